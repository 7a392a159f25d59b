"""The GRPO trainer: config validation, micro-batch invariance, end to end, resume."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_policy import write_tiny_policy

from jaxrlvr.config import LOSS_AGG_MODES, ConfigError, base_config, validate
from jaxrlvr.models import Qwen2, preset
from jaxrlvr.rl import grpo, packing
from jaxrlvr.runtime.metrics import read_metrics

TIME_KEYS = ("time_", "tokens_per_s")


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """A random tiny Qwen2 with the demo tokenizer and demo data (no warm start)."""
    return write_tiny_policy(tmp_path_factory.mktemp("policy"))


def tiny_config(policy, workdir, **overrides):
    c = base_config("demo")
    c.workdir = str(workdir)
    c.model.path = str(policy)
    c.data.train_files = str(policy / "train.jsonl")
    c.data.eval_files = str(policy / "eval.jsonl")
    c.rollout.n = 4
    c.rollout.max_new_tokens = 16
    c.rollout.max_slots = 16
    c.data.max_prompt_len = 16
    c.train.steps = 4
    c.train.prompts_per_step = 4
    c.train.mini_batch_prompts = 2
    c.train.micro_batch_sequences = 4
    c.train.eval_every = 2
    c.train.eval_n = 2
    c.train.eval_max_prompts = 4
    c.train.checkpoint_every = 2
    c.train.progress = False
    c.update_from_flattened_dict(overrides)
    return c


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("algo.eps_low", 1.5, r"config.algo.eps_low=1.5: must be in \[0, 1\]"),
        ("rollout.n", 0, r"config.rollout.n=0: must be >= 1"),
        ("train.prompts_per_step", 30, "must be divisible by train.mini_batch_prompts=16"),
        ("algo.loss_agg", "mean", "config.algo.loss_agg='mean': must be one of token-mean"),
        ("train.micro_batch_sequences", 7, "must divide the mini-batch"),
        ("data.train_files", "/nonexistent/*.jsonl", "'/nonexistent/\\*.jsonl' matches no file"),
        ("mesh.shape", (1, -1, -1), "config.mesh.shape"),
        ("algo.kl_clamp", -1.0, r"config.algo.kl_clamp=-1.0: must be >= 0 \(0 = off\)"),
        ("train.ppo_epochs", 0, r"config.train.ppo_epochs=0: must be >= 1"),
    ],
)
def test_invalid_config_names_key_and_range(key, value, message):
    c = base_config("demo")
    section, leaf = key.split(".")
    c[section][leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate(c)


def test_paper_preset_requires_model_and_data():
    with pytest.raises(ConfigError) as e:
        validate(base_config("qwen2.5-math-7b"))
    assert "config.model.path=None: required" in str(e.value)
    assert "config.data.train_files=None: required" in str(e.value)
    with pytest.raises(ConfigError, match="unknown preset 'llama'"):
        base_config("llama")


def test_bad_config_fails_before_any_compilation(tiny_policy, tmp_path, monkeypatch):
    from jaxrlvr import train

    compiled = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(a))
    with pytest.raises(ConfigError, match="algo.eps_low"):
        train.Trainer(tiny_config(tiny_policy, tmp_path, **{"algo.eps_low": 2.0}))
    assert not compiled and not (tmp_path / "metrics.jsonl").exists()


def test_overlong_shaping_moves_the_advantages_not_the_reward(tiny_policy, tmp_path):
    """DAPO's overlong shaping on: the random policy's responses run into the buffer (every
    truncated one is penalised); the logged reward stays the verifiable one."""
    from jaxrlvr import train

    config = tiny_config(
        tiny_policy, tmp_path, **{"train.steps": 1, "train.eval_every": 0,
        "reward.overlong_buffer": 4, "reward.overlong_penalty": 0.5},
    )  # fmt: skip
    train.Trainer(config).run()
    (row,) = read_metrics(tmp_path)
    assert row["overlong_penalized_frac"] >= row["truncated_frac"] > 0
    assert -0.5 <= row["overlong_penalty_mean"] < 0
    assert 0 <= row["reward_mean"] <= 1


def test_an_eval_set_keeping_no_prompt_is_refused(tiny_policy, tmp_path, monkeypatch):
    """It used to log `{}` for the set at every evaluation; now: one error at start-up,
    before anything compiles, and the workdir's lock released."""
    import json

    from jaxrlvr import train

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"question": "1+" * 40 + "1=", "answer": 41}) + "\n")
    compiled = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(a))
    config = tiny_config(tiny_policy, tmp_path / "run", **{"data.eval_files": f"long={long}"})
    message = (
        f"config.data.eval_files (long): no prompt of {long} is kept (1 longer than "
        "max_prompt_len=16 tokens); raise config.data.max_prompt_len or drop the set"
    )
    with pytest.raises(ConfigError) as e:
        train.Trainer(config)
    assert str(e.value) == message
    assert not compiled and not (tmp_path / "run" / "run.lock").exists()


