"""Entropy interventions (docs/algorithms.md#entropy-interventions) against NumPy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close

from jaxrlvr.losses import (
    AdaptiveEntropyState,
    LambdaState,
    adaptive_entropy_coef,
    adaptive_entropy_init,
    adaptive_entropy_update,
    aggregate,
    clip_cov_select,
    clip_cov_token_loss,
    entropy_estimate,
    entropy_guided_update,
    epoch_lambda,
    kl_cov_select,
    kl_cov_token_loss,
    lambda_init,
    lambda_update,
    pos_adv_lambda,
    pos_adv_weights,
    ppo_token_loss,
    rand_pos_clip_select,
    stage_lambda,
    steer_omega,
    steer_weights,
    token_covariance,
)


def make_batch(seed=0, b=8, width=40, empty_row=True):
    """A rollout-like batch: per-sequence advantages, spread-out log-probs, ragged mask."""
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 1.8, size=(b, width)).astype(np.float32)
    logp = (old + rng.normal(0.0, 0.3, size=(b, width))).astype(np.float32)
    adv = np.repeat(rng.choice([-1.5, -0.5, 0.0, 0.8, 1.7], size=(b, 1)), width, 1)
    adv[0] = 1.2
    adv[1] = -1.2
    lengths = rng.integers(width // 3, width + 1, size=b)
    if empty_row:
        lengths[2] = 0
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.float32)
    return logp, old, adv.astype(np.float32), mask


def np_cov(logp, adv, mask):
    v = mask > 0
    cov = (adv - adv[v].mean()) * (logp - logp[v].mean())
    return np.where(v, cov, 0.0)


def np_count(ratio, mask):
    return max(1, int(ratio * float(mask.sum())))


# ---------------------------------------------------------------------------- covariance


def test_token_covariance_matches_numpy_and_is_detached():
    logp, _, adv, mask = make_batch()
    cov = jax.jit(token_covariance)(logp, adv, mask)
    assert_close(cov, np_cov(logp.astype(np.float64), adv, mask), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(cov)[mask == 0] == 0)
    g = jax.grad(lambda lp: jnp.sum(token_covariance(lp, adv, mask) ** 2))(jnp.asarray(logp))
    assert np.all(np.asarray(g) == 0)


# ---------------------------------------------------------------------------- Clip-Cov


@pytest.mark.parametrize("ratio", [0.02, 0.05, 0.3])
def test_clip_cov_select_exact_count_band_and_unclipped(ratio):
    logp, old, adv, mask = make_batch(seed=1)
    cov = np_cov(logp.astype(np.float64), adv, mask).astype(np.float32)
    rng = np.random.default_rng(1)
    ppo_clipped = (rng.random(mask.shape) < 0.3).astype(np.float32)
    lb, ub = 1.0, 5.0
    candidates = (mask > 0) & (ppo_clipped == 0) & (cov > lb) & (cov < ub)
    n = min(np_count(ratio, mask), int(candidates.sum()))
    assert candidates.sum() > 10  # the band is populated

    fn = jax.jit(functools.partial(clip_cov_select, ratio=ratio, lb=lb, ub=ub))
    picks = []
    for seed in range(3):
        sel = np.asarray(fn(jax.random.key(seed), cov, mask, ppo_clipped))
        assert set(np.unique(sel)) <= {0.0, 1.0}
        assert sel.sum() == n
        assert np.all(candidates[sel > 0])  # in band, valid, never PPO-clipped
        picks.append(sel)
    if n < candidates.sum():
        assert not all(np.array_equal(picks[0], p) for p in picks[1:])  # random choice


def test_clip_cov_select_all_candidates_when_fewer_than_n():
    cov = np.zeros((2, 6), np.float32)
    cov[0, 1] = 2.0
    cov[1, 4] = 4.9
    cov[1, 5] = 5.0  # not strictly inside the band
    cov[0, 0] = 3.0  # clipped by PPO -> excluded
    mask = np.ones((2, 6), np.float32)
    clipped = np.zeros((2, 6), np.float32)
    clipped[0, 0] = 1.0
    sel = clip_cov_select(jax.random.key(0), cov, mask, clipped, ratio=0.5)
    expected = np.zeros((2, 6))
    expected[0, 1] = expected[1, 4] = 1.0
    np.testing.assert_array_equal(np.asarray(sel), expected)


def test_clip_cov_select_is_uniform():
    cov = np.full((4, 10), 2.0, np.float32)
    mask = np.ones((4, 10), np.float32)
    clipped = np.zeros((4, 10), np.float32)
    fn = jax.jit(
        jax.vmap(
            lambda k: clip_cov_select(k, cov, mask, clipped, ratio=0.1)  # n = 4 of 40
        )
    )
    freq = np.asarray(fn(jax.random.split(jax.random.key(0), 2000))).mean(0)
    np.testing.assert_allclose(freq, 0.1, atol=0.035)


def test_clip_cov_token_loss_zero_gradient_on_selected():
    logp, old, adv, mask = make_batch(seed=2)
    eps_low, eps_high = 0.2, 0.28
    key = jax.random.key(3)

    def loss_fn(lp):
        terms, sel = clip_cov_token_loss(
            key, lp, old, adv, mask, eps_low=eps_low, eps_high=eps_high, ratio=0.05
        )
        return aggregate(terms.loss, mask), (terms, sel)

    (loss, (terms, sel)), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(logp)
    sel, grad = np.asarray(sel), np.asarray(grad)
    assert sel.sum() == np_count(0.05, mask)

    # Selection consistent with the NumPy band (cov from the current logp) and the PPO clip.
    d = np.clip(logp - old, -20, 20)
    r = np.exp(d)
    l1, l2 = -adv * r, -adv * np.clip(r, 1 - eps_low, 1 + eps_high)
    cov = np_cov(logp.astype(np.float64), adv, mask)
    cand = (mask > 0) & ~(l2 > l1) & (cov > 1.0) & (cov < 5.0)
    assert np.all(cand[sel > 0])

    # Loss: PPO surrogate (no dual clip) with selected tokens removed, denominator unchanged.
    ppo = np.maximum(l1, l2)
    assert_close(loss, (ppo * (1 - sel) * mask).sum() / mask.sum(), rtol=1e-5)
    assert_close(terms.loss, ppo * (1 - sel), rtol=1e-5, atol=1e-6)

    # Zero gradient exactly on selected tokens; the hand gradient elsewhere.
    assert np.all(grad[sel > 0] == 0)
    expected = np.where(~(l2 > l1) & (sel == 0), -adv * r, 0.0) * mask / mask.sum()
    assert_close(grad, expected, rtol=1e-5, atol=1e-8)
    assert np.abs((adv * r)[sel > 0]).max() > 0  # unselected, they would get a gradient


# ---------------------------------------------------------------------------- KL-Cov


@pytest.mark.parametrize("ratio", [1e-3, 0.02, 0.2])
def test_kl_cov_select_exact_top_k(ratio):
    logp, _, adv, mask = make_batch(seed=4)
    cov = np.asarray(token_covariance(logp, adv, mask))
    sel = np.asarray(jax.jit(functools.partial(kl_cov_select, ratio=ratio))(cov, mask))
    k = np_count(ratio, mask)
    valid_idx = np.flatnonzero(mask.reshape(-1) > 0)
    top = valid_idx[np.argsort(-cov.reshape(-1)[valid_idx], kind="stable")[:k]]
    expected = np.zeros(mask.size)
    expected[top] = 1.0
    np.testing.assert_array_equal(sel.reshape(-1), expected)


def test_kl_cov_select_ignores_invalid_tokens_with_large_cov():
    cov = np.array([[9.0, 1.0, 2.0], [3.0, 8.0, 0.5]], np.float32)
    mask = np.array([[0, 1, 1], [1, 0, 1]], np.float32)
    sel = kl_cov_select(cov, mask, ratio=0.5)  # k = floor(0.5 * 4) = 2
    np.testing.assert_array_equal(np.asarray(sel), [[0, 0, 1], [1, 0, 0]])


def test_kl_cov_token_loss_matches_numpy():
    logp, old, adv, mask = make_batch(seed=5)
    ratio, kl_coef = 0.03, 0.7
    loss, sel = jax.jit(functools.partial(kl_cov_token_loss, ratio=ratio, kl_coef=kl_coef))(
        logp, old, adv, mask
    )
    cov = np_cov(logp.astype(np.float64), adv, mask)
    valid_idx = np.flatnonzero(mask.reshape(-1) > 0)
    top = valid_idx[np.argsort(-cov.reshape(-1)[valid_idx], kind="stable")[: np_count(ratio, mask)]]
    exp_sel = np.zeros(mask.size)
    exp_sel[top] = 1
    exp_sel = exp_sel.reshape(mask.shape)
    np.testing.assert_array_equal(np.asarray(sel), exp_sel)
    r = np.exp(logp.astype(np.float64) - old)
    expected = -adv * r + exp_sel * kl_coef * np.abs(logp - old)
    assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- pos-adv


def test_pos_adv_weights():
    adv = np.array([[1.0, -2.0, 0.0, 0.5]], np.float32)
    assert_close(jax.jit(pos_adv_weights)(adv, 0.3), [[0.3, 1.0, 1.0, 0.3]])
    assert_close(pos_adv_weights(adv, 0.0), [[0.0, 1.0, 1.0, 0.0]])  # Adv<=0 only
    assert_close(pos_adv_weights(adv, 1.0, neg_weight=0.0), [[1.0, 0.0, 1.0, 1.0]])  # Adv>=0 only


@pytest.mark.parametrize("lam,neg_weight", [(0.0, 1.0), (1.0, 0.0)])
def test_pos_adv_gradient_masks_tokens(lam, neg_weight):
    logp, old, adv, mask = make_batch(seed=6)

    def loss_fn(lp):
        terms = ppo_token_loss(lp, old, adv, 0.2, 0.28, 3.0)
        return aggregate(terms.loss * pos_adv_weights(adv, lam, neg_weight), mask)

    grad = np.asarray(jax.jit(jax.grad(loss_fn))(logp))
    zeroed = (adv > 0) if lam == 0.0 else (adv < 0)
    kept = ~zeroed & (adv != 0) & (mask > 0)
    assert np.all(grad[zeroed] == 0)
    assert np.count_nonzero(grad[kept]) > 0.5 * kept.sum()  # the others do learn


def test_stage_lambda():
    fn = jax.jit(stage_lambda)
    got = [float(fn(s, 10)) for s in range(10)]
    expected = [0, 0, 0, 0, 0, 0, 0.25, 0.5, 0.75, 1.0]  # 0 up to step 5, then linear to 1
    assert_close(got, expected)
    assert float(stage_lambda(1, 2)) == 1.0 and float(stage_lambda(0, 2)) == 0.0


def test_epoch_lambda():
    assert_close([float(jax.jit(epoch_lambda)(e, 5)) for e in range(1, 6)], [0, 0.25, 0.5, 0.75, 1])
    assert float(epoch_lambda(1, 1)) == 0.0


def test_entropy_guided_stepping_and_clipping():
    upd = jax.jit(functools.partial(entropy_guided_update, delta=0.5, step=0.05))
    state = lambda_init(0.0)
    state = upd(state, 0.3)  # below target: decrease, clipped at 0
    assert float(state.lam) == 0.0
    for k in range(1, 4):  # above target: increase by step
        state = upd(state, 0.9)
        assert float(state.lam) == pytest.approx(0.05 * k, abs=1e-6)
    state = upd(state, 0.1)
    assert float(state.lam) == pytest.approx(0.10, abs=1e-6)
    state = LambdaState(jnp.float32(0.98))
    state = upd(state, 2.0)  # clipped at 1
    assert float(state.lam) == 1.0
    state = upd(state, 0.5)  # H == delta is not "below": increase, stays at 1
    assert float(state.lam) == 1.0


def test_lambda_update_and_dispatch():
    s = lambda_init(0.4)
    assert float(lambda_update("entropy_guided", s, 0.0, delta=1.0, step=0.1).lam) == (
        pytest.approx(0.3)
    )
    for sched in ("constant", "stage", "epoch", "rand_pos_clip"):
        assert float(lambda_update(sched, s, 0.0, delta=1.0).lam) == pytest.approx(0.4)
    assert float(pos_adv_lambda("constant", s, lam=0.7)) == pytest.approx(0.7)
    assert float(pos_adv_lambda("stage", s, step=7, total_steps=10)) == pytest.approx(0.5)
    assert float(pos_adv_lambda("epoch", s, epoch=2, num_epochs=3)) == pytest.approx(0.5)
    assert float(pos_adv_lambda("entropy_guided", s)) == pytest.approx(0.4)
    assert float(pos_adv_lambda("rand_pos_clip", s)) == 1.0
    with pytest.raises(ValueError):
        pos_adv_lambda("cosine", s)
    with pytest.raises(ValueError):
        lambda_update("cosine", s, 0.0)


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.9])
def test_rand_pos_clip_select(ratio):
    _, _, adv, mask = make_batch(seed=7)
    candidates = (mask > 0) & (adv > 0)
    n = min(np_count(ratio, mask), int(candidates.sum()))
    fn = jax.jit(functools.partial(rand_pos_clip_select, ratio=ratio))
    for seed in range(3):
        sel = np.asarray(fn(jax.random.key(seed), adv, mask))
        assert sel.sum() == n
        assert np.all(candidates[sel > 0])


# ---------------------------------------------------------------------------- STEER


def np_steer(logp, old, ent, adv, mask, lmin=0.8, lmax=1.0, linear=False, norm=None):
    """Written from docs/algorithms.md#steer / the reference compute_token_weights."""
    logp, old, ent, adv = (np.asarray(x, np.float64) for x in (logp, old, ent, adv))
    b = logp.shape[0]
    p = np.clip(np.exp(logp), 1e-8, 1 - 1e-8)
    r = np.exp(np.clip(logp - old, -20, 20))
    with np.errstate(invalid="ignore"):
        omega = np.abs(adv * r * (1 - p) * (np.log(p) + ent))
    omega[~np.isfinite(omega)] = 0.0
    w = np.zeros_like(omega)
    g = b if norm is None else norm
    for s in range(0, b, g):
        rows = slice(s, min(s + g, b))
        v = mask[rows] > 0
        if not v.any():
            continue
        om = omega[rows][v]
        if linear:
            mmin, mmax = om.min(), om.max()
            if mmax > mmin:
                ww = np.clip(lmax - (om - mmin) * (lmax - lmin) / (mmax - mmin), lmin, lmax)
            else:
                ww = np.full_like(om, (lmin + lmax) / 2)
        else:
            k = -np.log(lmin) / max(om.max(), 0.02)
            ww = np.clip(np.exp(-k * om), lmin, 1.0)
        block = np.zeros(v.shape)
        block[v] = ww
        w[rows] = block
    return w


