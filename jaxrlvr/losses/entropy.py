"""Token log-probs and entropies from logits, chunked over the sequence.

Formulas: docs/algorithms.md#token-entropy.

The LM head of Qwen2.5 has a 152k vocabulary: [B, T, V] float32 logits of a long rollout do
not fit in memory. ``token_logp_entropy`` takes the final hidden states and the LM-head
matrix instead, and computes the logits of ``chunk_size`` positions at a time inside a
``lax.map``; its hand-written VJP recomputes a chunk's logits in the backward pass (unless
``remat=False``), so neither pass holds more than one chunk of logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["entropy_from_logits", "map_sequence_chunks", "token_logp_entropy"]

DEFAULT_CHUNK_SIZE = 128


def entropy_from_logits(
    logits: jax.Array,  # [..., V] any float dtype
    temperature: float | jax.Array = 1.0,
) -> jax.Array:  # [...] float32
    """Entropy of softmax(logits / T): ``logsumexp(z) - sum softmax(z) z`` with z = logits / T."""
    z = _shifted(jnp.asarray(logits).astype(jnp.float32) / temperature)  # [..., V], max 0
    lse = jax.nn.logsumexp(z, axis=-1)  # [...]
    p = jnp.exp(z - lse[..., None])  # [..., V]
    return lse - jnp.sum(p * z, axis=-1)


def _shifted(z: jax.Array) -> jax.Array:
    """z - max(z) over the vocabulary (constant shift: same softmax, same gradient).

    Keeps ``lse - sum(p z)`` free of cancellation when the logits are large.
    """
    return z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))


def map_sequence_chunks(
    fn: Callable[..., tuple[jax.Array, ...]],
    seq_args: tuple[jax.Array, ...],  # each [B, T, ...]
    *,
    chunk_size: int,
    remat: bool = True,
) -> tuple[jax.Array, ...]:  # each [B, T, ...]
    """Apply ``fn`` to chunks of ``chunk_size`` positions along axis 1 and re-join the outputs.

    ``fn`` maps chunks ``[B, C, ...]`` of every array in ``seq_args`` to a tuple of arrays
    ``[B, C, ...]``. T need not divide by ``chunk_size``: the arrays are zero-padded and
    the padding is cut from the result. With ``remat`` each chunk is recomputed in the
    backward pass instead of storing its intermediates (the [B, C, V] logits).
    """
    b, t = seq_args[0].shape[:2]
    c = max(1, min(int(chunk_size), t))
    n = -(-t // c)
    pad = n * c - t

    def split(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [n, B, C, ...]
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)

    def join(y: jax.Array) -> jax.Array:  # [n, B, C, ...] -> [B, T, ...]
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape((b, n * c) + y.shape[3:])[:, :t]

    body = jax.checkpoint(fn) if remat else fn
    if n == 1:
        outs = body(*[split(x)[0] for x in seq_args])
        return tuple(join(o[None]) for o in outs)
    outs = jax.lax.map(lambda xs: body(*xs), tuple(split(x) for x in seq_args))
    return tuple(join(o) for o in outs)


def token_logp_entropy(
    hidden: jax.Array,  # [B, T, D] final hidden states (after the final norm), any dtype
    unembed: jax.Array,  # [D, V] LM-head matrix ([V, D] with vocab_major)
    targets: jax.Array,  # [B, T] int, the token each position predicts
    *,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    remat: bool = True,
    vocab_major: bool = False,
) -> tuple[jax.Array, jax.Array]:  # (logp [B, T], entropy [B, T]) float32
    """log softmax(z / T)[target] and the entropy of softmax(z / T), z = hidden @ unembed.

    The logits are computed ``chunk_size`` positions at a time (matmul accumulated in
    float32), so at most [B, chunk_size, V] float32 logits exist at once in the forward
    pass, and in the backward pass too with `remat` (each chunk's logits recomputed; without
    it the backward pass keeps every chunk's, trading memory for a quarter less LM-head
    work). Differentiable w.r.t. ``hidden`` and ``unembed`` (a hand-written VJP: one pass
    over the logits each way); position ``t`` of ``hidden`` must be the state that predicts
    ``targets[:, t]``. `vocab_major`: `unembed` is `[V, D]` (a tied embedding as stored:
    no transposed copy of it is made).
    """
    temperature = jnp.asarray(temperature, jnp.float32)

    def chunk(h: jax.Array, tgt: jax.Array) -> tuple[jax.Array, jax.Array]:
        # On rows [B C, D]: XLA:CPU runs the reductions over a [B, C, V] dot output about
        # 3x slower than over the same logits as a matrix.
        b, c, d = h.shape
        logp, ent = _head_rows(
            h.reshape(b * c, d), unembed, tgt.reshape(b * c), temperature, remat, vocab_major
        )
        return logp.reshape(b, c), ent.reshape(b, c)

    return map_sequence_chunks(chunk, (hidden, targets), chunk_size=chunk_size, remat=False)


def head_logits(hidden: jax.Array, unembed: jax.Array, vocab_major: bool = False) -> jax.Array:
    """float32 logits `[..., V]` of hidden states `[..., D]` through the LM head, `[D, V]`
    (or `[V, D]` with `vocab_major`: a tied embedding as stored)."""
    spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
    return jnp.einsum(spec, hidden, unembed, preferred_element_type=jnp.float32)


# The backward products of `head_logits` on rows: (to the hidden states, to the head).
_GRAD_SPECS = {False: ("nv,dv->nd", "nd,nv->dv"), True: ("nv,vd->nd", "nd,nv->vd")}


def _row_stats(h, unembed, tgt, temperature, vocab_major):
    """Logits `[N, V]` (float32) and per row: the shift m = max(z), log sum exp(z - m),
    E_p[z] - m, and z[target] - m, for z = logits / T."""
    logits = head_logits(h, unembed, vocab_major)  # [N, V]
    z = logits / temperature
    m = jnp.max(z, axis=-1)  # [N]
    e = jnp.exp(z - m[:, None])  # one exponential per logit serves every statistic
    total = jnp.sum(e, axis=-1)  # >= 1
    mean_shifted = jnp.sum(e * (z - m[:, None]), axis=-1) / total  # no cancellation
    z_tgt = jnp.take_along_axis(logits, tgt[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return logits, m, jnp.log(total), mean_shifted, z_tgt / temperature - m


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_rows(h, unembed, tgt, temperature, remat, vocab_major):
    """(log-prob, entropy) `[N]` of rows h `[N, D]`: logp = z_tgt - lse, H = lse - E_p[z]."""
    _, _, lse, mean_shifted, z_tgt = _row_stats(h, unembed, tgt, temperature, vocab_major)
    return z_tgt - lse, lse - mean_shifted


def _head_rows_fwd(h, unembed, tgt, temperature, remat, vocab_major):
    logits, m, lse, mean_shifted, z_tgt = _row_stats(h, unembed, tgt, temperature, vocab_major)
    kept = None if remat else logits
    res = (h, unembed, tgt, temperature, kept, m, lse, mean_shifted)
    return (z_tgt - lse, lse - mean_shifted), res


def _head_rows_bwd(remat, vocab_major, res, cotangents):
    """d logp / dz = onehot - p and d H / dz = p (E_p[z] - z), chained through the matmul."""
    h, unembed, tgt, temperature, logits, m, lse, mean_shifted = res
    g_logp, g_ent = cotangents  # [N]
    to_h, to_w = _GRAD_SPECS[vocab_major]
    if logits is None:
        logits = head_logits(h, unembed, vocab_major)
    zs = logits / temperature - m[:, None]  # z - m
    p = jnp.exp(zs - lse[:, None])
    onehot = jnp.arange(zs.shape[-1]) == tgt[:, None]  # elementwise: fuses, unlike a scatter
    g_z = jnp.where(onehot, g_logp[:, None], 0.0) - p * (
        g_logp[:, None] + g_ent[:, None] * (zs - mean_shifted[:, None])
    )
    g_logits = g_z / temperature  # [N, V] float32
    g_h = jnp.einsum(to_h, g_logits, unembed, preferred_element_type=jnp.float32)
    g_w = jnp.einsum(to_w, h, g_logits, preferred_element_type=jnp.float32)
    g_h, g_w = g_h.astype(h.dtype), g_w.astype(unembed.dtype)
    # d / dT: z = logits / T, so dz/dT = -z / T; the statistics are shift-invariant.
    g_t = -jnp.sum(g_z * (zs + m[:, None])) / temperature
    return g_h, g_w, None, g_t


_head_rows.defvjp(_head_rows_fwd, _head_rows_bwd)
