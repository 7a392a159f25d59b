"""The study workflow: sweeps, the entropy-performance law, reports; end to end on a tiny
policy (a two-point, three-step sweep, an evaluation and a report of its output)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_policy import write_tiny_policy

from jaxrlvr import report, sweep
from jaxrlvr.config import ConfigError
from jaxrlvr.study import entropy_law, markdown

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- the law


def synthetic_run(workdir: Path, a: float, b: float, steps: int = 100, h0: float = 1.2,
                  h1: float = 0.1, noise: float = 0.0, seed: int = 0) -> None:  # fmt: skip
    """metrics.jsonl of a run whose eval score follows the law exactly (plus noise)."""
    rng = np.random.default_rng(seed)
    entropy = {s: h1 + (h0 - h1) * np.exp(-s / 30) for s in range(1, steps + 2)}
    rows = [{"step": 0, "eval_avg@4": None}]
    for s in range(1, steps + 1):
        row = {
            "step": s,
            "entropy": entropy[s],
            "reward_mean": 0.5,
            "response_length_mean": 9,
            **{f"cov_top_{f}": 1.0 / (i + 1) for i, f in enumerate(report.COV_FRACTIONS)},
        }
        rows.append(row)  # fmt: skip
    for row in rows:
        s = row["step"]
        if s % 5 == 0:  # the policy after s steps: the entropy of row s + 1
            h = entropy[s + 1] if s < steps else entropy[s]
            row["eval_avg@4"] = -a * np.exp(h) + b + noise * rng.standard_normal()
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_law_fit_recovers_a_and_b_and_predicts_the_final_score(tmp_path):
    synthetic_run(tmp_path / "run", a=0.3, b=0.9, noise=1e-4)
    steps, h, r = entropy_law.pairs(json_rows(tmp_path / "run"), "eval_avg@4")
    fit = entropy_law.fit_law(h, r)
    assert fit.a == pytest.approx(0.3, rel=0.01) and fit.b == pytest.approx(0.9, rel=0.01)
    assert fit.rmse < 5e-4 and fit.n == 21
    early = entropy_law.early_prediction(steps, h, r)
    assert early["early_pairs"] == 4  # steps 0, 5, 10, 15 of 100
    assert early["predicted_final"] == pytest.approx(early["actual_final"], rel=0.02)


def test_law_fit_refuses_what_it_cannot_fit():
    with pytest.raises(entropy_law.LawFitError, match=r"range 0.5 .. 0.5 nats over 4 pairs"):
        entropy_law.fit_law([0.5] * 4, [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(entropy_law.LawFitError, match="2 .* pairs; the fit needs at least 3"):
        entropy_law.fit_law([0.5, 0.4], [0.1, 0.2])


def json_rows(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_report_of_synthetic_runs(tmp_path):
    synthetic_run(tmp_path / "runs" / "one", a=0.3, b=0.9)
    synthetic_run(tmp_path / "runs" / "two", a=0.3, b=0.9, h0=1.5, h1=0.3)
    (tmp_path / "runs" / "empty").mkdir()
    no_eval = tmp_path / "no-eval"
    synthetic_run(no_eval, a=0.3, b=0.9)
    rows = [{k: v for k, v in r.items() if k != "eval_avg@4"} for r in json_rows(no_eval)]
    (no_eval / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    fits, notes = report.report(
        [str(tmp_path / "runs"), str(no_eval), str(tmp_path / "x")], str(out)
    )
    assert fits["one"]["a"] == pytest.approx(0.3, rel=0.01)
    assert fits["all runs"]["b"] == pytest.approx(0.9, rel=0.01)  # one law across both runs
    assert fits["one"]["predicted_final"] == pytest.approx(fits["one"]["actual_final"], rel=0.02)
    assert "error" in fits["no-eval"]
    assert any("x: not a directory" in n for n in notes)
    assert any("no-eval: no rows with 'eval_avg@4'" in n for n in notes)
    for name in ("entropy", "reward", "score", "length", "covariance", "law"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert json.loads((out / "fit.json").read_text())["one"]["b"] == pytest.approx(0.9, rel=0.01)
    index = (out / "index.md").read_text()
    assert "![law](law.png)" in index and "| one | 100 |" in index
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report-")]  # no leftovers
    with pytest.raises(report.ReportError, match="no run to report"):
        report.report([str(tmp_path / "runs" / "empty")], str(tmp_path / "r2"))


def test_entropy_check_summary_against_numpy(tmp_path):
    rng = np.random.default_rng(0)
    actual = rng.normal(-1e-3, 1e-3, 20)
    predicted = actual + rng.normal(0, 5e-4, 20)
    corr = rng.uniform(0.5, 1.0, 20)
    rows = [{"step": 0}] + [  # step 0 (an eval row) and unchecked steps carry no check
        {"step": i + 1, "entropy": 0.1, "reward_mean": 0.5, "dH_actual": a, "dH_predicted": p,
         "dH_corr": c} if i % 2 == 0 else {"step": i + 1, "entropy": 0.1, "reward_mean": 0.5}
        for i, (a, p, c) in enumerate(zip(actual, predicted, corr, strict=True))
    ]  # fmt: skip
    a, p, c = actual[::2], predicted[::2], corr[::2]
    got = report.entropy_check(rows)
    assert got["steps"] == 10
    assert got["step_mean_corr"] == pytest.approx(np.corrcoef(a, p)[0, 1], rel=1e-12)
    assert (got["token_corr_mean"], got["token_corr_min"]) == pytest.approx((c.mean(), c.min()))
    assert got["token_corr_median"] == pytest.approx(np.median(c))
    assert got["sign_agreement"] == pytest.approx(np.mean(np.sign(a) == np.sign(p)))
    assert (got["actual_mean"], got["predicted_mean"]) == pytest.approx((a.mean(), p.mean()))
    assert report.entropy_check(rows[:1] + [r for r in rows if "dH_actual" not in r]) is None
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.report([str(run)], str(tmp_path / "out"), score="reward_mean")
    index = (tmp_path / "out" / "index.md").read_text()
    assert f"| run | 10 | {got['step_mean_corr']:.3f} |" in index
    assert "Clipping" not in index  # no step logged the clip shares


def test_markdown_table():
    assert markdown.table(["run", "steps"], [["a", "3"], ["b", "10"]]) == [
        "| run | steps |", "|---|---|", "| a | 3 |", "| b | 10 |",
    ]  # fmt: skip
    assert markdown.table(["run"], []) == ["| run |", "|---|"]


def test_clipping_summary_against_numpy(tmp_path):
    rng = np.random.default_rng(1)
    shares = rng.uniform(0, 1e-2, (12, len(report.CLIP_KEYS)))
    rows = [{"step": 0, "eval_avg@4": 0.3}] + [  # the eval row carries no clip shares
        {"step": i + 1, "entropy": 0.1, "reward_mean": 0.5,
         **dict(zip(report.CLIP_KEYS, v, strict=True))}
        for i, v in enumerate(shares)
    ]  # fmt: skip
    got = report.clipping(rows)
    assert got["steps"] == 12
    for k, mean in zip(report.CLIP_KEYS, shares.mean(axis=0), strict=True):
        assert got[k] == pytest.approx(mean, rel=1e-12)
    assert report.clipping(rows[:1]) is None
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.report([str(run)], str(tmp_path / "out"), score="reward_mean")
    index = (tmp_path / "out" / "index.md").read_text()
    cells = " | ".join(f"{got[k]:.3g}" for k in report.CLIP_KEYS)
    assert f"| run | 12 | {cells} |" in index


def test_figures_without_a_metric_say_so(tmp_path):
    """A run that logged no covariance and no eval still gets every figure, each plot
    without data marked as such instead of an empty legend (matplotlib warns on those)."""
    import warnings

    rows = [{"step": i + 1, "entropy": 0.2 - 0.01 * i, "reward_mean": 0.4 + 0.02 * i}
            for i in range(8)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures = report.plot_all({"run": rows}, {}, "eval_avg@4", str(tmp_path), window=4)
    assert "covariance.png" in figures and "law.png" in figures
    assert all((tmp_path / f).stat().st_size > 0 for f in figures)


# ---------------------------------------------------------------------------- sweeps


def test_points_grids_and_names():
    points = sweep.product(sweep.axis("algo.eps_high", [0.2, 0.28]), sweep.seeds(2))
    assert points == [
        {"algo.eps_high": 0.2, "seed": 0}, {"algo.eps_high": 0.2, "seed": 1},
        {"algo.eps_high": 0.28, "seed": 0}, {"algo.eps_high": 0.28, "seed": 1},
    ]  # fmt: skip
    z = sweep.zipped(sweep.axis("a", [1, 2]), sweep.axis("b", [3, 4]))
    assert z == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    with pytest.raises(ValueError, match="differ in length"):
        sweep.zipped(sweep.axis("a", [1]), sweep.axis("b", [3, 4]))
    assert sweep.grid_points(["algo.eps_high=0.2,0.28", "seed=0,1"]) == [
        {k: str(v) for k, v in p.items()} for p in points
    ]
    assert sweep.point_name({"config": "configs/pos_adv.py:stage", "seed": 1}) == (
        "pos_adv-stage,seed=1"
    )
    assert sweep.point_name({"mesh.shape": (1, -1, 1)}) == "shape=_1,-1,1_"  # shell-safe


def test_every_point_is_checked_before_any_run(tmp_path):
    points = [{"algo.eps_high": "0.28"}, {"algo.eps_hihg": "0.3"}]
    with pytest.raises(
        ConfigError, match=r"point 1 \(eps_hihg=0.3\): no config key .*closest: algo.eps_high"
    ):
        sweep.resolve(points, "configs/grpo.py", {}, str(tmp_path))
    with pytest.raises(ConfigError, match=r"point 0 \(n=many\): config.rollout.n='many'"):
        sweep.resolve([{"rollout.n": "many"}], "configs/grpo.py", {}, str(tmp_path))
    with pytest.raises(ConfigError, match=r"point 0 \(eps_low=2.0\): invalid config"):
        sweep.resolve([{"algo.eps_low": 2.0}], "configs/grpo.py", {}, str(tmp_path))
    assert not list(tmp_path.iterdir())  # nothing was started or written
    (run,) = sweep.resolve(
        [{"algo.dynamic_sampling": "true"}], "configs/grpo.py", {}, str(tmp_path)
    )
    assert run.config.algo.dynamic_sampling is True
    assert run.command[-1] == "--config.algo.dynamic_sampling=true"


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "sweeps").glob("*.py")))
def test_sweep_files_resolve(name, tmp_path):
    runs = sweep.resolve(
        sweep.load_sweep(str(REPO / "sweeps" / f"{name}.py")), "configs/grpo.py", {}, str(tmp_path)
    )
    assert len(runs) >= 3 and len({r.name for r in runs}) == len(runs)


def test_summary_pairs_every_point_with_the_baseline_seed_by_seed(tmp_path):
    points = sweep.product(
        sweep.axis(
            "config", [f"configs/{m}.py" for m in ("grpo", "clip_higher", "steer", "kl_cov")]
        ),
        sweep.seeds(2),
    )
    runs = sweep.resolve(points, "configs/grpo.py", {}, str(tmp_path))
    final = {  # (config, seed) -> (entropy, reward) of every step
        ("grpo", "0"): (0.10, 0.5), ("grpo", "1"): (0.20, 0.6),
        ("clip_higher", "0"): (0.13, 0.4), ("clip_higher", "1"): (0.25, 0.6),
        ("steer", "0"): (0.11, 0.5), ("steer", "1"): (0.15, 0.7),
        ("kl_cov", "0"): (0.12, 0.5), ("kl_cov", "1"): (0.30, 0.1),
    }  # fmt: skip
    for run in runs:
        h, r = final[(run.config.name, str(run.point["seed"]))]
        os.makedirs(run.workdir)
        still_running = run.name == "kl_cov,seed=1"  # 3 of 5 steps: not compared
        with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
            for step in range(1, 4 if still_running else 6):
                f.write(json.dumps({"step": step, "entropy": h, "reward_mean": r}) + "\n")
    _, markdown = sweep.summarize(runs, str(tmp_path), window=3, baseline="grpo")
    assert "Paired differences against grpo, one value per seed (0, 1):" in markdown
    assert "| clip_higher | +0.0300, +0.0500 | -0.1000, +0.0000 | all above |" in markdown
    assert "| steer | +0.0100, -0.0500 | +0.0000, +0.1000 | mixed |" in markdown
    assert "| kl_cov | +0.0200 | +0.0000 | all above |" in markdown
    assert "| grpo | +" not in markdown  # the baseline is not paired with itself
    with pytest.raises(ConfigError, match=r"--baseline='dapo' matches 0 of the points"):
        sweep.sweep("configs/grpo.py", str(tmp_path / "x"), grids=["seed=0,1"], baseline="dapo")
    assert not (tmp_path / "x").exists()  # refused before anything ran


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> dict[str, str]:
    """Environment of one persistent JAX compilation cache for this module's runs: the
    end-to-end sweep compiles the tiny policy's programs once, the later runs load them."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_sweep_evaluate_report_end_to_end(tmp_path, compile_cache):
    policy = write_tiny_policy(tmp_path / "policy")
    root = tmp_path / "sweep"
    common = {
        "model.path": policy, "data.train_files": policy / "train.jsonl",
        "data.eval_files": f"arith={policy / 'eval.jsonl'}", "rollout.n": 4,
        "rollout.max_new_tokens": 16, "rollout.max_slots": 16, "train.steps": 3,
        "train.prompts_per_step": 4, "train.mini_batch_prompts": 2,
        "train.micro_batch_sequences": 4, "train.eval_every": 1, "train.eval_n": 2,
        "train.eval_max_prompts": 4, "optim.warmup_steps": 0, "algo.entropy_coef": 0.05,
    }  # fmt: skip
    args = ["jaxrlvr.sweep", f"--root={root}", "--grid=algo.eps_high=0.2,0.28", "--parallel=2"]
    args += [f"--set={k}={v}" for k, v in common.items()]
    out = cli(*args, env=compile_cache)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "sweep: 2/2 done, 0 running, 0 failed" in out.stderr
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["eps_high=0.2", "eps_high=0.28"]
    summary = (root / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("point,status,steps,algo.eps_high,") and len(summary) == 3
    assert "eval_avg@2_final" in summary[0] and ",done,3," in summary[1]
    assert "| eps_high=0.28 | 1 |" in (root / "summary.md").read_text()
    again = cli(*args)  # finished points are skipped
    assert again.returncode == 0 and "2 to run" not in again.stderr and "0 to run" in again.stderr

    point = root / "eps_high=0.28"
    out = cli("jaxrlvr.evaluate", f"--checkpoint={point / 'hf'}", "--n=4", "--max_prompts=4",
              f"--eval=arith={policy / 'eval.jsonl'}", f"--out={tmp_path / 'eval'}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(results["arith"]) >= {"avg@4", "pass@1", "pass@2", "pass@4", "maj@4", "ece"}
    lines = (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 16 and json.loads(lines[0])["benchmark"] == "arith"

    out = cli("jaxrlvr.report", str(root), f"--out={tmp_path / 'report'}", "--score=eval_avg@2")
    assert out.returncode == 0, out.stderr[-3000:]
    fits = json.loads((tmp_path / "report" / "fit.json").read_text())
    assert set(fits) == {"eps_high=0.2", "eps_high=0.28", "all runs"}
    assert (tmp_path / "report" / "law.png").exists()


def test_root_url_is_refused_before_anything_is_created(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "jaxrlvr.sweep", "--root=gs://bucket/runs", "--grid=seed=0,1",
         "--dry_run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("error: --root='gs://bucket/runs': a gs:// URL, not a path")
    assert "gcsfuse" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # no local ./gs:/bucket/runs


def sweep_in_own_session(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """The sweep as a terminal runs it: the leader of its own process group."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **env)
    return subprocess.Popen(
        [sys.executable, "-m", "jaxrlvr.sweep", *args], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def ctrl_c_once_both_reach(proc: subprocess.Popen, workdirs: list[Path], step: int) -> str:
    """Wait until every workdir logged `step`, then SIGINT the sweep's whole process group
    (what one Ctrl-C in a terminal does); returns the sweep's stderr."""
    t0 = time.monotonic()
    while not all(any(r["step"] >= step for r in sweep.read_rows(str(w))) for w in workdirs):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 300, "timed out waiting for the points' steps"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    return err


def test_one_ctrl_c_saves_every_running_point_and_a_rerun_resumes(tmp_path, compile_cache):
    """Each point gets exactly one stop signal: it saves its last completed step and exits
    with the trainer's clean stop code; the sweep says how to resume, and a rerun does.
    (The end-to-end test's shapes: its compiled programs are in `compile_cache`.)"""
    policy = write_tiny_policy(tmp_path / "policy")
    root = tmp_path / "sweep"
    common = {
        "model.path": policy, "data.train_files": policy / "train.jsonl", "rollout.n": 4,
        "rollout.max_new_tokens": 16, "rollout.max_slots": 16, "train.steps": 1000,
        "train.prompts_per_step": 4, "train.mini_batch_prompts": 2,
        "train.micro_batch_sequences": 4, "train.eval_every": 0, "optim.warmup_steps": 0,
        "algo.entropy_coef": 0.05,
    }  # fmt: skip
    args = [f"--root={root}", "--grid=algo.eps_high=0.2,0.28", "--parallel=2"]
    args += [f"--set={k}={v}" for k, v in common.items()]
    workdirs = [root / "eps_high=0.2", root / "eps_high=0.28"]
    proc = sweep_in_own_session(args, compile_cache)
    err = ctrl_c_once_both_reach(proc, workdirs, step=1)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "stopped by SIGINT; rerun the same command to resume: python -m jaxrlvr.sweep" in err
    saved = {}
    for w in workdirs:
        log = (w / "train.log").read_text()
        assert "stopped by SIGTERM after step" in log and "second stop signal" not in log, log
        assert f"stopped {w.name} (exit {128 + signal.SIGTERM})" in err, err[-3000:]
        saved[w] = max(r["step"] for r in sweep.read_rows(str(w)))
        assert f"the checkpoint of step {saved[w]} is saved" in log
        assert (w / "checkpoints" / str(saved[w])).is_dir()
    proc = sweep_in_own_session(args, compile_cache)  # the same command again: they resume
    err = ctrl_c_once_both_reach(proc, workdirs, step=max(saved.values()) + 1)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    for w in workdirs:
        assert (
            f"resumed from {w / 'checkpoints'} at step {saved[w]}" in (w / "train.log").read_text()
        )