def steer_batch(seed, b=6, width=12):
    logp, old, adv, mask = make_batch(seed=seed, b=b, width=width)
    rng = np.random.default_rng(seed)
    ent = rng.uniform(0.0, 3.0, size=logp.shape).astype(np.float32)
    logp = np.minimum(logp, -1e-3)
    return logp, old, ent, adv, mask


@pytest.mark.parametrize("norm", [None, 2, 4, 1])
@pytest.mark.parametrize("linear,lmax", [(False, 1.0), (True, 1.2)])
def test_steer_weights_match_numpy(norm, linear, lmax):
    logp, old, ent, adv, mask = steer_batch(8)  # B = 6: norm 4 leaves a group of 2
    ent[3, 1] = np.nan  # a non-finite Omega counts as 0
    fn = jax.jit(
        functools.partial(
            steer_weights, lambda_min=0.8, lambda_max=lmax, linear=linear, norm_sequences=norm
        )
    )
    w = np.asarray(fn(logp, old, ent, adv, mask))
    expected = np_steer(logp, old, ent, adv, mask, 0.8, lmax, linear, norm)
    assert_close(w, expected, rtol=1e-5, atol=1e-6)
    assert np.all(w[mask == 0] == 0)
    assert np.all(w[mask > 0] >= 0.8 - 1e-6) and np.all(w[mask > 0] <= lmax + 1e-6)
    assert np.ptp(w[mask > 0]) > 0.05  # weights actually vary
    if norm not in (None, 1):  # groups matter: the single-group weights differ
        whole = np_steer(logp, old, ent, adv, mask, 0.8, lmax, linear, None)
        assert not np.allclose(whole, expected)


