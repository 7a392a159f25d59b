"""This project against Tunix (`google-tunix` 0.1.7), side by side, at the same model shapes.

    python benchmarks/peers.py --setup                      # once: creates .venv-peers/
    python benchmarks/peers.py --repeats 3 --out peers.md   # hidden 512, 2 layers, vocab 32768
    python benchmarks/peers.py --hidden 128 --intermediate 352 --vocab 4096 \
        --max-new 16 --seq-len 48 --repeats 1 --iters 3     # a small check (~5 min on 2 CPUs)

Environment. Tunix is never a dependency of this package: it lives in the benchmark's own
virtual environment `.venv-peers/` (gitignored), which `--setup` (or a first run that needs
it) creates with `google-tunix==0.1.7` and this package's pinned dependencies (so JAX, Flax
and Optax are the versions this project is tested with; the setup checks them) except
`transformers`, then this package in editable mode without dependencies: Tunix pins
`safetensors<0.8`, which this project's `transformers` pin excludes, and nothing the
benchmark imports uses `transformers`. Both systems' workers run in that environment;
with `--systems jaxrlvr` and no such environment they run in the current interpreter.

Model. One random-weight Qwen2 (`--hidden`, `--layers`, `--heads`, `--kv-heads`,
`--intermediate`, `--vocab`, `--dtype`; tied embeddings unless `--no-tie`) is written once
as a Hugging Face checkpoint and each system reads it with its own loader, so both get
exactly the same weights (the first worker checks that both compute the same logits).
Each system runs on one device, on a one-device mesh: this project's ('data', 'fsdp',
'tensor'), Tunix's ('fsdp', 'tp') with its context entered, as Tunix's RL cluster does.

Measurements, each in a fresh worker process; the systems alternate (A B A B ...) over
`--repeats` rounds, and the table gives the median and range over the rounds. A worker
calls the system's step `1 + --iters` times: steady state is the median of the later calls
that compiled nothing, compile time the excess over it of every call that compiled (a
system may compile again after its first call); it also reports the XLA compile seconds
(`jax.monitoring`), the process's peak RSS (before the calls and at the end) and, where
the backend reports it, the device's peak memory.

  sample-equal     `--prompts` prompts of `--prompt-len` random tokens, exactly `--max-new`
                   new tokens each; temperature 1, top-p 1, top-k off, no stop token;
                   `--slots` sequences in flight (default: all prompts)
  sample-longtail  the same, response i forced to length L_i (log-normal, median the
                   geometric mean of `--min-new` and `--max-new`, sigma `--sigma`, clipped)
  grpo-equal       one GRPO training step on `--prompts` sequences of `--seq-len` tokens
                   (prompt `--prompt-len` + response), groups of `--group`, random
                   group-normalised advantages
  grpo-longtail    the same with log-normal response lengths in [`--min-response`, max]

Sampling: throughput = generated tokens (the forced lengths) / wall time of the rollout.
  jaxrlvr  `jaxrlvr.sampling.generate` on one `Engine` (continuous batching; prompts padded
           to a power of two >= 16, as the trainer does), per-request
           `SamplingParams.max_new_tokens` = L_i.
  tunix    `tunix.generate.sampler.Sampler` (static batches of `--slots` prompts, token ids
           through a pass-through tokenizer, `return_logprobs=True` as this engine always
           does, an EOS id outside the vocabulary); a batch decodes max(L_i) steps, which
           is what the sampler does when the other rows end at EOS earlier.

GRPO: time of one training step on the same batch: token-mean loss, PPO clip 0.2, dual
clip `DUAL_CLIP`, no KL term, AdamW (lr `LR`) after global-norm clipping, one optimizer
update over the whole batch, no gradient accumulation.
  jaxrlvr  `jaxrlvr.rl.learner.Learner.step`, as `jaxrlvr.train` runs it: the old-policy pass,
           the update (`jaxrlvr.rl.grpo.update`), the controllers and the step's metrics.
           The config is the demo preset's with the settings above; the rest keeps this
           project's defaults (e.g. `train.pack`, `model.attention`), which `--set KEY=VALUE`
           overrides (the sampler's engine and model numerics come from the same config).
  tunix    what `GRPOLearner` runs when old log-probs are needed (`num_iterations > 1`):
           `rl.common.compute_per_token_logps` (the rollout's old-policy pass), then the
           actor trainer's jitted train step (`rl.trainer.Trainer` with the registered
           `grpo` policy loss), its loss and metrics fetched to the host. The train step
           alone is reported too (`update only`): with `num_iterations == 1` Tunix skips
           the old-policy pass. Its training loop around the step (metric buffering,
           checkpoint checks) is not timed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-peers"
TUNIX = "google-tunix==0.1.7"
SYSTEMS = ("jaxrlvr", "tunix")
MEASUREMENTS = ("sample-equal", "sample-longtail", "grpo-equal", "grpo-longtail")
RESULT = "PEERS_RESULT "  # prefix of a worker's result line on stdout
LR, DUAL_CLIP, GRAD_CLIP = 1e-6, 3.0, 1.0
PAD = 0  # prompt and response tokens are drawn from [1, vocab)


@dataclasses.dataclass
class Spec:
    """Everything a worker needs (JSON-serialisable)."""

    hidden: int = 512
    layers: int = 2
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 1408
    vocab: int = 32768
    dtype: str = "float32"
    tie: bool = True
    rope_theta: float = 1_000_000.0
    prompts: int = 16
    slots: int = 0  # 0: all prompts at once
    prompt_len: int = 32
    max_new: int = 64
    min_new: int = 4
    seq_len: int = 96
    min_response: int = 8
    group: int = 8
    sigma: float = 0.75
    iters: int = 5
    seed: int = 0
    jaxrlvr_set: list[str] = dataclasses.field(default_factory=list)  # config overrides
    checkpoint: str = ""

    def __post_init__(self):
        if self.prompts % self.group or self.seq_len <= self.prompt_len:
            raise ValueError(
                f"need --prompts ({self.prompts}) a multiple of --group ({self.group}) and "
                f"--seq-len ({self.seq_len}) > --prompt-len ({self.prompt_len})"
            )

    @property
    def response_len(self) -> int:
        return self.seq_len - self.prompt_len

    @property
    def num_slots(self) -> int:
        return self.slots or self.prompts


def lognormal_lengths(n: int, lo: int, hi: int, sigma: float, seed: int) -> list[int]:
    """n lengths, log-normal with median sqrt(lo * hi), clipped to [lo, hi]."""
    rng = np.random.default_rng(seed)
    x = np.exp(rng.normal(0.5 * np.log(lo * hi), sigma, n))
    return np.clip(np.rint(x), lo, hi).astype(int).tolist()


def lengths(spec: Spec, measurement: str) -> list[int]:
    """The forced response lengths of a measurement (the same for both systems)."""
    task, workload = measurement.split("-")
    hi = spec.max_new if task == "sample" else spec.response_len
    if workload == "equal":
        return [hi] * spec.prompts
    lo = min(spec.min_new if task == "sample" else spec.min_response, hi)
    return lognormal_lengths(spec.prompts, lo, hi, spec.sigma, spec.seed + 1)


def prompts(spec: Spec) -> np.ndarray:
    return np.random.default_rng(spec.seed).integers(1, spec.vocab, (spec.prompts, spec.prompt_len))


def grpo_batch(spec: Spec, measurement: str):
    """Prompts [N, P], responses (lists), advantages [N] (group-normalised random rewards)."""
    rng = np.random.default_rng(spec.seed + 2)
    responses = [rng.integers(1, spec.vocab, n).tolist() for n in lengths(spec, measurement)]
    rewards = rng.normal(size=(spec.prompts // spec.group, spec.group))
    adv = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-6)
    return prompts(spec), responses, adv.reshape(-1).astype(np.float32)


# --------------------------------------------------------------------------- this project


def jaxrlvr_config(spec: Spec, task: str):
    """The training config of this benchmark: the demo preset's tree with the benchmark's
    shapes and settings, then the `--set` overrides; validated as the trainer does."""
    from jaxrlvr import config as config_lib

    c = config_lib.base_config("demo")
    c.model.dtype = c.model.param_dtype = spec.dtype
    c.data.max_prompt_len = spec.prompt_len
    c.rollout.n = spec.group
    c.rollout.max_new_tokens = spec.max_new if task == "sample" else spec.response_len
    c.rollout.max_slots = spec.num_slots
    c.train.prompts_per_step = c.train.mini_batch_prompts = spec.prompts // spec.group
    c.train.micro_batch_sequences = spec.prompts  # one update, no gradient accumulation
    c.train.steps = 10**6
    c.algo.dual_clip = DUAL_CLIP
    c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip = LR, 0, GRAD_CLIP
    for item in spec.jaxrlvr_set:
        key, _, value = item.partition("=")
        with contextlib.suppress(ValueError, SyntaxError):  # else a plain string
            value = ast.literal_eval(value)
        c.update_from_flattened_dict({key: value})
    config_lib.validate(c, files=False)
    return c


def jaxrlvr_model(spec: Spec, c):
    """The shared checkpoint loaded as `jaxrlvr.train` loads a model, on a one-device mesh."""
    from jaxrlvr import config as config_lib
    from jaxrlvr.models import load_hf_checkpoint
    from jaxrlvr.sharding import make_mesh

    mesh = make_mesh((1, 1, 1))
    return load_hf_checkpoint(spec.checkpoint, mesh=mesh, **config_lib.model_numerics(c)), mesh


def jaxrlvr_sampler(spec: Spec, measurement: str):
    from jaxrlvr import config as config_lib
    from jaxrlvr.sampling import Engine, SamplingParams, generate, num_generated_tokens

    c = jaxrlvr_config(spec, "sample")
    model, mesh = jaxrlvr_model(spec, c)
    engine = Engine(model, **config_lib.engine_shape(c), mesh=mesh)
    ids, lens = prompts(spec).tolist(), lengths(spec, measurement)
    r = c.rollout
    params = [
        SamplingParams(
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=n,
            seed=spec.seed,
        )
        for n in lens
    ]  # fmt: skip

    def run() -> dict:
        out = generate(engine, ids, params, progress=False)
        assert num_generated_tokens(out) == sum(lens)
        return {}

    return run


def jaxrlvr_grpo(spec: Spec, measurement: str):
    from flax import nnx

    from jaxrlvr.rl import grpo
    from jaxrlvr.rl.learner import Learner

    c = jaxrlvr_config(spec, "grpo")
    model, mesh = jaxrlvr_model(spec, c)
    graphdef, params = nnx.split(model, nnx.Param)
    learner = Learner(c, graphdef, params, mesh, num_epochs=1)
    ids, responses, adv = grpo_batch(spec, measurement)
    arrays = grpo.rollout_batch(
        ids.tolist(),
        responses,
        [[0.0] * len(r) for r in responses],
        adv,
        prompt_len=spec.prompt_len,
        response_len=spec.response_len,
        pad_id=PAD,
    )

    def run() -> dict:
        metrics = learner.step(arrays, 0, False)
        assert np.isfinite(metrics["loss"]) and not metrics["skipped_updates"], metrics
        return {}

    return run


# --------------------------------------------------------------------------- Tunix


class IdTokenizer:
    """Tunix's tokenizer interface over token ids written as space-separated integers."""

    def __init__(self, eos: int):
        self.eos = eos

    def encode(self, text: str, **kw) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **kw) -> str:
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return self.eos

    def pad_id(self) -> int:
        return PAD


