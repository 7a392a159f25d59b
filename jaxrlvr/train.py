"""GRPO training: `python -m jaxrlvr.train --config=configs/grpo.py[:preset] [--config.x=y ...]`.

One step: sample `n` responses for each of `prompts_per_step` prompts with the current
policy, score them with a verifiable reward, compute group advantages
(`jaxrlvr.rl.rollouts`), then one old-policy pass and `prompts_per_step / mini_batch_prompts`
optimizer updates (`jaxrlvr.rl.learner`). Metrics go to `workdir/metrics.jsonl` and
TensorBoard; Orbax checkpoints make a rerun of the same command resume; the final
policy is exported to `workdir/hf/`.

A run is built not to lose work: bad input is refused before anything compiles
(`jaxrlvr.rl.preflight`); non-finite updates are skipped and a run that keeps skipping
stops; SIGTERM / SIGINT save the last completed step before exiting; a damaged
checkpoint is set aside and the one before is used; a failed background save stops the
run at the next step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx
from ml_collections import config_flags
from transformers import AutoTokenizer

from jaxrlvr import config as config_lib
from jaxrlvr import config_help
from jaxrlvr.data import PromptDataset, read_prompts
from jaxrlvr.models import load_hf_checkpoint, save_hf_checkpoint, with_compute_dtype
from jaxrlvr.models.checkpoint import ExportError
from jaxrlvr.rl import grpo, preflight
from jaxrlvr.rl.learner import Learner
from jaxrlvr.rl.rollouts import (
    RolloutCollector,
    derive_seed,
    make_reward,
    pad_token_id,
    stop_token_ids,
)
from jaxrlvr.runtime import distributed
from jaxrlvr.runtime.checkpointing import (
    Checkpointer,
    CheckpointError,
    StateMismatch,
    split_pending_row,
)
from jaxrlvr.runtime.metrics import MetricsWriter, Progress
from jaxrlvr.runtime.record import CONFIG_FILE, config_changes, config_in_force, record_config
from jaxrlvr.runtime.signals import StopSignals
from jaxrlvr.runtime.workdir_lock import WorkdirLock
from jaxrlvr.sampling import Engine
from jaxrlvr.sharding import make_mesh
from jaxrlvr.study.evaluation import EvalSet, Evaluator, flat_eval_metrics, parse_eval_specs

log = logging.getLogger("jaxrlvr.train")

CONSOLE_KEYS = ("reward_mean", "accuracy", "entropy", "response_length_mean", "pg_clipfrac")
EVAL_STREAM = 1_000_003  # seeds of eval sampling, apart from the rollouts' attempts


class NonFiniteError(RuntimeError):
    """The run kept producing non-finite updates; the message says where and why."""


class Preempted(Exception):  # noqa: N818 - an event, not an error
    """A stop signal ended the run after saving; `str` says how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def resolve_model_and_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fill in the demo's model and data (built and cached on first use) where unset."""
    config = ml_collections.ConfigDict(config.to_dict())  # a copy; the caller's stays as given
    if config_lib.is_demo(config.preset) and not config.model.path:
        from jaxrlvr.demo_policy import build_demo_policy, preset_settings

        path = build_demo_policy(preset_settings(config.preset), log=log.info)
        config.model.path = str(path)
        config.data.train_files = config.data.train_files or str(path / "train.jsonl")
        config.data.eval_files = config.data.eval_files or str(path / "eval.jsonl")
    return config


