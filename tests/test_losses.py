"""Advantages, PPO loss, aggregation, KL and entropy against NumPy references.

Formulas: docs/algorithms.md (group advantages to token entropy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close

from jaxrlvr.losses import (
    AGG_MODES,
    agg_norm,
    aggregate,
    aggregation_weights,
    entropy_from_logits,
    grpo_advantages,
    kl_penalty,
    ppo_token_loss,
    token_logp_entropy,
)

# ---------------------------------------------------------------------------- references


def np_advantages(rewards, g, std_normalize=True, eps=1e-6):
    out = np.zeros(len(rewards))
    for s in range(0, len(rewards), g):
        grp = np.asarray(rewards[s : s + g], np.float64)
        if g == 1:
            continue
        a = grp - grp.mean()
        if std_normalize:
            a = a / (np.std(grp, ddof=1) + eps)
        out[s : s + g] = a
    return out


def np_ppo(logp, old, adv, eps_low, eps_high, c=None):
    d = np.clip(logp - old, -20.0, 20.0)
    r = np.exp(d)
    l1 = -adv * r
    l2 = -adv * np.clip(r, 1 - eps_low, 1 + eps_high)
    loss = np.maximum(l1, l2)
    clipped = l2 > l1
    dual = np.zeros_like(clipped)
    if c is not None:
        l3 = -adv * c
        dual = (adv < 0) & (loss > l3)
        loss = np.where(adv < 0, np.minimum(loss, l3), loss)
    return loss, clipped, dual, r


def np_aggregate(x, m, mode, max_len=None):
    x = np.asarray(x, np.float64)
    m = np.asarray(m, np.float64)
    b, width = m.shape
    if mode == "token-mean":
        return (x * m).sum() / m.sum()
    if mode == "seq-mean-token-mean":
        vals = [(x[i] * m[i]).sum() / m[i].sum() for i in range(b) if m[i].sum() > 0]
        return float(np.mean(vals))
    if mode == "seq-mean-token-sum":
        return float(np.mean([(x[i] * m[i]).sum() for i in range(b)]))
    if mode == "seq-mean-token-sum-norm":
        return (x * m).sum() / (b * (width if max_len is None else max_len))
    raise AssertionError(mode)


def np_entropy(logits, temp=1.0):
    z = np.asarray(logits, np.float64) / temp
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1)


def np_logp(logits, targets, temp=1.0):
    z = np.asarray(logits, np.float64) / temp
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def random_mask(rng, b, width, empty_row=True):
    lengths = rng.integers(1, width + 1, size=b)
    if empty_row:
        lengths[1] = 0
    return (np.arange(width)[None] < lengths[:, None]).astype(np.float32)


# ---------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("std_normalize", [True, False])
def test_grpo_advantages_match_numpy(std_normalize):
    rng = np.random.default_rng(0)
    g = 4
    rewards = rng.integers(0, 2, size=6 * g).astype(np.float32)
    rewards[:g] = 1.0  # a group with zero std -> advantages 0
    rewards[g : 2 * g] = rng.normal(size=g)  # non-binary rewards
    fn = jax.jit(functools.partial(grpo_advantages, group_size=g, std_normalize=std_normalize))
    got = fn(rewards)
    assert got.dtype == jnp.float32 and got.shape == rewards.shape
    assert_close(got, np_advantages(rewards, g, std_normalize), rtol=1e-5, atol=1e-5)
    assert_close(got[:g], np.zeros(g))
    if std_normalize:  # unbiased std: each non-degenerate group has sample std 1
        assert np.std(np.asarray(got[g : 2 * g]), ddof=1) == pytest.approx(1.0, rel=1e-4)


def test_grpo_advantages_group_size_one_is_zero():
    rewards = np.array([1.0, 0.0, 3.0], np.float32)
    got = jax.jit(functools.partial(grpo_advantages, group_size=1))(rewards)
    assert_close(got, np.zeros(3))


def test_grpo_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="multiple"):
        grpo_advantages(jnp.zeros(5), group_size=2)


# ---------------------------------------------------------------------------- PPO loss


def ppo_batch(seed=0, b=6, width=20):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 1.0, size=(b, width)).astype(np.float32)
    logp = (old + rng.normal(0.0, 0.4, size=(b, width))).astype(np.float32)
    adv = np.repeat(rng.normal(size=(b, 1)), width, 1).astype(np.float32)
    adv[0] = 0.0
    return logp, old, adv


@pytest.mark.parametrize(
    "eps_low,eps_high,dual",
    [(0.2, 0.2, None), (0.2, 0.28, None), (0.2, 0.28, 3.0), (0.2, 0.2, 10.0)],
)
def test_ppo_token_loss_matches_numpy(eps_low, eps_high, dual):
    logp, old, adv = ppo_batch()
    logp[2, 3] = old[2, 3] + 30.0  # beyond the +-20 log-ratio clip
    logp[3, 4] = old[3, 4] + 2.5  # large ratio with A<0 -> dual clip can bite
    adv[3] = -1.0
    fn = jax.jit(
        functools.partial(ppo_token_loss, eps_low=eps_low, eps_high=eps_high, dual_clip=dual)
    )
    terms = fn(logp, old, adv)
    loss, clipped, dual_ind, r = np_ppo(logp, old, adv, eps_low, eps_high, dual)
    assert_close(terms.loss, loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(terms.clipped), clipped.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(terms.dual_clipped), dual_ind.astype(np.float32))
    assert_close(terms.ratio, r, rtol=1e-5)
    assert float(terms.ratio[2, 3]) == pytest.approx(np.exp(20.0), rel=1e-5)
    assert clipped.sum() > 0 and (~clipped).sum() > 0  # both branches exercised
    if dual is not None and dual < 5:
        assert dual_ind.sum() > 0


def test_clip_higher_changes_only_upper_clip():
    logp, old, adv = ppo_batch(seed=1)
    sym = ppo_token_loss(logp, old, adv, 0.2, 0.2)
    hi = ppo_token_loss(logp, old, adv, 0.2, 0.28)
    r = np.exp(logp - old)
    differs = np.asarray(sym.loss) != np.asarray(hi.loss)
    # Only tokens with A > 0 and ratio above 1.2 can be affected by eps_high.
    assert differs.any()
    assert np.all((adv[differs] > 0) & (r[differs] > 1.2))


def test_ppo_gradient_matches_hand_derivative():
    logp, old, adv = ppo_batch(seed=2)
    mask = random_mask(np.random.default_rng(2), *logp.shape)

    def loss_fn(lp):
        return aggregate(ppo_token_loss(lp, old, adv, 0.2, 0.28, 3.0).loss, mask)

    grad = jax.jit(jax.grad(loss_fn))(logp)
    loss, clipped, dual, r = np_ppo(logp, old, adv, 0.2, 0.28, 3.0)
    active = ~clipped & ~dual  # unclipped surrogate: d(-A r)/dlogp = -A r
    expected = np.where(active, -adv * r, 0.0) * mask / mask.sum()
    assert_close(grad, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_modes_match_numpy(mode):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 11)).astype(np.float32)
    m = random_mask(rng, 7, 11)
    got = jax.jit(functools.partial(aggregate, mode=mode))(x, m)
    assert_close(got, np_aggregate(x, m, mode))
    # bool masks are accepted too
    assert_close(aggregate(x, m.astype(bool), mode), np_aggregate(x, m, mode))
    # weights form: sum(x * w) == aggregate
    assert_close(jnp.sum(x * aggregation_weights(m, mode)), np_aggregate(x, m, mode))


def test_seq_mean_token_sum_norm_custom_max_len():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    m = random_mask(rng, 3, 5, empty_row=False)
    got = aggregate(x, m, "seq-mean-token-sum-norm", agg_norm(m, max_len=64))
    assert_close(got, np_aggregate(x, m, "seq-mean-token-sum-norm", max_len=64))


def test_aggregate_unknown_mode_raises():
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate(jnp.ones((2, 2)), jnp.ones((2, 2)), "token-sum")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batch_invariance_value_and_gradient(mode):
    rng = np.random.default_rng(5)
    b, width, n_micro = 8, 9, 4
    logp, old, adv = ppo_batch(seed=5, b=b, width=width)
    mask = random_mask(rng, b, width)
    mask[5] = 1.0  # unequal lengths across micro-batches

    def full_loss(lp):
        return aggregate(ppo_token_loss(lp, old, adv, 0.2, 0.28, 3.0).loss, mask, mode)

    @jax.jit
    def micro_loss(lp):
        norm = agg_norm(mask)  # whole mini-batch denominators
        total = 0.0
        for k in range(n_micro):
            s = slice(k * b // n_micro, (k + 1) * b // n_micro)
            terms = ppo_token_loss(lp[s], old[s], adv[s], 0.2, 0.28, 3.0)
            total = total + aggregate(terms.loss, mask[s], mode, norm)
        return total

    v_full, g_full = jax.value_and_grad(full_loss)(logp)
    v_micro, g_micro = jax.value_and_grad(micro_loss)(logp)
    assert_close(v_micro, v_full, rtol=1e-5, atol=1e-7)
    assert_close(g_micro, g_full, rtol=1e-5, atol=1e-8)

    # Per-micro-batch denominators (the reference code's behaviour) generally differ.
    if mode in ("token-mean", "seq-mean-token-mean"):
        naive = np.mean(
            [
                np_aggregate(np_ppo(logp[s], old[s], adv[s], 0.2, 0.28, 3.0)[0], mask[s], mode)
                for s in (slice(k * 2, k * 2 + 2) for k in range(n_micro))
                if mask[s].sum() > 0
            ]
        )
        assert abs(naive - float(v_full)) > 1e-4


def test_micro_batch_gradient_through_lax_scan():
    """The accumulation pattern a trainer uses: lax.scan over micro-batches, summed grads."""
    rng = np.random.default_rng(6)
    b, width = 8, 6
    x0 = rng.normal(size=(width,)).astype(np.float32)  # parameters shared by all sequences
    mask = random_mask(rng, b, width)
    coef = rng.normal(size=(b, width)).astype(np.float32)

    def per_token(theta, c):  # [width], [b, width] -> [b, width]
        return jnp.tanh(theta[None] * c + c**2)

    def full(theta):
        return aggregate(per_token(theta, coef), mask, "seq-mean-token-mean")

    @jax.jit
    def accumulated(theta):
        norm = agg_norm(mask)
        mbs = (coef.reshape(4, 2, width), mask.reshape(4, 2, width))

        def step(carry, mb):
            c, m = mb
            v, g = jax.value_and_grad(
                lambda t: aggregate(per_token(t, c), m, "seq-mean-token-mean", norm)
            )(theta)
            return (carry[0] + v, carry[1] + g), None

        (v, g), _ = jax.lax.scan(step, (0.0, jnp.zeros_like(theta)), mbs)
        return v, g

    theta = jnp.asarray(x0)
    v, g = accumulated(theta)
    assert_close(v, full(theta), rtol=1e-5, atol=1e-7)
    assert_close(g, jax.grad(full)(theta), rtol=1e-5, atol=1e-7)


def test_empty_mask_aggregates_to_zero():
    for mode in AGG_MODES:
        assert float(aggregate(jnp.ones((2, 3)), jnp.zeros((2, 3)), mode)) == 0.0


# ---------------------------------------------------------------------------- KL


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_matches_numpy(estimator):
    rng = np.random.default_rng(7)
    logp = rng.normal(-2.0, 1.0, size=(4, 10)).astype(np.float32)
    ref = (logp + rng.normal(0.0, 0.5, size=(4, 10))).astype(np.float32)
    d = logp.astype(np.float64) - ref
    expected = {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) + d - 1.0}[estimator]
    got = jax.jit(functools.partial(kl_penalty, estimator=estimator))(logp, ref)
    assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if estimator != "k1":
        assert np.all(np.asarray(got) >= 0)


def verl_low_var_kl(logp: np.ndarray, ref_logp: np.ndarray) -> np.ndarray:
    """verl's "low_var_kl" (k3) as its core_algos computes it, in float64 NumPy."""
    kl = np.clip(ref_logp.astype(np.float64) - logp, -20.0, 20.0)
    return np.clip(np.exp(kl) - kl - 1.0, -10.0, 10.0)