# ----------------------------------------------------------------------------- update


def _random_rollouts(cfg, n, prompt_len, resp_len, seed=0):
    """Host arrays of n random (prompt, response) pairs of random lengths."""
    rng = np.random.RandomState(seed)
    prompts = [
        list(rng.randint(0, cfg.vocab_size, rng.randint(2, prompt_len + 1))) for _ in range(n)
    ]
    responses = [
        list(rng.randint(0, cfg.vocab_size, rng.randint(1, resp_len + 1))) for _ in range(n)
    ]
    arrays = grpo.rollout_batch(
        prompts, responses, [[0.0] * len(r) for r in responses], rng.randn(n),
        prompt_len=prompt_len, response_len=resp_len, pad_id=0,
    )  # fmt: skip
    return arrays, prompts, responses


def _random_batch(cfg, n, prompt_len, resp_len, seed=0, micro_batch=None, pack=True):
    """A device batch of random rollouts packed for `micro_batch`-sequence micro-batches."""
    arrays, _, _ = _random_rollouts(cfg, n, prompt_len, resp_len, seed)
    packed, _ = packing.pack(
        arrays, micro_batch=micro_batch or n, shards=1, row_len=prompt_len + resp_len,
        enabled=pack, buckets=base_config("demo").train.pack_buckets,
    )  # fmt: skip
    rng = np.random.RandomState(seed + 1)
    return grpo.Batch(
        **{k: jnp.asarray(packed[k]) for k in grpo.Batch._fields[:5]},
        response_mask=jnp.asarray(packed["response_mask"]),
        advantages=jnp.asarray(packed["advantages"]),
        old_logp=jnp.asarray(-rng.rand(n, resp_len).astype(np.float32)),
        old_entropy=jnp.asarray(rng.rand(n, resp_len).astype(np.float32)),
        ref_logp=jnp.asarray(-rng.rand(n, resp_len).astype(np.float32)),
    )


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_invariance(loss_agg):
    """One update with 1 or 4 micro-batches gives the same parameters.

    Plain SGD (lr 1) makes the parameter change equal the accumulated gradient, so the
    comparison is not blurred (or hidden) by Adam's per-coordinate normalisation. Each
    leaf's change must agree to 1e-5 of its largest entry (float32 summation order).
    """
    c = base_config("demo")
    c.algo.loss_agg = loss_agg
    c.algo.kl_coef = 0.1
    # Unclamped: the random reference sits ~5 nats off, so a clamped k3 would drop most of
    # the KL gradient and leave steps at the float32 resolution of the parameters.
    c.algo.kl_clamp = 0.0
    c.algo.entropy_coef = 0.01
    c.data.max_prompt_len = 6
    c.train.prompts_per_step = c.train.mini_batch_prompts  # the batch is one mini-batch
    cfg = preset("tiny")
    model = Qwen2(cfg, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.sgd(1.0)
    results = []
    for micro in (8, 2):
        c.train.micro_batch_sequences = micro
        batch = _random_batch(cfg, 8, 6, 5, micro_batch=micro)
        s = grpo.LossSettings.from_config(c)
        state = grpo.init_state(params, tx, c)
        inputs = grpo.step_inputs(state, batch.old_logp, batch.response_mask, jnp.int32(0), s)
        update = jax.jit(lambda st, b, i, s=s: grpo.update(st, graphdef, tx, b, 0, i, s))
        new, metrics = update(state, batch, inputs)
        results.append((new.params, metrics))
    (p1, m1), (p4, m4) = results
    for a, b, p0 in zip(
        jax.tree.leaves(p1), jax.tree.leaves(p4), jax.tree.leaves(params), strict=True
    ):
        step1, step4 = np.asarray(a - p0), np.asarray(b - p0)  # summation order differs
        assert np.max(np.abs(step1 - step4)) <= 1e-5 * np.max(np.abs(step1)) + 1e-12
    for key in ("loss", "grad_norm", "approx_kl", "pg_clipfrac", "kl"):
        np.testing.assert_allclose(m1[key], m4[key], rtol=1e-5, atol=1e-8)
    assert float(m1["grad_norm"]) > 0


def _one_update_setup(seed: int, resp_len: int = 5):
    """A demo config whose step is one mini-batch of 8 sequences (micro-batches of 4), a
    random tiny policy (graphdef, params) and a random batch for it."""
    c = base_config("demo")
    c.data.max_prompt_len = 6
    c.train.prompts_per_step = c.train.mini_batch_prompts  # the batch is one mini-batch
    c.train.micro_batch_sequences = 4
    c.train.single_pass = False  # the tests set the batch's old log-probs themselves
    cfg = preset("tiny")
    graphdef, params = nnx.split(Qwen2(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    return c, cfg, graphdef, params, _random_batch(cfg, 8, 6, resp_len, micro_batch=4)


def test_first_update_is_on_policy():
    """With old log-probs from the policy pass, the first update's ratio is exactly 1."""
    c, cfg, graphdef, params, batch = _one_update_setup(2)
    s = grpo.LossSettings.from_config(c)
    logp, ent = jax.jit(lambda p, b: grpo.policy_pass(graphdef, p, b, s))(params, batch)
    # Reference: a full forward pass of each sequence alone, log_softmax at temperature 1.
    _, prompts, responses = _random_rollouts(cfg, 8, 6, 5)
    model = nnx.merge(graphdef, params)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        logits = model(jnp.asarray([p + r]))[0, len(p) - 1 : -1]  # [len(r), V]
        ref = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(r)[:, None], -1)[:, 0]
        np.testing.assert_allclose(logp[i, : len(r)], ref, rtol=1e-5, atol=1e-6)
    tx, _ = grpo.make_optimizer(c.optim, 10, 1)
    state = grpo.init_state(params, tx, c)
    inputs = grpo.step_inputs(state, logp, batch.response_mask, jnp.int32(0), s)
    _, m = grpo.update(state, graphdef, tx, batch._replace(old_logp=logp), 0, inputs, s)
    assert float(m["approx_kl"]) < 1e-10 and float(m["pg_clipfrac"]) == 0.0


def test_upper_clip_fractions_match_numpy(monkeypatch):
    """`pg_clipfrac_pos` (A > 0 and r > 1 + eps_high) and `pg_clipfrac_pos_lowp` (those
    with old probability below `grpo.LOW_PROB`) against a NumPy count over the tokens.
    A random tiny model gives every token a probability near 1/V, so the threshold is set
    to the median old probability of the upper-clipped tokens, for both kinds to occur."""
    c, _, graphdef, params, batch = _one_update_setup(4, resp_len=8)
    c.algo.eps_low, c.algo.eps_high = 0.2, 0.28
    s = grpo.LossSettings.from_config(c)
    logp, _ = jax.jit(lambda p, b: grpo.policy_pass(graphdef, p, b, s))(params, batch)
    logp, mask = np.asarray(logp), np.asarray(batch.response_mask)
    rng = np.random.RandomState(5)
    old = logp - rng.uniform(-0.6, 0.6, logp.shape).astype(np.float32)  # ratios 0.55-1.8
    adv = np.where(np.arange(8) % 2 == 0, 1.0, -1.0).astype(np.float32)  # [N]
    ratio = np.exp(logp - old)
    upper = (adv[:, None] > 0) & (ratio > 1.28) & (mask > 0)
    lower = (adv[:, None] < 0) & (ratio < 0.8) & (mask > 0)
    monkeypatch.setattr(grpo, "LOW_PROB", float(np.median(np.exp(old[upper]))))
    lowp = np.exp(old) < grpo.LOW_PROB
    frac = lambda x: np.sum(x * mask) / np.sum(mask)  # noqa: E731
    assert 0 < frac(upper & lowp) < frac(upper) and frac(lower) > 0  # every case occurs

    batch = batch._replace(old_logp=jnp.asarray(old), advantages=jnp.asarray(adv))
    tx, _ = grpo.make_optimizer(c.optim, 10, 1)
    state = grpo.init_state(params, tx, c)
    inputs = grpo.step_inputs(state, batch.old_logp, batch.response_mask, jnp.int32(0), s)
    _, m = grpo.update(state, graphdef, tx, batch, 0, inputs, s)
    np.testing.assert_allclose(m["pg_clipfrac"], frac(upper | lower), rtol=1e-6)
    np.testing.assert_allclose(m["pg_clipfrac_pos"], frac(upper), rtol=1e-6)
    np.testing.assert_allclose(m["pg_clipfrac_pos_lowp"], frac(upper & lowp), rtol=1e-6)


def test_non_finite_update_leaves_the_state_unchanged():
    """The on-device guard: a NaN loss skips the update (parameters and moments kept)."""
    c, _, graphdef, params, batch = _one_update_setup(3)
    s = grpo.LossSettings.from_config(c)
    tx, _ = grpo.make_optimizer(c.optim, 10, 1)
    state = grpo.init_state(params, tx, c)
    inputs = grpo.step_inputs(state, batch.old_logp, batch.response_mask, jnp.int32(0), s)
    update = jax.jit(lambda st, b: grpo.update(st, graphdef, tx, b, 0, inputs, s))
    before = jax.tree.leaves(jax.tree.map(np.asarray, (state.params, state.opt_state)))
    bad = batch._replace(advantages=batch.advantages.at[0].set(jnp.nan))
    new, m = update(state, bad)
    assert int(m["skip_code"]) & 1 and not np.isfinite(float(m["loss"]))
    after = jax.tree.leaves((new.params, new.opt_state))
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    new, m = update(state, batch)
    assert int(m["skip_code"]) == 0
    after = jax.tree.leaves((new.params, new.opt_state))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, after, strict=True))


