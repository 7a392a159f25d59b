"""Per-step metrics: `metrics.jsonl` (one JSON object per step), TensorBoard, console."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax
from tqdm.auto import tqdm

from jaxrlvr.runtime import trackers
from jaxrlvr.runtime.record import write_atomic

log = logging.getLogger(__name__)

# `pg_clipfrac_pos_lowp` counts the upper-clipped tokens whose behaviour probability was
# below this: DAPO finds the tokens its Clip-Higher frees are almost all under about 0.2.
LOW_PROB = 0.2


class MetricsWriter:
    """Appends one JSON object per step to `workdir/metrics.jsonl`, mirrored to the
    trackers of `backends` (`jaxrlvr.runtime.trackers`: TensorBoard by default).

    On resume from step k, rows of later steps (written after the checkpoint) are dropped;
    a start from step 0 drops every row. So no step appears twice, and the file always
    describes one consistent run. `last_row` is the last row kept.
    """

    def __init__(
        self,
        workdir: str,
        *,
        resume_step: int = 0,
        enabled: bool = True,
        backends: str = "jsonl,tensorboard",
        project: str = "jaxrlvr",
        run_name: str = "",
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.last_row: dict[str, Any] = {}
        self._trackers: list = []
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            rows = []
            if resume_step > 0:
                with open(self.path) as f:
                    rows = [
                        line
                        for line in f
                        if line.strip() and json.loads(line)["step"] <= resume_step
                    ]
            self.last_row = json.loads(rows[-1]) if rows else {}
            write_atomic(self.path, "".join(rows))
        self._trackers = trackers.open_trackers(
            backends,
            workdir,
            project=project,
            name=run_name or os.path.basename(os.path.abspath(workdir)),
            config=config or {},
            resume_step=resume_step,
        )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)} | {k: _plain(v) for k, v in metrics.items() if k != "step"}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for tracker in self._trackers:
            tracker.write(int(step), row)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    return v


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of `workdir/metrics.jsonl`."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A run's progress on the console: a tqdm bar (on a terminal only, process 0) and,
    every `log_every` steps and at the last, a line with the rate, the ETA and `keys`
    (written through the bar, so a log file holds whole lines and no bar frames)."""

    def __init__(self, total: int, start: int, *, log_every: int, bar: bool, keys: tuple):
        self.total, self.log_every, self.keys = total, log_every, keys
        self.main = jax.process_index() == 0
        self.bar = tqdm(
            total=total,
            initial=start,
            desc="train",
            unit="step",
            disable=not bar or not self.main or not sys.stderr.isatty(),
        )
        self.pace = StepPace()

    def step_done(self, step: int, metrics: dict[str, Any]) -> None:
        seconds_per_step = self.pace.step_done(step)
        self.bar.update(1)
        self.bar.set_postfix(
            reward=f"{metrics['reward_mean']:.3f}", entropy=f"{metrics['entropy']:.3f}"
        )
        if self.main and (step % self.log_every == 0 or step == self.total):
            self.bar.write(console_line(step, self.total, metrics, self.keys, seconds_per_step))

    def close(self) -> None:
        self.bar.close()


class StepPace:
    """Seconds per step of this process's run, for the console line's rate and ETA. The
    first step (which compiles) is timed on its own and sets the pace only until a second
    step is done."""

    def __init__(self):
        self._start = time.perf_counter()
        self._first: tuple[int, float] | None = None  # (step, time) at the first step's end

    def step_done(self, step: int) -> float:
        """Record the end of `step`; the seconds per step so far."""
        now = time.perf_counter()
        if self._first is None or step <= self._first[0]:
            self._first = (step, now)
            return now - self._start
        first_step, first_end = self._first
        return (now - first_end) / (step - first_step)


def console_line(
    step: int,
    total: int,
    m: dict[str, Any],
    keys: tuple[str, ...],
    seconds_per_step: float | None = None,
) -> str:
    """`step k/N | r s/step | ETA t | key value | ...`: the periodic console (and log
    file) line; with the rate and ETA, a log without a progress bar still shows progress."""
    parts = [f"step {step}/{total}"]
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.3g} s/step")
        parts.append(f"ETA {_duration(max(total - step, 0) * seconds_per_step)}")
    for k in keys:
        if k in m and m[k] is not None:
            v = m[k]
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    """`45s`, `3m07s`, `2h05m`."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
