"""PPO clipped surrogate, loss aggregation and KL estimators.

Formulas: docs/algorithms.md#ppo-clipped-surrogate, #loss-aggregation and #kl-penalty.

Aggregation and gradient accumulation
-------------------------------------
The denominators of every aggregation mode are taken over the whole mini-batch
(one optimizer update), so that the loss, and its gradient, do not depend on how the
mini-batch is split into micro-batches. The API makes this explicit:

* ``agg_norm(mask)`` computes the denominators (an ``AggNorm``) from the mask of the whole
  mini-batch, once per optimizer update.
* ``aggregate(x, mask, mode, norm)`` aggregates one micro-batch with those denominators.
  Summing it over the micro-batches gives exactly ``aggregate(x_full, mask_full, mode)``,
  and so does the sum of the micro-batch gradients (the aggregate is linear in ``x`` with
  weights that depend only on the mask). With ``norm=None`` the micro-batch is its own
  mini-batch.
* ``aggregation_weights(mask, mode, norm)`` returns the per-token weights ``w`` with
  ``aggregate(x, mask, mode, norm) == sum(x * w)`` for callers who want to fuse weights.

So a trainer computes ``norm = agg_norm(minibatch_mask)`` before its scan over
micro-batches, passes ``norm`` to every micro-batch loss and *sums* (does not average)
the micro-batch losses and gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "AggNorm",
    "PPOTerms",
    "agg_norm",
    "aggregate",
    "aggregation_weights",
    "gspo_token_loss",
    "kl_penalty",
    "log_ratio",
    "masked_mean",
    "masked_sum",
    "ppo_token_loss",
]

AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("k1", "k2", "k3")
LOG_RATIO_CLIP = 20.0


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(x * m) in float32 (``mask`` bool or float, same shape as ``x``)."""
    return jnp.sum(_f32(x) * _f32(mask))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(x * m) / sum(m); 0 when the mask is empty."""
    m = _f32(mask)
    return jnp.sum(_f32(x) * m) / jnp.maximum(jnp.sum(m), 1.0)


def log_ratio(logp: jax.Array, old_logp: jax.Array) -> jax.Array:
    """d = clip(logp - old_logp, -20, 20), float32 (docs/algorithms.md#log-ratio-clamp)."""
    return jnp.clip(_f32(logp) - _f32(old_logp), -LOG_RATIO_CLIP, LOG_RATIO_CLIP)


class PPOTerms(NamedTuple):
    """Per-token outputs of ``ppo_token_loss`` (all [B, L] float32).

    loss: the clipped surrogate l (to be aggregated; gradient flows through it).
    clipped: 1 where l2 > l1 (PPO clip active) -> ``pg_clipfrac = masked_mean(clipped)``.
    dual_clipped: 1 where the dual clip is active (A < 0 and l > -A c); 0 without dual
        clip -> ``pg_clipfrac_lower``.
    ratio: r = exp(d), stop-gradient (metrics only).
    """

    loss: jax.Array
    clipped: jax.Array
    dual_clipped: jax.Array
    ratio: jax.Array


def ppo_token_loss(
    logp: jax.Array,  # [B, L] current policy
    old_logp: jax.Array,  # [B, L] behaviour policy
    advantages: jax.Array,  # [B, L] per-token advantage
    eps_low: float | jax.Array,
    eps_high: float | jax.Array,
    dual_clip: float | jax.Array | None = None,
) -> PPOTerms:
    """PPO clipped surrogate per token (docs/algorithms.md#ppo-clipped-surrogate).

    ``l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` with ``r = exp(clip(logp -
    old_logp, -20, 20))``; with ``dual_clip=c`` and ``A < 0`` additionally ``min(l, -A c)``.
    ``eps_high > eps_low`` is DAPO's Clip-Higher. Masks are applied by ``aggregate``.
    """
    adv = jax.lax.stop_gradient(_f32(advantages))
    ratio = jnp.exp(log_ratio(logp, old_logp))  # [B, L]
    l1 = -adv * ratio
    l2 = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(l1, l2)
    clipped = (l2 > l1).astype(jnp.float32)
    if dual_clip is None:
        dual_clipped = jnp.zeros_like(loss)
    else:
        l3 = -adv * dual_clip
        neg = adv < 0
        dual_clipped = (neg & (loss > l3)).astype(jnp.float32)
        loss = jnp.where(neg, jnp.minimum(loss, l3), loss)
    return PPOTerms(loss, clipped, dual_clipped, jax.lax.stop_gradient(ratio))


def gspo_token_loss(
    logp: jax.Array,  # [B, L] current policy
    old_logp: jax.Array,  # [B, L] behaviour policy
    advantages: jax.Array,  # [B, L] per-token advantage (constant along a sequence)
    mask: jax.Array,  # [B, L] response tokens
    eps_low: float | jax.Array,
    eps_high: float | jax.Array,
    log_ratio_cap: float = 10.0,
) -> PPOTerms:
    """GSPO's clipped surrogate per token (Zheng et al. 2025; docs/algorithms.md#gspo).

    The importance ratio is the sequence's, ``s = exp(mean_t(logp - old_logp))`` over its
    response tokens, written per token as ``log s_t = logp_t - sg(logp_t) + sg(log s)``
    (value: the sequence ratio; gradient: each token's own log-prob), capped at
    ``log_ratio_cap`` as verl does; then ``l = max(-A s_t, -A clip(s_t, 1 - eps_low,
    1 + eps_high))``. No dual clip. Masks are applied by ``aggregate``.
    """
    adv = jax.lax.stop_gradient(_f32(advantages))
    m = _f32(mask)
    d = (_f32(logp) - _f32(old_logp)) * m
    seq = jnp.sum(d, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(m, -1, keepdims=True), 1.0)
    sg = jax.lax.stop_gradient
    log_s = jnp.minimum(_f32(logp) - sg(_f32(logp)) + sg(seq), log_ratio_cap)  # [B, L]
    ratio = jnp.exp(log_s)
    l1 = -adv * ratio
    l2 = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(l1, l2)
    clipped = (l2 > l1).astype(jnp.float32)
    return PPOTerms(loss, clipped, jnp.zeros_like(loss), sg(ratio))


class AggNorm(NamedTuple):
    """Denominators of the aggregation modes, taken over a whole mini-batch (scalars, f32).

    num_tokens: sum(m)                                  (token-mean)
    num_seqs: number of sequences B                     (seq-mean-token-sum, -norm)
    num_nonempty_seqs: sequences with sum_t m > 0       (seq-mean-token-mean)
    max_len: L_max                                      (seq-mean-token-sum-norm)
    """

    num_tokens: jax.Array
    num_seqs: jax.Array
    num_nonempty_seqs: jax.Array
    max_len: jax.Array


def agg_norm(mask: jax.Array, max_len: int | jax.Array | None = None) -> AggNorm:
    """Denominators of ``mask`` ([B, L]) for ``aggregate``; call it on the whole mini-batch.

    ``max_len`` is Dr. GRPO's L_max for ``seq-mean-token-sum-norm``; default the padded
    width L of ``mask`` (the generation budget when rollouts are padded to
    ``max_new_tokens``). Pass the configured budget if widths vary between batches.
    """
    m = _f32(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be [B, L], got shape {m.shape}")
    b, width = m.shape
    seq_tokens = m.sum(axis=1)  # [B]
    return AggNorm(
        num_tokens=m.sum(),
        num_seqs=jnp.float32(b),
        num_nonempty_seqs=jnp.sum(seq_tokens > 0).astype(jnp.float32),
        max_len=jnp.asarray(width if max_len is None else max_len, jnp.float32),
    )


def aggregation_weights(
    mask: jax.Array,  # [b, L] (a micro-batch, or the whole mini-batch)
    mode: str,
    norm: AggNorm | None = None,
) -> jax.Array:  # [b, L] float32, zero on invalid tokens
    """Per-token weights w with ``aggregate(x, mask, mode, norm) == sum(x * w)``.

    ``norm`` holds the whole-mini-batch denominators (``agg_norm`` of the mini-batch mask);
    ``None`` uses ``agg_norm(mask)``. For ``seq-mean-token-mean`` the per-sequence token
    count comes from ``mask`` itself (sequences are never split between micro-batches).
    Empty denominators count as 1, so an all-masked batch aggregates to 0.
    """
    m = _f32(mask)
    if norm is None:
        norm = agg_norm(m)
    if mode == "token-mean":
        return m / jnp.maximum(norm.num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        seq_tokens = m.sum(axis=1, keepdims=True)  # [b, 1]
        return m / jnp.maximum(seq_tokens, 1.0) / jnp.maximum(norm.num_nonempty_seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return m / jnp.maximum(norm.num_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return m / jnp.maximum(norm.num_seqs * norm.max_len, 1.0)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")


def aggregate(
    x: jax.Array,  # [b, L] per-token quantity
    mask: jax.Array,  # [b, L]
    mode: str = "token-mean",
    norm: AggNorm | None = None,
) -> jax.Array:  # scalar float32
    """Aggregate a per-token quantity over valid tokens by one of ``AGG_MODES``.

    With ``norm=None`` the denominators come from ``mask`` (docs/algorithms.md#loss-aggregation).
    For gradient accumulation pass ``norm=agg_norm(minibatch_mask)`` and sum over micro-batches.
    """
    return jnp.sum(_f32(x) * aggregation_weights(mask, mode, norm))


def kl_penalty(
    logp: jax.Array,  # [B, L]
    ref_logp: jax.Array,  # [B, L]
    estimator: str = "k3",
    clamp: float = 0.0,
) -> jax.Array:  # [B, L] float32
    """Per-token KL(pi || ref) estimate: k1, k2 or k3 (Schulman's low-variance one).

    k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1.
    For k3 the log-ratio is clipped to [-20, 20] (as the policy ratio) so exp cannot
    overflow; this changes nothing for |ref - logp| < 20. With `clamp > 0`, k3 itself is
    clipped to [-clamp, clamp] as verl's "low_var_kl" does (value 10 there): a token far
    from the reference then adds at most `clamp` and no gradient.
    """
    d = _f32(logp) - _f32(ref_logp)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        nd = jnp.clip(-d, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
        k3 = jnp.exp(nd) - nd - 1.0
        return jnp.clip(k3, -clamp, clamp) if clamp > 0 else k3
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