# ----------------------------------------------------------------------------- end to end


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS)} for r in rows]


def test_end_to_end_and_resume(tiny_policy, tmp_path, monkeypatch):
    from jaxrlvr import train

    # The entropy-guided lambda controller changes every step: equal metrics after resume
    # (lambda, lambda_next included) show it is checkpointed and restored with the state.
    kw = {
        "algo.intervention": "pos_adv",
        "algo.pos_adv": ml_collections.ConfigDict(
            dict(schedule="entropy_guided", lam=1.0, neg_weight=1.0, delta=5.0, step=0.25,
                 lam0=0.5, ratio=0.1)
        ),
        "diagnostics.entropy_check_every": 2,
        # The random policy never earns a reward, so every group is uninformative: dynamic
        # sampling draws its maximum of batches, then tops the batch up.
        "algo.dynamic_sampling": True,
        "algo.dynamic_sampling_max_batches": 2,
        "algo.kl_coef": 0.05,  # the frozen reference policy
        # With no reward, advantages are zero; the entropy bonus still moves the policy.
        "algo.entropy_coef": 0.05,
    }  # fmt: skip
    full = tmp_path / "full"
    train.Trainer(tiny_config(tiny_policy, full, **kw)).run()
    rows = read_metrics(full)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert "eval_avg@2" in rows[0] and "entropy" not in rows[0]  # the base policy's eval
    rows = rows[1:]
    for key in (
        "entropy", "reward_mean", "accuracy", "response_length_mean", "response_length_max",
        "truncated_frac", "pg_clipfrac", "pg_clipfrac_pos", "pg_clipfrac_pos_lowp",
        "pg_clipfrac_lower", "approx_kl", "grad_norm", "lr",
        "advantage_pos_frac", "reward_errors", "time_rollout", "time_update", "time_step",
        "tokens_per_s", "entropy_delta",
    ):  # fmt: skip
        assert key in rows[-1], key
    assert rows[0]["entropy_delta"] is None and math.isfinite(rows[1]["entropy_delta"])
    assert "eval_avg@2" in rows[1] and "eval_pass@2" in rows[1]
    assert 0 < rows[0]["entropy"] < math.log(64)
    assert [r["lambda"] for r in rows] == [
        0.5,
        0.25,
        0.0,
        0.0,
    ]  # entropy < delta = 5 > ln(V): steps down
    assert "dH_actual" in rows[1] and "dH_corr" in rows[1] and "dH_actual" not in rows[0]
    assert "cov_top_0.2pct" in rows[0] and "advantage_pos_frac" in rows[0]
    assert all(r["dynamic_sampling_batches"] == 2 for r in rows)
    assert 0 <= rows[0]["kl"] < rows[-1]["kl"] and all(r["grad_norm"] > 0 for r in rows)
    assert all(r["dynamic_sampling_kept_frac"] == 0.0 for r in rows)
    assert (full / "hf" / "model.safetensors").exists()
    assert (full / "hf" / "tokenizer.json").exists()

    # Interrupt a second run after step 3 (checkpoint at step 2), then rerun: same metrics.
    part = tmp_path / "part"
    original = train.Trainer.collect

    def crash_at_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(train.Trainer, "collect", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        train.Trainer(tiny_config(tiny_policy, part, **kw)).run()
    monkeypatch.setattr(train.Trainer, "collect", original)
    resumed = train.Trainer(tiny_config(tiny_policy, part, **kw))
    assert resumed.start_step == 2
    resumed.run()
    a, b = _comparable(rows), _comparable(read_metrics(part)[1:])
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, atol=1e-7, err_msg=k)
            else:
                assert ra[k] == rb[k], k