def tunix_model(spec: Spec):
    import jax
    import jax.numpy as jnp
    from tunix.models.qwen2 import model as qwen2_lib
    from tunix.models.qwen2 import params as qwen2_params

    dtype = jnp.dtype(spec.dtype)
    cfg = qwen2_lib.ModelConfig(
        num_layers=spec.layers,
        vocab_size=spec.vocab,
        embed_dim=spec.hidden,
        hidden_dim=spec.intermediate,
        num_heads=spec.heads,
        head_dim=spec.hidden // spec.heads,
        num_kv_heads=spec.kv_heads,
        rope_theta=int(spec.rope_theta),
        norm_eps=1e-6,
        use_tied_embedding=spec.tie,
        dtype=dtype,
        param_dtype=dtype,
    )
    # A one-device mesh, as Tunix's RL cluster runs every role on a mesh (its context entered).
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    model = qwen2_params.create_model_from_safe_tensors(spec.checkpoint, cfg, mesh, dtype=dtype)
    return model, mesh


def tunix_sampler(spec: Spec, measurement: str):
    from tunix.generate import sampler as sampler_lib

    model, mesh = tunix_model(spec)
    cache = sampler_lib.CacheConfig(
        cache_size=spec.prompt_len + spec.max_new,
        num_layers=spec.layers,
        num_kv_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads,
    )
    sampler = sampler_lib.Sampler(model, IdTokenizer(eos=spec.vocab), cache)
    texts = [" ".join(map(str, p)) for p in prompts(spec).tolist()]
    lens, b = lengths(spec, measurement), spec.num_slots

    def run() -> dict:
        for i in range(0, len(texts), b):
            steps = max(lens[i : i + b])
            with mesh:
                out = sampler(
                    texts[i : i + b],
                    max_generation_steps=steps,
                    max_prompt_length=spec.prompt_len,
                    temperature=1.0,
                    top_p=1.0,
                    top_k=None,
                    seed=spec.seed,
                    return_logprobs=True,
                    eos_tokens=[spec.vocab],  # outside the vocabulary: never sampled
                )
            assert all(len(t) == steps for t in out.tokens)
        return {}

    return run


