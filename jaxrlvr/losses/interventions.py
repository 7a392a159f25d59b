"""Entropy interventions (docs/algorithms.md#entropy-interventions): token weights,
selections and controllers.

Every function is pure and jit-compatible (static shapes; dynamic counts such as
``n = max(1, floor(ratio * N_valid))`` are handled by ranking under a mask, never by
Python branching on traced values). Weights and selection masks are ``stop_gradient``.

Controllers are NamedTuple pytrees of float32 scalars that the trainer carries in its
train state (and checkpoints with it); their ``*_update`` functions are called once per
training step with that step's entropy:

* ``AdaptiveEntropyState(alpha)``  -- Skywork-OR1 adaptive entropy coefficient.
* ``LambdaState(lam)``             -- positive-advantage weight of the ``pos_adv`` family.

Selections (Clip-Cov, KL-Cov, Rand-Pos-Clip) and covariances are computed over the batch
passed in (in the reference code, verl, this is the micro-batch of the loss call).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrlvr.losses.policy import PPOTerms, log_ratio, masked_mean, ppo_token_loss

__all__ = [
    "POS_ADV_SCHEDULES",
    "AdaptiveEntropyState",
    "LambdaState",
    "adaptive_entropy_coef",
    "adaptive_entropy_init",
    "adaptive_entropy_update",
    "clip_cov_select",
    "clip_cov_token_loss",
    "entropy_estimate",
    "entropy_guided_update",
    "epoch_lambda",
    "kl_cov_select",
    "kl_cov_token_loss",
    "lambda_init",
    "lambda_update",
    "pos_adv_lambda",
    "pos_adv_weights",
    "rand_pos_clip_select",
    "selection_count",
    "stage_lambda",
    "steer_omega",
    "steer_weights",
    "token_covariance",
]

POS_ADV_SCHEDULES = ("constant", "stage", "epoch", "entropy_guided", "rand_pos_clip")
# Relative nudge so that floor(ratio * N) in float32 does not fall one short of the
# float64 value (e.g. 0.3 * 10 -> 2.9999998) because of the rounding of ``ratio``.
_FLOOR_NUDGE = 1e-6


def _valid(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask).astype(bool)


def selection_count(ratio: float | jax.Array, mask: jax.Array) -> jax.Array:
    """n = max(1, floor(ratio * N_valid)) as int32, N_valid = number of valid tokens."""
    n_valid = jnp.sum(_valid(mask)).astype(jnp.float32)
    n = jnp.floor(ratio * n_valid * (1.0 + _FLOOR_NUDGE))
    return jnp.maximum(n, 1.0).astype(jnp.int32)


def _top_n(scores: jax.Array, eligible: jax.Array, n: jax.Array) -> jax.Array:
    """0/1 mask of the min(n, #eligible) eligible entries with the largest scores.

    Exact count under jit: entries are ranked by a stable descending sort of the scores
    (ineligible ones last), ties broken by position.
    """
    shape = scores.shape
    s = jnp.where(eligible, scores.astype(jnp.float32), -jnp.inf).reshape(-1)
    order = jnp.argsort(s, descending=True, stable=True)
    rank = jnp.zeros(s.shape, jnp.int32).at[order].set(jnp.arange(s.size, dtype=jnp.int32))
    selected = eligible.reshape(-1) & (rank < n)
    return selected.reshape(shape).astype(jnp.float32)


def token_covariance(
    logp: jax.Array,  # [B, L]
    advantages: jax.Array,  # [B, L]
    mask: jax.Array,  # [B, L]
) -> jax.Array:  # [B, L] float32, stop-gradient
    """cov = (A - mean_m A) (logp - mean_m logp), means over valid tokens; 0 elsewhere."""
    logp = jax.lax.stop_gradient(jnp.asarray(logp, jnp.float32))
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    valid = _valid(mask)
    cov = (adv - masked_mean(adv, valid)) * (logp - masked_mean(logp, valid))
    return jnp.where(valid, cov, 0.0)


def clip_cov_select(
    key: jax.Array,  # PRNG key
    cov: jax.Array,  # [B, L] from token_covariance
    mask: jax.Array,  # [B, L]
    ppo_clipped: jax.Array,  # [B, L] 1 where PPO clipped (l2 > l1): never selected
    *,
    ratio: float | jax.Array = 2e-4,
    lb: float | jax.Array = 1.0,
    ub: float | jax.Array = 5.0,
) -> jax.Array:  # [B, L] float32 0/1, 1 = detached (weight 0)
    """Clip-Cov: pick n = max(1, floor(ratio N_valid)) tokens uniformly at random among the
    valid, not PPO-clipped tokens with lb < cov < ub (all of them if fewer)."""
    candidates = _valid(mask) & ~_valid(ppo_clipped) & (cov > lb) & (cov < ub)
    scores = jax.random.uniform(key, cov.shape, jnp.float32)
    return jax.lax.stop_gradient(_top_n(scores, candidates, selection_count(ratio, mask)))


def kl_cov_select(
    cov: jax.Array,  # [B, L]
    mask: jax.Array,  # [B, L]
    *,
    ratio: float | jax.Array = 2e-3,
) -> jax.Array:  # [B, L] float32 0/1, 1 = penalised
    """KL-Cov: the k = max(1, floor(ratio N_valid)) valid tokens with the largest cov."""
    return jax.lax.stop_gradient(_top_n(cov, _valid(mask), selection_count(ratio, mask)))


def rand_pos_clip_select(
    key: jax.Array,
    advantages: jax.Array,  # [B, L]
    mask: jax.Array,  # [B, L]
    *,
    ratio: float | jax.Array,
) -> jax.Array:  # [B, L] float32 0/1, 1 = weight 0
    """Rand-Pos-Clip ablation: n = max(1, floor(ratio N_valid)) uniformly random valid
    tokens with A > 0 (all of them if fewer)."""
    candidates = _valid(mask) & (jnp.asarray(advantages) > 0)
    scores = jax.random.uniform(key, candidates.shape, jnp.float32)
    return jax.lax.stop_gradient(_top_n(scores, candidates, selection_count(ratio, mask)))


def clip_cov_token_loss(
    key: jax.Array,
    logp: jax.Array,  # [B, L]
    old_logp: jax.Array,  # [B, L]
    advantages: jax.Array,  # [B, L]
    mask: jax.Array,  # [B, L]
    *,
    eps_low: float | jax.Array,
    eps_high: float | jax.Array,
    ratio: float | jax.Array = 2e-4,
    lb: float | jax.Array = 1.0,
    ub: float | jax.Array = 5.0,
) -> tuple[PPOTerms, jax.Array]:
    """Clip-Cov per-token loss: PPO surrogate (no dual clip) times (1 - selected).

    Returns (terms with ``terms.loss`` already zeroed on the selected tokens, selected
    [B, L]); ``masked_mean(selected, mask)`` is the fraction of tokens clipped by Clip-Cov.
    """
    terms = ppo_token_loss(logp, old_logp, advantages, eps_low, eps_high, dual_clip=None)
    cov = token_covariance(logp, advantages, mask)
    selected = clip_cov_select(key, cov, mask, terms.clipped, ratio=ratio, lb=lb, ub=ub)
    return terms._replace(loss=terms.loss * (1.0 - selected)), selected


def kl_cov_token_loss(
    logp: jax.Array,  # [B, L]
    old_logp: jax.Array,  # [B, L]
    advantages: jax.Array,  # [B, L]
    mask: jax.Array,  # [B, L]
    *,
    ratio: float | jax.Array = 2e-3,
    kl_coef: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array]:  # (loss [B, L], selected [B, L])
    """KL-Cov per-token loss: ``-A r`` (no clipping) plus ``kl_coef |logp - old_logp|`` on
    the top-k tokens by covariance."""
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    d = log_ratio(logp, old_logp)
    loss = -adv * jnp.exp(d)
    selected = kl_cov_select(token_covariance(logp, adv, mask), mask, ratio=ratio)
    diff = jnp.asarray(logp, jnp.float32) - jnp.asarray(old_logp, jnp.float32)
    # |diff| with subgradient 0 at 0, as torch's abs (verl): on-policy, where the old
    # log-probs are the current ones, the penalty pulls nowhere.
    abs_kl = jnp.where(diff == 0, 0.0, jnp.abs(diff))
    return loss + selected * kl_coef * abs_kl, selected


# ----------------------------------------------------------------------------------------
# Positive-advantage reweighting and its lambda schedules.


def pos_adv_weights(
    advantages: jax.Array,  # [B, L]
    lam: float | jax.Array,
    neg_weight: float | jax.Array = 1.0,
) -> jax.Array:  # [B, L] float32
    """w = lam where A > 0, neg_weight where A < 0, 1 where A == 0.

    ``lam=0`` is the "Adv<=0 only" ablation; ``lam=1, neg_weight=0`` the "Adv>=0 only" one.
    The aggregation denominator is unchanged (the mask is applied by ``aggregate``).
    """
    adv = jnp.asarray(advantages, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)
    neg_weight = jnp.asarray(neg_weight, jnp.float32)
    w = jnp.where(adv > 0, lam, jnp.where(adv < 0, neg_weight, 1.0))
    return jax.lax.stop_gradient(w)


def stage_lambda(step: int | jax.Array, total_steps: int | jax.Array) -> jax.Array:
    """``stage`` schedule: 0 over the first half of training, then linear up to 1 at the last
    step. ``step`` is 0-based in ``[0, total_steps)``."""
    step = jnp.asarray(step, jnp.float32)
    total = jnp.asarray(total_steps, jnp.float32)
    half = total / 2.0
    last = total - 1.0
    ramp = (step - half) / jnp.maximum(last - half, 1e-6)
    return jnp.where(step >= last, 1.0, jnp.clip(ramp, 0.0, 1.0))


def epoch_lambda(epoch: int | jax.Array, num_epochs: int | jax.Array) -> jax.Array:
    """``epoch`` schedule: (e - 1) / (E - 1) for the 1-based data epoch e of E (0 if E = 1)."""
    e = jnp.asarray(epoch, jnp.float32)
    n = jnp.asarray(num_epochs, jnp.float32)
    return jnp.clip((e - 1.0) / jnp.maximum(n - 1.0, 1.0), 0.0, 1.0)


class LambdaState(NamedTuple):
    """Controller state of the ``pos_adv`` family: the current lambda (float32 scalar).

    Only ``entropy_guided`` changes it; the other schedules keep it for logging/resume.
    """

    lam: jax.Array


def lambda_init(lam0: float = 0.0) -> LambdaState:
    """Initial controller state (``lam0 = 0`` for ``entropy_guided``)."""
    return LambdaState(jnp.asarray(lam0, jnp.float32))


def entropy_guided_update(
    state: LambdaState,
    entropy: float | jax.Array,  # this step's entropy H_k
    *,
    delta: float | jax.Array,  # target entropy
    step: float | jax.Array = 0.05,
) -> LambdaState:
    """lambda <- clip(lambda - step, 0, 1) if H_k < delta else clip(lambda + step, 0, 1)."""
    below = jnp.asarray(entropy, jnp.float32) < delta
    lam = jnp.where(below, state.lam - step, state.lam + step)
    return LambdaState(jnp.clip(lam, 0.0, 1.0).astype(jnp.float32))


def lambda_update(
    schedule: str,
    state: LambdaState,
    entropy: float | jax.Array,
    *,
    delta: float | jax.Array = 0.0,
    step: float | jax.Array = 0.05,
) -> LambdaState:
    """Once-per-step controller update: ``entropy_guided_update`` for that schedule, else a
    no-op. ``schedule`` is static."""
    if schedule not in POS_ADV_SCHEDULES:
        raise ValueError(f"unknown pos_adv schedule {schedule!r}; expected {POS_ADV_SCHEDULES}")
    if schedule == "entropy_guided":
        return entropy_guided_update(state, entropy, delta=delta, step=step)
    return state


def pos_adv_lambda(
    schedule: str,
    state: LambdaState,
    *,
    lam: float | jax.Array = 1.0,
    step: int | jax.Array = 0,
    total_steps: int | jax.Array = 1,
    epoch: int | jax.Array = 1,
    num_epochs: int | jax.Array = 1,
) -> jax.Array:
    """The lambda in force at this step for ``schedule`` (static string).

    constant: ``lam``; stage: ``stage_lambda(step, total_steps)``; epoch:
    ``epoch_lambda(epoch, num_epochs)``; entropy_guided: ``state.lam``; rand_pos_clip: 1
    (it zeroes a random subset of A > 0 tokens instead, see ``rand_pos_clip_select``).
    """
    if schedule == "constant":
        return jnp.asarray(lam, jnp.float32)
    if schedule == "stage":
        return stage_lambda(step, total_steps)
    if schedule == "epoch":
        return epoch_lambda(epoch, num_epochs)
    if schedule == "entropy_guided":
        return jnp.asarray(state.lam, jnp.float32)
    if schedule == "rand_pos_clip":
        return jnp.float32(1.0)
    raise ValueError(f"unknown pos_adv schedule {schedule!r}; expected {POS_ADV_SCHEDULES}")


# ----------------------------------------------------------------------------------------
# Adaptive entropy regularisation (Skywork-OR1).


class AdaptiveEntropyState(NamedTuple):
    """Skywork-OR1 controller state: the entropy coefficient alpha (float32 scalar)."""

    alpha: jax.Array


def adaptive_entropy_init(alpha0: float = 0.0) -> AdaptiveEntropyState:
    return AdaptiveEntropyState(jnp.asarray(alpha0, jnp.float32))


def entropy_estimate(old_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """H_hat = -masked_mean(old_logp): the sampled-token estimate of the entropy."""
    return -masked_mean(old_logp, mask)


def adaptive_entropy_coef(
    state: AdaptiveEntropyState,
    h_hat: float | jax.Array,
    *,
    target: float | jax.Array = 0.2,
) -> jax.Array:
    """Bonus coefficient of this step: alpha while H_hat < target, else 0 (loss -= coef agg(H))."""
    return jnp.where(jnp.asarray(h_hat, jnp.float32) < target, state.alpha, 0.0)


def adaptive_entropy_update(
    state: AdaptiveEntropyState,
    h_hat: float | jax.Array,
    *,
    target: float | jax.Array = 0.2,
    delta: float | jax.Array = 1e-4,
    alpha_min: float | jax.Array = 0.0,
    alpha_max: float | jax.Array = 0.005,
) -> AdaptiveEntropyState:
    """After a step: alpha += delta if H_hat < target else alpha -= delta; clip to range."""
    below = jnp.asarray(h_hat, jnp.float32) < target
    alpha = jnp.where(below, state.alpha + delta, state.alpha - delta)
    return AdaptiveEntropyState(jnp.clip(alpha, alpha_min, alpha_max).astype(jnp.float32))


# ----------------------------------------------------------------------------------------
# STEER.


def steer_omega(
    logp: jax.Array,  # [B, L] current policy
    old_logp: jax.Array,  # [B, L]
    entropy: jax.Array,  # [B, L] old-pass entropy
    advantages: jax.Array,  # [B, L]
    mask: jax.Array,  # [B, L]
) -> jax.Array:  # [B, L] float32, >= 0, zero on invalid / non-finite
    """STEER's per-token entropy-change magnitude Omega = |A r (1 - p) (log p + H)|,
    p = clamp(exp(logp), 1e-8, 1 - 1e-8), r = exp(clip(logp - old_logp, -20, 20))."""
    logp = jax.lax.stop_gradient(jnp.asarray(logp, jnp.float32))
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    ent = jax.lax.stop_gradient(jnp.asarray(entropy, jnp.float32))
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    p = jnp.clip(jnp.exp(logp), 1e-8, 1.0 - 1e-8)
    r = jnp.exp(log_ratio(logp, old_logp))
    omega = jnp.abs(adv * r * (1.0 - p) * (jnp.log(p) + ent))
    return jnp.where(_valid(mask) & jnp.isfinite(omega), omega, 0.0)


def steer_weights(
    logp: jax.Array,  # [B, L] current policy
    old_logp: jax.Array,  # [B, L]
    entropy: jax.Array,  # [B, L] old-pass entropy
    advantages: jax.Array,  # [B, L]
    mask: jax.Array,  # [B, L]
    *,
    lambda_min: float = 0.8,
    lambda_max: float = 1.0,
    linear: bool = False,
    norm_sequences: int | None = None,
) -> jax.Array:  # [B, L] float32, stop-gradient, zero on invalid tokens
    """STEER token weights (``compute_token_weights`` of zz-haooo/STEER).

    Exponential (default): ``M = max(max Omega, 0.02)``, ``w = clamp(exp(ln(lambda_min)
    Omega / M), lambda_min, 1)`` (``lambda_max`` unused). Linear: ``w = clamp(lambda_max -
    (Omega - m_min)(lambda_max - lambda_min) / (m_max - m_min), lambda_min, lambda_max)``,
    the midpoint when m_max == m_min (the reference linear runs use lambda_max = 1.2).
    Max/min are over the valid tokens of each group of ``norm_sequences`` consecutive
    sequences (``None``: one group; a last, shorter group takes the remainder).
    """
    omega = steer_omega(logp, old_logp, entropy, advantages, mask)  # [B, L]
    valid = _valid(mask)
    b, width = omega.shape
    g = b if norm_sequences is None else max(1, min(int(norm_sequences), b))
    ng = -(-b // g)
    pad = ng * g - b
    om = jnp.pad(omega, ((0, pad), (0, 0))).reshape(ng, g * width)  # [ng, g*L]
    vg = jnp.pad(valid, ((0, pad), (0, 0))).reshape(ng, g * width)
    has_valid = vg.any(axis=1, keepdims=True)  # [ng, 1]
    m_max = jnp.where(has_valid, jnp.max(jnp.where(vg, om, -jnp.inf), 1, keepdims=True), 0.0)
    lmin = jnp.float32(lambda_min)
    lmax = jnp.float32(lambda_max)
    if linear:
        m_min = jnp.where(has_valid, jnp.min(jnp.where(vg, om, jnp.inf), 1, keepdims=True), 0.0)
        span = m_max - m_min
        same = span <= 0
        w = lmax - (om - m_min) * (lmax - lmin) / jnp.where(same, 1.0, span)
        w = jnp.where(same, (lmin + lmax) / 2.0, jnp.clip(w, lmin, lmax))
    else:
        k = -jnp.log(lmin) / jnp.maximum(m_max, 0.02)
        w = jnp.clip(jnp.exp(-k * om), lmin, 1.0)
    w = w.reshape(ng * g, width)[:b]
    return jax.lax.stop_gradient(jnp.where(valid, w, 0.0))
