"""Evaluate a policy: `python -m jaxrlvr.evaluate --checkpoint=DIR --eval=NAME=PATH ... --out=DIR`.

The policy is a Hugging Face checkpoint directory (`--checkpoint`, e.g. a run's `hf/`),
or a training workdir (`--workdir`) at its final export or at an Orbax checkpoint
(`--step`). Each `--eval=name=NAME,path=PATH[,prompt_field=F][,answer_field=F]
[,template=T]` (or `--eval=NAME=PATH[:answer_field[:template]]`) is one benchmark;
`PATH` may be a glob or a URL (`jaxrlvr.data.files`). The sampling and reward settings
come from the run's recorded config when there is one (`workdir/config.json`, also found
next to a workdir's `hf/`), else from `--preset`, else (a bare checkpoint) from
`BARE_CHECKPOINT_PRESET` with the prompt and response lengths from the checkpoint's
context (`checkpoint_lengths`); flags override them. An eval set that keeps no prompt is
refused. Writes `OUT/eval.json` (`{benchmark: {metric: value}}`),
`OUT/samples.jsonl` (one line per sample) and `OUT/eval.md`; the metrics are those of
`jaxrlvr.study.evaluation`, the same the trainer logs.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx
from transformers import AutoTokenizer

from jaxrlvr import config as config_lib
from jaxrlvr.data import read_prompts
from jaxrlvr.models import load_hf_checkpoint, with_compute_dtype
from jaxrlvr.rl import grpo, preflight
from jaxrlvr.rl.rollouts import RolloutCollector, make_reward, pad_token_id, stop_token_ids
from jaxrlvr.runtime.checkpointing import Checkpointer
from jaxrlvr.runtime.record import config_in_force, flatten, write_atomic
from jaxrlvr.sampling import Engine
from jaxrlvr.sharding import make_mesh
from jaxrlvr.study.evaluation import EvalSet, Evaluator, markdown_table, parse_eval_specs

log = logging.getLogger("jaxrlvr.evaluate")

# Flags that override a field of the run's config when given.
OVERRIDES = {
    "temperature": "rollout.temperature",
    "top_p": "rollout.top_p",
    "top_k": "rollout.top_k",
    "max_new_tokens": "rollout.max_new_tokens",
    "max_slots": "rollout.max_slots",
    "max_prompt_len": "data.max_prompt_len",
    "reward": "reward.name",
    "seed": "seed",
}


BARE_CHECKPOINT_PRESET = "qwen2.5-math-1.5b"  # settings for a checkpoint without a run
DEFAULT_MAX_PROMPT_LEN = 1024
DEFAULT_MAX_NEW_TOKENS = 3072


def check_not_workdir(checkpoint: str) -> None:
    """Refuse a training workdir given as `--checkpoint` (it holds the run's config.json,
    checkpoints/ or hf/, not weights), pointing to `--workdir`."""
    if glob.glob(os.path.join(checkpoint, "*.safetensors")):
        return
    recorded = os.path.isfile(os.path.join(checkpoint, "config.json")) and _is_run_config(
        os.path.join(checkpoint, "config.json")
    )
    parts = [p for p in ("checkpoints", "hf") if os.path.isdir(os.path.join(checkpoint, p))]
    if recorded or parts:
        found = ", ".join(
            [*(["a run's config.json"] if recorded else []), *(f"{p}/" for p in parts)]
        )
        raise config_lib.ConfigError(
            f"--checkpoint={checkpoint} is a training workdir ({found}), not a Hugging Face "
            f"checkpoint: use --workdir={checkpoint} (its final export; --step=N for an Orbax "
            f"checkpoint) or --checkpoint={os.path.join(checkpoint, 'hf')}"
        )


def _is_run_config(path: str) -> bool:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "preset" in data and "model" in data


def checkpoint_context(checkpoint: str) -> int | None:
    """The context length of a Hugging Face checkpoint: its config.json's
    `max_position_embeddings`, or its tokenizer's `model_max_length` when smaller; None
    when neither can be read (the model-directory check then says why)."""
    limits = []
    for name, key in (("config.json", "max_position_embeddings"),
                      ("tokenizer_config.json", "model_max_length")):  # fmt: skip
        try:
            with open(os.path.join(checkpoint, name)) as f:
                value = json.load(f).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**9:
            limits.append(value)
    return min(limits) if limits else None


def checkpoint_lengths(context: int, overrides: dict) -> dict[str, int]:
    """`data.max_prompt_len` and `rollout.max_new_tokens` for a checkpoint of `context`
    positions without a run config (given flags win):

    - max_prompt_len: min(1024, context - max_new_tokens) when --max_new_tokens is given,
      else min(1024, context // 4);
    - max_new_tokens: min(3072, context - max_prompt_len).
    """
    new = overrides.get("rollout.max_new_tokens")
    prompt = overrides.get("data.max_prompt_len")
    if prompt is None:
        prompt = min(DEFAULT_MAX_PROMPT_LEN, context - new if new else context // 4)
    if new is None:
        new = min(DEFAULT_MAX_NEW_TOKENS, context - prompt)
    if prompt < 1 or new < 1 or prompt + new > context:
        raise config_lib.ConfigError(
            f"max_prompt_len={prompt} + max_new_tokens={new} do not fit the checkpoint's "
            f"context of {context} positions (config.json max_position_embeddings / "
            "tokenizer model_max_length)"
        )
    return {"data.max_prompt_len": prompt, "rollout.max_new_tokens": new}


def resolve_config(
    checkpoint: str | None, workdir: str | None, preset: str | None, overrides: dict
) -> ml_collections.ConfigDict:
    """The run's recorded config (workdir, or the parent of a workdir's `hf/`), or else
    `preset`'s, with `overrides` (dotted key -> value) applied and validated.

    A checkpoint without a run config and no `preset` gets `BARE_CHECKPOINT_PRESET`'s
    settings with its lengths from the checkpoint (`checkpoint_lengths`)."""
    recorded = None
    for d in filter(None, (workdir, checkpoint and os.path.dirname(os.path.abspath(checkpoint)))):
        if (recorded := config_in_force(d)) is not None:
            break
    config = config_lib.base_config(
        recorded["preset"] if recorded else preset or BARE_CHECKPOINT_PRESET
    )
    if recorded:
        config.update_from_flattened_dict(_flatten_known(recorded, config))
    elif not preset and checkpoint and (context := checkpoint_context(checkpoint)):
        overrides = {**overrides, **checkpoint_lengths(context, overrides)}
    for key, value in overrides.items():
        config.update_from_flattened_dict({key: value})
    config.model.path = checkpoint or config.model.path
    config_lib.validate(config, files=False)
    return config


def _flatten_known(recorded: dict, config: ml_collections.ConfigDict) -> dict:
    known = flatten(json.loads(config.to_json()))
    return {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in flatten(recorded).items()
        if k in known and v is not None
    }


def load_policy(config: ml_collections.ConfigDict, mesh, workdir: str | None, step: int | None):
    """The policy model: `config.model.path`, or a workdir's Orbax checkpoint `step` (its
    parameters restored onto the initial model)."""
    model = load_hf_checkpoint(config.model.path, mesh=mesh, **config_lib.model_numerics(config))
    if step is None:
        return model
    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = grpo.make_optimizer(config.optim, config.train.steps, 1)
    state, _ = _checkpoint_step(workdir, step).restore(step, grpo.init_state(params, tx, config))
    return nnx.merge(graphdef, state.params)


def _checkpoint_step(workdir: str, step: int) -> Checkpointer:
    """The workdir's checkpoints, which must hold `step`."""
    checkpoints = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"))
    if step not in checkpoints.all_steps():
        raise config_lib.ConfigError(
            f"--step={step}: {checkpoints.directory} holds steps {checkpoints.all_steps()}"
        )
    return checkpoints