def test_ppo_epochs_visit_every_mini_batch_once_per_epoch(tiny_policy, tmp_path):
    """`train.ppo_epochs=2`: the mini-batches in order, twice, all against the step's old
    log-probs (the first update is on-policy, the second epoch is not); the optimizer
    schedule counts every update."""
    import dataclasses

    from jaxrlvr import train

    kw = {
        "train.steps": 2, "train.ppo_epochs": 2, "train.eval_every": 0,
        "train.checkpoint_every": 0, "algo.entropy_coef": 0.05,  # moves the random policy
        "optim.warmup_steps": 1, "optim.lr": 1e-3,
    }  # fmt: skip
    trainer = train.Trainer(tiny_config(tiny_policy, tmp_path, **kw))
    programs, calls = trainer.learner.programs, []

    def update(state, batch, k, inputs):
        state, metrics, old = programs.update(state, batch, k, inputs)
        calls.append((int(k), float(metrics["approx_kl"])))
        return state, metrics, old

    trainer.learner.programs = dataclasses.replace(programs, update=update)
    trainer.run()
    assert [k for k, _ in calls] == [0, 1, 0, 1] * 2
    kls = [kl for _, kl in calls[:4]]  # the first step
    assert kls[0] < 1e-10 and min(kls[2:]) > 100 * max(kls[0], 1e-12)
    # One step of warm-up spans the step's 4 updates (2 if epochs were not counted):
    # the first step's last update runs at 3/4 of the peak.
    assert [r["lr"] for r in read_metrics(tmp_path)] == pytest.approx([0.75e-3, 1e-3])
    assert float(trainer.learner.schedule(1)) == pytest.approx(1e-3 / 4)


