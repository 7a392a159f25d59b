"""Every experiment file in `configs/`: loading, presets, arguments, validation, flag overrides.

Fast: no model, no data, no training. Files are loaded as `ml_collections.config_flags`
loads them (import the file, call `get_config(arg)`).
"""

import math
import re

import numpy as np
import pytest
from absl import flags
from config_files import CONFIG_FILES, ROOT, get_config
from ml_collections import config_flags

from jaxrlvr.config import (
    MIN_TEMPERATURE,
    PRESET_NAMES,
    ConfigError,
    base_config,
    is_demo,
    parse_arg,
    updates_per_step,
    validate,
)
from jaxrlvr.methods.pos_adv import SCHEDULES as POS_ADV_SCHEDULES
from jaxrlvr.runtime.record import flatten

METHODS = (
    "adaptive_entropy.py", "clip_cov.py", "clip_higher.py", "entropy_bonus.py",
    "grpo.py", "gspo.py", "kl_cov.py", "pos_adv.py", "steer.py",
)  # fmt: skip
PAPER_PRESETS = tuple(p for p in PRESET_NAMES if not is_demo(p))
POS_ADV_ABLATIONS = ("adv_pos_only", "adv_neg_only")


def error_keys(exc: ConfigError) -> list[str]:
    """The `config.<key>` each line of a validation error names."""
    lines = str(exc).removeprefix("invalid config:").splitlines()
    return [re.match(r"\s*config\.([\w.]+)", line).group(1) for line in lines if line.strip()]


@pytest.fixture
def paths(tmp_path):
    """An existing model directory and training file, as a paper preset requires."""
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "train.parquet"
    data.write_bytes(b"")
    return str(model), str(data)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_demo_hard_is_the_demo_on_the_reference_update_schedule(name):
    """`:demo-hard` changes only the updates per step and the lr (and, as in the STEER
    runs, STEER's upper clip); it needs no paths either, nor does `:demo-fork`."""
    demo, hard = get_config(name, "demo"), get_config(name, "demo-hard")
    validate(hard)
    assert updates_per_step(demo) == 2 and updates_per_step(hard) == 16
    assert hard.optim.lr < demo.optim.lr
    before, after = flatten(demo.to_dict()), flatten(hard.to_dict())
    diff = {k for k, v in after.items() if before.get(k) != v}
    expected = {"preset", "train.mini_batch_prompts", "optim.lr"}
    assert diff == expected | ({"algo.eps_high"} if name == "steer.py" else set())
    # `:demo-fork` is `demo-hard` on another base policy (`jaxrlvr.demo_policy`).
    fork = get_config(name, "demo-fork")
    validate(fork)
    assert fork.to_dict() == hard.to_dict() | {"preset": "demo-fork"}


def test_every_method_has_a_config_file():
    assert set(CONFIG_FILES) == set(METHODS)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_default_arg_is_the_valid_demo(name):
    c = get_config(name)  # `--config=configs/<name>` with no `:arg`
    assert c.preset == "demo"
    assert c.to_dict() == get_config(name, "demo").to_dict()
    assert c.to_dict() == get_config(name, "").to_dict()
    validate(c)  # the demo needs no paths: the trainer builds its model and data


@pytest.mark.parametrize("preset", PAPER_PRESETS)
@pytest.mark.parametrize("name", CONFIG_FILES)
def test_paper_presets_need_only_model_and_data(name, preset, paths):
    c = get_config(name, preset)
    assert c.preset == preset
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert error_keys(e.value) == ["model.path", "data.train_files"]
    assert "config.model.path=None: required" in str(e.value)
    assert "config.data.train_files=None: required" in str(e.value)
    c.model.path, c.data.train_files = paths
    validate(c)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_missing_paths_are_named(name, tmp_path):
    c = get_config(name, "qwen2.5-math-7b")
    c.model.path = str(tmp_path / "nope")
    c.data.train_files = str(tmp_path / "*.parquet")
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert error_keys(e.value) == ["model.path", "data.train_files"]
    assert "directory does not exist" in str(e.value)
    assert "matches no file" in str(e.value)


