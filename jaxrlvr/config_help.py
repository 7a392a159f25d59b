"""What each config field means, for `--show_config` and for errors about `--config.KEY`.

`HELP` holds one line per field of `config.base_config` (a test checks that every field
has one and that `docs/config.md` documents it); `describe` prints a resolved config
with each field's value, its default and its help; `override_error` turns a failed
`--config.KEY=VALUE` flag into one line naming the key and the closest valid keys.
"""

from __future__ import annotations

import difflib
import json
import re

import ml_collections

from jaxrlvr import methods
from jaxrlvr.config import base_config, load_config_file
from jaxrlvr.runtime.record import flatten

HELP: dict[str, str] = {
    "preset": "model preset, set by the config argument: demo | qwen2.5-math-7b | ...",
    "name": "method name, used in the default workdir",
    "workdir": "output directory; None = runs/<name>-<preset>",
    "seed": "seeds the data order, the PRNG key and the sampling seeds",
    "model.path": "local Hugging Face checkpoint directory (config, safetensors, tokenizer)",
    "model.dtype": "compute dtype: float32 | bfloat16",
    "model.param_dtype": "storage dtype of parameters and AdamW moments: float32 | bfloat16",
    "model.remat": "activation checkpointing per layer: none | full | dots",
    "model.logp_chunk": "sequence chunk of the log-prob/entropy computation ([chunk, V] logits)",
    "model.logp_remat": "recompute the LM head's chunks in the backward pass: auto | on | off",
    "model.attention": "attention backend: auto | blocked | splash | cudnn | reference",
    "model.attention_block": "key block (slots) of the blocked flash attention",
    "data.train_files": "comma-separated .jsonl/.parquet paths, globs, URLs or path=P,...",
    "data.eval_files": "eval sets name=N,path=P[,prompt_field=..] or NAME=PATH[:answer]",
    "data.prompt_field": "dotted path of the prompt; '' = prompt, problem or question",
    "data.answer_field": "dotted path of the answer; '' = reward_model.ground_truth or answer",
    "data.prompt_template": "qwen_chat | dapo | raw",
    "data.max_prompt_len": "tokens; longer prompts are dropped (counted)",
    "data.shuffle": "a fresh permutation of the prompts every epoch",
    "reward.name": "math (math-verify) | demo (the arithmetic checker)",
    "reward.timeout_s": "math: wall-clock limit per answer (a time-out scores 0)",
    "reward.batch_timeout_s": "math: wall-clock limit per scored batch; answers left score 0 "
    "and count as time-outs; 0 = off",
    "reward.num_workers": "math: checker processes; 0 = half the CPUs (1..8)",
    "reward.overlong_buffer": "DAPO overlong shaping: tokens before rollout.max_new_tokens "
    "where the length penalty ramps up; 0 = off",
    "reward.overlong_penalty": "DAPO overlong shaping: the penalty at rollout.max_new_tokens",
    "rollout.n": "responses per prompt (the GRPO group size)",
    "rollout.temperature": "sampling temperature; every log-prob uses logits / T; >= 1e-8 "
    "(the 1/T-scaled gradient overflows float32 when squared below it)",
    "rollout.top_p": "nucleus sampling, in (0, 1]",
    "rollout.top_k": "top-k sampling; 0 = off",
    "rollout.max_new_tokens": "response budget (tokens)",
    "rollout.max_slots": "concurrent sequences in the sampler's KV cache",
    "rollout.max_prefill_batch": "most prompts per prefill call (prompts of one length bucket)",
    "rollout.backend": "engine | jetstream",
    "algo.eps_low": "PPO lower clip: ratio >= 1 - eps_low",
    "algo.eps_high": "PPO upper clip: ratio <= 1 + eps_high (> eps_low is Clip-Higher)",
    "algo.dual_clip": "dual-clip constant c for A < 0; 0 = off",
    "algo.loss_agg": "token-mean | seq-mean-token-mean | seq-mean-token-sum[-norm]",
    "algo.std_normalize": "divide group-centred rewards by the group std (False = Dr. GRPO)",
    "algo.kl_coef": "weight of the KL penalty to the initial policy; > 0 keeps a reference",
    "algo.kl_estimator": "k1 | k2 | k3",
    "algo.kl_clamp": "k3 clipped to [-kl_clamp, kl_clamp] as verl does; 0 = off",
    "algo.entropy_coef": "fixed entropy bonus coefficient",
    "algo.dynamic_sampling": "DAPO: keep only groups whose rewards differ",
    "algo.dynamic_sampling_max_batches": "prompt batches tried per step before topping up",
    "algo.old_logp_source": "source of the old log-probs: trainer | sampler",
    "algo.intervention": "entropy method (jaxrlvr/methods/): " + " | ".join(methods.names()),
    "diagnostics.entropy_check_every": "steps between first-order entropy-change checks; 0 = off",
    "optim.lr": "peak learning rate",
    "optim.b1": "AdamW beta1",
    "optim.b2": "AdamW beta2",
    "optim.weight_decay": "decoupled weight decay",
    "optim.warmup_steps": "training steps of linear warm-up",
    "optim.schedule": "constant | cosine (to 0 at the last update)",
    "optim.grad_clip": "global-norm gradient clip; 0 = off",
    "train.steps": "training steps",
    "train.prompts_per_step": "prompts per rollout batch",
    "train.mini_batch_prompts": "prompts per optimizer update",
    "train.ppo_epochs": "passes over the step's mini-batches (updates = mini-batches x epochs)",
    "train.micro_batch_sequences": "sequences per gradient-accumulation chunk",
    "train.pack": "pack several sequences per row in the policy pass and the update",
    "train.pack_buckets": "row-count / head-list sizes: at most this many compiled shapes",
    "train.eval_every": "steps between evaluations (and the last step); 0 = never",
    "train.eval_n": "samples per eval prompt (k of Avg@k / Pass@k)",
    "train.eval_max_prompts": "first k eval prompts; 0 = all",
    "train.checkpoint_every": "steps between checkpoints (and the last step); 0 = only the last",
    "train.max_checkpoints": "checkpoints kept",
    "train.max_skipped_steps": "consecutive steps with non-finite updates before the run stops",
    "train.log_every": "steps between console summary lines",
    "train.progress": "progress bars (only when stderr is a terminal)",
    "mesh.shape": "device mesh sizes over (data, fsdp, tensor); -1 = the remaining devices",
}
# Each method's settings, from their one declaration in jaxrlvr/methods/.
HELP |= {
    f"algo.{name}.{key}": text
    for name in methods.names()
    for key, text in methods.get(name).help().items()
}