@pytest.mark.parametrize(
    "intervention, sub",
    [
        ("entropy_bonus", {}),
        ("adaptive_entropy", {}),
        ("clip_cov", {"ratio": 0.2, "lb": -1.0, "ub": 5.0}),
        ("kl_cov", {"ratio": 0.2}),
        ("pos_adv", {"schedule": "stage"}),
        ("pos_adv", {"schedule": "rand_pos_clip", "ratio": 0.2}),
        ("steer", {"norm_sequences": 2}),
    ],
)
def test_every_intervention_updates(intervention, sub):
    """Each intervention compiles into the update and reports its own metrics."""
    c = base_config("demo")
    c.algo.intervention = intervention
    c.algo.entropy_coef = 0.01 if intervention == "entropy_bonus" else 0.0
    c.algo.adaptive_entropy.target = 10.0  # bonus active
    for k, v in sub.items():
        c.algo[intervention][k] = v
    c.data.max_prompt_len = 6
    c.train.prompts_per_step = c.train.mini_batch_prompts  # the batch is one mini-batch
    c.train.micro_batch_sequences = 4
    c.train.single_pass = False  # the tests set the batch's old log-probs themselves
    cfg = preset("tiny")
    graphdef, params = nnx.split(Qwen2(cfg, rngs=nnx.Rngs(3)), nnx.Param)
    s = grpo.LossSettings.from_config(c, num_epochs=2)
    tx = optax.sgd(1.0)
    state = grpo.init_state(params, tx, c, step=3)
    batch = _random_batch(cfg, 8, 6, 5, micro_batch=4)
    logp, ent = grpo.policy_pass(graphdef, params, batch, s)  # near on-policy old log-probs
    noise = 0.05 * jax.random.normal(jax.random.key(1), logp.shape)
    batch = batch._replace(old_logp=logp + noise, old_entropy=ent)
    inputs = grpo.step_inputs(state, batch.old_logp, batch.response_mask, jnp.int32(1), s)
    new, m = jax.jit(lambda st, b: grpo.update(st, graphdef, tx, b, 0, inputs, s))(state, batch)
    assert all(np.isfinite(float(v)) for v in m.values())
    assert float(m["grad_norm"]) > 0
    assert not np.array_equal(jax.random.key_data(new.rng), jax.random.key_data(state.rng))
    if intervention in ("clip_cov", "kl_cov") or sub.get("schedule") == "rand_pos_clip":
        assert float(m["intervention_frac"]) > 0
    if intervention == "steer":
        assert 0.8 <= float(m["weight_min"]) < 1.0
    if intervention == "adaptive_entropy":
        finished = grpo.finish_step(state, jnp.float32(0.5), inputs, s)
        assert float(finished.controller.alpha) == pytest.approx(1e-4)  # stepped up
    if sub.get("schedule") == "stage":  # step 3 of 500: first half, lambda 0
        assert float(inputs["lam"]) == 0.0


