"""GRPO training: `python -m jaxrlvr.train --config=configs/grpo.py[:preset] [--config.x=y ...]`.

One step: sample `n` responses for each of `prompts_per_step` prompts with the current
policy, score them with a verifiable reward, compute group advantages, run one old-policy
pass for log-probs and entropies, then `prompts_per_step / mini_batch_prompts` optimizer
updates. Metrics go to `workdir/metrics.jsonl` and TensorBoard; Orbax checkpoints make a
rerun of the same command resume; the final policy is exported to `workdir/hf/`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx
from ml_collections import config_flags
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from jaxrlvr import config as config_lib
from jaxrlvr import distributed, grpo, losses, programs
from jaxrlvr.checkpointing import Checkpointer
from jaxrlvr.data import PromptDataset, load_prompts
from jaxrlvr.evaluation import avg_and_pass_at_k
from jaxrlvr.metrics import MetricsWriter, StepTimer, console_line
from jaxrlvr.models import load_hf_checkpoint, save_hf_checkpoint
from jaxrlvr.rewards import get_reward_fn
from jaxrlvr.sampling import Engine, SamplingParams, generate
from jaxrlvr.sharding import batch_shards, make_mesh

log = logging.getLogger("jaxrlvr.train")

CONSOLE_KEYS = ("reward_mean", "accuracy", "entropy", "response_length_mean", "pg_clipfrac")


def resolve_model_and_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fill in the demo's model and data (built and cached on first use) where unset."""
    config = ml_collections.ConfigDict(config.to_dict())  # a copy; the caller's stays as given
    if config.preset == "demo" and not config.model.path:
        from jaxrlvr.demo_policy import build_demo_policy

        path = build_demo_policy(log=log.info)
        config.model.path = str(path)
        config.data.train_files = config.data.train_files or str(path / "train.jsonl")
        config.data.eval_files = config.data.eval_files or str(path / "eval.jsonl")
    return config


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """EOS plus the chat end-of-turn token where the vocabulary has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return tuple(sorted(ids))


def record_config(config: ml_collections.ConfigDict, workdir: str, *, resuming: bool) -> None:
    """Write `workdir/config.json`; on resume, warn about every key that changed."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json())
    if resuming and os.path.exists(path):
        with open(path) as f:
            before = _flatten(json.load(f))
        now = _flatten(current)
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                log.warning(
                    "resuming with config.%s = %r (was %r)", key, now.get(key), before.get(key)
                )
    with open(path, "w") as f:
        json.dump(current, f, indent=2)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


EVAL_STREAM = 1_000_003  # seeds of eval sampling, apart from the rollouts' attempts