INTERVENTION_OF = {
    "adaptive_entropy.py": "adaptive_entropy",
    "clip_cov.py": "clip_cov",
    "clip_higher.py": "none",
    "entropy_bonus.py": "entropy_bonus",
    "grpo.py": "none",
    "gspo.py": "gspo",
    "kl_cov.py": "kl_cov",
    "pos_adv.py": "pos_adv",
    "steer.py": "steer",
}


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("name", CONFIG_FILES)
def test_method_name_and_intervention(name, preset):
    c = get_config(name, preset)
    assert c.name.split("-")[0] == name.removesuffix(".py")
    assert c.algo.intervention == INTERVENTION_OF[name]


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_unknown_tokens_are_rejected(name):
    with pytest.raises(ConfigError, match="'llama-70b'"):
        get_config(name, "llama-70b")
    with pytest.raises(ConfigError, match="expected a preset"):
        get_config(name, "qwen2.5-math-7b,llama-70b")


def test_options_belong_to_their_file():
    with pytest.raises(ConfigError, match="'linear'"):
        get_config("grpo.py", "linear")
    with pytest.raises(ConfigError, match="'stage'"):
        get_config("steer.py", "stage")


def test_parse_arg_grammar():
    assert parse_arg(None) == ("demo", [])
    assert parse_arg("") == ("demo", [])
    assert parse_arg("qwen2.5-0.5b") == ("qwen2.5-0.5b", [])
    assert parse_arg("stage", POS_ADV_SCHEDULES) == ("demo", ["stage"])
    assert parse_arg(" qwen2.5-math-7b , epoch ", POS_ADV_SCHEDULES) == (
        "qwen2.5-math-7b",
        ["epoch"],
    )
    assert parse_arg("epoch,qwen2.5-math-1.5b", POS_ADV_SCHEDULES) == (
        "qwen2.5-math-1.5b",
        ["epoch"],
    )
    with pytest.raises(ConfigError, match="unknown preset"):
        base_config("llama")


# ----------------------------------------------------------------------------- pos_adv


def test_pos_adv_default_is_entropy_guided():
    c = get_config("pos_adv.py")
    assert c.algo.intervention == "pos_adv"
    assert c.algo.pos_adv.schedule == "entropy_guided"
    assert c.name == "pos_adv-entropy_guided"
    assert c.algo.pos_adv.lam0 == 0.0


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("schedule", POS_ADV_SCHEDULES)
def test_pos_adv_every_schedule(schedule, preset, paths):
    for arg in (f"{preset},{schedule}", f"{schedule},{preset}"):
        c = get_config("pos_adv.py", arg)
        assert c.preset == preset
        assert c.algo.pos_adv.schedule == schedule
        assert c.name == f"pos_adv-{schedule}"
        assert (c.algo.pos_adv.lam, c.algo.pos_adv.neg_weight) == (1.0, 1.0)
        if preset != "demo":
            c.model.path, c.data.train_files = paths
        validate(c)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_pos_adv_ablations(preset, paths):
    pos = get_config("pos_adv.py", f"adv_pos_only,{preset}")
    neg = get_config("pos_adv.py", f"{preset},adv_neg_only")
    for c, name in ((pos, "adv_pos_only"), (neg, "adv_neg_only")):
        assert c.algo.intervention == "pos_adv"
        assert c.algo.pos_adv.schedule == "constant"
        assert c.name == f"pos_adv-{name}"
        if preset != "demo":
            c.model.path, c.data.train_files = paths
        validate(c)
    assert (pos.algo.pos_adv.lam, pos.algo.pos_adv.neg_weight) == (1.0, 0.0)  # "Adv>=0 only"
    assert (neg.algo.pos_adv.lam, neg.algo.pos_adv.neg_weight) == (0.0, 1.0)  # "Adv<=0 only"