@pytest.mark.parametrize(
    "intervention, controller, field",
    [("pos_adv", "lam", 0.35), ("adaptive_entropy", "alpha", 0.004), ("none", None, None)],
)
def test_controllers_survive_checkpoint(tmp_path, intervention, controller, field):
    """The active method's controller is saved and restored with the train state."""
    from jaxrlvr import methods
    from jaxrlvr.runtime.checkpointing import Checkpointer

    c = base_config("demo")
    c.algo.intervention = intervention
    init = methods.from_config(c).init_controller()
    value = jax.tree.map(lambda x: jnp.float32(field), init)
    state = grpo.TrainState(
        step=jnp.int32(7), params={"w": jnp.ones((2, 3))}, opt_state=(), rng=jax.random.key(5),
        entropy=jnp.float32(0.3), controller=value,
    )  # fmt: skip
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(7, state, {"next_index": 7})
    ckpt.wait()
    like = state.replace(step=jnp.int32(0), entropy=jnp.float32(0), controller=init)
    restored, data = Checkpointer(str(tmp_path / "ckpt")).restore(7, like)
    assert data == {"next_index": 7} and int(restored.step) == 7
    if controller is not None:
        assert float(getattr(restored.controller, controller)) == pytest.approx(field)
    else:
        assert restored.controller == ()
    assert np.array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_give_the_same_training_metrics(tiny_policy, tmp_path, remat):
    """Two steps with remat in every pass (policy, reference, update, entropy check) match
    the run without remat to 1e-5 (float32; only the recompute order differs)."""
    from jaxrlvr import train

    kw = {
        "train.steps": 2,
        "train.eval_every": 1,
        "diagnostics.entropy_check_every": 1,
        "algo.kl_coef": 0.05,
        "algo.entropy_coef": 0.05,  # a gradient although the random policy earns no reward
    }
    runs = {}
    for setting in ("none", remat):
        workdir = tmp_path / setting
        train.Trainer(tiny_config(tiny_policy, workdir, **kw, **{"model.remat": setting})).run()
        runs[setting] = _comparable(read_metrics(workdir))
    for base, other in zip(runs["none"], runs[remat], strict=True):
        assert base.keys() == other.keys()
        for key, value in base.items():
            if isinstance(value, float):
                # The sampler/learner mismatch is float32 rounding itself (~1e-7 per token,
                # summed per sequence): only its scale is comparable across recompute orders.
                atol = 1e-6 if key.startswith(("mismatch_", "sampler_logp_abs_diff")) else 1e-7
                np.testing.assert_allclose(other[key], value, rtol=1e-5, atol=atol, err_msg=key)
    assert runs["none"][-1]["grad_norm"] > 0 and "dH_actual" in runs["none"][-1]