def evaluate(
    config: ml_collections.ConfigDict,
    eval_specs: list[str],
    n: int,
    out: str,
    *,
    workdir: str | None = None,
    step: int | None = None,
    max_prompts: int = 0,
) -> dict[str, dict[str, float]]:
    """Sample `n` responses per prompt of every eval set and write the results to `out`."""
    specs = parse_eval_specs(
        eval_specs or config.data.eval_files, config.data.answer_field, config.data.prompt_template
    )
    if not specs:
        raise config_lib.ConfigError(
            "no eval set: give --eval=NAME=PATH (or a run with eval_files)"
        )
    preflight.check_attention(config)
    preflight.check_model_dir(config.model.path)
    preflight.check_workdir(out)
    if step is not None:
        _checkpoint_step(workdir, step)
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    sets = []
    for s in specs:
        try:
            prompts = read_prompts(config, "eval_files", tokenizer, s)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(
                f"--eval={s.name}: {e.args[0].split(': ', 1)[1]}"
            ) from None
        try:
            sets.append(EvalSet.checked(s, prompts, config.data.max_prompt_len))
        except ValueError as e:
            raise config_lib.ConfigError(f"--eval={s.name}: {e}; raise --max_prompt_len") from None
    mesh = make_mesh(tuple(config.mesh.shape))
    model = load_policy(config, mesh, workdir, step)
    stop_ids = stop_token_ids(tokenizer)
    engine = Engine(
        with_compute_dtype(model, config_lib.rollout_dtype(config)),
        **config_lib.engine_shape(config),
        max_stop_tokens=max(8, len(stop_ids)),
        mesh=mesh,
    )
    reward_fn = make_reward(config)
    rollouts = RolloutCollector(
        config, engine, tokenizer, reward_fn, stop_ids, pad_token_id(tokenizer)
    )
    try:
        t0 = time.perf_counter()
        evaluator = Evaluator(sets, rollouts, n, max_prompts)
        samples, _ = evaluator.sample(seed=config.seed)
        results = evaluator.metrics(samples)
        log.info("evaluated %d samples in %.1f s", len(samples), time.perf_counter() - t0)
    finally:
        reward_fn.close()
    write_atomic(os.path.join(out, "eval.json"), json.dumps(results, indent=2) + "\n")
    write_atomic(
        os.path.join(out, "samples.jsonl"),
        "".join(json.dumps(s.record()) + "\n" for s in samples),
    )
    write_atomic(os.path.join(out, "eval.md"), markdown_table(results))
    return results


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint directory of the policy")
    flags.DEFINE_string("workdir", None, "a training workdir (its hf/, or --step)")
    flags.DEFINE_integer("step", None, "with --workdir: the Orbax checkpoint step to evaluate")
    flags.DEFINE_multi_string(
        "eval",
        [],
        "eval set name=NAME,path=PATH[,prompt_field=F][,answer_field=F][,template=T] "
        "(or NAME=PATH[:answer_field[:template]]); PATH may be a glob or URL; repeatable",
    )
    flags.DEFINE_integer("n", 16, "samples per prompt (Avg@n, Pass@k for k up to n, maj@n)")
    flags.DEFINE_string("out", None, "output directory (eval.json, samples.jsonl, eval.md)")
    flags.DEFINE_string(
        "preset",
        None,
        "settings to start from when no run config is found (default: "
        f"{BARE_CHECKPOINT_PRESET}'s, lengths from the checkpoint's config.json)",
    )
    flags.DEFINE_integer("max_prompts", 0, "first prompts of each set only; 0 = all")
    flags.DEFINE_float("temperature", None, "sampling temperature (default: the run's)")
    flags.DEFINE_float("top_p", None, "nucleus sampling (default: the run's)")
    flags.DEFINE_integer("top_k", None, "top-k sampling, 0 = off (default: the run's)")
    flags.DEFINE_integer(
        "max_new_tokens", None, "response budget (default: the run's, or from the checkpoint)"
    )
    flags.DEFINE_integer("max_slots", None, "concurrent sequences of the sampler")
    flags.DEFINE_integer(
        "max_prompt_len",
        None,
        "longer prompts are dropped (default: the run's, or from the checkpoint)",
    )
    flags.DEFINE_string("reward", None, "math | demo (default: the run's)")
    flags.DEFINE_integer("seed", None, "sampling seed (default: the run's)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jaxrlvr").setLevel(logging.INFO)
    f = flags.FLAGS
    try:
        if not (f.checkpoint or f.workdir) or not f.out:
            raise config_lib.ConfigError("give --checkpoint=DIR (or --workdir=DIR) and --out=DIR")
        if f.step is not None and not f.workdir:
            raise config_lib.ConfigError("--step needs --workdir")
        if f.n < 1:
            raise config_lib.ConfigError(f"--n={f.n}: must be >= 1")
        preflight.check_local_path("--out", f.out)
        checkpoint = f.checkpoint
        if checkpoint:
            check_not_workdir(checkpoint)
        if f.workdir and not checkpoint and f.step is None:
            checkpoint = os.path.join(f.workdir, "hf")
        overrides = {key: f[name].value for name, key in OVERRIDES.items() if f[name].present}
        config = resolve_config(checkpoint, f.workdir, f.preset, overrides)
        results = evaluate(
            config, f.eval, f.n, f.out, workdir=f.workdir, step=f.step, max_prompts=f.max_prompts
        )
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(markdown_table(results), end="")


if __name__ == "__main__":
    define_flags()
    app.run(main)