def test_pos_adv_rejects_unknown_token():
    with pytest.raises(ConfigError) as e:
        get_config("pos_adv.py", "entropy_guidedd")
    assert "'entropy_guidedd'" in str(e.value)
    for option in POS_ADV_SCHEDULES + POS_ADV_ABLATIONS:
        assert option in str(e.value)  # the message lists what is accepted


# ----------------------------------------------------------------------------- steer


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_steer_linear(preset):
    exp = get_config("steer.py", preset)
    lin = get_config("steer.py", f"{preset},linear")
    assert (exp.algo.steer.linear, exp.algo.steer.lambda_max) == (False, 1.0)
    assert (lin.algo.steer.linear, lin.algo.steer.lambda_max) == (True, 1.2)
    assert lin.algo.steer.lambda_min == exp.algo.steer.lambda_min == 0.8
    assert lin.name == "steer-linear"
    assert lin.algo.intervention == "steer"


def test_steer_linear_default_preset():
    c = get_config("steer.py", "linear")
    assert c.preset == "demo"
    assert c.algo.steer.linear and c.algo.steer.lambda_max == 1.2
    validate(c)


# ------------------------------------------------- docs/algorithms.md#reference-settings


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_qwen25_math_7b_reference_settings(name):
    """docs/algorithms.md#reference-settings (STEER runs) on the qwen2.5-math-7b preset of
    every method."""
    c = get_config(name, "qwen2.5-math-7b")
    method = name.removesuffix(".py")
    assert c.train.prompts_per_step == 512
    assert c.rollout.n == 8
    assert c.train.mini_batch_prompts == 32
    assert updates_per_step(c) == 16
    assert c.data.max_prompt_len == 1024
    assert c.rollout.max_new_tokens == 3072
    assert c.rollout.temperature == 1.0
    assert c.rollout.top_p == 1.0
    assert c.rollout.top_k == 0
    assert c.optim.lr == 1e-6
    assert c.optim.schedule == "constant"
    assert c.optim.grad_clip == 1.0
    # GSPO keeps its own loss: seq-mean-token-mean on the sequence ratio, clip 3e-4 / 4e-4
    assert c.algo.loss_agg == ("seq-mean-token-mean" if method == "gspo" else "token-mean")
    assert c.algo.std_normalize
    assert c.algo.kl_coef == 0.0  # no KL (no reference model)
    assert c.algo.entropy_coef == (1e-3 if method == "entropy_bonus" else 0.0)
    if method in ("steer", "clip_higher"):
        assert (c.algo.eps_low, c.algo.eps_high) == (0.2, 0.28)
    if method not in ("clip_cov", "kl_cov", "gspo"):  # those losses have no dual clip
        assert c.algo.dual_clip == 10.0
    if method == "gspo":
        assert (c.algo.eps_low, c.algo.eps_high, c.algo.dual_clip) == (3e-4, 4e-4, 0.0)
    assert c.data.prompt_template == "dapo"
    assert c.data.answer_field == ""  # detected per row: reward_model.ground_truth first
    assert c.reward.name == "math"


def test_grpo_is_symmetric_and_clip_higher_is_not():
    for preset in PRESET_NAMES:
        g = get_config("grpo.py", preset)
        h = get_config("clip_higher.py", preset)
        assert g.algo.eps_low == g.algo.eps_high == 0.2
        assert (h.algo.eps_low, h.algo.eps_high) == (0.2, 0.28)


