"""Token log-probs and entropies from logits, chunked over the sequence.

Formulas: docs/algorithms.md#token-entropy.

The LM head of Qwen2.5 has a 152k vocabulary: [B, T, V] float32 logits of a long rollout do
not fit in memory. ``token_logp_entropy`` takes the final hidden states and the LM-head
matrix instead, and computes the logits of ``chunk_size`` positions at a time inside a
``lax.map`` whose body is rematerialised (``jax.checkpoint``, unless ``remat=False``), so
neither the forward nor the backward pass holds more than one chunk of logits.
"""

from __future__ import annotations

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


def _logp_entropy_from_logits(
    logits: jax.Array,  # [..., V]
    targets: jax.Array,  # [...] int
    temperature: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    z = _shifted(logits.astype(jnp.float32) / temperature)  # [..., V], max 0
    e = jnp.exp(z)  # one exponential per logit serves both: softmax = e / sum(e)
    total = jnp.sum(e, axis=-1)  # [...] >= 1
    lse = jnp.log(total)
    z_tgt = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return z_tgt - lse, lse - jnp.sum(e * z, axis=-1) / total


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
    unembed: jax.Array,  # [D, V] LM-head matrix (embedding.T when tied)
    targets: jax.Array,  # [B, T] int, the token each position predicts
    *,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    remat: bool = True,
) -> tuple[jax.Array, jax.Array]:  # (logp [B, T], entropy [B, T]) float32
    """log softmax(z / T)[target] and the entropy of softmax(z / T), z = hidden @ unembed.

    The logits are computed ``chunk_size`` positions at a time (matmul accumulated in
    float32), so at most [B, chunk_size, V] float32 logits exist at once in the forward
    pass, and in the backward pass too with `remat` (each chunk's logits recomputed; without
    it the backward pass keeps every chunk's, trading memory for a third less LM-head
    work). Differentiable w.r.t. ``hidden`` and ``unembed``; position ``t`` of
    ``hidden`` must be the state that predicts ``targets[:, t]``.
    """

    def chunk(h: jax.Array, tgt: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = jnp.einsum("bcd,dv->bcv", h, unembed, preferred_element_type=jnp.float32)
        return _logp_entropy_from_logits(logits, tgt, temperature)

    logp, ent = map_sequence_chunks(chunk, (hidden, targets), chunk_size=chunk_size, remat=remat)
    return logp, ent