def tunix_grpo(spec: Spec, measurement: str):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tunix.rl import common, function_registry
    from tunix.rl import trainer as rl_trainer
    from tunix.rl.grpo.grpo_learner import GRPOConfig, TrainExample
    from tunix.sft import peft_trainer

    model, mesh = tunix_model(spec)
    algo = GRPOConfig(
        num_generations=spec.group, num_iterations=1, beta=0.0, epsilon=0.2,
        loss_agg_mode="token-mean",
    )  # fmt: skip
    algo.temperature, algo.epsilon_c = 1.0, DUAL_CLIP  # as GRPOLearner sets the temperature
    tx = optax.chain(optax.clip_by_global_norm(GRAD_CLIP), optax.adamw(LR, weight_decay=0.0))
    policy_loss = function_registry.get_policy_loss_fn("grpo")
    with mesh:
        trainer = rl_trainer.Trainer(
            model,
            tx,
            peft_trainer.TrainingConfig(eval_every_n_steps=10**9),
            custom_checkpoint_metadata_fn=dict,
        )
        trainer.with_loss_fn(
            lambda model, train_example, algo_config: policy_loss(
                model, train_example, algo_config=algo, pad_id=PAD, eos_id=spec.vocab
            ),
            has_aux=True,
        )
        trainer.with_gen_model_input_fn(lambda x: {"train_example": x, "algo_config": algo})
        train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)

    ids, responses, adv = grpo_batch(spec, measurement)
    completions = np.full((spec.prompts, spec.response_len), PAD, np.int32)
    for i, r in enumerate(responses):
        completions[i, : len(r)] = r
    prompt_ids, completion_ids = jnp.asarray(ids, jnp.int32), jnp.asarray(completions)

    def run() -> dict:
        t0 = time.perf_counter()
        with mesh:
            graphdef, state = nnx.split(trainer.model)
            old = common.compute_per_token_logps(
                graphdef, state, prompt_tokens=prompt_ids, completion_tokens=completion_ids,
                pad_id=PAD, eos_id=spec.vocab, stop_gradient=True,
            )  # fmt: skip
            jax.block_until_ready(old)
            t1 = time.perf_counter()
            example = TrainExample(
                prompt_ids=prompt_ids,
                prompt_mask=prompt_ids != PAD,
                completion_ids=completion_ids,
                completion_mask=completion_ids != PAD,
                advantages=jnp.asarray(adv),
                ref_per_token_logps=None,
                old_per_token_logps=old,
            )
            loss, aux, grad_norm = jax.device_get(train_step(example))
        assert np.isfinite(loss) and np.isfinite(grad_norm), (loss, grad_norm)
        return {"old_logp_s": t1 - t0, "update_s": time.perf_counter() - t1}

    return run


