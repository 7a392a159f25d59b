"""The training config tree, its presets, and validation.

Every experiment file in `configs/` is `get_config(preset)` over `base_config(preset)`:
the shared tree with the preset's values (`demo`, `qwen2.5-math-7b`, `qwen2.5-math-1.5b`,
`qwen2.5-0.5b`), then the method's own changes. `docs/config.md` documents every field.
`validate(config)` checks the whole tree before anything is compiled and raises one
`ConfigError` naming each bad key and its allowed range (every float must be finite).
"""

from __future__ import annotations

import math
import os

import ml_collections
from ml_collections import config_dict

from jaxrlvr import methods
from jaxrlvr.config_fields import FIELDS, MIN_TEMPERATURE, PRESET_NAMES
from jaxrlvr.errors import ConfigError
from jaxrlvr.losses import AGG_MODES as LOSS_AGG_MODES

# The embedded demo presets: their policies and data are built and cached on first use.
DEMO_PRESETS = ("demo", "demo-hard", "demo-fork")


def is_demo(preset: str) -> bool:
    """Whether `preset` runs the embedded demo (its policy and data are built, not read)."""
    return preset in DEMO_PRESETS


def base_config(preset: str = "demo") -> ml_collections.ConfigDict:
    """The full config tree with `preset`'s values (see `PRESET_NAMES`)."""
    preset = preset or "demo"
    if preset not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESET_NAMES)}")
    c = ml_collections.ConfigDict()
    for key, field in FIELDS.items():
        *groups, name = key.split(".")
        node = c
        for group in groups:
            if group not in node:
                node[group] = ml_collections.ConfigDict()
            node = node[group]
        node[name] = config_dict.placeholder(field.type) if field.default is None else field.default
    # Entropy methods (jaxrlvr/methods/, docs/algorithms.md#entropy-interventions): the one
    # named by algo.intervention acts; each method's settings sit under algo.<name>.
    for name in methods.names():
        if defaults := methods.get(name).defaults():
            c.algo[name] = ml_collections.ConfigDict(defaults)
    c.preset = preset

    if is_demo(preset):
        _demo(c)
        if preset != "demo":  # demo-hard, demo-fork: the papers' update schedule
            _demo_hard(c)
    elif preset in ("qwen2.5-math-1.5b", "qwen3-1.7b-base", "qwen3-4b-base"):
        c.train.prompts_per_step = 128
        c.train.mini_batch_prompts = 16
    elif preset == "qwen2.5-0.5b":
        c.train.prompts_per_step = 64
        c.train.mini_batch_prompts = 16
        c.rollout.max_new_tokens = 2048
    if preset.startswith("qwen"):
        c.model.dtype = "bfloat16"
        c.model.remat = "full"
        if preset in ("qwen2.5-math-7b", "qwen3-8b-base"):
            c.data.prompt_template = "dapo"
    return c


def _demo(c: ml_collections.ConfigDict) -> None:
    """The embedded demo: a tiny warm-started policy on arithmetic, minutes on a CPU."""
    c.model.dtype = "float32"
    c.reward.name = "demo"
    c.data.prompt_template = "raw"
    c.data.answer_field = "answer"
    c.data.max_prompt_len = 16  # demo prompts are at most 9 tokens
    c.rollout.n = 8
    c.rollout.max_new_tokens = 40  # worked solutions are at most 35 tokens
    c.rollout.max_slots = 128
    c.algo.dual_clip = 3.0
    c.optim.lr = 2e-4  # 1e-3 destroys the tiny policy within 10 steps; 4e-4 is unstable
    c.optim.warmup_steps = 5
    c.train.steps = 100
    c.train.prompts_per_step = 32
    c.train.mini_batch_prompts = 16
    c.train.micro_batch_sequences = 16  # fastest on CPU (cache-sized chunks)
    c.train.eval_every = 25
    c.train.eval_n = 4
    c.train.eval_max_prompts = 64
    c.train.checkpoint_every = 25
    c.mesh.shape = (1, 1, 1)


def _demo_hard(c: ml_collections.ConfigDict) -> None:
    """The demo policy trained on the papers' off-policy schedule (docs/methods.md).

    The reference runs take 16 optimizer updates per step (512 prompts in mini-batches of
    32); the demo takes 2. With 16 the later updates are off-policy enough for the PPO
    clip to bind (`pg_clipfrac` about 7e-3 instead of 1e-3), and "Adv>=0 only" collapses
    entropy below GRPO as the papers report. `demo-fork` trains the same way from another
    base policy (`jaxrlvr.demo_policy.PRESET_SETTINGS`).
    """
    c.train.mini_batch_prompts = 2  # 32 prompts per step: 16 updates of 16 sequences
    c.optim.lr = 7e-5  # 16 updates of 2e-4 break the policy; 1e-4 barely improves GRPO


