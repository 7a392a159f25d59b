"""The sampler/learner mismatch: its measures, and the corrections of verl's rollout
correction (truncated importance sampling, rejection sampling).

The rollouts come from the sampler's copy of the policy (its own dtype), the loss from
the learner's old log-probs. With `d = old_logp - sampler_logp` per response token, the
importance ratio of the learner's policy to the sampler's is `exp(d)` per token, or
`exp(sum_t d)` per sequence. Every function here is pure and jit-able; inputs `[B, R]`
with a 0/1 `mask` over the response tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LEVELS = ("none", "token", "sequence")


def _log_ratio(old_logp, sampler_logp, mask, level: str) -> jax.Array:
    """`[B, R]` log importance ratio: per token, or the sequence's sum on all its tokens."""
    d = (jnp.asarray(old_logp, jnp.float32) - jnp.asarray(sampler_logp, jnp.float32)) * mask
    if level == "sequence":
        return jnp.broadcast_to(jnp.sum(d, -1, keepdims=True), d.shape)
    return d


def rollout_is_weights(
    old_logp: jax.Array,  # [B, R]
    sampler_logp: jax.Array,  # [B, R]
    mask: jax.Array,  # [B, R]
    *,
    level: str,
    threshold: float,
) -> tuple[jax.Array, jax.Array]:  # (weights [B, R], truncated [B, R])
    """Truncated importance weights `min(w, threshold)` (detached; 1 off the mask) and
    where the truncation acted. `w = exp(d)` per token or `exp(sum d)` per sequence."""
    log_w = jax.lax.stop_gradient(_log_ratio(old_logp, sampler_logp, mask, level))
    cap = jnp.log(jnp.float32(threshold))
    weights = jnp.exp(jnp.minimum(log_w, cap))  # in log space: no overflow of exp(sum d)
    return jnp.where(mask > 0, weights, 1.0), ((log_w > cap) & (mask > 0)).astype(jnp.float32)


def rollout_rs_keep(
    old_logp: jax.Array,  # [B, R]
    sampler_logp: jax.Array,  # [B, R]
    mask: jax.Array,  # [B, R]
    *,
    level: str,
    lower: float,
    upper: float,
) -> jax.Array:  # [B, R] 1 = kept
    """Rejection sampling: 1 where the importance ratio lies in `[lower, upper]` (per
    token, or the whole sequence by its ratio), else 0; 0 off the mask."""
    log_w = jax.lax.stop_gradient(_log_ratio(old_logp, sampler_logp, mask, level))
    inside = (log_w >= jnp.log(jnp.float32(lower))) & (log_w <= jnp.log(jnp.float32(upper)))
    return (inside & (mask > 0)).astype(jnp.float32)


def mismatch_metrics(
    logp: jax.Array,  # [B, R] the learner's log-probs before the step's updates
    sampler_logp: jax.Array,  # [B, R]
    mask: jax.Array,  # [B, R]
) -> dict[str, jax.Array]:
    """How far the sampler's policy is from the learner's, over the response tokens.

    `mismatch_kl`: token-mean of `exp(d) - 1 - d`, `d = logp - sampler_logp` (k3, an
    unbiased estimate of KL(sampler || learner) on the sampler's tokens);
    `mismatch_logp_abs_diff_mean` / `_max`: |d|; `mismatch_prob_pearson`: the Pearson
    correlation of the two token probabilities; `mismatch_seq_log_ratio_abs_mean`: the
    mean over sequences of |sum_t d|; `sampler_entropy`: `-token-mean(sampler_logp)`, the
    sampler's per-token entropy estimated from its own samples."""
    logp, sampler_logp = jnp.asarray(logp, jnp.float32), jnp.asarray(sampler_logp, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    mean = lambda x: jnp.sum(x * mask) / tokens  # noqa: E731
    d = jnp.clip(logp - sampler_logp, -20.0, 20.0) * mask
    p, q = jnp.exp(logp), jnp.exp(sampler_logp)
    cov = mean((p - mean(p)) * (q - mean(q)))
    spread = jnp.sqrt(mean((p - mean(p)) ** 2) * mean((q - mean(q)) ** 2))
    sequences = jnp.sum(mask, -1) > 0
    seq_abs = jnp.abs(jnp.sum(d, -1))
    return {
        "mismatch_kl": mean(jnp.exp(d) - 1.0 - d),
        "mismatch_logp_abs_diff_mean": mean(jnp.abs(d)),
        "mismatch_logp_abs_diff_max": jnp.max(jnp.abs(d)),
        "mismatch_prob_pearson": jnp.where(spread > 0, cov / jnp.maximum(spread, 1e-30), 0.0),
        "mismatch_seq_log_ratio_abs_mean": jnp.sum(seq_abs * sequences)
        / jnp.maximum(jnp.sum(sequences), 1),
        "sampler_entropy": -mean(sampler_logp),
    }