# --------------------------------------------------------------------------- workers

BUILDERS = {
    ("jaxrlvr", "sample"): jaxrlvr_sampler,
    ("jaxrlvr", "grpo"): jaxrlvr_grpo,
    ("tunix", "sample"): tunix_sampler,
    ("tunix", "grpo"): tunix_grpo,
}
XLA_COMPILE = "/jax/core/compile/backend_compile_duration"  # a `jax.monitoring` event


def memory() -> dict:
    """Peak RSS of this process and, where reported, the device's peak bytes (MiB)."""
    import jax

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    return out


def measure(system: str, measurement: str, spec: Spec) -> dict:
    """One measurement in this process: `1 + spec.iters` calls of the system's step.

    Steady state is the median of the later calls that compiled nothing; compile time the
    excess over it of every call that compiled (XLA compilations are counted through
    `jax.monitoring`: a system may compile again after its first call)."""
    import jax

    task = measurement.split("-")[0]
    run = BUILDERS[system, task](spec, measurement)
    rss_before = memory()["peak_rss_mib"]
    compiles: list[float] = []

    def listener(event: str, secs: float, **kw) -> None:
        if event == XLA_COMPILE:
            compiles.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    calls = []  # (seconds, XLA compile seconds, extras)
    try:
        for _ in range(1 + spec.iters):
            compiles.clear()
            t0 = time.perf_counter()
            extra = run()
            calls.append((time.perf_counter() - t0, sum(compiles), extra))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    warm = [c for c in calls[1:] if not c[1]] or calls[1:]
    steady = statistics.median(c[0] for c in warm)
    out = {
        "first_s": calls[0][0],
        "steady_s": steady,
        "compile_s": sum(max(t - steady, 0.0) for t, xla, _ in calls if xla),
        "xla_compile_s": sum(c[1] for c in calls),
        "compiling_calls": sum(bool(c[1]) for c in calls),
        "rss_before_calls_mib": rss_before,
    }
    if task == "sample":
        out["tokens"] = sum(lengths(spec, measurement))
        out["tokens_per_s"] = out["tokens"] / steady
    for key in warm[0][2]:
        out[key] = statistics.median(c[2][key] for c in warm)
    return out | memory()