def test_clip_cov_and_kl_cov_reference_values():
    cc = get_config("clip_cov.py", "qwen2.5-math-7b")
    assert (cc.algo.eps_low, cc.algo.eps_high, cc.algo.dual_clip) == (1.0, 1.0, 0.0)
    assert (cc.algo.clip_cov.ratio, cc.algo.clip_cov.lb, cc.algo.clip_cov.ub) == (2e-4, 1.0, 5.0)
    kc = get_config("kl_cov.py", "qwen2.5-math-7b")
    assert (kc.algo.kl_cov.ratio, kc.algo.kl_cov.kl_coef) == (2e-3, 1.0)
    ae = get_config("adaptive_entropy.py", "qwen2.5-math-7b").algo.adaptive_entropy
    assert (ae.target, ae.delta, ae.alpha_min, ae.alpha_max, ae.alpha0) == (0.2, 1e-4, 0, 0.005, 0)


# ----------------------------------------------------------------------------- absl flags


def parse_flags(argv: list[str]):
    """`--config=... --config.a.b=...` as `python -m jaxrlvr.train` parses them, on a fresh
    `FlagValues` (the overrides are read from `sys_argv`, the command line by default)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", "configs/grpo.py", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


# ml_collections loads config files with the deprecated `load_module`.
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_config_flag_file_and_overrides(monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths as on the command line
    c = parse_flags(
        [
            "prog",
            "--config=configs/steer.py:qwen2.5-math-7b",
            "--config.rollout.n=4",
            "--config.model.path=/x",
        ]
    )
    assert c.name == "steer" and c.algo.intervention == "steer"
    assert c.preset == "qwen2.5-math-7b"
    assert c.rollout.n == 4
    assert c.model.path == "/x"
    assert c.train.prompts_per_step == 512 and c.model.dtype == "bfloat16"
    assert (c.algo.eps_low, c.algo.eps_high) == (0.2, 0.28)
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert sorted(error_keys(e.value)) == ["data.train_files", "model.path"]  # /x: no such dir


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_config_flag_default_option_and_types(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert parse_flags(["prog"]).to_dict() == get_config("grpo.py").to_dict()
    c = parse_flags(
        [
            "prog",
            "--config=configs/pos_adv.py:stage",
            "--config.algo.pos_adv.lam0=0.5",
            "--config.mesh.shape=(2,4,1)",
            "--config.data.train_files=a.jsonl,b.jsonl",
            "--config.algo.dynamic_sampling=true",
        ]
    )
    assert c.algo.pos_adv.schedule == "stage" and c.preset == "demo"
    assert c.algo.pos_adv.lam0 == 0.5
    assert tuple(c.mesh.shape) == (2, 4, 1)
    assert c.data.train_files == "a.jsonl,b.jsonl"
    assert c.algo.dynamic_sampling is True
    with pytest.raises(Exception, match="nosuchfield"):  # locked: unknown keys are refused
        parse_flags(["prog", "--config=configs/grpo.py", "--config.algo.nosuchfield=1"])


def float_keys(config) -> list[str]:
    return [k for k, v in flatten(config.to_dict()).items() if isinstance(v, float)]


def test_every_float_field_must_be_finite():
    keys = float_keys(base_config("demo"))
    assert {"optim.lr", "rollout.temperature", "algo.clip_cov.ratio"} <= set(keys)
    for key in keys:
        for bad in (math.inf, -math.inf, math.nan):
            c = base_config("demo")
            c.update_from_flattened_dict({key: bad})
            with pytest.raises(ConfigError) as e:
                validate(c, files=False)
            assert error_keys(e.value) == [key], str(e.value)
            assert str(e.value) == f"invalid config: config.{key}={bad!r}: must be a finite number"


def test_temperature_is_bounded_where_the_gradient_overflows():
    for temperature in (1e-30, 0.0, -1.0, MIN_TEMPERATURE / 2):
        c = base_config("demo")
        c.rollout.temperature = temperature
        with pytest.raises(ConfigError, match=r"config.rollout.temperature=.*: must be >= 1e-08"):
            validate(c, files=False)
    for temperature in (MIN_TEMPERATURE, 0.6, 1.0):
        c = base_config("demo")
        c.rollout.temperature = temperature
        validate(c, files=False)

    # The bound's arithmetic: the loss gradient scales as 1/T and its global norm squares it.
    import jax
    import jax.numpy as jnp
    import optax

    from jaxrlvr.losses.entropy import token_logp_entropy

    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(1, 8, 16), jnp.float32)
    unembed = jnp.asarray(rng.randn(16, 64), jnp.float32)  # logits of size ~4
    targets = jnp.asarray(rng.randint(0, 64, (1, 8)))

    def grad_norm(temperature: float) -> float:
        def loss(h, w):
            logp, ent = token_logp_entropy(h, w, targets, temperature=temperature)
            return logp.mean() + 0.01 * ent.mean()

        return float(optax.tree.norm(jax.grad(loss, argnums=(0, 1))(hidden, unembed)))

    assert np.isfinite(grad_norm(MIN_TEMPERATURE)) and not np.isfinite(grad_norm(1e-30))


def test_pos_adv_target_entropy_is_not_negative():
    c = base_config("demo")
    c.algo.intervention, c.algo.pos_adv.schedule, c.algo.pos_adv.delta = "pos_adv", "stage", -0.1
    with pytest.raises(ConfigError) as e:
        validate(c, files=False)
    assert error_keys(e.value) == ["algo.pos_adv.delta"]


def test_every_field_is_declared_once_with_help_and_current_docs():
    """The tree is built from the declarations; docs/config.md's tables are generated
    from them (`python -m jaxrlvr.config_help --write_docs`) and must be current."""
    from jaxrlvr import methods
    from jaxrlvr.config_fields import FIELDS
    from jaxrlvr.config_help import BEGIN, END, HELP, fields_markdown

    declared = set(FIELDS) | {
        f"algo.{name}.{key}" for name in methods.names() for key in methods.get(name).fields()
    }
    for preset in PRESET_NAMES:
        assert set(flatten(base_config(preset).to_dict())) == declared, preset
    assert all(HELP[key] for key in declared)
    docs = (ROOT / "docs" / "config.md").read_text()
    generated = docs.split(BEGIN + "\n\n", 1)[1].split("\n" + END, 1)[0]
    assert generated == fields_markdown(), (
        "docs/config.md is stale: run python -m jaxrlvr.config_help --write_docs"
    )
    for key in declared:
        assert f"`{key}`" in generated or f"`{key.rsplit('.', 1)[-1]}`" in generated, key


def test_field_declarations_check_and_word_their_ranges():
    from jaxrlvr.fields import Field

    dual = Field(10.0, "dual clip", must="> 1", special=(0, "off"))
    assert [dual.problem(v) for v in (0, 1.5)] == [None, None]
    assert dual.problem(1.0) == "must be 0 (off) or > 1"
    assert dual.allowed() == "Must be 0 (off) or > 1."
    clamp = Field(10.0, "clamp", must=">= 0", special=(0, "off"))
    assert clamp.problem(-1.0) == "must be >= 0 (0 = off)"
    unit = Field(0.5, "p", must="in (0, 1]")
    assert [unit.problem(v) for v in (1.0, 1e-9)] == [None, None]
    assert unit.problem(0.0) == unit.problem(float("nan")) == "must be in (0, 1]"
    assert Field(0.9, "b1", must="in [0, 1)").problem(1.0) == "must be in [0, 1)"
    assert Field(1, "n", must=">= 1").problem(True) == "must be >= 1"  # a bool is no count
    mode = Field("a", "mode", choices=("a", "b"), doc="`a` or `b`")
    assert mode.problem("c") == "must be one of a, b" and mode.allowed() == ""
    assert Field("a", "mode", choices=("a", "b")).allowed() == "One of `a` \\| `b`."
    with pytest.raises(ValueError, match="unknown range"):
        Field(1, "x", must="at least 1")
    with pytest.raises(ValueError, match="default 0 must be >= 1"):
        Field(0, "x", must=">= 1")
