"""Sweeps: `python -m jaxrlvr.sweep --sweep=sweeps/methods.py --root=runs/methods [--parallel=2]`.

A sweep is a list of points; a point is a dict of config overrides (`{"algo.eps_high":
0.28, "seed": 1}`), where the key `config` picks the experiment file for that point
(`"configs/steer.py"` or `"configs/pos_adv.py:stage"`; default: `--config`). Points come
from a sweep file's `get_sweep(arg)` (built with `axis`, `product`, `zipped`, `seeds`),
or from repeated `--grid=KEY=V1,V2` flags (their product), or both (the product of the
two). `--set=KEY=VALUE` applies to every point.

Each point is one `python -m jaxrlvr.train` run in `ROOT/<point name>` (named from its
overrides), its output in `ROOT/<name>/train.log`. Every point is resolved and validated
before any runs, so a misspelt key stops the sweep at once, naming the point and the
closest valid keys. A point whose run finished (its last metrics row is the final step
and `hf/` is exported) is skipped; an interrupted one resumes from its checkpoint.
`--parallel=N` runs N points at a time on this machine, each in a process group of its
own: the first Ctrl-C / SIGTERM reaches only the sweep, which passes one SIGTERM to each
running point (each saves its last completed step, then exits) and starts no more; a
second passes a second one (the points stop at once, without saving the step in
progress); a third leaves at once without waiting for them. A rerun of the same command
resumes. `--launcher=tpu` hands every point to `python -m jaxrlvr.launch tpu` instead
(with `--launch_args`). `--root` is a local (or mounted) directory, not a URL. The sweep logs
progress (done, running, failed, ETA) and writes `ROOT/summary.csv` (a row per point)
and `ROOT/summary.md` (mean +- std over seeds); with `--baseline=NAME` (a point's name
without its seed, or a unique prefix of one) the summary also lists every other point's
final entropy and reward minus the baseline's, seed by seed, and whether the entropy
differences all have one sign: the paired comparison of methods that share data and
sampling seeds.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import itertools
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags

from jaxrlvr import config as config_lib
from jaxrlvr.config_help import closest_keys
from jaxrlvr.runtime.record import flatten, write_atomic
from jaxrlvr.study import markdown

log = logging.getLogger("jaxrlvr.sweep")

Point = dict[str, Any]
CONFIG_KEY = "config"  # a point's experiment file, FILE[:ARG]
# The sampler/learner mismatch too: a precision study (sweeps/precision.py) reads it here.
SUMMARY_METRICS = (
    "entropy", "reward_mean", "response_length_mean", "mismatch_kl",
    "mismatch_logp_abs_diff_mean",
)  # fmt: skip


# ---------------------------------------------------------------------------- building


def axis(key: str, values: Iterable[Any]) -> list[Point]:
    """One config key over several values: `[{key: v} for v in values]`."""
    return [{key: v} for v in values]


def seeds(n: int) -> list[Point]:
    """`seed` = 0 .. n-1."""
    return axis("seed", range(n))


def _merge(points: Iterable[Point]) -> Point:
    return dict(itertools.chain.from_iterable(p.items() for p in points))


def product(*axes: Sequence[Point]) -> list[Point]:
    """Every combination of one point from each axis, merged (later axes win)."""
    return [_merge(combo) for combo in itertools.product(*axes)]


def zipped(*axes: Sequence[Point]) -> list[Point]:
    """The i-th points of every axis merged (the axes must have one length)."""
    if len({len(a) for a in axes}) > 1:
        raise ValueError(f"zipped axes differ in length: {[len(a) for a in axes]}")
    return [_merge(combo) for combo in zip(*axes, strict=True)]


def sweep_arg(arg: str | None) -> tuple[str, dict[str, str]]:
    """A sweep file's argument `preset[,key=value...]` -> (preset, options)."""
    preset, options = "demo", {}
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        if "=" in token:
            k, _, v = token.partition("=")
            options[k] = v
        elif token in config_lib.PRESET_NAMES:
            preset = token
        else:
            options[token] = "true"
    return preset, options