def init(spec: Spec) -> dict:
    """Write the shared random-weight checkpoint; where Tunix is importable, check that
    both systems compute the same logits from it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrlvr.models import Qwen2, Qwen2Config, save_hf_checkpoint

    cfg = Qwen2Config(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie, dtype=spec.dtype, param_dtype=spec.dtype,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    save_hf_checkpoint(Qwen2(cfg, rngs=nnx.Rngs(spec.seed)), spec.checkpoint)
    out = {"jax": jax.__version__, "devices": str(jax.devices())}
    try:
        import tunix  # noqa: F401
        from tunix.rl.common import make_causal_attn_mask
    except ImportError:
        return out
    from importlib.metadata import version

    ids = jnp.asarray(prompts(spec)[:2], jnp.int32)
    ours = jaxrlvr_model(spec, jaxrlvr_config(spec, "sample"))[0](ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    mask = make_causal_attn_mask(jnp.ones(ids.shape, bool))
    model, mesh = tunix_model(spec)
    with mesh:
        theirs, _ = model(ids, positions, None, mask)
    diff = float(jnp.max(jnp.abs(ours - theirs)) / jnp.max(jnp.abs(ours)))
    return out | {"tunix": version("google-tunix"), "logits_rel_diff": diff}


def worker_main(payload: str) -> None:
    job = json.loads(payload)
    spec = Spec(**job["spec"])
    if job["task"] == "init":
        result = init(spec)
    else:
        result = measure(job["system"], job["measurement"], spec)
    print(RESULT + json.dumps(result), flush=True)


def run_worker(python: str, job: dict, timeout: float) -> dict:
    """Run one job in a fresh process; its result (raises with the worker's output on failure)."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"worker {job.get('system', '')} {job['task']} failed:\n{tail}")
    return json.loads(lines[-1][len(RESULT) :])


# --------------------------------------------------------------------------- environment


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def setup(venv: Path) -> None:
    """Create (or update) the benchmark's environment: Tunix + this package (see docstring)."""
    py = venv_python(venv)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    deps = [d for d in deps if not d.startswith("transformers")]
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TUNIX, *deps], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(REPO)], check=True)
    pins = {d.split("==")[0]: d.split("==")[1] for d in deps if "==" in d}
    check = "import jax, flax, optax, tunix\nfor m in (jax, flax, optax): print(m.__version__)"
    got = subprocess.run([str(py), "-c", check], check=True, capture_output=True, text=True)
    jax_v, flax_v, optax_v = got.stdout.split()
    want = (pins["jax"], pins["flax"], pins["optax"])
    if (jax_v, flax_v, optax_v) != want:
        raise RuntimeError(f"{venv}: jax/flax/optax {jax_v}/{flax_v}/{optax_v}, expected {want}")
    print(f"{venv}: {TUNIX}, jax {jax_v}, flax {flax_v}, optax {optax_v}")


