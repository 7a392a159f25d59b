"""Every field of the config tree, declared once.

Each `Field` (`jaxrlvr.fields`) holds a field's default (the paper-scale value, before a
preset or a `configs/*.py` file changes it), its allowed values, its one-line help for
`--show_config` and its text in `docs/config.md`. `config.base_config` builds the tree
from `FIELDS`, `config.validate` checks it against them, and `python -m
jaxrlvr.config_help --write_docs` writes the field tables of `docs/config.md`. The
entropy methods declare their own settings (`algo.<method>.*`) in `jaxrlvr/methods/`.
"""

from __future__ import annotations

from jaxrlvr import methods
from jaxrlvr.fields import Field
from jaxrlvr.losses import AGG_MODES
from jaxrlvr.models.attention import ATTENTION_BACKENDS

PRESET_NAMES = (
    "demo",
    "demo-hard",
    "demo-fork",
    "qwen2.5-math-7b",
    "qwen2.5-math-1.5b",
    "qwen2.5-0.5b",
    "qwen3-1.7b-base",
    "qwen3-4b-base",
    "qwen3-8b-base",
)
# The smallest rollout.temperature. The loss gradient scales as 1/T and is squared (Adam's
# second moment, the global norm of the clip), which overflows float32 and bfloat16 (both
# max 3.4e38) once it passes 1.8e19: 1e-8 keeps it finite for gradient norms up to 1.8e11
# at T = 1, and logits / T finite for logits up to 3.4e30.
MIN_TEMPERATURE = 1e-8

# The groups of the tree in order, with the text docs/config.md puts above their table.
SECTIONS: dict[str, str] = {
    "": "",
    "model": "",
    "data": "",
    "reward": "",
    "rollout": "",
    "algo": "",
    "diagnostics": "",
    "optim": "AdamW (`optax.adamw`) after global-norm clipping.",
    "train": "",
    "logging": "Where the metrics go besides `metrics.jsonl` (process 0 only).",
    "mesh": "",
}