def test_k3_clamp_matches_verl_beyond_the_clamp():
    """Log-ratio gaps of 0 to 30 nats either way: inside the clamp, between the two clips
    (k3 > 10 from a gap near 2.5 on the ref side), and beyond the log-ratio clip."""
    gaps = np.array([0.0, 0.5, 2.0, 2.7, 4.0, 6.0, 12.0, 25.0, 30.0], np.float32)
    logp = np.full(2 * gaps.size, -3.0, np.float32)
    ref = np.concatenate([logp[: gaps.size] + gaps, logp[gaps.size :] - gaps])
    got = np.asarray(jax.jit(functools.partial(kl_penalty, clamp=10.0))(logp, ref))
    assert_close(got, verl_low_var_kl(logp, ref), rtol=1e-5, atol=1e-6)
    # clamped: gaps >= 2.7 with the reference above (e^g - g - 1), >= 12 below (g - 1 + e^-g)
    assert got.max() == 10.0 and np.sum(got == 10.0) == 9
    unclamped = np.asarray(kl_penalty(logp, ref))  # clamp 0: off
    assert unclamped.max() > 1e8 and np.array_equal(unclamped <= 10, got < 10)
    grad = jax.grad(lambda lp: kl_penalty(lp, jnp.asarray(ref), clamp=10.0).sum())(logp)
    assert np.all(np.asarray(grad)[got == 10.0] == 0.0)  # no gradient past the clamp