def tunix_ready(venv: Path) -> bool:
    py = venv_python(venv)
    return py.exists() and not subprocess.run([str(py), "-c", "import tunix, jaxrlvr"]).returncode


# --------------------------------------------------------------------------- report

# (name, field, unit, higher is better)
METRICS = {
    "sample": [("throughput", "tokens_per_s", "tok/s", True)],
    "grpo": [("step time", "steady_s", "s", False), ("  update only", "update_s", "s", False)],
}
COMMON = [
    ("compile", "compile_s", "s", False),
    ("  XLA compile", "xla_compile_s", "s", False),
    ("peak RSS", "peak_rss_mib", "MiB", False),
    ("  before the calls", "rss_before_calls_mib", "MiB", False),
    ("device peak", "device_peak_mib", "MiB", False),
]


def summarize(records: list[dict], systems: list[str]) -> list[dict]:
    """Per measurement and metric: median and range per system, and the ratio oriented so
    that > 1 favours this project (throughput jaxrlvr / tunix, times and memory tunix /
    jaxrlvr)."""
    rows = []
    for m in dict.fromkeys(r["measurement"] for r in records):
        for name, key, unit, higher in METRICS[m.split("-")[0]] + COMMON:
            row = {"measurement": m, "metric": name, "unit": unit}
            for s in systems:
                got = [r.get(key) for r in records if (r["measurement"], r["system"]) == (m, s)]
                vals = [v for v in got if v is not None]
                if vals:
                    row[s] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
            if not any(s in row for s in systems):
                continue
            if all(s in row for s in SYSTEMS):
                a, b = row["jaxrlvr"]["median"], row["tunix"]["median"]
                row["ratio"] = (a / b if higher else b / a) if a and b else None
            rows.append(row)
    return rows