def test_steer_exponential_floor_on_max():
    logp, old, ent, adv, mask = steer_batch(9)
    adv = adv * 1e-3  # every Omega far below 0.02
    w = np.asarray(steer_weights(logp, old, ent, adv, mask))
    expected = np_steer(logp, old, ent, adv, mask)
    assert_close(w, expected, rtol=1e-6, atol=1e-7)
    # Without the floor the largest Omega would get lambda_min exactly; with it,
    # min w = 0.8 ** (max Omega / 0.02) > 0.8.
    m = float(np.max(np.asarray(steer_omega(logp, old, ent, adv, mask))))
    assert 0 < m < 0.02
    assert w[mask > 0].min() == pytest.approx(0.8 ** (m / 0.02), rel=1e-5)
    assert w[mask > 0].min() > 0.81


def test_steer_linear_constant_omega_gives_midpoint():
    logp, old, ent, adv, mask = steer_batch(10)
    adv = np.zeros_like(adv)  # Omega == 0 everywhere: m_max == m_min
    w = np.asarray(steer_weights(logp, old, ent, adv, mask, lambda_max=1.2, linear=True))
    np.testing.assert_allclose(w[mask > 0], 1.0, rtol=1e-6)
    assert np.all(w[mask == 0] == 0)
    # exponential variant: Omega = 0 -> weight 1
    w = np.asarray(steer_weights(logp, old, ent, adv, mask))
    np.testing.assert_allclose(w[mask > 0], 1.0)


