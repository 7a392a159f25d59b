"""Experiment trackers that mirror `metrics.jsonl`: TensorBoard, Weights & Biases, MLflow,
Trackio (`config.logging.backends`).

Every tracker gets the same rows (metric names and step as in `metrics.jsonl`, finite
numbers only), the resolved config once, from process 0 only. A resumed run continues
the same tracker run: the ids are kept in `workdir/trackers.json`. The tracker packages
are optional extras (`pip install 'jaxrlvr[wandb]'`, `[mlflow]`, `[trackio]`); each is
imported only when its backend is chosen, and a missing one is named before the run
starts (`missing`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from typing import Any, Protocol

from jaxrlvr.runtime.record import flatten, write_atomic

BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow", "trackio")
# backend -> (module to import, pip extra)
PACKAGES = {
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def write(self, step: int, row: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def parse(spec: str) -> tuple[str, ...]:
    """`jsonl,tensorboard,wandb` -> the backends, in order, once each."""
    return tuple(dict.fromkeys(b.strip() for b in spec.split(",") if b.strip()))


def problems(spec: str) -> list[str]:
    """What is wrong with a `logging.backends` value (empty when it can run here)."""
    backends, out = parse(spec), []
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        out.append(f"unknown backend {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if "jsonl" not in backends:
        out.append("must include jsonl (metrics.jsonl is the run's record; resume reads it)")
    for b in backends:
        if b in PACKAGES and importlib.util.find_spec(PACKAGES[b][0]) is None:
            out.append(f"{b} needs its package: pip install 'jaxrlvr[{PACKAGES[b][1]}]'")
    return out


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numeric metrics of a row (without `step`)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step"
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


class _Ids:
    """`workdir/trackers.json`: each tracker's run id, so a resumed run continues it."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, IDS_FILE)
        self.ids = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.ids = json.load(f)

    def get(self, backend: str) -> str | None:
        return self.ids.get(backend)

    def set(self, backend: str, run_id: str) -> None:
        self.ids[backend] = run_id
        write_atomic(self.path, json.dumps(self.ids, indent=1) + "\n")


class TensorBoard:
    def __init__(self, workdir: str, resume_step: int):
        from tensorboardX import SummaryWriter

        # Events of the steps dropped on resume are purged from TensorBoard's view too.
        purge = resume_step + 1 if resume_step > 0 else 0
        self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def write(self, step, row):
        for k, v in numbers(row).items():
            self._writer.add_scalar(k, v, step)
        self._writer.flush()

    def close(self):
        self._writer.close()


class WandB:
    def __init__(self, ids: _Ids, workdir: str, project: str, name: str, config: dict):
        import wandb

        self._run = wandb.init(
            project=project, name=name, id=ids.get("wandb"),
            resume="allow", dir=workdir, config=config,
        )  # fmt: skip
        ids.set("wandb", self._run.id)

    def write(self, step, row):
        self._run.log(numbers(row), step=step)

    def close(self):
        self._run.finish()


class MLflow:
    """A run of experiment `project` in `MLFLOW_TRACKING_URI`, else a file store in
    `workdir/mlruns`; the config is logged as the run's parameters when it starts."""

    def __init__(self, ids: _Ids, workdir: str, project: str, name: str, config: dict):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a file store in the workdir (MLflow 3 asks to opt in to it)
            uri = "file:" + os.path.join(os.path.abspath(workdir), "mlruns")
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(project)
        exp_id = experiment.experiment_id if experiment else client.create_experiment(project)
        self._run_id = ids.get("mlflow")
        if self._run_id is None:
            self._run_id = client.create_run(exp_id, run_name=name).info.run_id
            ids.set("mlflow", self._run_id)
            for key, value in flatten(config).items():
                client.log_param(self._run_id, key, str(value)[:500])

    def write(self, step, row):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numbers(row).items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def close(self):
        self._client.set_terminated(self._run_id)


class Trackio:
    """A Trackio run (local by default: `TRACKIO_DIR`, else the Hugging Face cache)."""

    def __init__(self, ids: _Ids, project: str, name: str, config: dict):
        import trackio

        self._trackio = trackio
        run_name = ids.get("trackio") or name
        trackio.init(
            project=project, name=run_name, config=config, resume="allow",
            auto_log_cpu=False, auto_log_gpu=False,
        )  # fmt: skip
        ids.set("trackio", run_name)

    def write(self, step, row):
        self._trackio.log(numbers(row), step=step)

    def close(self):
        self._trackio.finish()


def open_trackers(
    spec: str, workdir: str, *, project: str, name: str, config: dict, resume_step: int
) -> list[Tracker]:
    """The trackers of `spec` other than jsonl (which `MetricsWriter` writes itself)."""
    ids, out = _Ids(workdir), []
    for backend in parse(spec):
        if backend == "tensorboard":
            out.append(TensorBoard(workdir, resume_step))
        elif backend == "wandb":
            out.append(WandB(ids, workdir, project, name, config))
        elif backend == "mlflow":
            out.append(MLflow(ids, workdir, project, name, config))
        elif backend == "trackio":
            out.append(Trackio(ids, project, name, config))
    return out