def markdown(rows: list[dict], systems: list[str]) -> str:
    def fmt(x: float) -> str:
        return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"

    def cell(v) -> str:
        if v is None:
            return ""
        spread = "" if v["min"] == v["max"] else f" ({fmt(v['min'])}-{fmt(v['max'])})"
        return fmt(v["median"]) + spread

    head = "| measurement | metric | " + " | ".join(systems) + " | ratio (>1: jaxrlvr better) |"
    lines = [head, "|---|---|" + "---|" * len(systems) + "---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else ""
        cells = " | ".join(cell(r.get(s)) for s in systems)
        lines.append(f"| {r['measurement']} | {r['metric']} ({r['unit']}) | {cells} | {ratio} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Spec()
    for field in dataclasses.fields(Spec):
        if field.name in ("checkpoint", "tie", "jaxrlvr_set"):
            continue
        flag = "--" + field.name.replace("_", "-")
        p.add_argument(flag, type=type(getattr(d, field.name)), default=getattr(d, field.name))
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--set",
        dest="jaxrlvr_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override this project's training config, e.g. --set train.pack=False",
    )
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--measurements", default=",".join(MEASUREMENTS))
    p.add_argument("--repeats", type=int, default=3, help="rounds of A B alternation")
    p.add_argument("--venv", type=Path, default=VENV, help="the environment with Tunix")
    p.add_argument("--setup", action="store_true", help="create / update --venv first")
    p.add_argument("--python", help="worker interpreter (default: --venv's, else this one)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    p.add_argument("--out", help="write the results: .md a table, else JSON with every run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def compare(spec: Spec, systems, measurements, repeats: int, python: str, timeout: float):
    """Write the checkpoint, then run every measurement `repeats` times, systems alternating.
    Returns (the init worker's info, one record per worker)."""
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        spec = dataclasses.replace(spec, checkpoint=os.path.join(tmp, "model"))
        job = {"spec": dataclasses.asdict(spec)}
        info = run_worker(python, job | {"task": "init"}, timeout)
        print(f"environment: {info}", flush=True)
        records = []
        for r in range(repeats):
            for m in measurements:
                for s in systems:
                    job_m = job | {"task": "measure", "system": s, "measurement": m}
                    res = run_worker(python, job_m, timeout)
                    records.append({"round": r, "measurement": m, "system": s} | res)
                    brief = {k: round(v, 4) for k, v in res.items() if isinstance(v, float)}
                    print(f"round {r} {m:16s} {s:8s} {json.dumps(brief)}", flush=True)
    return info, records


def write(path: str, spec: Spec, info: dict, records: list[dict], rows: list[dict]) -> None:
    """`.md`: the settings and the table; otherwise JSON with every worker's record."""
    spec_d = {k: v for k, v in dataclasses.asdict(spec).items() if k != "checkpoint"}
    if path.endswith(".md"):
        systems = [s for s in SYSTEMS if any(r["system"] == s for r in records)]
        text = f"settings: `{json.dumps(spec_d)}`\n\nenvironment: `{json.dumps(info)}`\n\n"
        text += markdown(rows, systems) + "\n"
    else:
        out = {"spec": spec_d, "info": info, "records": records, "summary": rows}
        text = json.dumps(out, indent=1)
    Path(path).write_text(text)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    systems, measurements = args.systems.split(","), args.measurements.split(",")
    unknown = set(systems) - set(SYSTEMS) | set(measurements) - set(MEASUREMENTS)
    if unknown:
        raise SystemExit(f"unknown systems or measurements: {sorted(unknown)}")
    if args.setup or ("tunix" in systems and not args.python and not tunix_ready(args.venv)):
        setup(args.venv)
    python = args.python or str(venv_python(args.venv))
    if not args.python and not venv_python(args.venv).exists():
        python = sys.executable
    names = [f.name for f in dataclasses.fields(Spec) if f.name != "checkpoint"]
    spec = Spec(**{n: getattr(args, n) for n in names})
    info, records = compare(spec, systems, measurements, args.repeats, python, args.timeout)
    rows = summarize(records, systems)
    print(markdown(rows, systems))
    if args.out:
        write(args.out, spec, info, records, rows)


if __name__ == "__main__":
    main()