def describe(config: ml_collections.ConfigDict) -> str:
    """Every field of `config`: its value, the `base_config` default where different, and
    its help, one line each."""
    values = flatten(json.loads(config.to_json()))
    defaults = flatten(json.loads(base_config(config.get("preset", "demo")).to_json()))
    width = max(len(k) for k in values)
    lines = []
    for key, value in values.items():
        default = "" if defaults.get(key) == value else f"  (default {defaults.get(key)!r})"
        lines.append(f"{key:<{width}} = {value!r}{default}  # {HELP.get(key, '')}")
    return "\n".join(lines)


def override_error(argv: list[str], error: Exception) -> str:
    """One line for a flag-parsing `error`: an unknown `--config.KEY` is named with the
    closest valid keys; anything else is the error's first line."""
    keys = _config_keys(argv)
    for arg in argv[1:]:
        m = re.match(r"--config\.([\w.]+)", arg)
        if m and keys and m.group(1) not in keys:
            hint = closest_keys(m.group(1), keys)
            return f"{arg.split('=')[0]}: no such config key{hint} (see --show_config)"
    text = str(error).strip().strip("'\"").splitlines()
    return text[0] if text else type(error).__name__


def _config_keys(argv: list[str]) -> set[str]:
    """The field names of the config file named by `--config=FILE[:ARG]` (empty if it
    cannot be loaded)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "configs/grpo.py")
    try:
        config = load_config_file(spec)
    except Exception:  # noqa: BLE001 - the caller reports the original error instead
        return set()
    return set(flatten(json.loads(config.to_json())))


def closest_keys(key: str, keys) -> str:
    """`; closest: a, b` for an unknown `key` ("" when nothing is close)."""
    close = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.5)
    return f"; closest: {', '.join(close)}" if close else ""