def load_sweep(spec: str) -> list[Point]:
    """The points of a sweep file `FILE[:ARG]` (its `get_sweep(ARG)`)."""
    path, _, arg = spec.partition(":")
    points = config_lib.load_python_file(path, "--sweep: sweep file").get_sweep(arg or None)
    if not points or not all(isinstance(p, dict) for p in points):
        raise config_lib.ConfigError(f"--sweep={spec}: get_sweep must return a list of dicts")
    return [dict(p) for p in points]


def grid_points(grids: Sequence[str]) -> list[Point]:
    """`["algo.eps_high=0.2,0.28", "seed=0,1"]` -> their product (values still strings)."""
    axes = []
    for g in grids:
        key, sep, values = g.partition("=")
        if not sep or not key or not values:
            raise config_lib.ConfigError(f"--grid={g!r}: expected KEY=V1,V2,...")
        axes.append(axis(key.strip(), [v.strip() for v in values.split(",")]))
    return product(*axes) if axes else [{}]


# ---------------------------------------------------------------------------- resolving


def parse_value(text: str, like: Any) -> Any:
    """A command-line string as the type of the field's current value `like`."""
    if not isinstance(text, str) or isinstance(like, str) or like is None:
        return text
    if isinstance(like, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{text!r} is not a bool")
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    return ast.literal_eval(text)


def flag_value(value: Any) -> str:
    """A value as `--config.KEY=` writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def point_name(point: Point) -> str:
    """A workdir name from a point's overrides: `steer,eps_high=0.28,seed=1`."""
    parts = []
    for key, value in point.items():
        if key == CONFIG_KEY:
            file, _, arg = str(value).partition(":")
            parts.append(os.path.splitext(os.path.basename(file))[0] + (f"-{arg}" if arg else ""))
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}={flag_value(value)}")
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts)) or "base"
    return name


@dataclasses.dataclass
class Run:
    """One resolved point: its overrides, config, workdir and command line."""

    index: int
    point: Point
    name: str
    config: ml_collections.ConfigDict
    workdir: str
    command: list[str]
    status: str = "pending"  # pending | done | running | failed
    started: float = 0.0
    seconds: float = 0.0


def resolve(points: Sequence[Point], default_config: str, common: Point, root: str) -> list[Run]:
    """Every point's config, validated; raises `ConfigError` naming the first bad point."""
    runs, names = [], set()
    for i, point in enumerate(points):
        name = point_name(point)
        if name in names:
            raise config_lib.ConfigError(f"point {i} ({name}): the same overrides appear twice")
        names.add(name)
        spec = str(point.get(CONFIG_KEY, default_config))
        try:
            config = config_lib.load_config_file(spec)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"point {i} ({name}): {e}") from None
        keys = flatten(json.loads(config.to_json()))
        overrides = {}
        for key, raw in (common | {k: v for k, v in point.items() if k != CONFIG_KEY}).items():
            if key not in keys:
                raise config_lib.ConfigError(
                    f"point {i} ({name}): no config key {key!r}{closest_keys(key, keys)}"
                )
            try:
                value = parse_value(raw, keys[key])
                config.update_from_flattened_dict(
                    {key: tuple(value) if isinstance(value, list) else value}
                )
            except (ValueError, TypeError, SyntaxError) as e:
                raise config_lib.ConfigError(
                    f"point {i} ({name}): config.{key}={raw!r}: {e}"
                ) from None
            overrides[key] = value
        workdir = os.path.join(root, name)
        config.workdir = workdir
        try:
            config_lib.validate(config)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"point {i} ({name}): {e}") from None
        command = [
            sys.executable, "-m", "jaxrlvr.train", f"--config={spec}",
            f"--config.workdir={workdir}", "--config.train.progress=false",
            *(f"--config.{k}={flag_value(v)}" for k, v in overrides.items()),
        ]  # fmt: skip
        runs.append(Run(i, point, name, config, workdir, command))
    return runs