def test_steer_gradient_equals_weighted_grpo_gradient():
    logp, old, ent, adv, mask = steer_batch(11, b=8, width=16)

    def steer_loss(lp):
        w = steer_weights(lp, old, ent, adv, mask, norm_sequences=4)
        return aggregate(ppo_token_loss(lp, old, adv, 0.2, 0.28, 10.0).loss * w, mask)

    grad = np.asarray(jax.jit(jax.grad(steer_loss))(logp))
    # By hand: w * d(PPO)/dlogp / N with the NumPy weights held constant.
    w = np_steer(logp, old, ent, adv, mask, norm=4)
    r = np.exp(np.clip(logp.astype(np.float64) - old, -20, 20))
    l1, l2 = -adv * r, -adv * np.clip(r, 0.8, 1.28)
    lmax = np.maximum(l1, l2)
    active = ~(l2 > l1) & ~((adv < 0) & (lmax > -adv * 10.0))
    expected = w * np.where(active, -adv * r, 0.0) * mask / mask.sum()
    assert_close(grad, expected, rtol=1e-5, atol=1e-8)
    assert np.abs(expected).max() > 1e-3
    # and differs from the unweighted gradient
    assert not np.allclose(expected, np.where(active, -adv * r, 0.0) * mask / mask.sum())


