"""The entropy-method registry: every method registered once, its settings declared once
(default and help), its config validated by the method, and the training metrics of
every `configs/*.py` unchanged by the move to one module per method, and by folding the
old-policy pass into a step's only update."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxrlvr import methods
from jaxrlvr.config import ConfigError, base_config, validate
from jaxrlvr.config_help import HELP

REPO = Path(__file__).resolve().parents[1]


def test_every_method_is_one_module_with_its_settings_declared_once():
    assert methods.names()[0] == "none"
    for name in methods.names():
        cls = methods.get(name)
        assert cls.name == name and cls.summary
        if name != "none":
            assert cls.__module__ == f"jaxrlvr.methods.{name}"
        defaults = base_config("demo").algo.get(name)
        declared = cls.defaults()
        assert (defaults.to_dict() if defaults is not None else {}) == declared
        for key in declared:
            assert HELP[f"algo.{name}.{key}"] == cls.help()[key]
        instance = cls.from_config(base_config("demo").algo)
        assert dataclasses.is_dataclass(instance) and hash(instance) == hash(cls(**declared))


def test_unknown_method_and_bad_settings_name_the_key():
    c = base_config("demo")
    c.algo.intervention = "entropy_magic"
    with pytest.raises(ConfigError, match="config.algo.intervention='entropy_magic'"):
        validate(c, files=False)
    c = base_config("demo")
    c.algo.intervention = "steer"
    c.algo.steer.lambda_min = 0.0
    with pytest.raises(ConfigError, match=r"config.algo.steer.lambda_min=0.0: must be in \(0, 1\]"):
        validate(c, files=False)
    with pytest.raises(KeyError, match="no entropy method 'x'; choose one of none, "):
        methods.get("x")


def test_a_method_registers_once():
    with pytest.raises(ValueError, match="'steer' is registered already"):
        methods.register(type("Steer2", (methods.Method,), {"name": "steer"}))


def method_runs(mode: str) -> None:
    """`tests/method_runs.py MODE` on one CPU device; fails with its output."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "method_runs.py"), mode],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]


def test_training_metrics_of_every_config_unchanged():
    """One step of each configs/*.py (and pos_adv's stage / rand_pos_clip / ablation) on
    the demo policy equals the metrics recorded before the methods moved into
    jaxrlvr/methods/ (tests/fixtures/method_runs.json), 1e-6 relative."""
    method_runs("--check")


def test_single_pass_step_equals_the_two_pass_step():
    """With one update per step the old log-probs come from the update's own forward pass
    (no separate old-policy pass): every configs/*.py gives the metrics and parameters of
    the two-pass step (1e-6), adaptive_entropy keeping its pass."""
    method_runs("--single-pass")


def test_kl_cov_penalty_is_flat_on_policy():
    """At logp == old_logp (the on-policy update) KL-Cov's |logp - old_logp| term adds
    nothing to the gradient (torch's abs, as in verl): only -A r's gradient remains."""
    import jax
    import jax.numpy as jnp

    from jaxrlvr import losses

    rng = np.random.default_rng(0)
    logp = jnp.asarray(-rng.random((4, 6)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    mask = jnp.ones((4, 6), jnp.float32)

    def total(lp, coef):
        loss, selected = losses.kl_cov_token_loss(lp, logp, adv, mask, ratio=0.5, kl_coef=coef)
        return jnp.sum(loss), selected

    (_, selected), grad = jax.value_and_grad(total, has_aux=True)(logp, 1.0)
    assert float(jnp.sum(selected)) > 0
    np.testing.assert_allclose(grad, jax.grad(lambda lp: total(lp, 0.0)[0])(logp), rtol=1e-6)
    np.testing.assert_allclose(grad, -adv, rtol=1e-6)  # d(-A exp(lp - old))/d lp at lp = old


def gspo_numpy(logp, old_logp, adv, mask, eps_low, eps_high, cap=10.0):
    """verl's compute_policy_loss_gspo in NumPy (float64): per-token loss, clip flags, and
    d loss / d logp (the straight-through ratio's gradient is the ratio itself)."""
    seq = ((logp - old_logp) * mask).sum(-1, keepdims=True) / np.maximum(
        mask.sum(-1, keepdims=True), 1
    )
    log_s = np.minimum(np.broadcast_to(seq, logp.shape), cap)
    s = np.exp(log_s)
    l1, l2 = -adv * s, -adv * np.clip(s, 1 - eps_low, 1 + eps_high)
    loss = np.maximum(l1, l2)
    # d l1 / d logp = -A s below the cap (0 above it); l2 passes it only inside the band
    d1 = np.where(seq < cap, -adv * s, 0.0)
    inside = (s > 1 - eps_low) & (s < 1 + eps_high)
    d2 = np.where(inside, d1, 0.0)
    grad = np.where(l1 > l2, d1, np.where(l2 > l1, d2, 0.5 * (d1 + d2)))
    return loss, (l2 > l1).astype(float), grad


def test_gspo_token_loss_is_verls_formula():
    import jax
    import jax.numpy as jnp

    from jaxrlvr import losses

    rng = np.random.default_rng(0)
    b, t = 6, 7
    old = -rng.uniform(0.1, 3.0, (b, t))
    logp = old + rng.normal(0, 0.02, (b, t))
    logp[0] = old[0] + 12.0  # a sequence past the log-ratio cap
    adv = np.repeat(rng.normal(0, 1, (b, 1)), t, axis=1)
    mask = (np.arange(t)[None] < rng.integers(1, t + 1, (b, 1))).astype(float)
    eps_low, eps_high = 3e-3, 4e-3
    loss, clipped, grad = gspo_numpy(logp, old, adv, mask, eps_low, eps_high)

    def total(lp):
        terms = losses.gspo_token_loss(lp, jnp.asarray(old), adv, mask, eps_low, eps_high)
        return jnp.sum(terms.loss * mask), terms

    (_, terms), g = jax.value_and_grad(total, has_aux=True)(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(np.asarray(terms.loss) * mask, loss * mask, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(terms.clipped) * mask, clipped * mask)
    np.testing.assert_allclose(np.asarray(g), grad * mask, rtol=2e-5, atol=1e-6)
    assert 0 < (clipped * mask).sum() < mask.sum()  # both branches are exercised
    # the ratio is the sequence's: equal along each sequence
    ratio = np.asarray(terms.ratio)
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-6)