class Trainer:
    """Wires data, sampler, learner and checkpoints together and runs the loop."""

    def __init__(self, config: ml_collections.ConfigDict):
        config_lib.validate(config)
        preflight.check_local_path("config.workdir", config_lib.workdir(config))
        preflight.check_trackers(config)
        self.config = config = resolve_model_and_data(config)
        config_lib.validate(config)
        c = config
        self.workdir = config_lib.workdir(config)
        try:
            self.mesh = make_mesh(tuple(config.mesh.shape))
        except ValueError as e:  # e.g. more devices than the processes have together
            raise config_lib.ConfigError(f"config.mesh.shape={config.mesh.shape}: {e}") from None
        config_lib.validate_mesh(config, self.mesh)
        # Several processes: the same config everywhere, and a workdir all of them see.
        distributed.check_same("the config", json.loads(config.to_json()))
        preflight.check_attention(c)
        preflight.check_workdir(self.workdir)
        distributed.check_shared_directory(self.workdir)
        preflight.check_model_dir(c.model.path)
        preflight.check_disk_space(self.workdir, preflight.checkpoint_bytes(c))
        self.lock = self._lock_workdir()  # before anything reads or writes the run's state
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise

    def _set_up(self) -> None:
        """Data, model, learner, sampler, evaluator; the newest checkpoint restored."""
        c = config = self.config
        self.tokenizer = AutoTokenizer.from_pretrained(c.model.path)
        train_prompts = read_prompts(c, "train_files", self.tokenizer)
        if len(train_prompts) < c.train.prompts_per_step:
            raise config_lib.ConfigError(
                f"config.data.train_files: {len(train_prompts)} usable prompts, fewer than "
                f"config.train.prompts_per_step={c.train.prompts_per_step}"
            )
        # Every process reads the whole (deterministic) step batch: the sampler runs on the
        # global mesh, so all processes feed it the same prompts.
        self.dataset = PromptDataset(
            train_prompts, c.train.prompts_per_step, seed=c.seed, shuffle=c.data.shuffle,
            process_index=0, process_count=1,
        )  # fmt: skip
        self.data_iter = self.dataset.iterator()
        eval_sets = []
        if c.data.eval_files and c.train.eval_every:
            specs = parse_eval_specs(c.data.eval_files, c.data.answer_field, c.data.prompt_template)
            for s in specs:
                prompts = read_prompts(c, "eval_files", self.tokenizer, s)
                try:
                    eval_sets.append(EvalSet.checked(s, prompts, c.data.max_prompt_len))
                except ValueError as e:
                    raise config_lib.ConfigError(
                        f"config.data.eval_files ({s.name}): {e}; raise "
                        "config.data.max_prompt_len or drop the set"
                    ) from None
        reward_fn = make_reward(c)

        model = load_hf_checkpoint(c.model.path, mesh=self.mesh, **config_lib.model_numerics(c))
        self.graphdef, params = nnx.split(model, nnx.Param)
        epochs = -(-c.train.steps // max(self.dataset.batches_per_epoch, 1))
        for warning in config_lib.inert_settings(c, epochs):
            log.warning("%s", warning)
        self.learner = Learner(c, self.graphdef, params, self.mesh, epochs)
        self.engine = Engine(
            with_compute_dtype(model, config_lib.rollout_dtype(c)),
            **config_lib.engine_shape(c),
            max_stop_tokens=max(8, len(stop_ids := stop_token_ids(self.tokenizer))),
            mesh=self.mesh,
        )
        self.rollouts = RolloutCollector(
            c, self.engine, self.tokenizer, reward_fn, stop_ids, pad_token_id(self.tokenizer)
        )
        self.evaluator = None
        if eval_sets:
            n, max_prompts = c.train.eval_n, c.train.eval_max_prompts
            self.evaluator = Evaluator(eval_sets, self.rollouts, n, max_prompts)
        self.checkpointer = Checkpointer(
            os.path.join(os.path.abspath(self.workdir), "checkpoints"), c.train.max_checkpoints
        )
        self.start_step, self.pending_row = 0, None
        self._resume()
        self._check_processes_agree()
        if jax.process_index() == 0:
            record_config(config, self.workdir, start_step=self.start_step)
        self.metrics = MetricsWriter(
            self.workdir,
            resume_step=self.start_step,
            enabled=jax.process_index() == 0,
            backends=c.logging.backends,
            project=c.logging.project,
            run_name=c.logging.run_name,
            config=json.loads(c.to_json()),
        )
        self.skipped_steps = int(self.metrics.last_row.get("skipped_steps", 0))
        self.consecutive_skips = 0
        self.signals = StopSignals()

    def _lock_workdir(self) -> WorkdirLock | None:
        """Process 0 locks the workdir (`jaxrlvr.runtime.workdir_lock`), so a second run there is
        refused; with several processes, all of them stop when it cannot."""
        lock, refusal = None, None
        if jax.process_index() == 0:
            try:
                lock = WorkdirLock.acquire(self.workdir)
            except config_lib.ConfigError as e:
                refusal = e
        locked = distributed.gather(np.asarray([lock is not None]), jax.process_count())
        if refusal is not None:
            raise refusal
        if not locked[0]:
            raise config_lib.ConfigError(
                f"config.workdir={self.workdir!r}: process 0 could not lock the workdir "
                "(its log says why)"
            )
        return lock

    def close(self) -> None:
        """Release the workdir (`run` does when it ends, however it ends)."""
        if self.lock is not None:
            self.lock.release()

    @property
    def state(self) -> grpo.TrainState:
        return self.learner.state

    @property
    def programs(self):
        return self.learner.programs

    def _resume(self) -> None:
        """Restore the newest sound checkpoint, if any (damaged ones are set aside). A
        checkpoint of another state structure (a changed setting) is refused with a
        `ConfigError` naming the changed config keys; nothing is moved or overwritten."""

        def problem(step: int, state: grpo.TrainState) -> str | None:
            if int(state.step) != step:
                return f"it holds step {int(state.step)}"
            if not self.learner.params_finite(state.params):
                return "its parameters are not finite"
            return None

        try:
            found = self.checkpointer.restore_latest(self.learner.state, problem)
        except StateMismatch as e:
            raise config_lib.ConfigError(
                f"cannot resume from {e.path}: it holds a training state of another structure "
                f"than this config builds ({e.differences}); {self._changes_since_recorded()}. "
                "Nothing was moved: rerun with that run's settings to resume, or start fresh "
                f"with a new config.workdir or after moving {self.checkpointer.directory} away"
            ) from None
        if found is None:
            return
        step, state, data_state = found
        self.learner.set_state(state)
        data_state, self.pending_row = split_pending_row(data_state)
        self.data_iter.set_state(data_state)
        self.start_step = step
        log.info("resumed from %s at step %d", self.checkpointer.directory, step)

    def _changes_since_recorded(self) -> str:
        """The config keys that differ from those the workdir's latest run recorded."""
        try:
            before = config_in_force(self.workdir)
        except (OSError, ValueError) as e:
            return f"the config the run recorded cannot be read ({e})"
        if before is None:
            return f"the run recorded no config ({os.path.join(self.workdir, CONFIG_FILE)})"
        changed = config_changes(before, json.loads(self.config.to_json()))
        changed.pop("workdir", None)  # where the run lives does not shape its state
        if not changed:
            return "no config key differs from that run's: the code or library versions do"
        return "config keys changed since the run that wrote it: " + ", ".join(
            f"{k} ({old!r} -> {new!r})" for k, (old, new) in changed.items()
        )

    # ------------------------------------------------------------------ one step

    def collect(self, step: int) -> tuple[dict, dict[str, Any]]:
        """The step's rollouts (weights synced to the engine, sampled, scored): arrays and
        their metrics. Nothing of it is kept if a stop signal cuts it short."""
        t0 = time.perf_counter()
        self.engine.update_params(self.state.params)
        arrays, info = self.rollouts.collect(step, self.data_iter)
        return arrays, info | {"time_rollout": time.perf_counter() - t0}

    def learn(self, step: int, rollout: tuple[dict, dict[str, Any]]) -> dict[str, Any]:
        """The step's updates on its rollouts; counts skipped updates and stops a run
        that keeps skipping (`NonFiniteError`)."""
        c = self.config
        arrays, info = rollout
        t0 = time.perf_counter()
        every = c.diagnostics.entropy_check_every
        metrics = info | self.learner.step(arrays, info["epoch"], bool(every) and step % every == 0)
        metrics["time_update"] = time.perf_counter() - t0
        metrics["time_step"] = metrics["time_rollout"] + metrics["time_update"]
        metrics["tokens_per_s"] = info["generated_tokens"] / metrics["time_step"]
        if metrics["skipped_updates"]:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            log.warning(
                "step %d: %d of %d updates skipped (non-finite %s)", step,
                metrics["skipped_updates"], config_lib.updates_per_step(c), metrics["skip_reason"],
            )  # fmt: skip
        else:
            self.consecutive_skips = 0
        metrics["skipped_steps"] = self.skipped_steps
        if self.consecutive_skips >= c.train.max_skipped_steps:
            self.metrics.write(step, metrics)
            last = self.checkpointer.latest_step()
            raise NonFiniteError(
                f"{self.consecutive_skips} consecutive steps ({step - self.consecutive_skips + 1}"
                f"..{step}) had non-finite updates ({metrics['skip_reason']}); stopping "
                f"(config.train.max_skipped_steps={c.train.max_skipped_steps}). Nothing of "
                f"these steps is saved; the last checkpoint is "
                f"{'step ' + str(last) if last is not None else 'none'}. Lower config.optim.lr "
                "or check the data, then rerun to resume."
            )
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        """The eval metrics (`jaxrlvr.study.evaluation`) of the current policy on every eval set."""
        self.engine.update_params(self.state.params)
        t0 = time.perf_counter()
        seed = derive_seed(self.config.seed, step, EVAL_STREAM)
        samples, (errors, timeouts) = self.evaluator.sample(seed)
        return flat_eval_metrics(self.evaluator.metrics(samples)) | {
            "eval_reward_errors": errors,
            "eval_reward_timeouts": timeouts,
            "time_eval": time.perf_counter() - t0,
        }

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Train to `train.steps`, then export. Raises `Preempted` after a stop signal
        (with the last completed step saved), `NonFiniteError` when updates keep failing,
        `CheckpointError` when a save fails."""
        c, steps = self.config, self.config.train.steps
        if self.start_step >= steps:
            log.info("training already finished at step %d (%s)", self.start_step, self.workdir)
        progress = Progress(
            steps,
            self.start_step,
            log_every=c.train.log_every,
            bar=c.train.progress,
            keys=CONSOLE_KEYS,
        )
        step, data_state = self.start_step, self.data_iter.get_state()
        try:
            with self.signals:
                if self.pending_row is not None:  # a step whose evaluation a signal cut short
                    self._write_row(step, self.pending_row, data_state)
                elif step == 0 and self.evaluator is not None:
                    self._write_row(0, {}, data_state)  # the base policy
                for step in range(self.start_step + 1, steps + 1):
                    self.checkpointer.check_for_errors()  # a failed save stops the run here
                    rollout = self.signals.attempt(self.collect, step)
                    if rollout is None:  # cut short by a stop signal: redone on resume
                        step -= 1
                        break
                    metrics = self.learn(step, rollout)
                    data_state = self.data_iter.get_state()
                    self._write_row(step, metrics, data_state)
                    progress.step_done(step, metrics)
                    every = c.train.checkpoint_every
                    if step == steps or (every and step % every == 0):
                        self._save(step, data_state)
                    if self.signals.should_stop():
                        break
                if self.signals.should_stop():
                    self._save(step, data_state)
                    raise self._preempted(step)
                self.checkpointer.wait()
            self.export()
        finally:
            progress.close()
            with contextlib.suppress(CheckpointError):  # raised above if it matters
                self.checkpointer.wait()  # a save in flight becomes durable
            self.metrics.close()
            self.rollouts.reward_fn.close()
            self.close()

    def _write_row(self, step: int, metrics: dict[str, Any], data_state: dict) -> None:
        """Evaluate where due, then write the step's row. A stop signal during the
        evaluation saves the step with its row pending; the resumed run evaluates it (with
        the same seeds) and writes the row then, so no metric is lost."""
        c = self.config
        due = step == 0 or step == c.train.steps or step % max(c.train.eval_every, 1) == 0
        if self.evaluator is not None and due and c.train.eval_every:
            evaluation = self.signals.attempt(self.evaluate, step)
            if evaluation is None:
                log.warning("step %d: evaluation cut short; it runs again on resume", step)
                self._save(step, data_state, pending_row=metrics)
                raise self._preempted(step)
            metrics = metrics | evaluation
        self.metrics.write(step, metrics)

    def _save(self, step: int, data_state: dict[str, Any], pending_row: dict | None = None):
        """Checkpoint `step` (once), refusing a non-finite state."""
        if step == 0 or step in self.checkpointer.all_steps():
            return
        self._check_processes_agree()
        if not self.learner.params_finite():
            raise NonFiniteError(f"step {step}: the parameters are not finite; not saving them")
        self.checkpointer.save(step, self.state, data_state, pending_row)

    def _preempted(self, step: int) -> Preempted:
        signum = self.signals.received
        self.checkpointer.wait()
        saved = self.checkpointer.latest_step()
        where = f"the checkpoint of step {saved} is saved" if saved else "no step was completed"
        return Preempted(
            signum,
            f"stopped by {signal.Signals(signum).name} after step {step} of "
            f"{self.config.train.steps}: {where} in {self.checkpointer.directory}. Rerun the "
            "same command to resume.",
        )

    def _check_processes_agree(self) -> None:
        """The host-side state every process must hold identically (no-op with one)."""
        distributed.check_same(
            "the training state (step, controllers, PRNG key, data position)",
            {"data": self.data_iter.get_state(), "host": self.learner.host_state()},
        )

    def export(self) -> str:
        """The final policy as a Hugging Face checkpoint in `workdir/hf/`."""
        if not self.learner.params_finite():
            raise NonFiniteError("the final parameters are not finite; not exporting them")
        path = os.path.join(self.workdir, "hf")
        model = nnx.merge(self.graphdef, self.state.params)
        save_hf_checkpoint(model, path, tokenizer=self.tokenizer)
        log.info("exported the policy to %s", path)
        return path


def define_flags() -> None:
    """The command line's flags (defined only when run, so that modules import together)."""
    config_flags.DEFINE_config_file(
        "config", "configs/grpo.py", "Experiment config file, e.g. configs/grpo.py:demo; "
        "override any field with --config.KEY=VALUE (see --show_config for the tree)"
    )  # fmt: skip
    flags.DEFINE_bool("show_config", False, "print the resolved config tree, each field with "
                      "its default and help, and exit")  # fmt: skip
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one-line errors: an unknown `--config.KEY` names the
    closest valid keys, a bad value names the flag."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - ml_collections raises several types
        message = config_help.override_error(argv, e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.show_config:
        print(config_help.describe(f.config))
        return
    absl_logging.set_verbosity(absl_logging.WARNING)  # quiet Orbax / JAX info logs
    logging.getLogger("jaxrlvr").setLevel(logging.INFO)
    try:
        distributed.initialize(
            f.coordinator_address,
            f.num_processes,
            f.process_id,
            auto=f.distributed or os.environ.get("JAXRLVR_DISTRIBUTED") == "1",
            timeout_s=f.distributed_timeout_s,
        )
        Trainer(f.config).run()
    except (config_lib.ConfigError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteError, CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