# ---------------------------------------------------------------------------- Skywork


def test_adaptive_entropy_controller():
    target, delta = 0.2, 1e-3
    upd = jax.jit(
        functools.partial(
            adaptive_entropy_update, target=target, delta=delta, alpha_min=0.0, alpha_max=0.0025
        )
    )
    state = adaptive_entropy_init(0.0)
    assert isinstance(state, AdaptiveEntropyState)
    state = upd(state, 0.5)  # above target: decrease, clipped at alpha_min
    assert float(state.alpha) == 0.0
    alphas = []
    for _ in range(4):  # below target: +delta each step, clipped at alpha_max
        state = upd(state, 0.1)
        alphas.append(float(state.alpha))
    assert_close(alphas, [0.001, 0.002, 0.0025, 0.0025], rtol=1e-6, atol=1e-9)
    state = upd(state, 0.3)
    assert float(state.alpha) == pytest.approx(0.0015, abs=1e-9)

    # the bonus applies only while H_hat < target
    assert float(adaptive_entropy_coef(state, 0.1, target=target)) == pytest.approx(0.0015)
    assert float(adaptive_entropy_coef(state, 0.25, target=target)) == 0.0

    logp = np.array([[-0.1, -0.3, -5.0], [-0.2, -9.0, -9.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
    assert float(entropy_estimate(logp, mask)) == pytest.approx((0.1 + 0.3 + 5.0 + 0.2) / 4)


def test_controller_states_are_pytrees():
    for state in (lambda_init(0.2), adaptive_entropy_init(0.001)):
        leaves, treedef = jax.tree_util.tree_flatten(state)
        assert len(leaves) == 1 and leaves[0].dtype == jnp.float32
        assert jax.tree_util.tree_unflatten(treedef, leaves) == state
