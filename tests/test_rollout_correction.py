"""The sampler/learner mismatch (issue: on-policy at every precision): its metrics, the
rollout corrections (truncated IS, rejection) against NumPy references of verl's
formulas, micro-batch invariance, `rollout.dtype` end to end, and `algo.cov_scope`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_train import _random_batch, tiny_config
from tiny_policy import write_tiny_policy

from jaxrlvr import losses, train
from jaxrlvr.config import ConfigError, base_config, validate, validate_mesh
from jaxrlvr.models import Qwen2, preset
from jaxrlvr.rl import grpo
from jaxrlvr.runtime.metrics import read_metrics


def _inputs(seed=0, b=6, r=7):
    rng = np.random.default_rng(seed)
    old = -rng.random((b, r)).astype(np.float32) * 3
    sampler = old + rng.normal(0, 0.4, (b, r)).astype(np.float32)
    mask = (np.arange(r)[None] < rng.integers(2, r + 1, (b, 1))).astype(np.float32)
    return old, sampler, mask


@pytest.mark.parametrize("level, cap", [("token", 1.5), ("sequence", 1.2)])
def test_is_weights_are_verls_truncated_ratio(level, cap):
    old, sampler, mask = _inputs()
    d = (old.astype(np.float64) - sampler) * mask
    log_w = d if level == "token" else np.broadcast_to(d.sum(-1, keepdims=True), d.shape)
    want = np.where(mask > 0, np.minimum(np.exp(log_w), cap), 1.0)
    w, truncated = losses.rollout_is_weights(old, sampler, mask, level=level, threshold=cap)
    np.testing.assert_allclose(w, want, rtol=1e-6)
    np.testing.assert_array_equal(truncated, (np.exp(log_w) > cap) & (mask > 0))
    assert 0 < float(np.sum(truncated)) < mask.sum()  # both cases occur


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rs_keeps_the_band(level):
    old, sampler, mask = _inputs(1)
    d = (old.astype(np.float64) - sampler) * mask
    ratio = np.exp(d if level == "token" else np.broadcast_to(d.sum(-1, keepdims=True), d.shape))
    keep = losses.rollout_rs_keep(old, sampler, mask, level=level, lower=0.8, upper=1.25)
    np.testing.assert_array_equal(keep, (ratio >= 0.8) & (ratio <= 1.25) & (mask > 0))
    assert 0 < float(np.sum(keep)) < mask.sum()


def test_mismatch_metrics_match_numpy():
    old, sampler, mask = _inputs(2)
    m = {k: float(v) for k, v in losses.mismatch_metrics(old, sampler, mask).items()}
    sel = mask > 0
    d = (old.astype(np.float64) - sampler)[sel]
    p, q = np.exp(old.astype(np.float64))[sel], np.exp(sampler.astype(np.float64))[sel]
    seq = np.abs(((old.astype(np.float64) - sampler) * mask).sum(-1))
    want = {
        "mismatch_kl": np.mean(np.exp(d) - 1 - d),
        "mismatch_logp_abs_diff_mean": np.mean(np.abs(d)),
        "mismatch_logp_abs_diff_max": np.max(np.abs(d)),
        "mismatch_prob_pearson": np.corrcoef(p, q)[0, 1],
        "mismatch_seq_log_ratio_abs_mean": np.mean(seq),
        "sampler_entropy": -np.mean(sampler.astype(np.float64)[sel]),
    }
    for key, value in want.items():
        np.testing.assert_allclose(m[key], value, rtol=2e-5, err_msg=key)


def _update(c, micro, sampler_shift=0.3, params=None):
    """One update (plain SGD, lr 1e3: the parameter change is the gradient, scaled well
    above the float32 resolution of the parameters) with the sampler's log-probs
    `sampler_shift`-noisy around the old ones."""
    cfg = preset("tiny")
    graphdef, params0 = nnx.split(Qwen2(cfg, rngs=nnx.Rngs(1)), nnx.Param)
    c.train.micro_batch_sequences = micro
    batch = _random_batch(cfg, 8, 6, 5, micro_batch=micro)
    rng = np.random.default_rng(3)
    noise = rng.normal(0, sampler_shift, batch.old_logp.shape).astype(np.float32)
    batch = batch._replace(sampler_logp=batch.old_logp + noise)
    s = grpo.LossSettings.from_config(c)
    tx = optax.sgd(1e3)
    state = grpo.init_state(params0, tx, c)
    inputs = grpo.step_inputs(state, batch.old_logp, batch.response_mask, jnp.int32(0), s)
    new, m = jax.jit(lambda st, b: grpo.update(st, graphdef, tx, b, 0, inputs, s))(state, batch)
    return params0, new.params, m, batch


@pytest.mark.parametrize(
    "changes",
    [
        {"algo.rollout_is": "token"},
        {"algo.rollout_is": "sequence", "algo.rollout_is_threshold": 1.5},
        {"algo.rollout_rs": "token", "algo.rollout_rs_threshold": 1.3},
        {"algo.rollout_rs": "sequence", "algo.rollout_rs_threshold": 2.5},
    ],
)
def test_corrections_are_micro_batch_invariant_and_counted(changes):
    c = base_config("demo")
    c.data.max_prompt_len = 6
    c.train.prompts_per_step = c.train.mini_batch_prompts
    c.train.single_pass = False  # the batch's old log-probs are given
    c.update_from_flattened_dict(changes)
    validate(c, files=False)
    p0, p_one, m_one, batch = _update(c, 8)
    _, p_four, m_four, _ = _update(c, 2)
    for a, b, base in zip(
        jax.tree.leaves(p_one), jax.tree.leaves(p_four), jax.tree.leaves(p0), strict=True
    ):
        step1, step4 = np.asarray(a - base), np.asarray(b - base)
        resolution = 2 * np.finfo(np.float32).eps * np.abs(np.asarray(base))  # of a - base
        assert np.all(np.abs(step1 - step4) <= 1e-5 * np.max(np.abs(step1)) + resolution)
    for key in ("loss", "grad_norm", "rollout_is_mean", "rollout_rs_masked_frac"):
        np.testing.assert_allclose(m_one[key], m_four[key], rtol=1e-5, atol=1e-8)
    old, sampler = np.asarray(batch.old_logp), np.asarray(batch.sampler_logp)
    mask = np.asarray(batch.response_mask)
    if "algo.rollout_is" in changes:
        w, t = losses.rollout_is_weights(
            old, sampler, mask, level=c.algo.rollout_is, threshold=c.algo.rollout_is_threshold
        )
        np.testing.assert_allclose(m_one["rollout_is_mean"], np.sum(w * mask) / mask.sum(), 1e-5)
        np.testing.assert_allclose(m_one["rollout_is_clip_frac"], np.sum(t) / mask.sum(), 1e-5)
    else:
        lower, upper = grpo.rollout_rs_band(c)
        keep = losses.rollout_rs_keep(
            old, sampler, mask, level=c.algo.rollout_rs, lower=lower, upper=upper
        )
        want = 1 - np.sum(keep) / mask.sum()
        assert 0 < want < 1
        np.testing.assert_allclose(m_one["rollout_rs_masked_frac"], want, rtol=1e-5)


def test_token_is_scales_each_tokens_gradient():
    """With a huge cap every token's weight is exp(old - sampler): the loss equals the
    uncorrected loss with each token's term multiplied by it (checked on the loss value,
    where the terms enter linearly)."""
    c = base_config("demo")
    c.data.max_prompt_len = 6
    c.train.prompts_per_step = c.train.mini_batch_prompts
    c.train.single_pass = False
    c.algo.dual_clip = 0.0
    plain = _update(c, 8)[2]
    c.algo.rollout_is, c.algo.rollout_is_threshold = "token", 1e9
    corrected = _update(c, 8)[2]
    assert abs(float(corrected["loss"]) - float(plain["loss"])) > 1e-4
    c.algo.rollout_is_threshold = 1.0  # every weight min(w, 1): at most the plain terms
    assert float(_update(c, 8)[2]["rollout_is_mean"]) <= 1.0


def test_bad_correction_settings_name_the_key():
    c = base_config("demo")
    c.algo.rollout_is, c.algo.old_logp_source = "token", "sampler"
    with pytest.raises(ConfigError, match=r"config.algo.rollout_is='token': corrects the sampler"):
        validate(c, files=False)
    c = base_config("demo")
    c.algo.rollout_is_threshold = 0.5
    with pytest.raises(ConfigError, match=r"config.algo.rollout_is_threshold=0.5: must be >= 1"):
        validate(c, files=False)
    c = base_config("demo")
    c.rollout.dtype = "float8"
    with pytest.raises(ConfigError, match=r"config.rollout.dtype='float8': must be one of"):
        validate(c, files=False)

    class FakeMesh:  # a TPU mesh, as far as the check looks
        class devices:  # noqa: N801
            flat = [type("Device", (), {"platform": "tpu"})()]

    c = base_config("demo")
    c.rollout.dtype = "float16"
    with pytest.raises(ConfigError, match="float16.*TPUs have no float16"):
        validate_mesh(c, FakeMesh())


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    return write_tiny_policy(tmp_path_factory.mktemp("policy"))


def test_rollout_dtype_end_to_end(tiny_policy, tmp_path):
    """One step per sampler dtype: a float32 sampler is on-policy to float precision, a
    bfloat16 / float16 one is measurably off; every mismatch metric is written."""
    rows = {}
    for dtype in ("float32", "bfloat16", "float16"):
        c = tiny_config(tiny_policy, tmp_path / dtype, **{"train.steps": 1})
        c.rollout.dtype, c.train.eval_every, c.train.progress = dtype, 0, False
        train.Trainer(c).run()
        rows[dtype] = read_metrics(str(tmp_path / dtype))[-1]
    keys = [k for k in rows["float32"] if k.startswith("mismatch_")] + ["sampler_entropy"]
    assert len(keys) == 6 and all(np.isfinite(rows[d][k]) for d in rows for k in keys)
    assert rows["float32"]["mismatch_logp_abs_diff_mean"] < 1e-5
    for low in ("bfloat16", "float16"):
        assert rows[low]["mismatch_logp_abs_diff_mean"] > 10 * max(
            rows["float32"]["mismatch_logp_abs_diff_mean"], 1e-7
        )


def test_cov_scope_per_device_selects_within_each_devices_rows():
    """On 8 devices, `per_device` picks KL-Cov's top-k within each device's rows of a
    micro-batch (verl's per-GPU micro-batches); `global` over the micro-batch."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxrlvr.sharding import make_mesh

    assert jax.device_count() == 8
    mesh = make_mesh((1, 8, 1))
    c = base_config("demo")
    c.algo.intervention, c.algo.kl_cov.ratio = "kl_cov", 0.2
    c.train.prompts_per_step = c.train.mini_batch_prompts
    rng = np.random.default_rng(4)
    n, r = 16, 5
    logp = -rng.random((n, r)).astype(np.float32)
    adv = np.broadcast_to(rng.normal(size=(n, 1)), (n, r)).astype(np.float32)
    mask = np.ones((n, r), np.float32)
    counts = {}
    for scope in ("global", "per_device"):
        c.algo.cov_scope = scope
        s = grpo.LossSettings.from_config(c, batch_shards=8)

        class Mb:  # the fields KL-Cov reads
            old_logp, response_mask = jnp.asarray(logp), jnp.asarray(mask)

        rows = NamedSharding(mesh, PartitionSpec("fsdp"))
        fn = jax.jit(
            lambda lp, a, s=s: s.method.token_loss(None, lp, Mb, a, {}, s).selected,
            in_shardings=(rows, rows),
            out_shardings=rows,
        )
        with jax.set_mesh(mesh):
            args = (jax.device_put(logp, rows), jax.device_put(adv, rows))
            counts[scope] = np.asarray(fn(*args))
    # NumPy reference: the global top-k, and the top-k of each device's 2 rows.
    cov = (adv - adv.mean()) * (logp - logp.mean())
    k = max(1, int(0.2 * n * r))
    assert counts["global"].sum() == k
    assert set(np.argsort(-cov.ravel())[:k]) == set(np.flatnonzero(counts["global"]))
    for block in range(8):
        rows_ = slice(2 * block, 2 * block + 2)
        lb, ab = logp[rows_], adv[rows_]
        cb = (ab - ab.mean()) * (lb - lb.mean())
        kb = max(1, int(0.2 * 2 * r))
        got = counts["per_device"][rows_]
        assert got.sum() == kb
        assert set(np.argsort(-cb.ravel())[:kb]) == set(np.flatnonzero(got))