def test_kl_penalty_unknown_raises():
    with pytest.raises(ValueError, match="KL estimator"):
        kl_penalty(jnp.zeros(2), jnp.zeros(2), "k4")


# ---------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_entropy_from_logits_matches_numpy(temp):
    rng = np.random.default_rng(8)
    logits = (rng.normal(size=(3, 5, 50)) * 3.0).astype(np.float32)
    got = jax.jit(functools.partial(entropy_from_logits, temperature=temp))(logits)
    assert got.dtype == jnp.float32 and got.shape == (3, 5)
    assert_close(got, np_entropy(logits, temp), rtol=1e-5, atol=1e-5)
    # bf16 input is upcast before the math
    got_bf16 = entropy_from_logits(jnp.asarray(logits, jnp.bfloat16), temp)
    assert got_bf16.dtype == jnp.float32
    assert_close(
        got_bf16, np_entropy(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), temp)
    )


def test_entropy_bounds():
    assert float(entropy_from_logits(jnp.zeros(64))) == pytest.approx(np.log(64), rel=1e-6)
    peaked = jnp.zeros(64).at[3].set(100.0)
    assert float(entropy_from_logits(peaked)) == pytest.approx(0.0, abs=1e-6)


def unchunked_logp_entropy(hidden, unembed, targets, temp):
    logits = jnp.einsum("btd,dv->btv", hidden, unembed, preferred_element_type=jnp.float32) / temp
    logp = jax.nn.log_softmax(logits, -1)
    tok = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, -1)
    return tok, ent


