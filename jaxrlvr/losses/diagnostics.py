"""Entropy diagnostics (docs/algorithms.md#entropy-diagnostics): covariance distribution,
advantage shares and the first-order entropy-change check of Cui et al. (Lemma 1).

All functions return float32 scalars (dicts of them) or per-position arrays and are
jit-compatible; the trainer turns the scalars into metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlvr.losses.entropy import DEFAULT_CHUNK_SIZE, head_logits, map_sequence_chunks
from jaxrlvr.losses.policy import masked_mean

__all__ = [
    "COV_TOP_FRACTIONS",
    "advantage_stats",
    "cov_stats",
    "entropy_change",
    "entropy_change_summary",
    "token_entropy_change",
]

# Metric key -> fraction of valid tokens (Cui et al. Table 1).
COV_TOP_FRACTIONS = {
    "cov_top_0.02pct": 0.0002,
    "cov_top_0.2pct": 0.002,
    "cov_top_2pct": 0.02,
    "cov_top_20pct": 0.2,
    "cov_top_50pct": 0.5,
}


def cov_stats(
    cov: jax.Array,  # [B, L] from token_covariance
    mask: jax.Array,  # [B, L]
) -> dict[str, jax.Array]:
    """``cov_mean`` over valid tokens and ``cov_top_*``: the mean cov of the top
    k = max(1, floor(frac * N_valid)) valid tokens by cov. All 0 when no token is valid."""
    valid = jnp.asarray(mask).astype(bool).reshape(-1)
    c = jnp.asarray(cov, jnp.float32).reshape(-1)
    n_valid = jnp.sum(valid)
    srt = jnp.sort(jnp.where(valid, c, -jnp.inf), descending=True)  # valid entries first
    csum = jnp.cumsum(jnp.where(jnp.arange(c.size) < n_valid, srt, 0.0))
    out = {"cov_mean": masked_mean(c, valid)}
    for name, frac in COV_TOP_FRACTIONS.items():
        k = jnp.maximum(jnp.floor(frac * n_valid.astype(jnp.float32) * (1.0 + 1e-6)), 1.0)
        top = csum[k.astype(jnp.int32) - 1] / k
        out[name] = jnp.where(n_valid > 0, top, 0.0)
    return out


def advantage_stats(
    advantages: jax.Array,  # [B, L]
    mask: jax.Array,  # [B, L]
) -> dict[str, jax.Array]:
    """Token shares of A > 0 and A < 0 among valid tokens and the mean |A| of each set."""
    adv = jnp.asarray(advantages, jnp.float32)
    valid = jnp.asarray(mask).astype(bool)
    pos = valid & (adv > 0)
    neg = valid & (adv < 0)
    return {
        "advantage_pos_frac": masked_mean(pos, valid),
        "advantage_neg_frac": masked_mean(neg, valid),
        "advantage_pos_abs_mean": masked_mean(jnp.abs(adv), pos),
        "advantage_neg_abs_mean": masked_mean(jnp.abs(adv), neg),
    }


def entropy_change(
    logits_before: jax.Array,  # [..., V]
    logits_after: jax.Array,  # [..., V]
    temperature: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array]:  # (dH_actual [...], dH_predicted [...]) float32
    """Actual entropy change H(z') - H(z) and Cui et al.'s Lemma-1 prediction
    ``-Cov_{a~pi}(log pi(a), z'_a - z_a)``, pi = softmax(z), with z = logits / T (the
    logits of the tempered policy whose entropy is logged)."""
    z0 = jnp.asarray(logits_before).astype(jnp.float32) / temperature
    z1 = jnp.asarray(logits_after).astype(jnp.float32) / temperature
    logp0 = jax.nn.log_softmax(z0, axis=-1)
    logp1 = jax.nn.log_softmax(z1, axis=-1)
    p0 = jnp.exp(logp0)
    p1 = jnp.exp(logp1)
    h0 = -jnp.sum(p0 * logp0, axis=-1)
    h1 = -jnp.sum(p1 * logp1, axis=-1)
    dz = z1 - z0
    dz = dz - jnp.sum(p0 * dz, axis=-1, keepdims=True)  # centre: Cov = E[log pi * (dz - E dz)]
    predicted = -jnp.sum(p0 * logp0 * dz, axis=-1)
    return h1 - h0, predicted


def token_entropy_change(
    hidden_before: jax.Array,  # [B, T, D]
    unembed_before: jax.Array,  # [D, V], or [V, D] with vocab_major
    hidden_after: jax.Array,  # [B, T, D]
    unembed_after: jax.Array,  # [D, V], or [V, D] with vocab_major
    *,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_major: bool = False,
) -> tuple[jax.Array, jax.Array]:  # (dH_actual [B, T], dH_predicted [B, T])
    """``entropy_change`` per position from the hidden states and LM heads of the policy
    before and after the step's updates, chunked over T like ``token_logp_entropy``.
    `vocab_major` reads the heads as `[V, D]` (a tied embedding as stored)."""

    def chunk(h0: jax.Array, h1: jax.Array) -> tuple[jax.Array, jax.Array]:
        z0 = head_logits(h0, unembed_before, vocab_major)  # [B, C, V]
        z1 = head_logits(h1, unembed_after, vocab_major)
        return entropy_change(z0, z1, temperature)

    hidden_before = jax.lax.stop_gradient(hidden_before)
    hidden_after = jax.lax.stop_gradient(hidden_after)
    unembed_before = jax.lax.stop_gradient(unembed_before)
    unembed_after = jax.lax.stop_gradient(unembed_after)
    actual, predicted = map_sequence_chunks(
        chunk, (hidden_before, hidden_after), chunk_size=chunk_size, remat=False
    )
    return actual, predicted


def entropy_change_summary(
    dh_actual: jax.Array,  # [B, T]
    dh_predicted: jax.Array,  # [B, T]
    mask: jax.Array,  # [B, T]
) -> dict[str, jax.Array]:
    """Token means of the actual and predicted change over valid tokens and their Pearson
    correlation across those tokens (0 if either is constant): ``dH_actual``,
    ``dH_predicted``, ``dH_corr``."""
    valid = jnp.asarray(mask).astype(bool)
    a = jnp.asarray(dh_actual, jnp.float32)
    p = jnp.asarray(dh_predicted, jnp.float32)
    ma = masked_mean(a, valid)
    mp = masked_mean(p, valid)
    da = jnp.where(valid, a - ma, 0.0)
    dp = jnp.where(valid, p - mp, 0.0)
    # Rescale before squaring so that tiny entropy changes do not underflow in float32.
    da = da / jnp.maximum(jnp.max(jnp.abs(da)), 1e-30)
    dp = dp / jnp.maximum(jnp.max(jnp.abs(dp)), 1e-30)
    sa = jnp.sqrt(jnp.sum(da * da))
    sp = jnp.sqrt(jnp.sum(dp * dp))
    ok = (sa > 0) & (sp > 0)
    corr = jnp.where(ok, jnp.sum(da * dp) / jnp.where(ok, sa * sp, 1.0), 0.0)
    return {"dH_actual": ma, "dH_predicted": mp, "dH_corr": corr}
