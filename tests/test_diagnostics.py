"""Entropy diagnostics (docs/algorithms.md#entropy-diagnostics) against NumPy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close

from jaxrlvr.losses import (
    COV_TOP_FRACTIONS,
    advantage_stats,
    cov_stats,
    entropy_change,
    entropy_change_summary,
    token_entropy_change,
)


def np_cov_stats(cov, mask):
    vals = np.sort(np.asarray(cov, np.float64)[mask > 0])[::-1]
    out = {"cov_mean": vals.mean()}
    for name, frac in COV_TOP_FRACTIONS.items():
        k = max(1, int(frac * len(vals)))
        out[name] = vals[:k].mean()
    return out


@pytest.mark.parametrize("shape", [(6, 50), (40, 130)])
def test_cov_stats_match_numpy(shape):
    rng = np.random.default_rng(0)
    cov = rng.standard_t(3, size=shape).astype(np.float32)
    mask = (rng.random(shape) < 0.8).astype(np.float32)
    cov[mask == 0] = 100.0  # invalid tokens must not enter the top sets
    got = jax.jit(cov_stats)(cov, mask)
    expected = np_cov_stats(cov, mask)
    assert (
        set(got)
        == set(expected)
        == {
            "cov_mean",
            "cov_top_0.02pct",
            "cov_top_0.2pct",
            "cov_top_2pct",
            "cov_top_20pct",
            "cov_top_50pct",
        }
    )
    for key in expected:
        assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    # small batch: the 0.02% set is the single largest valid cov
    assert_close(got["cov_top_0.02pct"], cov[mask > 0].max())
    ordered = [float(got[k]) for k in COV_TOP_FRACTIONS]
    assert ordered == sorted(ordered, reverse=True)


def test_cov_stats_empty_mask():
    got = cov_stats(jnp.ones((2, 3)), jnp.zeros((2, 3)))
    assert all(float(v) == 0.0 for v in got.values())


def test_advantage_stats_match_numpy():
    rng = np.random.default_rng(1)
    adv = np.repeat(rng.normal(size=(10, 1)), 7, 1).astype(np.float32)
    adv[0] = 0.0
    mask = (rng.random((10, 7)) < 0.7).astype(np.float32)
    got = jax.jit(advantage_stats)(adv, mask)
    v = mask > 0
    pos, neg = v & (adv > 0), v & (adv < 0)
    assert_close(got["advantage_pos_frac"], pos.sum() / v.sum())
    assert_close(got["advantage_neg_frac"], neg.sum() / v.sum())
    assert_close(got["advantage_pos_abs_mean"], np.abs(adv[pos]).mean())
    assert_close(got["advantage_neg_abs_mean"], np.abs(adv[neg]).mean())


def np_entropy_change(z0, z1, temp):
    z0 = np.asarray(z0, np.float64) / temp
    z1 = np.asarray(z1, np.float64) / temp

    def logsoftmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp0, lp1 = logsoftmax(z0), logsoftmax(z1)
    p0, p1 = np.exp(lp0), np.exp(lp1)
    actual = -(p1 * lp1).sum(-1) + (p0 * lp0).sum(-1)
    dz = z1 - z0
    e_lp_dz = (p0 * lp0 * dz).sum(-1)
    predicted = -(e_lp_dz - (p0 * lp0).sum(-1) * (p0 * dz).sum(-1))
    return actual, predicted


@pytest.mark.parametrize("temp", [1.0, 0.6])
def test_entropy_change_matches_numpy(temp):
    rng = np.random.default_rng(2)
    z0 = (rng.normal(size=(4, 9, 30)) * 2).astype(np.float32)
    z1 = (z0 + rng.normal(size=z0.shape) * 0.3).astype(np.float32)
    actual, predicted = jax.jit(functools.partial(entropy_change, temperature=temp))(z0, z1)
    exp_actual, exp_pred = np_entropy_change(z0, z1, temp)
    assert_close(actual, exp_actual, rtol=1e-4, atol=2e-5)
    assert_close(predicted, exp_pred, rtol=1e-4, atol=2e-5)


def test_lemma1_prediction_matches_small_perturbation():
    """First-order check: for z' = z + s * u with small s, dH_actual ~ dH_predicted."""
    rng = np.random.default_rng(3)
    shape = (8, 16, 40)
    z0 = (rng.normal(size=shape) * 1.5).astype(np.float32)
    u = rng.normal(size=shape).astype(np.float32)
    mask = np.ones(shape[:2], np.float32)
    fn = jax.jit(entropy_change)

    s = 2e-3
    actual, predicted = fn(z0, z0 + s * u)
    summary = entropy_change_summary(actual, predicted, mask)
    assert float(summary["dH_corr"]) > 0.99
    rel = np.abs(np.asarray(actual) - np.asarray(predicted)).max() / np.abs(predicted).max()
    assert rel < 0.05

    # The prediction is the exact directional derivative: finite difference in float64.
    z64, u64 = z0.astype(np.float64), u.astype(np.float64)
    h = 1e-6
    fd = (
        np_entropy_change(z64, z64 + h * u64, 1.0)[0]
        - np_entropy_change(z64, z64 - h * u64, 1.0)[0]
    ) / (2 * h)
    assert_close(np.asarray(predicted) / s, fd, rtol=2e-3, atol=2e-3)

    # A large step leaves the first-order regime: the error grows.
    big_actual, big_pred = fn(z0, z0 + 2.0 * u)
    big_rel = np.abs(np.asarray(big_actual) - np.asarray(big_pred)).max() / np.abs(big_pred).max()
    assert big_rel > 10 * rel