@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_packed_update_equals_unpacked(loss_agg):
    """Packing several sequences per row changes nothing but the layout: the policy pass,
    the update's parameter step and its metrics agree with one sequence per row to 1e-5."""
    c = base_config("demo")
    c.algo.loss_agg = loss_agg
    c.algo.kl_coef, c.algo.kl_clamp, c.algo.entropy_coef = 0.1, 0.0, 0.01
    c.algo.intervention = "clip_cov"  # a random per-micro-batch selection: same keys, same picks
    c.algo.clip_cov.ratio, c.algo.clip_cov.lb, c.algo.clip_cov.ub = 0.2, -100.0, 100.0
    c.data.max_prompt_len = 8
    c.train.prompts_per_step = c.train.mini_batch_prompts
    c.train.micro_batch_sequences = 4
    c.train.single_pass = False  # the tests set the batch's old log-probs themselves
    cfg = preset("tiny")
    graphdef, params = nnx.split(Qwen2(cfg, rngs=nnx.Rngs(4)), nnx.Param)
    s = grpo.LossSettings.from_config(c)
    tx = optax.sgd(1.0)
    out = []
    for pack in (False, True):
        batch = _random_batch(cfg, 8, 8, 12, seed=5, micro_batch=4, pack=pack)
        logp, ent = jax.jit(lambda p, b: grpo.policy_pass(graphdef, p, b, s))(params, batch)
        batch = batch._replace(old_logp=logp + 0.05, old_entropy=ent)
        state = grpo.init_state(params, tx, c)
        inputs = grpo.step_inputs(state, batch.old_logp, batch.response_mask, jnp.int32(0), s)
        update = jax.jit(lambda st, b, i: grpo.update(st, graphdef, tx, b, 0, i, s))
        new, m = update(state, batch, inputs)
        out.append((batch.tokens.shape[0], logp, ent, new.params, m))
    (rows_u, logp_u, ent_u, p_u, m_u), (rows_p, logp_p, ent_p, p_p, m_p) = out
    assert rows_p < rows_u == 8  # packing did pack
    mask = np.asarray(batch.response_mask) > 0
    np.testing.assert_allclose(np.asarray(logp_p)[mask], np.asarray(logp_u)[mask], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ent_p)[mask], np.asarray(ent_u)[mask], rtol=1e-5)
    leaves = (jax.tree.leaves(t) for t in (p_u, p_p, params))
    for a, b, p0 in zip(*leaves, strict=True):
        step_u, step_p = np.asarray(a - p0), np.asarray(b - p0)
        assert np.max(np.abs(step_u - step_p)) <= 1e-5 * np.max(np.abs(step_u)) + 1e-12
    for key in m_u:
        np.testing.assert_allclose(m_p[key], m_u[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert float(m_u["intervention_frac"]) > 0


@pytest.mark.parametrize("buckets", [1, 4, 8, 16])
def test_pack_buckets_round_rows_and_head_list(buckets):
    """Rows per micro-batch and the head list are the smallest multiple of 1/`buckets` of
    their unpacked size that holds the batch, and every sequence's tokens are in place."""
    arrays, prompts, responses = _random_rollouts(preset("tiny"), 16, 8, 24, seed=3)
    packed, stats = packing.pack(arrays, micro_batch=16, shards=1, row_len=32, buckets=buckets)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    need_rows = len(packing.first_fit(np.asarray(lengths), 32))
    row_step, head_step = max(1, 16 // buckets), max(1, 16 * 24 // buckets)
    rows = packed["tokens"].shape[0]
    assert rows % row_step == 0 and need_rows <= rows < need_rows + row_step
    head = packed["head_positions"].shape[0]
    n_resp = sum(map(len, responses))
    assert head % head_step == 0 and n_resp <= head < n_resp + head_step
    assert stats["rows_per_micro_batch"] == rows
    flat = packed["tokens"].reshape(-1)
    for i, r in enumerate(responses):  # response token t predicted at head slot t
        pos = packed["head_positions"][packed["head_slots"][i, : len(r)]]
        np.testing.assert_array_equal(flat[pos + 1], r)


def test_pack_buckets_validated():
    c = base_config("demo")
    c.train.pack_buckets = 0
    with pytest.raises(ConfigError, match="train.pack_buckets"):
        validate(c, files=False)