def derive_seed(*parts: int) -> int:
    """A sampling seed from integers, stable across processes (unlike `hash`)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] >> 1)


class Trainer:
    """The stateful shell around the pure update in `jaxrlvr.grpo`."""

    def __init__(self, config: ml_collections.ConfigDict):
        config_lib.validate(config)
        self.config = config = resolve_model_and_data(config)
        config_lib.validate(config)
        self.workdir = config_lib.workdir(config)
        try:
            self.mesh = make_mesh(tuple(config.mesh.shape))
        except ValueError as e:  # e.g. more devices than the processes have together
            raise config_lib.ConfigError(f"config.mesh.shape={config.mesh.shape}: {e}") from None
        config_lib.validate_mesh(config, self.mesh)
        c, a = config, config.algo
        # Several processes: the same config everywhere, and a workdir all of them see.
        distributed.check_same("the config", json.loads(config.to_json()))
        os.makedirs(self.workdir, exist_ok=True)
        distributed.check_shared_directory(self.workdir)

        self.tokenizer = AutoTokenizer.from_pretrained(c.model.path)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        self.stop_ids = stop_token_ids(self.tokenizer)
        data_kw = dict(
            tokenizer=self.tokenizer,
            template=c.data.prompt_template,
            max_prompt_len=c.data.max_prompt_len,
            prompt_field=c.data.prompt_field or None,
            answer_field=c.data.answer_field,
        )
        train_prompts = load_prompts(config_lib.split_files(c.data.train_files), **data_kw)
        if len(train_prompts) < c.train.prompts_per_step:
            raise config_lib.ConfigError(
                f"config.data.train_files: {len(train_prompts)} usable prompts, fewer than "
                f"config.train.prompts_per_step={c.train.prompts_per_step}"
            )
        # Every process reads the whole (deterministic) step batch: the sampler runs on the
        # global mesh, so all processes feed it the same prompts.
        self.dataset = PromptDataset(
            train_prompts,
            c.train.prompts_per_step,
            seed=c.seed,
            shuffle=c.data.shuffle,
            process_index=0,
            process_count=1,
        )
        self.data_iter = self.dataset.iterator()
        self.eval_prompts = None
        if c.data.eval_files and c.train.eval_every:
            self.eval_prompts = load_prompts(config_lib.split_files(c.data.eval_files), **data_kw)
        self.reward_fn = get_reward_fn(
            c.reward.name,
            **(
                {"timeout_s": c.reward.timeout_s, "num_workers": c.reward.num_workers or None}
                if c.reward.name == "math"
                else {}
            ),
        )

        model = load_hf_checkpoint(
            c.model.path,
            dtype=c.model.dtype,
            param_dtype=c.model.param_dtype,
            mesh=self.mesh,
            remat=c.model.remat,
        )
        self.graphdef, params = nnx.split(model, nnx.Param)
        # The frozen reference (initial policy) needs its own buffers: updates donate the state.
        self.ref_params = jax.tree.map(jnp.copy, params) if a.kl_coef > 0 else None
        self.tx, self.schedule = grpo.make_optimizer(
            c.optim, c.train.steps, config_lib.updates_per_step(c)
        )
        epochs = -(-c.train.steps // max(self.dataset.batches_per_epoch, 1))
        shards = batch_shards(self.mesh)
        self.settings = grpo.LossSettings.from_config(c, num_epochs=epochs, batch_shards=shards)
        num_sequences = c.train.prompts_per_step * c.rollout.n
        self.row_order = grpo.device_order(num_sequences, c.train.micro_batch_sequences, shards)
        abstract = programs.abstract_train_state(params, self.tx, c)
        self.programs = programs.build(
            self.graphdef, self.tx, self.settings, self.mesh, abstract, num_sequences
        )
        init = jax.jit(
            lambda p: grpo.init_state(p, self.tx, c), out_shardings=self.programs.state_shardings
        )
        self.state = init(params)
        self.engine = Engine(
            model,
            **config_lib.engine_shape(c),
            max_stop_tokens=max(8, len(self.stop_ids)),
            mesh=self.mesh,
        )
        self.checkpointer = Checkpointer(
            os.path.join(os.path.abspath(self.workdir), "checkpoints"), c.train.max_checkpoints
        )
        self.start_step = 0
        if (latest := self.checkpointer.latest_step()) is not None:
            self.state, data_state = self.checkpointer.restore(latest, self.state)
            self.state = jax.device_put(self.state, self.programs.state_shardings)
            self.data_iter.set_state(data_state)
            self.start_step = int(self.state.step)
            log.info("resumed from %s at step %d", self.checkpointer.directory, self.start_step)
        self._check_processes_agree()
        if jax.process_index() == 0:
            record_config(config, self.workdir, resuming=self.start_step > 0)
        self.metrics = MetricsWriter(
            self.workdir, resume_step=self.start_step, enabled=jax.process_index() == 0
        )

    # ------------------------------------------------------------------ rollouts

    def _sampling(self, n: int, seed: int) -> SamplingParams:
        r = self.config.rollout
        return SamplingParams(
            n=n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            stop_token_ids=self.stop_ids,
            seed=seed,
        )

    def _generate(self, prompts: list[list[int]], n: int, seed: int):
        backend = "native" if self.config.rollout.backend == "engine" else "jetstream"
        return generate(
            self.engine,
            prompts,
            self._sampling(n, seed),
            backend=backend,
            progress=self.config.train.progress and len(prompts) * n >= 1024,
        )

    def _score(self, completions, answers: list[str], n: int) -> tuple[np.ndarray, int]:
        """Rewards of every completion and the count of checker errors; with several
        processes each scores its share and the shares are gathered."""
        mine = distributed.share(len(completions))
        texts = [
            self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions[mine]
        ]
        result = self.reward_fn.score_batch(texts, [a for a in answers for _ in range(n)][mine])
        rewards = np.asarray(result.rewards, np.float32)
        errors = np.asarray([result.num_errors], np.int64)
        rewards = distributed.gather(rewards, len(completions))
        errors = distributed.gather(errors, jax.process_count()).sum()
        return rewards, int(errors)

    def collect(self, step: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Rollouts, rewards and advantages of one step (with DAPO dynamic sampling)."""
        c = self.config
        n, want = c.rollout.n, c.train.prompts_per_step
        kept: list[tuple] = []  # (prompt, completions, rewards) per group
        spare: list[tuple] = []
        all_rewards, errors, epochs = [], 0, []
        for attempt in range(c.algo.dynamic_sampling_max_batches if c.algo.dynamic_sampling else 1):
            batch = next(self.data_iter)
            epochs.append(batch.epoch)
            seed = derive_seed(c.seed, step, attempt)
            out = self._generate(batch.input_ids, n, seed)
            flat = [comp for group in out for comp in group]
            rewards, num_errors = self._score(flat, batch.answers, n)
            all_rewards.append(rewards)
            errors += num_errors
            for i, prompt in enumerate(batch.input_ids):
                g = (prompt, out[i], rewards[i * n : (i + 1) * n])
                informative = not c.algo.dynamic_sampling or np.ptp(g[2]) > 0
                (kept if informative else spare).append(g)
            if len(kept) >= want:
                break
        groups = (kept + spare)[:want]  # top up with uninformative groups if sampling ran dry
        rewards = np.concatenate([g[2] for g in groups])
        adv = np.asarray(losses.grpo_advantages(jnp.asarray(rewards), n, c.algo.std_normalize))
        comps = [comp for g in groups for comp in g[1]]
        arrays = grpo.rollout_batch(
            [g[0] for g in groups for _ in range(n)],
            [comp.token_ids for comp in comps],
            [comp.logprobs for comp in comps],
            adv,
            prompt_len=c.data.max_prompt_len,
            response_len=c.rollout.max_new_tokens,
            pad_id=self.pad_id,
        )
        lengths = np.array([len(comp.token_ids) for comp in comps])
        sampled = np.concatenate(all_rewards)
        info = {
            "reward_mean": float(sampled.mean()),
            "accuracy": float((sampled >= 1.0).mean()),
            "reward_errors": int(errors),
            "response_length_mean": float(lengths.mean()),
            "response_length_max": int(lengths.max()),
            "truncated_frac": float(np.mean([comp.finish_reason == "length" for comp in comps])),
            "generated_tokens": int(lengths.sum()),
            "epoch": int(max(epochs)),
        }
        if c.algo.dynamic_sampling:
            info["dynamic_sampling_batches"] = len(all_rewards)
            info["dynamic_sampling_kept_frac"] = float(min(len(kept), want) / want)
        return arrays, info

    # ------------------------------------------------------------------ training

    def _put(self, x: np.ndarray) -> jax.Array:
        """A host array of rollout rows (the same on every process) on the mesh, rows in
        the device order."""
        return distributed.global_array(x[self.row_order], self.programs.batch_sharding)

    def _device_batch(self, arrays: dict[str, np.ndarray], zeros: jax.Array) -> grpo.Batch:
        """The rollout arrays on the mesh (row-sharded); log-prob fields start as zeros."""
        return grpo.Batch(
            input_ids=self._put(arrays["input_ids"]),
            attention_mask=self._put(arrays["attention_mask"]),
            response_mask=self._put(arrays["response_mask"]),
            advantages=self._put(arrays["advantages"]),
            old_logp=zeros,
            old_entropy=zeros,
            ref_logp=zeros,
        )

    def train_step(self, step: int) -> dict[str, Any]:
        timer = StepTimer()
        t0 = time.perf_counter()
        with timer("rollout"):
            self.engine.update_params(self.state.params)
            arrays, info = self.collect(step)
        with timer("update"), jax.set_mesh(self.mesh):
            metrics = self._update_step(step, arrays, info)
        metrics = info | metrics
        metrics["time_rollout"] = timer.times["rollout"]
        metrics["time_update"] = timer.times["update"]
        metrics["time_step"] = time.perf_counter() - t0
        metrics["tokens_per_s"] = info["generated_tokens"] / metrics["time_step"]
        return metrics

    def _update_step(self, step: int, arrays: dict[str, np.ndarray], info: dict) -> dict:
        """Old-policy pass, the step's optimizer updates and controllers, and diagnostics."""
        c, fns = self.config, self.programs
        zeros = self._put(np.zeros(arrays["response_mask"].shape, np.float32))
        batch = self._device_batch(arrays, zeros)
        logp, entropy = fns.policy_pass(self.state.params, batch)
        mask = batch.response_mask
        sampler_logp = self._put(arrays["sampler_logp"])
        ref_logp = zeros
        if self.ref_params is not None:
            ref_logp, _ = fns.policy_pass(self.ref_params, batch)
        old_logp = sampler_logp if c.algo.old_logp_source == "sampler" else logp
        batch = batch._replace(old_logp=old_logp, old_entropy=entropy, ref_logp=ref_logp)
        inputs = fns.step_inputs(self.state, old_logp, mask, np.int32(info["epoch"]))
        params_before = None
        if self._check_entropy(step):  # a copy: the updates donate the state's buffers
            params_before = jax.tree.map(jnp.copy, self.state.params)
        n_mini = config_lib.updates_per_step(c)
        per_update = []
        for k in range(n_mini):  # mini-batch k is sliced on device, within each shard
            self.state, m = fns.update(self.state, batch, np.int32(k), inputs)
            per_update.append(m)
        step_entropy = losses.masked_mean(entropy, mask)
        prev_entropy = self.state.entropy
        self.state = fns.finish_step(self.state, step_entropy, inputs)
        tokens = jnp.maximum(jnp.sum(mask), 1.0)
        stats = {
            "entropy": step_entropy,
            "entropy_delta": step_entropy - prev_entropy,  # NaN on the first step
            "sampler_logp_abs_diff": jnp.sum(jnp.abs(logp - sampler_logp) * mask) / tokens,
            **fns.diagnostics(batch),
        }
        if params_before is not None:
            stats |= fns.entropy_check(params_before, self.state.params, batch)
        stats, per_update, inputs = distributed.to_host((stats, per_update, inputs))

        metrics = {k: float(v) for k, v in stats.items()}
        for key in per_update[0]:
            metrics[key] = float(np.mean([m[key] for m in per_update]))
        metrics["lr"] = float(self.schedule(int(self.state.step) * n_mini - 1))
        if not c.algo.kl_coef:
            metrics.pop("kl")
        frac, wmean = metrics.pop("intervention_frac"), metrics.pop("weight_mean")
        wmin = float(np.min([m["weight_min"] for m in per_update]))
        metrics.pop("weight_min")
        return metrics | self._method_metrics(frac, wmean, wmin, inputs)

    def _method_metrics(
        self, frac: float, wmean: float, wmin: float, inputs: grpo.StepInputs
    ) -> dict[str, float]:
        """The generic intervention metrics, named after the active method."""
        a = self.config.algo
        out: dict[str, float] = {}
        if a.intervention in ("clip_cov", "kl_cov"):
            out[f"{a.intervention}_frac"] = frac
        elif a.intervention == "pos_adv":
            if a.pos_adv.schedule == "rand_pos_clip":
                out["rand_pos_clip_frac"] = frac
            else:
                out["lambda"] = float(inputs.lam)
        elif a.intervention == "steer":
            out["steer_weight_mean"], out["steer_weight_min"] = wmean, wmin
        elif a.intervention == "adaptive_entropy":
            out["alpha"] = float(inputs.alpha)
            out["entropy_estimate"] = float(inputs.h_hat)
            out["alpha_next"] = float(self.state.controllers.alpha.alpha)
        if a.intervention == "pos_adv" and a.pos_adv.schedule == "entropy_guided":
            out["lambda_next"] = float(self.state.controllers.lam.lam)
        return out

    def _check_entropy(self, step: int) -> bool:
        every = self.config.diagnostics.entropy_check_every
        return bool(every) and step % every == 0

    def evaluate(self, step: int) -> dict[str, float]:
        c, prompts = self.config, self.eval_prompts
        k = c.train.eval_n
        ids = [list(map(int, p)) for p in prompts.input_ids]
        answers = list(prompts.answers)
        if c.train.eval_max_prompts:
            ids, answers = ids[: c.train.eval_max_prompts], answers[: c.train.eval_max_prompts]
        self.engine.update_params(self.state.params)
        t0 = time.perf_counter()
        out = self._generate(ids, k, seed=derive_seed(c.seed, step, EVAL_STREAM))
        rewards, num_errors = self._score([comp for g in out for comp in g], answers, k)
        avg, pass_k = avg_and_pass_at_k(rewards.reshape(len(ids), k) >= 1.0)
        return {
            f"eval_avg@{k}": avg,
            f"eval_pass@{k}": pass_k,
            "eval_reward_errors": num_errors,
            "time_eval": time.perf_counter() - t0,
        }

    def run(self) -> None:
        c = self.config
        steps = c.train.steps
        if self.start_step >= steps:
            log.info("training already finished at step %d (%s)", self.start_step, self.workdir)
        bar = tqdm(
            total=steps,
            initial=self.start_step,
            desc="train",
            unit="step",
            disable=not c.train.progress or jax.process_index() != 0,
        )
        try:
            if self.start_step == 0 and self.eval_prompts is not None:
                self.metrics.write(0, self.evaluate(0))  # the base policy, for reference
            for step in range(self.start_step + 1, steps + 1):
                metrics = self.train_step(step)
                last = step == steps
                if self.eval_prompts is not None and (step % c.train.eval_every == 0 or last):
                    metrics.update(self.evaluate(step))
                self.metrics.write(step, metrics)
                bar.update(1)
                bar.set_postfix(
                    reward=f"{metrics['reward_mean']:.3f}", entropy=f"{metrics['entropy']:.3f}"
                )
                if (step % c.train.log_every == 0 or last) and jax.process_index() == 0:
                    bar.write(console_line(step, steps, metrics, CONSOLE_KEYS))
                if last or (c.train.checkpoint_every and step % c.train.checkpoint_every == 0):
                    self._check_processes_agree()
                    self.checkpointer.save(step, self.state, self.data_iter.get_state())
        finally:
            bar.close()
            self.checkpointer.wait()
            self.metrics.close()
            self.reward_fn.close()
        self.export()

    def _check_processes_agree(self) -> None:
        """The host-side state every process must hold identically (no-op with one)."""
        st = self.state
        distributed.check_same(
            "the training state (step, controllers, PRNG key, data position)",
            {
                "data": self.data_iter.get_state(),
                "host": distributed.to_host(
                    (st.step, st.controllers, jax.random.key_data(st.rng), st.entropy)
                ),
            },
        )

    def export(self) -> str:
        """The final policy as a Hugging Face checkpoint in `workdir/hf/`."""
        path = os.path.join(self.workdir, "hf")
        model = nnx.merge(self.graphdef, self.state.params)
        save_hf_checkpoint(model, path, tokenizer=self.tokenizer)
        log.info("exported the policy to %s", path)
        return path