FIELDS: dict[str, Field] = {
    # -- top level
    "preset": Field(
        "demo",
        "model preset, set by the config argument: demo | qwen2.5-math-7b | ...",
        choices=PRESET_NAMES,
        doc="Set from `:arg`. Presets other than the demo ones (`demo`, `demo-hard`, "
        "`demo-fork`) require `model.path` and `data.train_files`.",
    ),
    "name": Field(
        "grpo",
        "method name, used in the default workdir",
        doc="Method name, set by each config file. Used in the default workdir.",
    ),
    "workdir": Field(
        None,
        "output directory; None = runs/<name>-<preset>",
        type=str,
        doc="Output directory. `None` means `runs/<name>-<preset>` (relative to the current "
        "directory). A local or mounted path: a URL such as `gs://b/run` is refused "
        "(mount the bucket with `gcsfuse --implicit-dirs BUCKET /mnt/BUCKET` and use a "
        "path under it). One run at a time: a second is refused while `run.lock` is held. "
        "See [workdir](#the-workdir-and-resume).",
    ),
    "seed": Field(
        0,
        "seeds the data order, the PRNG key and the sampling seeds",
        doc="Seeds the data order, the train state's PRNG key (random token selections of "
        "Clip-Cov / Rand-Pos-Clip) and the rollout and eval sampling seeds. The sampling "
        "seeds are derived from `(seed, step, attempt)`.",
    ),
    # -- model
    "model.path": Field(
        None,
        "local Hugging Face checkpoint directory (config, safetensors, tokenizer)",
        type=str,
        doc="Local Hugging Face checkpoint directory (config, safetensors, tokenizer). It "
        "must exist, and is checked at start-up from `config.json` and the safetensors "
        "headers (a Qwen2 architecture, whole files, every tensor of the config's shape; "
        "[model.md](model.md#checkpoint-format)). Required unless the preset is `demo` or "
        "`demo-hard`, where unset means the built-in demo policy.",
    ),
    "model.dtype": Field(
        "float32",
        "compute dtype: float32 | bfloat16",
        choices=("float32", "bfloat16"),
        doc="Compute dtype: `float32` \\| `bfloat16`. Log-probs and entropies are always "
        "computed in float32.",
    ),
    "model.param_dtype": Field(
        "float32",
        "storage dtype of parameters and AdamW moments: float32 | bfloat16",
        choices=("float32", "bfloat16"),
        doc="Storage dtype of the trained parameters (and of the AdamW moments): `float32` \\| "
        "`bfloat16`.",
    ),
    "model.remat": Field(
        "none",
        "activation checkpointing per layer: none | full | dots",
        choices=("none", "full", "dots"),
        doc="What the backward pass keeps of each decoder layer: `none` (everything), `full` "
        "(only its input: the layer is recomputed, least memory), `dots` (weight-matmul "
        "outputs: norms, activations and attention are recomputed). Applies to every pass "
        "that takes gradients; results are the same to 1e-5.",
    ),
    "model.logp_chunk": Field(
        128,
        "sequence chunk of the log-prob/entropy computation ([chunk, V] logits)",
        must=">= 1",
        doc="Sequence chunk (positions) for log-probs and entropies. At most `[rows, "
        "logp_chunk, vocab]` float32 logits exist at a time in the forward pass (rows: "
        "the packed rows of a micro-batch).",
    ),
    "model.logp_remat": Field(
        "auto",
        "recompute the LM head's chunks in the backward pass: auto | on | off",
        choices=("auto", "on", "off"),
        doc="Whether the backward pass recomputes each chunk's LM-head logits (`on`) or keeps "
        "them (`off`: about a quarter less work in the update, but `2 x 4 x rows x "
        "(max_prompt_len + max_new_tokens) x vocab` bytes per device kept). `auto` keeps "
        "them when that is at most 1 GiB: on for the paper presets, off for the demo. "
        "`python -m jaxrlvr.plan` shows the choice.",
    ),
    "model.attention": Field(
        "auto",
        "attention backend: auto | blocked | splash | cudnn | reference",
        choices=ATTENTION_BACKENDS,
        doc="Attention backend (see [model.md](model.md#attention)): `auto` (splash on TPU, "
        "cudnn on GPU, blocked elsewhere), `blocked` (flash attention in XLA, memory "
        "linear in length; decode visits only the filled prefix), `splash` (Pallas TPU "
        "kernel), `cudnn` (GPU), `reference` (scores materialised; quadratic memory). "
        "Asking for `splash` or `cudnn` on another platform is refused at start.",
    ),
    "model.attention_block": Field(
        512,
        "key block (slots) of the blocked flash attention",
        must=">= 1",
        doc="Key block, in slots, of the blocked attention (and the splash block size, at "
        "least 128).",
    ),
    # -- data
    "data.train_files": Field(
        None,
        "comma-separated .jsonl/.parquet paths, globs, URLs or path=P,...",
        type=str,
        doc="Comma-separated entries of `.jsonl` / `.parquet` files: a path, glob or URL "
        "(`scheme://`, read through fsspec: `memory://`, `gs://` with `gcsfs` installed), "
        "or a keyed entry `path=P,prompt_field=F,answer_field=F,template=T` (every key "
        "but `path` optional; a key given again starts the next entry), e.g. "
        "`path=dapo.parquet,path=amc.jsonl,prompt_field=question,answer_field=answer`. "
        "Local paths must match a file. Required unless `preset=demo`, where unset means "
        "the demo's `train.jsonl`.",
    ),
    "data.eval_files": Field(
        None,
        "eval sets name=N,path=P[,prompt_field=..] or NAME=PATH[:answer]",
        type=str,
        doc="Comma-separated eval sets: keyed "
        "`name=NAME,path=PATH,prompt_field=F,answer_field=F,template=T` (every key but "
        "`path` optional; a key given again starts the next set), or short "
        "`NAME=PATH[:answer_field[:template]]` (a URL path keeps its `scheme://`), or a "
        "bare path; a set without a name is named after its file, one without its own "
        "field or template uses `data.prompt_field` / `data.answer_field` / "
        "`data.prompt_template`. Unset means no evaluation. The demo uses its "
        "`eval.jsonl`.",
    ),
    "data.prompt_field": Field(
        "",
        "dotted path of the prompt; '' = prompt, problem or question",
        doc='Dotted path of the prompt in a row. `""` means the first of `prompt`, `problem`, '
        "`question` that the row has (per row, so files of different layouts mix). A "
        "prompt is a string or a chat list of `{role, content}`.",
    ),
    "data.answer_field": Field(
        "",
        "dotted path of the answer; '' = reward_model.ground_truth or answer",
        doc='Dotted path of the ground-truth answer (string or number). `""` means the first '
        "of `reward_model.ground_truth` (verl Parquet: DAPO-Math-17k, MATH-500, AIME), "
        "`answer` that the row has.",
    ),
    "data.prompt_template": Field(
        "qwen_chat",
        "qwen_chat | dapo | raw",
        choices=("qwen_chat", "dapo", "raw"),
        doc='`qwen_chat` (system "Please reason step by step, and put your final answer '
        'within \\boxed{}." + user), `dapo` (DAPO-Math-17k instruction with an `Answer:` '
        "line), `raw` (text as is). A prompt that is already a chat list is rendered as "
        "given under every template.",
    ),
    "data.max_prompt_len": Field(
        1024,
        "tokens; longer prompts are dropped (counted)",
        must=">= 1",
        doc="Tokens. Longer prompts are dropped (counted in the log); a prompt of more UTF-8 "
        "bytes than this many tokens can stand for (`jaxrlvr.data.token_bound`) is "
        "dropped before tokenization, counted in the same line. Also the left-padded "
        "prompt width of the rollout batch.",
    ),
    "data.shuffle": Field(
        True,
        "a fresh permutation of the prompts every epoch",
        doc="A fresh permutation of the prompts every epoch (seeded by `seed`).",
    ),
    # -- reward
    "reward.name": Field(
        "math",
        "math (math-verify) | demo (the arithmetic checker)",
        choices=("math", "demo"),
        doc="`math` (`math-verify` on the `\\boxed{}` answer or the `Answer:` line) \\| `demo` "
        "(exact check of the arithmetic task). Reward 1 if correct, else 0. How `math` "
        "decides, with 95 answer forms against math-verify and verl: "
        "[training.md](training.md#the-math-reward).",
    ),
    "reward.timeout_s": Field(
        5.0,
        "math: wall-clock limit per answer (a time-out scores 0)",
        must="> 0",
        doc="`math` only: wall-clock limit per answer. A time-out scores 0 and is counted in "
        "`reward_timeouts`, an exception in `reward_errors`.",
    ),
    "reward.num_workers": Field(
        0,
        "math: checker processes; 0 = half the CPUs (1..8)",
        must=">= 0",
        special=(0, "auto"),
        doc="`math` only: checker subprocesses. `0` means half the CPUs, clamped to 1..8.",
    ),
    "reward.batch_timeout_s": Field(
        300.0,
        "math: wall-clock limit per scored batch; answers left score 0 and count as "
        "time-outs; 0 = off",
        must=">= 0",
        special=(0, "off"),
        doc="`math` only: wall-clock limit of one scored batch. Answers still unscored when "
        "it runs out score 0 and are counted in `reward_timeouts`.",
    ),
    "reward.overlong_buffer": Field(
        0,
        "DAPO overlong shaping: tokens before rollout.max_new_tokens where the length penalty "
        "ramps up; 0 = off",
        doc="DAPO's overlong shaping: the last tokens before `rollout.max_new_tokens` over "
        "which a length penalty ramps from 0 to `reward.overlong_penalty`; it shapes the "
        "advantages only ([algorithms.md](algorithms.md#overlong-reward-shaping-dapo)). "
        "`0` = off. Must be in [0, `rollout.max_new_tokens`).",
    ),
    "reward.overlong_penalty": Field(
        1.0,
        "DAPO overlong shaping: the penalty at rollout.max_new_tokens",
        must=">= 0",
        doc="DAPO's overlong shaping: the penalty of a response cut at `rollout.max_new_tokens`.",
    ),
    # -- rollout
    "rollout.n": Field(
        8,
        "responses per prompt (the GRPO group size)",
        must=">= 1",
        doc="Responses per prompt (GRPO group size G).",
    ),
    "rollout.temperature": Field(
        1.0,
        "sampling temperature; every log-prob uses logits / T; >= 1e-8 (the 1/T-scaled "
        "gradient overflows float32 when squared below it)",
        must=f">= {MIN_TEMPERATURE:g}",
        doc="Sampling temperature T. Every log-prob and entropy in the loss and metrics is "
        "computed from `logits / T`. Must be >= 1e-8 (`config.MIN_TEMPERATURE`): the loss "
        "gradient scales as 1/T and is squared (Adam's second moment, the clip's global "
        "norm), which overflows float32 and bfloat16 (max 3.4e38) past 1.8e19; 1e-8 keeps "
        "it finite for gradient norms up to 1.8e11 at T = 1.",
    ),
    "rollout.top_p": Field(
        1.0,
        "nucleus sampling, in (0, 1]",
        must="in (0, 1]",
        doc="Nucleus sampling.",
    ),
    "rollout.top_k": Field(
        0,
        "top-k sampling; 0 = off",
        must=">= 0",
        special=(0, "off"),
        doc="Sample among the k most likely tokens only.",
    ),
    "rollout.max_new_tokens": Field(
        3072,
        "response budget (tokens)",
        must=">= 1",
        doc="Response budget. Also the padded response width R of the rollout batch.",
    ),
    "rollout.max_slots": Field(
        256,
        "concurrent sequences in the sampler's KV cache",
        must=">= 1",
        doc="Concurrent sequences (KV-cache slots) of the sampling engine.",
    ),
    "rollout.max_prefill_batch": Field(
        16,
        "most prompts per prefill call (prompts of one length bucket)",
        must=">= 1",
        doc="Most prompts per prefill call of the sampling engine: prompts of one length "
        "bucket are prefilled together, the rows padded to a power of two up to this "
        "(`docs/sampling.md`). Lower it if the prefill of that many `data.max_prompt_len` "
        "prompts does not fit.",
    ),
    "rollout.dtype": Field(
        "",
        "dtype of the sampler's weights and activations; '' = model.dtype",
        choices=("", "float32", "bfloat16", "float16"),
        doc="Dtype of the sampler's copy of the weights, its activations and KV cache, "
        "independent of the learner's `model.dtype`: `\"\"` (the model's compute dtype), "
        "`float32`, `bfloat16`, `float16` (refused on TPU; a weight beyond float16's range "
        "stops the run with its name). The mismatch it causes is measured every step "
        "(`mismatch_*` metrics) and can be corrected (`algo.rollout_is`, `algo.rollout_rs`).",
    ),
    "rollout.backend": Field(
        "engine",
        "engine | jetstream",
        choices=("engine", "jetstream"),
        doc="`engine` (the native driver) \\| `jetstream` (through the JetStream adapter, "
        "optional extra).",
    ),
    # -- algo
    "algo.eps_low": Field(
        0.2,
        "PPO lower clip: ratio >= 1 - eps_low",
        must="in [0, 1]",
        doc="PPO lower clip: `r >= 1 - eps_low`. `1` = no lower clip.",
    ),
    "algo.eps_high": Field(
        0.2,
        "PPO upper clip: ratio <= 1 + eps_high (> eps_low is Clip-Higher)",
        must=">= 0",
        doc="PPO upper clip: `r <= 1 + eps_high`. `eps_high > eps_low` is Clip-Higher.",
    ),
    "algo.dual_clip": Field(
        10.0,
        "dual-clip constant c for A < 0; 0 = off",
        must="> 1",
        special=(0, "off"),
        doc="Dual-clip constant c: for A < 0, `l = min(l, -A c)`. Not used by `clip_cov` and "
        "`kl_cov`.",
    ),
    "algo.loss_agg": Field(
        "token-mean",
        "token-mean | seq-mean-token-mean | seq-mean-token-sum[-norm]",
        choices=AGG_MODES,
        doc="`token-mean` \\| `seq-mean-token-mean` \\| `seq-mean-token-sum` \\| "
        "`seq-mean-token-sum-norm`; formulas in [loss "
        "aggregation](algorithms.md#loss-aggregation). The denominators are over the "
        "whole mini-batch.",
    ),
    "algo.std_normalize": Field(
        True,
        "divide group-centred rewards by the group std (False = Dr. GRPO)",
        doc="Divide group-centred rewards by the group std (ddof 1) + 1e-6. `False` gives Dr. "
        "GRPO advantages.",
    ),
    "algo.kl_coef": Field(
        0.0,
        "weight of the KL penalty to the initial policy; > 0 keeps a reference",
        must=">= 0",
        doc="beta of `+ beta * agg(k)` to the reference policy (the initial `model.path` "
        "weights). The reference is kept only when > 0.",
    ),
    "algo.kl_estimator": Field(
        "k3",
        "k1 | k2 | k3",
        choices=("k1", "k2", "k3"),
        doc="`k1` \\| `k2` \\| `k3`, with `u = logp - ref_logp`: `k1 = u`, `k2 = u^2 / 2`, `k3 "
        "= exp(-u) + u - 1` ([KL penalty](algorithms.md#kl-penalty)).",
    ),
    "algo.kl_clamp": Field(
        10.0,
        "k3 clipped to [-kl_clamp, kl_clamp] as verl does; 0 = off",
        must=">= 0",
        special=(0, "off"),
        doc="k3 only: each token's estimate `exp(r) - r - 1` (r = ref - policy log-prob, "
        "itself clipped to [-20, 20]) is clipped to [-kl_clamp, kl_clamp], as verl's "
        "`low_var_kl` does; a token past the clamp adds `kl_clamp` and no gradient.",
    ),
    "algo.entropy_coef": Field(
        0.0,
        "fixed entropy bonus coefficient",
        must=">= 0",
        doc="Fixed bonus `- entropy_coef * agg(H)`, with gradient through H.",
    ),
    "algo.dynamic_sampling": Field(
        False,
        "DAPO: keep only groups whose rewards differ",
        doc="DAPO: keep only groups whose rewards are not all equal, and sample more prompt "
        "batches until `prompts_per_step` groups are kept.",
    ),
    "algo.dynamic_sampling_max_batches": Field(
        4,
        "prompt batches tried per step before topping up",
        must=">= 1",
        doc="At most this many prompt batches per step. If still short, the batch is topped "
        "up with uninformative groups.",
    ),
    "algo.old_logp_source": Field(
        "trainer",
        "source of the old log-probs: trainer | sampler",
        choices=("trainer", "sampler"),
        doc="Source of `old_logp` (ratio denominator, covariance, H_hat): `trainer` (one "
        "forward pass before the step's updates) \\| `sampler` (the engine's "
        "temperature-scaled log-probs). The logged `entropy` always comes from the "
        "trainer pass.",
    ),
    "algo.rollout_is": Field(
        "none",
        "truncated importance weights learner/sampler: none | token | sequence",
        choices=("none", "token", "sequence"),
        doc="Rollout correction by truncated importance sampling: each token's "
        "policy-gradient term is multiplied by `min(w, algo.rollout_is_threshold)`, "
        "detached, with `w = exp(old_logp - sampler_logp)` per token (`token`) or the "
        "product over the sequence (`sequence`) "
        "([rollout correction](algorithms.md#rollout-correction)).",
    ),
    "algo.rollout_is_threshold": Field(
        2.0,
        "the cap C of the importance weights",
        must=">= 1",
        doc="The cap C of `algo.rollout_is`'s weights.",
    ),
    "algo.rollout_rs": Field(
        "none",
        "rejection of tokens/sequences whose ratio leaves the band: none | token | sequence",
        choices=("none", "token", "sequence"),
        doc="Rollout correction by rejection: tokens (`token`) or whole sequences "
        "(`sequence`) whose importance ratio leaves `[algo.rollout_rs_threshold_lower, "
        "algo.rollout_rs_threshold]` leave the loss and its denominators. Needs the old "
        "log-probs before the update: a step with it keeps its old-policy pass.",
    ),
    "algo.rollout_rs_threshold": Field(
        2.0,
        "upper end of the rejection band",
        must=">= 1",
        doc="Upper end of `algo.rollout_rs`'s band.",
    ),
    "algo.rollout_rs_threshold_lower": Field(
        0.0,
        "lower end of the rejection band; 0 = 1 / rollout_rs_threshold",
        must="in [0, 1]",
        special=(0, "1 / rollout_rs_threshold"),
        doc="Lower end of `algo.rollout_rs`'s band.",
    ),
    "algo.cov_scope": Field(
        "global",
        "Clip-Cov / KL-Cov top-k over: global | per_device",
        choices=("global", "per_device"),
        doc="Where Clip-Cov and KL-Cov compute the covariance and choose their tokens: "
        "`global` (over each micro-batch as a whole, on however many devices it is split), "
        "`per_device` (within each device's rows of the micro-batch, as verl's per-GPU "
        "micro-batches do) ([scope](algorithms.md#covariance-scope)).",
    ),
    "algo.intervention": Field(
        "none",
        "entropy method (jaxrlvr/methods/): " + " | ".join(methods.names()),
        choices=methods.names(),
        doc=" \\| ".join(f"`{name}`" for name in methods.names())
        + ": the method of `jaxrlvr/methods/` that acts "
        "([entropy interventions](algorithms.md#entropy-interventions), "
        "[GSPO](algorithms.md#gspo)). Only the selected method's sub-config below is used "
        "and range-checked (every float must be finite in all of them).",
    ),
    # -- diagnostics
    "diagnostics.entropy_check_every": Field(
        0,
        "steps between first-order entropy-change checks; 0 = off",
        must=">= 0",
        special=(0, "off"),
        doc="Every k steps (at steps that are multiples of k), run the Lemma-1 entropy-change "
        "check (one extra forward pass of the old and new policy).",
    ),
    # -- optim
    "optim.lr": Field(
        1e-06,
        "peak learning rate",
        must="> 0",
        doc="Peak learning rate.",
    ),
    "optim.b1": Field(
        0.9,
        "AdamW beta1",
        must="in [0, 1)",
        doc="AdamW's first-moment decay.",
    ),
    "optim.b2": Field(
        0.999,
        "AdamW beta2",
        must="in [0, 1)",
        doc="AdamW's second-moment decay.",
    ),
    "optim.weight_decay": Field(
        0.0,
        "decoupled weight decay",
        must=">= 0",
        doc="Decoupled weight decay on all parameters (0 as in the STEER runs, [reference "
        "settings](algorithms.md#reference-settings); DAPO's recipe uses 0.1).",
    ),
    "optim.warmup_steps": Field(
        0,
        "training steps of linear warm-up",
        must=">= 0",
        doc="Linear warm-up from 0, counted in **training steps** as in verl/DAPO (each "
        "step's `updates_per_step` updates share its stretch; DAPO's recipe uses 10).",
    ),
    "optim.schedule": Field(
        "constant",
        "constant | cosine (to 0 at the last update)",
        choices=("constant", "cosine"),
        doc="`constant` \\| `cosine` (reaches 0 at the last optimizer update).",
    ),
    "optim.grad_clip": Field(
        1.0,
        "global-norm gradient clip; 0 = off",
        must=">= 0",
        special=(0, "off"),
        doc="Global-norm clip of the accumulated gradient.",
    ),
    # -- train
    "train.steps": Field(
        500,
        "training steps",
        must=">= 1",
        doc="Training steps (rollout batch + its updates).",
    ),
    "train.prompts_per_step": Field(
        512,
        "prompts per rollout batch",
        must=">= 1",
        doc="Prompts per rollout batch (global, over all processes).",
    ),
    "train.mini_batch_prompts": Field(
        32,
        "prompts per optimizer update",
        must=">= 1",
        doc="Prompts per optimizer update. Updates per step = `prompts_per_step / "
        "mini_batch_prompts` x `ppo_epochs` (demo 2, 7B 16).",
    ),
    "train.ppo_epochs": Field(
        1,
        "passes over the step's mini-batches (updates = mini-batches x epochs)",
        must=">= 1",
        doc="Passes over the step's mini-batches (verl's `ppo_epochs`): each pass visits them "
        "in the same order, every update against the same old log-probs (the policy at "
        "the start of the step), so from the second pass on every sampled token is "
        "revisited off-policy. The learning-rate schedule and its warm-up count all the "
        "updates.",
    ),
    "train.micro_batch_sequences": Field(
        8,
        "sequences per gradient-accumulation chunk",
        doc="Sequences per gradient-accumulation chunk (also the chunk of the old-policy "
        "pass). Must divide `mini_batch_prompts * rollout.n`, and be a multiple of the "
        "data x fsdp devices the batch splits over (checked against the mesh at start, "
        "with the nearest valid value in the error): every micro-batch keeps every device "
        "busy. The update does not depend on it, except for the per-micro-batch "
        "selections of `clip_cov`, `kl_cov` and `rand_pos_clip`.",
    ),
    "train.pack": Field(
        True,
        "pack several sequences per row in the policy pass and the update",
        doc="Pack several whole sequences per row (segment ids, per-sequence positions, "
        "attention within a sequence) in the policy pass and the update, instead of one "
        "padded sequence per row. Loss, gradients and metrics are the same to 1e-5; "
        "compute follows the real tokens. Metrics `pad_fraction` and "
        "`rows_per_micro_batch` show the effect.",
    ),
    "train.pack_buckets": Field(
        8,
        "row-count / head-list sizes: at most this many compiled shapes",
        must=">= 1",
        doc="How finely the packed batch's shape follows its content: the rows per "
        "micro-batch and the length of the LM-head position list are rounded up to a "
        "multiple of 1/`pack_buckets` of their unpacked size, so the policy pass and the "
        "update compile for at most `pack_buckets` row counts (and as many head lengths). "
        "More buckets pad less and may compile more variants (each compiled once, when a "
        "batch first needs it).",
    ),
    "train.single_pass": Field(
        True,
        "one update per step: old log-probs from the update's own forward pass",
        doc="With exactly one optimizer update per step (`prompts_per_step = "
        "mini_batch_prompts`, `ppo_epochs = 1`) and `algo.old_logp_source=trainer`, the old "
        "log-probs and entropies are the update's own under stop_gradient (ratio 1, the same "
        "loss and gradients, as verl and Tunix run on-policy), and the separate old-policy "
        "pass is skipped; every metric and method reads them from that pass. Not with "
        "`adaptive_entropy`, whose controller needs the entropy estimate before the update. "
        "`False` always runs the separate pass. `python -m jaxrlvr.plan` shows which.",
    ),
    "train.eval_every": Field(
        10,
        "steps between evaluations (and the last step); 0 = never",
        must=">= 0",
        special=(0, "never"),
        doc="Evaluate every k steps and at the last step, when `data.eval_files` is set.",
    ),
    "train.eval_n": Field(
        32,
        "samples per eval prompt (k of Avg@k / Pass@k)",
        must=">= 1",
        doc="Samples per eval prompt (k of Avg@k / Pass@k), drawn with the rollout sampling "
        "settings.",
    ),
    "train.eval_max_prompts": Field(
        0,
        "first k eval prompts; 0 = all",
        must=">= 0",
        special=(0, "all"),
        doc="Use the first k eval prompts.",
    ),
    "train.checkpoint_every": Field(
        20,
        "steps between checkpoints (and the last step); 0 = only the last",
        must=">= 0",
        special=(0, "only at the end"),
        doc="Save every k steps and always at the last step. `0` = only at the end.",
    ),
    "train.max_checkpoints": Field(
        2,
        "checkpoints kept",
        must=">= 1",
        doc="Checkpoints kept.",
    ),
    "train.max_skipped_steps": Field(
        3,
        "consecutive steps with non-finite updates before the run stops",
        must=">= 1",
        doc="The run stops (exit code 1) after this many consecutive steps with a skipped "
        "non-finite update ([faults](training.md#faults)).",
    ),
    "train.log_every": Field(
        1,
        "steps between console summary lines",
        must=">= 1",
        doc="Console summary line every k steps, with the rate (s/step) and the ETA.",
    ),
    "train.progress": Field(
        True,
        "progress bars (only when stderr is a terminal)",
        doc="tqdm progress bars (steps, and generation when at least 1024 sequences), shown "
        "only when stderr is a terminal (never in a log file).",
    ),
    # -- logging
    "logging.backends": Field(
        "jsonl,tensorboard",
        "metric sinks: jsonl (required), tensorboard, wandb, mlflow, trackio",
        doc="Comma-separated: `jsonl` (`metrics.jsonl`, always), `tensorboard` "
        "(`workdir/tensorboard/`), `wandb` (Weights & Biases; `WANDB_MODE=offline` works "
        "without a network), `mlflow` (`MLFLOW_TRACKING_URI`, else a file store in "
        "`workdir/mlruns`), `trackio` (local in `TRACKIO_DIR`, else the Hugging Face cache). "
        "Every tracker gets the same metric names and steps and the resolved config once; "
        "a resumed run continues the same tracker run (ids in `workdir/trackers.json`). "
        "The tracker packages are extras: `pip install 'jaxrlvr[wandb]'` (`[mlflow]`, "
        "`[trackio]`, `[trackers]` for all); a missing one stops the run before it starts, "
        "naming the extra.",
    ),
    "logging.project": Field(
        "jaxrlvr",
        "the tracker project (W&B project, MLflow experiment, Trackio project)",
        doc="The project (W&B), experiment (MLflow) or project (Trackio) runs are filed under.",
    ),
    "logging.run_name": Field(
        "",
        "the tracker run name; '' = the workdir's name",
        doc="The run's name in the trackers. `\"\"` means the workdir's directory name.",
    ),
    # -- mesh
    "mesh.shape": Field(
        (1, -1, 1),
        "device mesh sizes over (data, fsdp, tensor); -1 = the remaining devices",
        doc="Device mesh over `('data', 'fsdp', 'tensor')`. Batches are sharded over data × "
        "fsdp, parameters over fsdp (ZeRO-3 style) and tensor. 3 sizes, each >= 1, at "
        "most one `-1` (= the remaining devices).",
    ),
}