# ---------------------------------------------------------------------------- running


def finished(run: Run) -> bool:
    """The run reached its last step and exported its policy."""
    rows = read_rows(run.workdir)
    done = rows and rows[-1]["step"] == run.config.train.steps
    return bool(done) and os.path.exists(os.path.join(run.workdir, "hf", "config.json"))


def read_rows(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Stopped(Exception):  # noqa: N818 - an outcome, like KeyboardInterrupt
    """A stop signal ended the sweep after its running points stopped."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class Scheduler:
    """Runs the pending points `parallel` at a time, with a progress line.

    Each point runs in a process group of its own, so a terminal's Ctrl-C reaches only the
    sweep, which passes stop signals on itself: the first signal the sweep gets sends one
    SIGTERM to each running point (the trainer saves its last completed step and exits)
    and starts no more points; a second sends each a second SIGTERM (the trainer stops at
    once, without saving the step in progress); a third leaves without waiting for them."""

    STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
    CLEAN_STOP = (128 + signal.SIGTERM, -signal.SIGTERM)  # saved and exited; not yet started

    def __init__(self, runs: list[Run], parallel: int, progress_every_s: float = 30.0):
        self.runs, self.parallel, self.every = runs, parallel, progress_every_s
        self.procs: dict[int, subprocess.Popen] = {}
        self.signals: list[int] = []  # the stop signals the sweep received
        self.sent: dict[int, int] = {}  # run index -> stop signals passed to its process

    @property
    def stop_signal(self) -> int | None:
        return self.signals[0] if self.signals else None

    def run(self) -> None:
        previous = {s: signal.signal(s, self._on_signal) for s in self.STOP_SIGNALS}
        try:
            self._loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        """Count the signal; the loop passes it on (so a point being started gets it too)."""
        self.signals.append(signum)
        name = signal.Signals(signum).name
        if len(self.signals) == 1:
            log.warning(
                "%s: stopping; each running point saves its last completed step (a second "
                "Ctrl-C stops them at once, without saving the step in progress)", name
            )  # fmt: skip
        elif len(self.signals) == 2:
            log.warning("%s again: the running points stop at once (a third: leave now)", name)
        else:
            raise KeyboardInterrupt(f"{name} a third time: left the running points stopping")

    def _pass_on(self) -> None:
        """Send each running point the stop signals it has not had yet (at most two)."""
        due = min(len(self.signals), 2)
        for index, proc in self.procs.items():
            while self.sent.get(index, 0) < due and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                self.sent[index] = self.sent.get(index, 0) + 1

    def _loop(self) -> None:
        t0, last_log = time.monotonic(), 0.0
        pending = [r for r in self.runs if r.status == "pending"]
        while pending or self.procs:
            while pending and len(self.procs) < self.parallel and not self.signals:
                self._start(pending.pop(0))
            self._pass_on()
            for index, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    self._finish(self.runs[index], proc)
                    del self.procs[index]
            if self.signals and not self.procs:
                break
            now = time.monotonic()
            if now - last_log >= self.every or not (pending or self.procs):
                log.info("%s", self.progress(now - t0))
                last_log = now
            time.sleep(0.2)

    def _start(self, run: Run) -> None:
        os.makedirs(run.workdir, exist_ok=True)
        logfile = open(os.path.join(run.workdir, "train.log"), "a")  # noqa: SIM115
        log.info("start %s: %s", run.name, shlex.join(run.command[2:]))
        run.status, run.started = "running", time.monotonic()
        self.procs[run.index] = subprocess.Popen(
            run.command, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
            process_group=0,  # its own group: a terminal's Ctrl-C reaches only the sweep
        )  # fmt: skip
        logfile.close()

    def _finish(self, run: Run, proc: subprocess.Popen) -> None:
        run.seconds = time.monotonic() - run.started
        if proc.returncode == 0:
            run.status = "done"
            log.info("done %s in %.0f s", run.name, run.seconds)
            return
        sent = self.sent.get(run.index, 0)
        stopped = sent >= 2 or (sent == 1 and proc.returncode in self.CLEAN_STOP)
        run.status = "stopped" if stopped else "failed"
        tail = _tail(os.path.join(run.workdir, "train.log"))
        log.warning("%s %s (exit %d): %s", run.status, run.name, proc.returncode, tail)

    def progress(self, elapsed: float) -> str:
        count = {s: sum(r.status == s for r in self.runs) for s in ("done", "running", "failed")}
        timed = [r.seconds for r in self.runs if r.status == "done" and r.seconds]
        eta = ""
        if timed:  # pending points take the mean; running ones what they have left of it
            mean, now = float(np.mean(timed)), time.monotonic()
            left = sum(
                mean if r.status == "pending" else max(mean - (now - r.started), 0.0)
                for r in self.runs
                if r.status in ("pending", "running")
            )
            eta = f", ETA {_duration(left / self.parallel)}" if left else ""
        return (
            f"sweep: {count['done']}/{len(self.runs)} done, {count['running']} running, "
            f"{count['failed']} failed, {_duration(elapsed)} elapsed{eta}"
        )


def _tail(path: str, lines: int = 1) -> str:
    try:
        with open(path) as f:
            text = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-300:]


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def launch_on_tpu(runs: Sequence[Run], launch_args: str) -> int:
    """One Cloud TPU job per pending point, through `python -m jaxrlvr.launch tpu`."""
    command = [sys.executable, "-m", "jaxrlvr.launch", "tpu", *shlex.split(launch_args)]
    for run in runs:
        command.append("--point=" + shlex.join(run.command[3:]))
    log.info("%s", shlex.join(command))
    return subprocess.run(command).returncode


# ---------------------------------------------------------------------------- summary


def run_summary(run: Run, window: int) -> dict[str, Any]:
    """Final (mean over the last `window` steps) and best values of a run's metrics."""
    rows = read_rows(run.workdir)
    steps = [r for r in rows if r["step"] > 0 and "entropy" in r]
    out: dict[str, Any] = {"point": run.name, "status": run.status, "steps": len(steps)}
    out |= {k: flag_value(v) for k, v in run.point.items()}
    for key in SUMMARY_METRICS:
        values = [r[key] for r in steps[-window:] if r.get(key) is not None]
        out[f"{key}_final"] = float(np.mean(values)) if values else float("nan")
    evals = [r for r in rows if any(k.startswith("eval_avg@") for k in r)]
    if evals:
        key = next(k for k in evals[-1] if k.startswith("eval_avg@"))
        scores = [r[key] for r in evals if r.get(key) is not None]
        out[f"{key}_base"] = evals[0][key] if evals[0]["step"] == 0 else float("nan")
        out[f"{key}_final"] = evals[-1][key]
        out[f"{key}_best"] = max(scores) if scores else float("nan")
    out["seconds"] = float(sum(r.get("time_step", 0) + r.get("time_eval", 0) for r in rows))
    return out


def summarize(
    runs: Sequence[Run], root: str, window: int, baseline: str | None = None
) -> tuple[str, str]:
    """Write `root/summary.csv` (a row per point) and `root/summary.md` (mean +- std over
    the `seed` values of otherwise equal points, and with `baseline` the paired
    differences against it); returns both texts."""
    rows = [run_summary(r, window) for r in runs]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    groups: dict[str, list[dict]] = {}
    for run, row in zip(runs, rows, strict=True):
        groups.setdefault(group_key(run), []).append(row)
    metrics = [c for c in columns if c.endswith(("_final", "_best", "_base")) or c == "seconds"]
    table = [
        [
            key,
            str(len(members)),
            *(_mean_std([m.get(c, float("nan")) for m in members]) for c in metrics),
        ]
        for key, members in groups.items()
    ]
    lines = markdown.table(["point", "runs", *metrics], table)
    if baseline is not None:
        lines += ["", *paired_differences(groups, baseline)]
    summary_md = "\n".join(lines) + "\n"
    for name, text in (("summary.csv", buffer.getvalue()), ("summary.md", summary_md)):
        write_atomic(os.path.join(root, name), text)
    return buffer.getvalue(), summary_md


PAIRED_METRICS = ("entropy_final", "reward_mean_final")


def group_key(run: Run) -> str:
    """The name of a run's point without its seed: the runs a summary row averages."""
    return point_name({k: v for k, v in run.point.items() if k != "seed"})


def baseline_group(keys: Sequence[str], baseline: str) -> str:
    """The one group `--baseline` names: an exact group name, else a unique prefix."""
    matches = [k for k in keys if k == baseline] or [k for k in keys if k.startswith(baseline)]
    if len(matches) != 1:
        raise config_lib.ConfigError(
            f"--baseline={baseline!r} matches {len(matches)} of the points "
            f"({', '.join(keys)}); give one point's name without its seed"
        )
    return matches[0]


def paired_differences(groups: dict[str, list[dict]], baseline: str) -> list[str]:
    """Markdown: each group's final values minus the baseline group's, seed by seed (equal
    seeds share the data order and sampling seeds, so the difference is the method's), and
    whether the entropy differences all have one sign. Only runs that reached the same
    step as their baseline run are paired."""
    base_key = baseline_group(list(groups), baseline)
    base = {row.get("seed", 0): row for row in groups[base_key]}
    rows = []
    for key, members in groups.items():
        if key == base_key:
            continue
        pairs = [(m, base.get(m.get("seed", 0))) for m in members]
        pairs = [(m, b) for m, b in pairs if b is not None and _comparable(m, b)]
        if not pairs:
            continue
        cells = [", ".join(f"{m[c] - b[c]:+.4f}" for m, b in pairs) for c in PAIRED_METRICS]
        dh = [m["entropy_final"] - b["entropy_final"] for m, b in pairs]
        sign = "all above" if min(dh) > 0 else "all below" if max(dh) < 0 else "mixed"
        rows.append([key, *cells, sign])
    header = ["point", *(f"{m} - baseline" for m in PAIRED_METRICS), "entropy"]
    return [
        f"Paired differences against {base_key}, one value per seed "
        f"({', '.join(str(seed) for seed in base)}):",
        "",
        *markdown.table(header, rows),
    ]


def _comparable(run: dict, base: dict) -> bool:
    """Both runs reached the same step and have final values (a run still going is not
    compared with a finished one)."""
    values = [r.get(c, np.nan) for r in (run, base) for c in PAIRED_METRICS]
    return run["steps"] == base["steps"] and bool(np.all(np.isfinite(values)))


def _mean_std(values: Sequence[float]) -> str:
    values = [float(v) for v in values if v is not None and not np.isnan(float(v))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.2g}"


# ---------------------------------------------------------------------------- command line


def build_runs(
    config: str, root: str, sweep_file: str | None, grids: Sequence[str], sets: Sequence[str]
) -> list[Run]:
    """The resolved runs of a sweep file and/or grids, with `--set` values for every point."""
    from jaxrlvr.rl.preflight import check_local_path  # here: the sweep process stays jax-free

    check_local_path("--root", root)
    points = product(load_sweep(sweep_file) if sweep_file else [{}], grid_points(grids))
    common = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise config_lib.ConfigError(f"--set={item!r}: expected KEY=VALUE")
        common[key.strip()] = value.strip()
    return resolve(points, config, common, root)


def sweep(
    config: str,
    root: str,
    *,
    sweep_file: str | None = None,
    grids: Sequence[str] = (),
    sets: Sequence[str] = (),
    parallel: int = 1,
    dry_run: bool = False,
    launcher: str = "local",
    launch_args: str = "",
    window: int = 10,
    baseline: str | None = None,
) -> list[Run]:
    """Resolve, run and summarise a sweep (see module docstring); returns its runs."""
    runs = build_runs(config, root, sweep_file, grids, sets)
    if baseline is not None:
        baseline_group(list(dict.fromkeys(group_key(r) for r in runs)), baseline)
    for run in runs:
        if finished(run):
            run.status = "done"
    todo = [r for r in runs if r.status == "pending"]
    log.info("sweep of %d points in %s: %d to run", len(runs), root, len(todo))
    if dry_run:
        for run in runs:
            print(f"{run.status:8} {run.name}: {shlex.join(run.command[2:])}")
        return runs
    os.makedirs(root, exist_ok=True)
    if launcher == "tpu":
        if launch_on_tpu(todo, launch_args):
            raise RuntimeError("the TPU launcher failed")
        return runs
    scheduler = Scheduler(runs, parallel)
    scheduler.run()
    _, summary_md = summarize(runs, root, window, baseline)
    print(summary_md, end="")
    if scheduler.stop_signal is not None:
        raise Stopped(scheduler.stop_signal)
    return runs


def define_flags() -> None:
    flags.DEFINE_string("config", "configs/grpo.py", "experiment file of points without `config`")
    flags.DEFINE_string("sweep", None, "sweep file FILE[:ARG] with get_sweep(arg)")
    flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,... (repeatable: their product)")
    flags.DEFINE_multi_string("set", [], "KEY=VALUE for every point (repeatable)")
    flags.DEFINE_string(
        "root", None, "directory of the points' workdirs and the summary (a path; for a "
        "bucket, its gcsfuse mount)"
    )  # fmt: skip
    flags.DEFINE_integer("parallel", 1, "points run side by side on this machine")
    flags.DEFINE_bool("dry_run", False, "print every point's command and status; run nothing")
    flags.DEFINE_enum("launcher", "local", ["local", "tpu"], "where the points run")
    flags.DEFINE_string("launch_args", "", "with --launcher=tpu: args of jaxrlvr.launch tpu")
    flags.DEFINE_integer("window", 10, "steps averaged for the final values of the summary")
    flags.DEFINE_bool("summarize", False, "only write the summary of what ROOT holds")
    flags.DEFINE_string(
        "baseline", None, "point name (without seed) to pair every other point against"
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    f = flags.FLAGS
    try:
        if not f.root:
            raise config_lib.ConfigError("--root is required")
        if f.parallel < 1:
            raise config_lib.ConfigError(f"--parallel={f.parallel}: must be >= 1")
        if not f.sweep and not f.grid:
            raise config_lib.ConfigError("give --sweep=FILE or at least one --grid=KEY=V1,V2")
        kw = dict(
            sweep_file=f.sweep, grids=f.grid, sets=f.set, window=f.window, baseline=f.baseline
        )
        if f.summarize:
            runs = build_runs(f.config, f.root, f.sweep, f.grid, f.set)
            for run in runs:
                run.status = "done" if finished(run) else "incomplete"
            print(summarize(runs, f.root, f.window, f.baseline)[1], end="")
            return
        runs = sweep(
            f.config, f.root, parallel=f.parallel, dry_run=f.dry_run, launcher=f.launcher,
            launch_args=f.launch_args, **kw,
        )  # fmt: skip
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        command = shlex.join(["python", "-m", "jaxrlvr.sweep", *sys.argv[1:]])
        print(f"{e}; rerun the same command to resume: {command}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    if any(r.status == "failed" for r in runs):
        failed = [r.name for r in runs if r.status == "failed"]
        print(f"error: {len(failed)} points failed: {', '.join(failed)} (see their train.log)")
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