def define_flags() -> None:
    """The command line's flags (defined only when run, so that modules import together)."""
    config_flags.DEFINE_config_file(
        "config", "configs/grpo.py", "Experiment config file, e.g. configs/grpo.py:demo"
    )
    flags.DEFINE_string(
        "coordinator_address", None, "HOST:PORT of process 0, to run as several processes"
    )
    flags.DEFINE_integer("num_processes", None, "processes of the run (with a coordinator)")
    flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)")
    flags.DEFINE_bool(
        "distributed", False, "join a multi-process run detected from the environment "
        "(Cloud TPU slices, SLURM)"
    )  # fmt: skip
    flags.DEFINE_integer("distributed_timeout_s", 300, "time to wait for every process")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # quiet Orbax / JAX info logs
    logging.getLogger("jaxrlvr").setLevel(logging.INFO)
    f = flags.FLAGS
    try:
        distributed.initialize(
            f.coordinator_address,
            f.num_processes,
            f.process_id,
            auto=f.distributed or os.environ.get("JAXRLVR_DISTRIBUTED") == "1",
            timeout_s=f.distributed_timeout_s,
        )
        trainer = Trainer(f.config)
    except (config_lib.ConfigError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    trainer.run()


if __name__ == "__main__":
    define_flags()
    app.run(main)