@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("t,chunk", [(11, 4), (6, 16)])
def test_token_entropy_change_chunked(t, chunk, vocab_major):
    rng = np.random.default_rng(4)
    b, d, v = 2, 6, 25
    h0 = rng.normal(size=(b, t, d)).astype(np.float32)
    h1 = (h0 + 0.05 * rng.normal(size=h0.shape)).astype(np.float32)
    w0 = rng.normal(size=(d, v)).astype(np.float32)
    w1 = (w0 + 0.05 * rng.normal(size=w0.shape)).astype(np.float32)
    fn = jax.jit(
        functools.partial(
            token_entropy_change, temperature=0.9, chunk_size=chunk, vocab_major=vocab_major
        )
    )
    heads = (w0.T.copy(), w1.T.copy()) if vocab_major else (w0, w1)  # as stored: [V, D]
    actual, predicted = fn(h0, heads[0], h1, heads[1])
    assert actual.shape == (b, t) and predicted.shape == (b, t)
    z0 = np.einsum("btd,dv->btv", h0.astype(np.float64), w0)
    z1 = np.einsum("btd,dv->btv", h1.astype(np.float64), w1)
    exp_actual, exp_pred = np_entropy_change(z0, z1, 0.9)
    assert_close(actual, exp_actual, rtol=1e-3, atol=2e-5)
    assert_close(predicted, exp_pred, rtol=1e-3, atol=2e-5)


def test_entropy_change_summary_matches_numpy():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(5, 8)).astype(np.float32)
    p = (0.5 * a + rng.normal(size=a.shape)).astype(np.float32)
    mask = (rng.random((5, 8)) < 0.7).astype(np.float32)
    a[mask == 0] = 1e3  # must be ignored
    got = jax.jit(entropy_change_summary)(a, p, mask)
    v = mask > 0
    assert_close(got["dH_actual"], a[v].mean())
    assert_close(got["dH_predicted"], p[v].mean())
    assert_close(got["dH_corr"], np.corrcoef(a[v], p[v])[0, 1], rtol=1e-5, atol=1e-6)
    # scale invariance: tiny entropy changes do not underflow
    tiny = entropy_change_summary(a * 1e-20, p * 1e-20, mask)
    assert_close(tiny["dH_corr"], np.corrcoef(a[v], p[v])[0, 1], rtol=1e-4, atol=1e-5)
    # constant input -> correlation 0 rather than NaN
    const = entropy_change_summary(jnp.ones((5, 8)), p, mask)
    assert float(const["dH_corr"]) == 0.0