@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("remat", [True, False])
@pytest.mark.parametrize("t,chunk", [(13, 4), (12, 4), (5, 8), (7, 1)])
def test_token_logp_entropy_chunked_equals_unchunked(t, chunk, remat, vocab_major):
    rng = np.random.default_rng(9)
    b, d, v, temp = 2, 8, 37, 0.8
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    unembed = rng.normal(size=(d, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    fn = jax.jit(functools.partial(token_logp_entropy, temperature=temp, chunk_size=chunk))
    logp, ent = fn(hidden, unembed, targets)
    assert logp.shape == (b, t) and ent.shape == (b, t) and logp.dtype == jnp.float32
    logits = np.einsum("btd,dv->btv", hidden.astype(np.float64), unembed)
    assert_close(logp, np_logp(logits, targets, temp), rtol=1e-4, atol=1e-5)
    assert_close(ent, np_entropy(logits, temp), rtol=1e-4, atol=1e-5)

    # Gradients w.r.t. hidden and unembed equal those of the unchunked computation.
    c1 = rng.normal(size=(b, t)).astype(np.float32)
    c2 = rng.normal(size=(b, t)).astype(np.float32)

    def objective(impl, h, w, temp):
        lp, en = impl(h, w, temp)
        return jnp.sum(lp * c1) + jnp.sum(en * c2)

    def chunked(h, w, temp):  # w [D, V]; given as stored, [V, D], with vocab_major
        return token_logp_entropy(
            h, w.T if vocab_major else w, targets, temperature=temp,
            chunk_size=chunk, remat=remat, vocab_major=vocab_major,
        )  # fmt: skip

    def full(h, w, temp):
        return unchunked_logp_entropy(h, w, targets, temp)

    # Gradients w.r.t. hidden, unembed and the temperature (the hand-written VJP).
    grad = functools.partial(jax.grad, argnums=(0, 1, 2))
    g_chunk = jax.jit(grad(functools.partial(objective, chunked)))(hidden, unembed, temp)
    g_full = grad(functools.partial(objective, full))(hidden, unembed, temp)
    for a, b_ in zip(g_chunk, g_full, strict=True):
        assert_close(a, b_, rtol=1e-4, atol=1e-5)
        assert np.abs(np.asarray(a)).max() > 1e-3  # non-trivial gradients


def test_token_logp_entropy_bf16_hidden():
    rng = np.random.default_rng(10)
    hidden = rng.normal(size=(2, 6, 8)).astype(np.float32)
    unembed = rng.normal(size=(8, 20)).astype(np.float32) * 0.3
    targets = rng.integers(0, 20, size=(2, 6)).astype(np.int32)
    hb = jnp.asarray(hidden, jnp.bfloat16)
    wb = jnp.asarray(unembed, jnp.bfloat16)
    logp, ent = token_logp_entropy(hb, wb, targets, chunk_size=4)
    assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
    ref_lp, ref_ent = unchunked_logp_entropy(hb, wb, jnp.asarray(targets), 1.0)
    assert_close(logp, ref_lp, rtol=1e-5, atol=1e-5)
    assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
