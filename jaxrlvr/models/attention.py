"""Causal grouped-query attention: one function, a backend per platform.

Every backend computes the same thing. Query t of row b sees key slot s when both carry the
same segment id and s is at or before the query's own slot:

    visible[b, t, s] = (kv_segments[b, s] == q_segments[b, t]) and (s <= q_slots[b, t])

Segments express left or right padding (segment 0 for padding, 1 for the sequence) and
packed rows (segments 1, 2, ... one per sequence). `q_slots` is the query's column in a
row (`arange(T)`) for a full pass, or its cache slot while decoding.

Backends (`ATTENTION_BACKENDS`):
- `reference`: the scores `[B, K, G, T, S]` materialised in float32; quadratic memory.
- `blocked`: flash attention in plain XLA. Keys are visited in blocks of `block` slots
  with an online softmax; the backward pass recomputes each block's probabilities from
  the saved log-sum-exp (a custom VJP), so memory is linear in the sequence length. Only
  the blocks up to the last visible slot are visited (a trip count set at run time), so
  a decode step costs the filled prefix of the cache, not its length: ragged decode.
- `splash`: the Pallas TPU splash (flash) attention kernel with segment ids, used where
  queries start at slot 0 (policy pass, update, prefill); decode steps use `blocked`.
- `cudnn`: `jax.nn.dot_product_attention` with the cuDNN fused kernel (GPU).
- `auto`: splash on TPU, cudnn on GPU, blocked elsewhere.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ATTENTION_BACKENDS = ("auto", "reference", "blocked", "splash", "cudnn")
_PLATFORM_BACKEND = {"tpu": "splash", "gpu": "cudnn"}
_NEEDS_PLATFORM = {"splash": "tpu", "cudnn": "gpu"}
_NEG = -0.7 * float(np.finfo(np.float32).max)  # masked score: finite, so no inf - inf

log = logging.getLogger(__name__)


class Visibility(NamedTuple):
    """Which key slots each query sees (see the module docstring)."""

    q_segments: Array  # [B, T] int
    kv_segments: Array  # [B, S] int
    q_slots: Array  # [B, T] int: the query's own slot; later slots are invisible
    # Static: q_slots == arange(T) and T == S (a full pass, or a prefill into slot 0).
    aligned: bool = False

    def mask(self) -> Array:  # [B, T, S] bool
        s = jnp.arange(self.kv_segments.shape[1])
        same = self.kv_segments[:, None, :] == self.q_segments[:, :, None]
        return same & (s[None, None, :] <= self.q_slots[:, :, None])


def current_platform() -> str:
    """The platform being traced for: the ambient mesh's devices (a TPU slice planned on a
    CPU host is TPU), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def platform_backend(backend: str, platform: str | None = None) -> str:
    """The backend that runs for `backend` on `platform` (default: `current_platform()`).

    `auto` picks the platform's kernel. A kernel the platform lacks is an error when asked
    for by name (`check_backend`); inside `attention` it falls back to `blocked`, once
    with a warning naming both.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; one of {ATTENTION_BACKENDS}")
    platform = platform or current_platform()
    if backend == "auto":
        return _PLATFORM_BACKEND.get(platform, "blocked")
    need = _NEEDS_PLATFORM.get(backend)
    if need is not None and platform != need:
        _warn_fallback(backend, platform)
        return "blocked"
    return backend


def check_backend(backend: str, platform: str | None = None) -> str | None:
    """Why `backend` cannot run on `platform`, or None when it can (for start-up checks)."""
    if backend not in ATTENTION_BACKENDS:
        return f"unknown attention backend {backend!r}; one of {', '.join(ATTENTION_BACKENDS)}"
    platform = platform or current_platform()
    need = _NEEDS_PLATFORM.get(backend)
    if need is not None and platform != need:
        return f"the {backend} kernel needs a {need.upper()}, and this run is on {platform}"
    return None


@functools.cache
def _warn_fallback(backend: str, platform: str) -> None:
    log.warning("attention: %s cannot run on %s; using blocked attention", backend, platform)


def attention(
    q: Array,  # [B, T, H, Dh]
    k: Array,  # [B, S, K, Dh]
    v: Array,  # [B, S, K, Dh]
    vis: Visibility,
    *,
    backend: str = "auto",
    block: int = 512,
) -> Array:  # [B, T, H, Dh]
    """softmax(q k^T / sqrt(Dh)) v over the visible slots, query heads grouped on KV heads."""
    kind = platform_backend(backend)
    if kind == "splash" and not vis.aligned:
        kind = "blocked"  # decode steps: queries at arbitrary cache slots
    if kind == "reference":
        return _reference(q, k, v, vis)
    if kind == "cudnn":
        return _cudnn(q, k, v, vis)
    if kind == "splash":
        from jaxrlvr.models import splash

        return splash.attention(q, k, v, vis)
    b, t, h, hd = q.shape
    n_kv = k.shape[2]
    qg = q.reshape(b, t, n_kv, h // n_kv, hd)
    bk = max(1, min(block, k.shape[1]))
    pad = -k.shape[1] % bk
    kv_seg = vis.kv_segments
    if pad:  # padded slots lie after every query's slot: never visible
        k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad)))
    # Blocks past the last visible slot are skipped: a run-time trip count (ragged decode).
    num_blocks = (jnp.max(vis.q_slots) + bk) // bk
    out = _flash(qg, k, v, vis.q_segments, kv_seg, vis.q_slots, num_blocks, bk)
    return out.reshape(b, t, h, hd)


# --------------------------------------------------------------------------- reference


def _reference(q, k, v, vis: Visibility) -> Array:
    b, t, h, hd = q.shape
    n_kv = k.shape[2]
    qg = q.reshape(b, t, n_kv, h // n_kv, hd)  # group query heads by their KV head
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(vis.mask()[:, None, None], scores * hd**-0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)


def _cudnn(q, k, v, vis: Visibility) -> Array:
    if vis.aligned:  # causal in the kernel; segments as a padding mask only when needed
        mask = vis.kv_segments[:, None, :] == vis.q_segments[:, :, None]
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], is_causal=True, implementation="cudnn"
        )
    return jax.nn.dot_product_attention(q, k, v, mask=vis.mask()[:, None], implementation="cudnn")


# --------------------------------------------------------------------------- blocked


def _block_scores(q, kb, q_seg, kv_seg_b, q_slots, j, bk):
    """Scaled, masked scores of one key block `[B, K, G, T, bk]` (float32) and its mask."""
    hd = q.shape[-1]
    s = jnp.einsum("btkgd,bskd->bkgts", q, kb, preferred_element_type=jnp.float32) * hd**-0.5
    slots = j * bk + jnp.arange(bk)
    ok = (kv_seg_b[:, None, :] == q_seg[:, :, None]) & (slots[None, None] <= q_slots[:, :, None])
    ok = ok[:, None, None]  # [B, 1, 1, T, bk]
    return jnp.where(ok, s, _NEG), ok


def _slice(x, j, bk):
    return jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1)


def _flash_forward(q, k, v, q_seg, kv_seg, q_slots, num_blocks, bk):
    """Online softmax over key blocks: output `[B, T, K, G, Dh]` and log-sum-exp
    `[B, K, G, T]` (float32)."""
    b, t, n_kv, g, hd = q.shape
    acc = jnp.zeros((b, n_kv, g, t, hd), jnp.float32)
    m = jnp.full((b, n_kv, g, t), _NEG, jnp.float32)
    l = jnp.zeros((b, n_kv, g, t), jnp.float32)  # noqa: E741

    def body(j, carry):
        acc, m, l = carry  # noqa: E741
        s, ok = _block_scores(q, _slice(k, j, bk), q_seg, _slice(kv_seg, j, bk), q_slots, j, bk)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum(
            "bkgts,bskd->bkgtd", p.astype(q.dtype), _slice(v, j, bk),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        return acc * corr[..., None] + pv, m_new, l * corr + jnp.sum(p, axis=-1)

    acc, m, l = jax.lax.fori_loop(0, num_blocks, body, (acc, m, l))  # noqa: E741
    l = jnp.maximum(l, jnp.finfo(jnp.float32).tiny)  # noqa: E741
    out = jnp.einsum("bkgtd->btkgd", acc / l[..., None]).astype(q.dtype)
    return out, m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_seg, kv_seg, q_slots, num_blocks, bk):
    return _flash_forward(q, k, v, q_seg, kv_seg, q_slots, num_blocks, bk)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, q_slots, num_blocks, bk):
    out, lse = _flash_forward(q, k, v, q_seg, kv_seg, q_slots, num_blocks, bk)
    return out, (q, k, v, q_seg, kv_seg, q_slots, num_blocks, out, lse)


def _flash_bwd(bk, res, d_out):
    """Recompute each block's probabilities from the log-sum-exp; accumulate dq, dk, dv."""
    q, k, v, q_seg, kv_seg, q_slots, num_blocks, out, lse = res
    hd = q.shape[-1]
    do = d_out.astype(jnp.float32)  # [B, T, K, G, Dh]
    delta = jnp.einsum("btkgd,btkgd->bkgt", do, out.astype(jnp.float32))  # rowsum(dO * O)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)

    def body(j, carry):
        dq, dk, dv = carry
        kb, vb = _slice(k, j, bk), _slice(v, j, bk)
        s, ok = _block_scores(q, kb, q_seg, _slice(kv_seg, j, bk), q_slots, j, bk)
        p = jnp.where(ok, jnp.exp(s - lse[..., None]), 0.0)  # [B, K, G, T, bk]
        dv_b = jnp.einsum("bkgts,btkgd->bskd", p, do)
        dp = jnp.einsum("btkgd,bskd->bkgts", do, vb.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * hd**-0.5
        dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kb.astype(jnp.float32))
        dk_b = jnp.einsum("bkgts,btkgd->bskd", ds, q.astype(jnp.float32))
        put = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(acc, x, j * bk, axis=1)  # noqa: E731
        return dq, put(dk, dk_b), put(dv, dv_b)

    dq, dk, dv = jax.lax.fori_loop(0, num_blocks, body, (dq, dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
