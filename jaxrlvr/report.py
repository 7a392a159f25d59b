"""Figures and a report of runs: `python -m jaxrlvr.report RUN_DIR ... --out=DIR`.

Each RUN_DIR is a training workdir, or a directory of workdirs (a sweep's root). Writes
to DIR:

- `entropy.png`, `reward.png`, `score.png`, `length.png`: the metric against the step,
  every run on one plot;
- `covariance.png`: the covariance distribution (mean covariance of the top 0.02% ...
  50% of tokens, the `cov_top_*` metrics) averaged over each run's last steps;
- `law.png`: score against entropy with the fitted law `R = -a exp(H) + b` per run
  (`jaxrlvr.study.entropy_law`) and, with several runs, one fit across them all;
- `fit.json`: per run `a`, `b`, `rmse`, `pairs` and, from the first 15% of steps,
  `predicted_final` / `actual_final` (or the reason a fit could not be made);
- `index.md`: the figures and a table of every run; for runs that logged the first-order
  entropy-change check (`diagnostics.entropy_check_every`), a second table of how well the
  prediction `dH_predicted` matched the measured `dH_actual` (`entropy_check`), and a
  table of where the PPO clip bound (`clipping`: either side, the upper side, the upper
  side on low-probability tokens, and `approx_kl`, each a mean over the steps).

The score is `--score` (default `eval_avg@4`, the demo's Avg@4; any metric works, e.g.
`reward_mean`). A directory without `metrics.jsonl`, or a run without score rows, is
named in a warning and left out of what it cannot feed. Files appear whole or not at
all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from jaxrlvr.runtime.metrics import LOW_PROB, read_metrics
from jaxrlvr.study import entropy_law, markdown

log = logging.getLogger("jaxrlvr.report")

CURVES = {  # figure -> (metric, axis label)
    "entropy": ("entropy", "entropy (nats)"),
    "reward": ("reward_mean", "training reward"),
    "length": ("response_length_mean", "response length (tokens)"),
}
COV_FRACTIONS = ("0.02pct", "0.2pct", "2pct", "20pct", "50pct")
CLIP_KEYS = ("pg_clipfrac", "pg_clipfrac_pos", "pg_clipfrac_pos_lowp", "approx_kl")


class ReportError(ValueError):
    """Nothing to report; the message says why."""


def find_runs(paths: Sequence[str]) -> tuple[dict[str, list[dict]], list[str]]:
    """`{label: metrics rows}` of every run under `paths`, and a warning per path skipped."""
    runs, skipped = {}, []
    for path in paths:
        if os.path.exists(os.path.join(path, "metrics.jsonl")):
            candidates = [path]
        elif os.path.isdir(path):
            candidates = sorted(
                os.path.join(path, d)
                for d in os.listdir(path)
                if os.path.exists(os.path.join(path, d, "metrics.jsonl"))
            )
            if not candidates:
                skipped.append(f"{path}: no metrics.jsonl in it or in its subdirectories")
        else:
            skipped.append(f"{path}: not a directory")
            candidates = []
        for run in candidates:
            rows = read_metrics(run)
            if not any("entropy" in r for r in rows):
                skipped.append(f"{run}: metrics.jsonl holds no training step")
                continue
            label = os.path.basename(os.path.normpath(run))
            runs[label if label not in runs else run] = rows
    return runs, skipped


def fit_runs(runs: dict[str, list[dict]], score: str) -> tuple[dict[str, Any], list[str]]:
    """The law fits of every run (and of all runs pooled) for `score`; warnings."""
    fits, notes, pooled = {}, [], ([], [])
    for label, rows in runs.items():
        steps, h, r = entropy_law.pairs(rows, score)
        if not len(steps):
            notes.append(f"{label}: no rows with {score!r}; not in the law fit")
            fits[label] = {"error": f"no rows with {score!r}"}
            continue
        pooled[0].extend(h)
        pooled[1].extend(r)
        try:
            fit = entropy_law.fit_law(h, r)
            fits[label] = {"a": fit.a, "b": fit.b, "rmse": fit.rmse, "pairs": fit.n}
        except entropy_law.LawFitError as e:
            notes.append(f"{label}: no law fit: {e}")
            fits[label] = {"error": str(e)}
            continue
        try:
            fits[label] |= entropy_law.early_prediction(steps, h, r)
        except entropy_law.LawFitError as e:
            fits[label]["early_error"] = str(e)
    if len(runs) > 1 and pooled[0]:
        try:
            fit = entropy_law.fit_law(*pooled)
            fits["all runs"] = {"a": fit.a, "b": fit.b, "rmse": fit.rmse, "pairs": fit.n}
        except entropy_law.LawFitError as e:
            fits["all runs"] = {"error": str(e)}
    return fits, notes


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_all(runs: dict[str, list[dict]], fits: dict, score: str, out: str, window: int) -> list:
    """Every figure of the module docstring into `out`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        for ax in fig.axes:  # a legend of the runs, or a note where none has this metric
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, ncol=2)
            else:
                ax.text(
                    0.5,
                    0.5,
                    "no data in these runs",
                    transform=ax.transAxes,
                    ha="center",
                    va="center",
                    color="gray",
                )
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        written.append(name)

    curves = dict(CURVES, score=(score, score))
    for name, (key, ylabel) in curves.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, rows in runs.items():
            steps, values = _series(rows, key)
            if steps:
                ax.plot(steps, values, label=label, marker="o" if name == "score" else None, ms=3)
        ax.set(xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        save(fig, f"{name}.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [float(f.replace("pct", "")) for f in COV_FRACTIONS]
    for label, rows in runs.items():
        last = [r for r in rows if "cov_top_0.2pct" in r][-window:]
        if last:
            ys = [np.mean([r[f"cov_top_{f}"] for r in last]) for f in COV_FRACTIONS]
            ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set(xscale="log", xlabel="top tokens by covariance (%)", ylabel="mean covariance")
    ax.set_title(f"covariance distribution, mean of the last {window} steps", fontsize=9)
    ax.grid(alpha=0.3)
    save(fig, "covariance.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, rows in runs.items():
        _, h, r = entropy_law.pairs(rows, score)
        if not len(h):
            continue
        (dots,) = ax.plot(h, r, "o", ms=3, label=label)
        if "a" in fits.get(label, {}):
            grid = np.linspace(h.min(), h.max(), 50)
            law = entropy_law.LawFit(fits[label]["a"], fits[label]["b"], 0.0, 0)
            ax.plot(grid, law.predict(grid), color=dots.get_color(), lw=1)
    if "a" in fits.get("all runs", {}):
        every = [h for rows in runs.values() for h in entropy_law.pairs(rows, score)[1]]
        grid = np.linspace(min(every), max(every), 50)
        f = fits["all runs"]
        law = entropy_law.LawFit(f["a"], f["b"], 0.0, 0)
        ax.plot(grid, law.predict(grid), "k--", lw=1.5, label="all runs")
    ax.set(xlabel="entropy (nats)", ylabel=score)
    ax.set_title("R = -a exp(H) + b", fontsize=9)
    ax.grid(alpha=0.3)
    save(fig, "law.png")
    return written


def entropy_check(rows: list[dict]) -> dict[str, float] | None:
    """How well the first-order law predicted a run's per-step entropy change: over the
    steps that logged the check, the correlation of the step means `dH_actual` and
    `dH_predicted`, the per-step token correlation `dH_corr` (mean, median, min), the share
    of steps whose two means have the same sign, and the mean of each. None if no step
    logged it."""
    checked = [r for r in rows if all(r.get(k) is not None for k in ("dH_actual", "dH_predicted"))]
    if not checked:
        return None
    actual = np.array([r["dH_actual"] for r in checked])
    predicted = np.array([r["dH_predicted"] for r in checked])
    token_corr = np.array([r["dH_corr"] for r in checked if r.get("dH_corr") is not None])
    both_vary = len(checked) > 1 and actual.std() > 0 and predicted.std() > 0
    return {
        "steps": len(checked),
        "step_mean_corr": float(np.corrcoef(actual, predicted)[0, 1]) if both_vary else np.nan,
        "token_corr_mean": float(token_corr.mean()) if token_corr.size else np.nan,
        "token_corr_median": float(np.median(token_corr)) if token_corr.size else np.nan,
        "token_corr_min": float(token_corr.min()) if token_corr.size else np.nan,
        "sign_agreement": float(np.mean(np.sign(actual) == np.sign(predicted))),
        "actual_mean": float(actual.mean()),
        "predicted_mean": float(predicted.mean()),
    }


def clipping(rows: list[dict]) -> dict[str, float] | None:
    """The mean over a run's training steps of each of `CLIP_KEYS` (where the PPO clip
    bound, and how far the policy moved per update); None if the run did not log them."""
    steps = [r for r in rows if all(r.get(k) is not None for k in CLIP_KEYS)]
    if not steps:
        return None
    return {"steps": len(steps)} | {k: float(np.mean([r[k] for r in steps])) for k in CLIP_KEYS}


def index_markdown(runs, fits, score: str, figures: list[str], notes: list[str], window: int):
    """`index.md`: the figures, a row per run, then the entropy-check and clipping tables
    of the runs that logged those metrics."""
    lines = ["# Report", ""]
    lines += [f"![{f[:-4]}]({f})" for f in figures] + [""]
    head = [
        "run", "steps", f"entropy (first -> last {window})", f"reward (last {window})",
        f"{score} (last)", "a", "b", "rmse", "predicted final (15%)", "actual final",
    ]  # fmt: skip
    table = []
    for label, rows in runs.items():
        train = [r for r in rows if "entropy" in r]
        h0 = np.mean([r["entropy"] for r in train[:window]])
        h1 = np.mean([r["entropy"] for r in train[-window:]])
        reward = np.mean([r["reward_mean"] for r in train[-window:]])
        scores = _series(rows, score)[1]
        f = fits.get(label, {})
        table.append([
            label, str(train[-1]["step"]), f"{h0:.4f} -> {h1:.4f}", f"{reward:.4f}",
            f"{scores[-1]:.4f}" if scores else "-",
            *(f"{f[k]:.4g}" if k in f else "-" for k in ("a", "b", "rmse", "predicted_final",
                                                           "actual_final")),
        ])  # fmt: skip
    lines += markdown.table(head, table)
    if "all runs" in fits and "a" in fits["all runs"]:
        f = fits["all runs"]
        lines += ["", f"One fit across all runs: a = {f['a']:.4g}, b = {f['b']:.4g}, "
                  f"rmse = {f['rmse']:.4g} over {f['pairs']} pairs."]  # fmt: skip

    def logged(summary):  # run -> its summary, for the runs that logged the metrics
        return {label: c for label, rows in runs.items() if (c := summary(rows)) is not None}

    if checks := logged(entropy_check):
        lines += [
            "",
            "First-order entropy-change check (per step: measured against predicted):",
            "",
        ]
        head = ["run", "steps", "corr. of step means", "dH_corr mean / median / min",
                "same sign", "mean dH actual / predicted"]  # fmt: skip
        lines += markdown.table(head, [
            [label, str(c["steps"]), f"{c['step_mean_corr']:.3f}",
             f"{c['token_corr_mean']:.3f} / {c['token_corr_median']:.3f} / "
             f"{c['token_corr_min']:.3f}", f"{c['sign_agreement']:.0%}",
             f"{c['actual_mean']:.3g} / {c['predicted_mean']:.3g}"]
            for label, c in checks.items()
        ])  # fmt: skip
    if clips := logged(clipping):
        lines += [
            "",
            "Clipping (token shares, means over the steps; `pos`: the upper side, A > 0; "
            f"`pos_lowp`: of those, old probability below {LOW_PROB}):",
            "",
        ]
        head = ["run", "steps", *(f"`{k}`" for k in CLIP_KEYS)]
        lines += markdown.table(head, [
            [label, str(c["steps"]), *(f"{c[k]:.3g}" for k in CLIP_KEYS)]
            for label, c in clips.items()
        ])  # fmt: skip
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def report(paths: Sequence[str], out: str, score: str = "eval_avg@4", window: int = 10):
    """Write the report of the runs under `paths` into `out`; returns (fits, notes)."""
    runs, notes = find_runs(paths)
    for note in notes:
        log.warning("skipped %s", note)
    if not runs:
        raise ReportError("no run to report: " + "; ".join(notes))
    fits, fit_notes = fit_runs(runs, score)
    for note in fit_notes:
        log.warning("%s", note)
    notes += fit_notes
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".report-", dir=os.path.dirname(os.path.abspath(out)))
    try:
        figures = plot_all(runs, fits, score, stage, window)
        with open(os.path.join(stage, "fit.json"), "w") as f:
            json.dump(fits, f, indent=2)
        with open(os.path.join(stage, "index.md"), "w") as f:
            f.write(index_markdown(runs, fits, score, figures, notes, window))
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(stage):
            os.replace(os.path.join(stage, name), os.path.join(out, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return fits, notes


def define_flags() -> None:
    flags.DEFINE_string("out", None, "output directory of the figures, fit.json and index.md")
    flags.DEFINE_string("score", "eval_avg@4", "the performance metric R of the law fit")
    flags.DEFINE_integer("window", 10, "steps averaged for the table's first/last values")


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    f = flags.FLAGS
    if len(argv) < 2 or not f.out:
        print("error: usage: python -m jaxrlvr.report RUN_DIR ... --out=DIR", file=sys.stderr)
        sys.exit(2)
    try:
        fits, _ = report(argv[1:], f.out, f.score, f.window)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {f.out}/index.md ({len(fits)} fits)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
