"""Token sampling: temperature, top-k, top-p, and the log-prob of the sampled token.

Everything is per row, with per-row settings as arrays, so one compiled function serves any
mix of greedy and sampled requests. Conventions (as Hugging Face `generate`):

- `temperature <= 0` is greedy (argmax of the raw logits), scored at T = 1.
- Filters apply in the order temperature -> top-k -> top-p; top-p is measured on the
  distribution renormalised over the top-k set. `top_k = 0` (or >= V) and `top_p = 1`
  are off. Tokens tied with the cut-off value are all kept.
- The returned log-prob is `log_softmax(logits / T)[token]` on the *untruncated*
  distribution: the behaviour-policy log-prob the PPO ratio needs
  (docs/algorithms.md#sampling-transforms).

No full-vocabulary sort (slow on CPU): the top-k / top-p cut-off is found by bisection on
the order-preserving integer image of the float logits (32 exact steps), and sampling is
an inverse-CDF draw with one uniform number per row, searched in two levels (chunks of
`_CHUNK` tokens, then within the chunk) so no length-V cumulative sum is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

_CHUNK = 256  # tokens per chunk of the two-level inverse-CDF search


def _sortable(x: Array) -> Array:
    """float32 -> uint32 with the same order (for bisection over float values)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    sign = bits >> 31
    return jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))


def _bisect(pred, batch: int) -> Array:
    """Smallest uint32 `u` per row with `pred(u)` true; `pred` is monotone and true at 2^32-1.

    `pred` maps `[B]` uint32 thresholds to `[B]` bool.
    """

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        ok = pred(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo = jnp.zeros((batch,), jnp.uint32)
    hi = jnp.full((batch,), jnp.iinfo(jnp.uint32).max, jnp.uint32)
    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def filter_weights(x: Array, w: Array, top_p: Array, top_k: Array) -> Array:
    """Zero the weights outside the top-k / top-p set.

    x `[B, V]` scaled logits; w `[B, V]` unnormalised probabilities `exp(x - max)`;
    top_p `[B]` float in (0, 1]; top_k `[B]` int (0 = off). Returns `[B, V]`.
    """
    v = x.shape[-1]
    keys = _sortable(x)  # [B, V]
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v + 1)  # [B]

    def count_above(u):  # [B] -> [B]: tokens strictly above threshold u
        return jnp.sum(keys > u[:, None], axis=-1)

    def mass_above(u):
        return jnp.sum(jnp.where(keys > u[:, None], w, 0.0), axis=-1)

    # Top-k: the smallest threshold u_k with fewer than k tokens strictly above it keeps
    # the tokens >= u_k; z_k is their mass. Skipped when no row uses top-k.
    def topk_mass():
        u_k = _bisect(lambda u: count_above(u) < k, x.shape[0])
        return jnp.sum(jnp.where(keys >= u_k[:, None], w, 0.0), axis=-1)

    z = jnp.sum(w, axis=-1)
    z_k = jax.lax.cond(jnp.any(k <= v), topk_mass, lambda: z)

    # Top-p over the top-k set: keep a token iff fewer than k tokens are above it and the
    # mass strictly above it is < top_p * z_k (HF: drop tokens whose ascending
    # cumulative probability is <= 1 - top_p).
    def keep_above(u):
        return (count_above(u) < k) & ((top_p >= 1.0) | (mass_above(u) < top_p * z_k))

    u = _bisect(keep_above, x.shape[0])
    return jnp.where(keys >= u[:, None], w, 0.0)


def inverse_cdf(w: Array, uniform: Array) -> Array:
    """Index i with `cumsum(w)[i-1] <= uniform * sum(w) < cumsum(w)[i]`, per row.

    w `[B, V]` non-negative weights with a positive sum; uniform `[B]` in [0, 1).
    Returns `[B]` int32, always an index with positive weight.
    """
    b, v = w.shape
    c = _CHUNK
    n_chunks = -(-v // c)
    w = jnp.pad(w, ((0, 0), (0, n_chunks * c - v))).reshape(b, n_chunks, c)
    chunk_mass = jnp.sum(w, axis=-1)  # [B, NC]
    chunk_cum = jnp.cumsum(chunk_mass, axis=-1)  # [B, NC]
    target = uniform * chunk_cum[:, -1]  # [B]
    ci = jnp.minimum(jnp.sum(chunk_cum <= target[:, None], axis=-1), n_chunks - 1)
    # Skip any trailing zero-mass chunks that float rounding could land on.
    last_nz_chunk = jnp.max(jnp.where(chunk_mass > 0, jnp.arange(n_chunks), 0), axis=-1)
    ci = jnp.minimum(ci, last_nz_chunk)
    base = jnp.where(ci > 0, jnp.take_along_axis(chunk_cum, (ci - 1)[:, None], -1)[:, 0], 0.0)
    inner = jnp.take_along_axis(w, ci[:, None, None], axis=1)[:, 0]  # [B, C]
    inner_cum = base[:, None] + jnp.cumsum(inner, axis=-1)
    ti = jnp.sum(inner_cum <= target[:, None], axis=-1)
    last_nz = jnp.max(jnp.where(inner > 0, jnp.arange(c), 0), axis=-1)
    return (ci * c + jnp.minimum(ti, last_nz)).astype(jnp.int32)


def sample_tokens(
    logits: Array,  # [B, V] float32
    keys: Array,  # [B, 2] uint32 raw PRNG keys, one per row (already per token)
    temperature: Array,  # [B] float32; <= 0 is greedy
    top_p: Array,  # [B] float32 in (0, 1]
    top_k: Array,  # [B] int32; 0 = off
) -> tuple[Array, Array]:
    """Sample one token per row; returns tokens `[B]` int32 and log-probs `[B]` float32."""
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0
    t = jnp.where(greedy, 1.0, temperature).astype(jnp.float32)
    x = logits / t[:, None]  # [B, V]
    m = jnp.max(x, axis=-1, keepdims=True)
    w = jnp.exp(x - m)
    lse = m[:, 0] + jnp.log(jnp.sum(w, axis=-1))  # [B]
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        v = x.shape[-1]
        needs_filter = ~greedy & ((top_p < 1.0) | ((top_k > 0) & (top_k < v)))
        wf = jax.lax.cond(
            jnp.any(needs_filter),
            lambda: jnp.where(needs_filter[:, None], filter_weights(x, w, top_p, top_k), w),
            lambda: w,
        )
        uniform = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
        return jnp.where(greedy, greedy_tokens, inverse_cdf(wf, uniform))

    tokens = jax.lax.cond(jnp.all(greedy), lambda: greedy_tokens, draw)
    logprobs = jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0] - lse
    return tokens, logprobs