def parse_arg(arg: str | None, options: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """Split a config-file argument `preset[,option...]` (either part optional).

    `configs/pos_adv.py:entropy_guided` and `configs/pos_adv.py:qwen2.5-math-7b,stage` both
    work: each comma-separated token is a model preset or one of the file's `options`.
    """
    preset, chosen = "demo", []
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        if token in PRESET_NAMES:
            preset = token
        elif token in options:
            chosen.append(token)
        else:
            raise ConfigError(
                f"config argument {token!r}: expected a preset ({', '.join(PRESET_NAMES)})"
                + (f" or one of {', '.join(options)}" if options else "")
            )
    return preset, chosen


def load_python_file(path: str, what: str = "config file"):
    """The module of a Python file given by path (a config or sweep file)."""
    import importlib.util

    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_file_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """The config of an experiment file `FILE[:ARG]` (its `get_config(ARG)`), as
    `--config=FILE[:ARG]` loads it."""
    path, _, arg = spec.partition(":")
    module = load_python_file(path)
    return module.get_config(arg) if arg else module.get_config()


def workdir(config: ml_collections.ConfigDict) -> str:
    return config.workdir or f"runs/{config.name}-{config.preset}"


def validate(config: ml_collections.ConfigDict, files: bool = True) -> None:
    """Check every field; raise one `ConfigError` listing each problem with its key.

    `files=False` skips the checks of the model and data paths (`jaxrlvr.plan` needs
    neither weights nor data)."""
    # A non-finite float passes most range checks (inf > 0); each is named once, here.
    nonfinite = [key for key, v in _float_fields(config) if not math.isfinite(v)]
    errors = [f"config.{key}={_get(config, key)!r}: must be a finite number" for key in nonfinite]

    def need(ok: bool, key: str, allowed: str):
        if not ok and key not in nonfinite:
            errors.append(f"config.{key}={_get(config, key)!r}: {allowed}")

    def one_of(key: str, options):
        need(_get(config, key) in options, key, f"must be one of {', '.join(map(str, options))}")

    for key, field in FIELDS.items():
        problem = field.problem(_get(config, key))
        need(problem is None, key, problem or "")
    method = methods.from_config(config) if config.algo.intervention in methods.names() else None
    if method is not None:  # only the selected method's settings are range-checked
        method.check_settings(need)
        method.validate(config, need, one_of)

    # What relates several fields.
    r, t = config.rollout, config.train
    if t.prompts_per_step >= 1 and t.mini_batch_prompts >= 1:
        need(
            t.prompts_per_step % t.mini_batch_prompts == 0,
            "train.prompts_per_step",
            f"must be divisible by train.mini_batch_prompts={t.mini_batch_prompts}",
        )
    seqs = t.mini_batch_prompts * r.n
    need(
        t.micro_batch_sequences >= 1 and seqs % t.micro_batch_sequences == 0,
        "train.micro_batch_sequences",
        f"must divide the mini-batch of mini_batch_prompts * rollout.n = {seqs} sequences",
    )
    a = config.algo
    for key in ("rollout_is", "rollout_rs"):
        need(
            a[key] == "none" or a.old_logp_source == "trainer",
            f"algo.{key}",
            "corrects the sampler against the learner's old log-probs: meaningless with "
            "algo.old_logp_source=sampler (they are the sampler's)",
        )
    need(
        0 <= config.reward.overlong_buffer < r.max_new_tokens,
        "reward.overlong_buffer",
        f"must be in [0, rollout.max_new_tokens={r.max_new_tokens}) (0 = off)",
    )

    shape = tuple(config.mesh.shape)
    need(
        len(shape) == 3 and all(s >= 1 or s == -1 for s in shape) and shape.count(-1) <= 1,
        "mesh.shape",
        "must be 3 sizes over ('data', 'fsdp', 'tensor'), each >= 1, at most one -1",
    )

    if files and not is_demo(config.preset):
        need(bool(config.model.path), "model.path", "required: a local Hugging Face checkpoint dir")
    if files and (not is_demo(config.preset) or config.model.path):
        from jaxrlvr.data.files import split_files

        need(
            bool(split_files(config.data.train_files)),
            "data.train_files",
            "required (with a model.path the demo data is not used)",
        )
    if config.model.path:
        need(os.path.isdir(config.model.path), "model.path", "directory does not exist")
    if files:
        from jaxrlvr.data.files import spec_errors

        errors += spec_errors(config)

    if errors:
        # One problem: one line (the command lines print it as one `error:` line).
        sep = " " if len(errors) == 1 else "\n  "
        raise ConfigError("invalid config:" + sep + "\n  ".join(errors))


def model_numerics(config: ml_collections.ConfigDict) -> dict[str, object]:
    """The `Qwen2Config` fields this port sets from `config.model` (not the architecture)."""
    m = config.model
    return dict(
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        remat=m.remat,
        attention=m.attention,
        attention_block=int(m.attention_block),
    )


def model_architecture(config: ml_collections.ConfigDict):
    """The policy's `Qwen2Config` (shapes only, nothing loaded): `model.path`'s
    config.json, else the preset's architecture, with `model_numerics`. A bad directory
    or a preset without one raises `ConfigError`."""
    from jaxrlvr.models.checkpoint import read_config
    from jaxrlvr.models.qwen2 import PRESETS

    numerics = model_numerics(config)
    if config.model.path:
        return read_config(config.model.path, **numerics)
    if config.preset in PRESETS:
        return PRESETS[config.preset].replace(**numerics)
    if is_demo(config.preset):
        from jaxrlvr.demo_policy import preset_settings

        return preset_settings(config.preset).model_config().replace(**numerics)
    raise ConfigError(
        f"config.preset={config.preset!r} has no model config; set config.model.path or use "
        f"one of {', '.join(sorted(PRESETS))}"
    )


def rollout_dtype(config: ml_collections.ConfigDict) -> str:
    """The sampler's dtype: `rollout.dtype`, else the model's compute dtype."""
    return config.rollout.dtype or config.model.dtype


def engine_shape(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The sampling engine's slots, lengths (prompts padded to a power of 2) and prompts per
    prefill call for a config."""
    prefill = max(16, 1 << (config.data.max_prompt_len - 1).bit_length())
    return dict(
        max_concurrent_decodes=config.rollout.max_slots,
        max_prefill_length=prefill,
        max_target_length=prefill + config.rollout.max_new_tokens,
        max_prefill_batch=config.rollout.max_prefill_batch,
    )


def validate_mesh(config: ml_collections.ConfigDict, mesh) -> None:
    """Checks that need the device mesh: every micro-batch must split over data x fsdp."""
    from jaxrlvr.sharding import batch_shards

    platform = mesh.devices.flat[0].platform
    if rollout_dtype(config) == "float16" and platform == "tpu":
        raise ConfigError(
            "config.rollout.dtype='float16': TPUs have no float16 arithmetic; use bfloat16 "
            "or float32"
        )
    shards = batch_shards(mesh)
    micro = config.train.micro_batch_sequences
    if micro % shards:
        fix = -(-micro // shards) * shards
        raise ConfigError(
            f"config.train.micro_batch_sequences={micro}: must be a multiple of the "
            f"{shards} devices the batch splits over (mesh data x fsdp = "
            f"{dict(mesh.shape)}), or its activations are replicated; e.g. {fix}"
        )


def inert_settings(config: ml_collections.ConfigDict, num_epochs: int | None = None) -> list[str]:
    """Settings that cannot act in this run (each a warning): the run they give equals a
    simpler one. `num_epochs` (data epochs the run spans) enables the epoch check."""
    t = config.train
    out = methods.from_config(config).inert(config, num_epochs)
    if config.optim.warmup_steps >= t.steps:
        out.append(
            f"config.optim.warmup_steps={config.optim.warmup_steps} >= train.steps={t.steps}: "
            "the learning rate never reaches optim.lr"
        )
    every = config.diagnostics.entropy_check_every
    if every > t.steps:
        out.append(f"config.diagnostics.entropy_check_every={every} > train.steps: never runs")
    return out


def _float_fields(node: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted key, value) of every float field under `node`."""
    for name, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _float_fields(value, f"{prefix}{name}.")
        elif isinstance(value, float):
            yield f"{prefix}{name}", value


def _get(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def mini_batches_per_step(config: ml_collections.ConfigDict) -> int:
    return config.train.prompts_per_step // config.train.mini_batch_prompts


def updates_per_step(config: ml_collections.ConfigDict) -> int:
    """Optimizer updates per step: every mini-batch once per PPO epoch."""
    return mini_batches_per_step(config) * config.train.ppo_epochs


__all__ = [
    "ConfigError",
    "DEMO_PRESETS",
    "LOSS_AGG_MODES",
    "MIN_TEMPERATURE",
    "PRESET_NAMES",
    "base_config",
    "engine_shape",
    "inert_settings",
    "is_demo",
    "load_config_file",
    "load_python_file",
    "mini_batches_per_step",
    "updates_per_step",
    "validate",
    "validate_mesh",
    "workdir",
]
