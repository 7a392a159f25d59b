"""Faults a long run meets, injected one by one: nothing is lost, every failure is named.

Runs of the command line (`tests/fault_runner.py`, a tiny random policy, 5 steps) are
cut by SIGTERM mid-step and mid-save, by a damaged newest checkpoint, by writes the
kernel refuses, and by a diverging learning rate; each resumed run must log exactly the
metrics of an uninterrupted one. Smaller checks cover the start-up refusals, the reward
batch limit and orphaned checker processes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_policy import write_tiny_policy

from jaxrlvr import config as config_lib
from jaxrlvr.rewards.pool import CheckerPool
from jaxrlvr.rl import preflight
from jaxrlvr.runtime.metrics import MetricsWriter, read_metrics
from jaxrlvr.runtime.record import HISTORY_FILE, record_config

REPO = Path(__file__).resolve().parents[1]
TIME_KEYS = ("time_", "tokens_per_s")
STEPS = 5
sys.path.insert(0, str(Path(__file__).parent))  # checkers below run in pool workers
THIS = Path(__file__).stem


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    return write_tiny_policy(tmp_path_factory.mktemp("policy"))


def run_flags(policy: Path, workdir: Path, **overrides) -> list[str]:
    """The command line of a 5-step run of the tiny policy (checkpoints at 2, 4, 5)."""
    values = {
        "workdir": workdir, "model.path": policy, "data.train_files": policy / "train.jsonl",
        "data.eval_files": policy / "eval.jsonl", "rollout.n": 4, "rollout.max_new_tokens": 16,
        "rollout.max_slots": 16, "train.steps": STEPS, "train.prompts_per_step": 4,
        "train.mini_batch_prompts": 2, "train.micro_batch_sequences": 4,
        "train.eval_every": 2, "train.eval_n": 2, "train.eval_max_prompts": 4,
        "train.checkpoint_every": 2, "train.progress": False, "optim.warmup_steps": 0,
        "algo.entropy_coef": 0.05,  # a random policy earns no reward: let the entropy move it
    } | overrides  # fmt: skip
    return ["--config=configs/grpo.py", *(f"--config.{k}={v}" for k, v in values.items())]


def start(fault: str, flags: list[str], **env_vars: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **env_vars)
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fault_runner.py"), fault, *flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, finish(proc)[1][-3000:]
        assert time.monotonic() - t0 < timeout, "timed out waiting"
        time.sleep(0.05)


def rows_done(workdir: Path, step: int):
    def check():
        path = workdir / "metrics.jsonl"
        return path.exists() and any(r["step"] >= step for r in read_metrics(workdir))

    return check


def assert_same_metrics(reference: list[dict], rows: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for a, b in zip(reference, rows, strict=True):
        a = {k: v for k, v in a.items() if not k.startswith(TIME_KEYS)}
        b = {k: v for k, v in b.items() if not k.startswith(TIME_KEYS)}
        assert a.keys() == b.keys(), a.keys() ^ b.keys()
        for k in a:
            if isinstance(a[k], float):
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
            else:
                assert a[k] == b[k], k


@pytest.fixture(scope="module")
def reference(policy, tmp_path_factory) -> Path:
    """An uninterrupted run: its workdir."""
    workdir = tmp_path_factory.mktemp("reference")
    code, log = finish(start("none", run_flags(policy, workdir)))
    assert code == 0, log[-3000:]
    assert [r["step"] for r in read_metrics(workdir)] == list(range(STEPS + 1))
    return workdir


def resume_and_compare(policy, workdir: Path, reference: Path, *extra: str) -> str:
    code, log = finish(start("none", run_flags(policy, workdir) + list(extra)))
    assert code == 0, log[-3000:]
    assert_same_metrics(read_metrics(reference), read_metrics(workdir))
    assert (workdir / "hf" / "model.safetensors").exists()
    return log


# ------------------------------------------------------------------ stop signals


def test_sigterm_mid_step_saves_the_last_step_and_resumes(policy, reference, tmp_path):
    proc = start("none", run_flags(policy, tmp_path))
    wait_for(rows_done(tmp_path, 1), proc)
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "stopped by SIGTERM after step" in log and "Rerun the same command" in log
    done = max(r["step"] for r in read_metrics(tmp_path))
    assert done < STEPS
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    # The last completed step is saved; when the signal cut its evaluation short, the
    # step's row waits in the checkpoint (and is written on resume).
    pending = "runs again on resume" in log
    assert saved and saved[-1] == done + pending, (saved, done, pending)
    assert not (tmp_path / "hf").exists()
    resume_and_compare(policy, tmp_path, reference)


def test_sigterm_mid_save_finishes_the_save(policy, reference, tmp_path):
    marker = tmp_path / "saving"
    proc = start("slow_save", run_flags(policy, tmp_path / "run"), FAULT_MARKER=str(marker))
    wait_for(marker.exists, proc)  # the save of step 2 sleeps before writing
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "the checkpoint of step 2 is saved" in log
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == 2
    resume_and_compare(policy, tmp_path / "run", reference)


def test_sigterm_mid_evaluation_keeps_the_step_and_its_row(policy, reference, tmp_path):
    marker = tmp_path / "evaluating"
    proc = start("slow_eval", run_flags(policy, tmp_path / "run"), FAULT_MARKER=str(marker))
    wait_for(marker.exists, proc)  # step 2 is trained; its evaluation sleeps
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "the checkpoint of step 2 is saved" in log and "runs again on resume" in log
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == 1  # row 2 is pending
    resume_and_compare(policy, tmp_path / "run", reference)


# ------------------------------------------------------------------ checkpoints


def test_damaged_newest_checkpoint_is_set_aside(policy, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "hf")
    for f in (workdir / "checkpoints" / str(STEPS) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * 16)  # the array data is garbage now
    # A save that a `kill -9` cut short leaves Orbax's temporary directory: never restored.
    half = workdir / "checkpoints" / f"{STEPS + 4}.orbax-checkpoint-tmp"
    shutil.copytree(workdir / "checkpoints" / str(STEPS - 1), half)
    (half / "commit_success.txt").unlink(missing_ok=True)
    first_config = (workdir / "config.json").read_text()
    # The rerun also changes a setting: the record must keep both.
    log = resume_and_compare(policy, workdir, reference, "--config.train.log_every=2")
    assert f"checkpoints/{STEPS} is damaged" in log
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints-damaged").iterdir()] == [
        str(STEPS)
    ]
    assert (workdir / "config.json").read_text() == first_config
    (entry,) = [json.loads(line) for line in (workdir / HISTORY_FILE).read_text().splitlines()]
    assert entry["step"] == STEPS - 1 and entry["changed"]["train.log_every"] == [1, 2]
    assert set(entry["changed"]) == {"train.log_every", "workdir"}  # the copy moved it


def copy_of_finished_run(reference: Path, workdir: Path) -> dict[str, bytes]:
    """A copy of the reference run without its export (so a rerun would train again),
    and the bytes of every file in it, to show later that nothing moved or changed."""
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "hf")
    return files_in(workdir)


def files_in(workdir: Path) -> dict[str, bytes]:
    return {str(f.relative_to(workdir)): f.read_bytes() for f in workdir.rglob("*") if f.is_file()}


def test_resume_with_another_optimizer_structure_is_refused(policy, reference, tmp_path):
    workdir = tmp_path / "run"
    before = copy_of_finished_run(reference, workdir)
    code, log = finish(start("none", run_flags(policy, workdir) + ["--config.optim.grad_clip=0"]))
    assert code == 2, log[-3000:]
    (line,) = [x for x in log.splitlines() if x.startswith("error:")]
    assert f"cannot resume from {workdir}/checkpoints/{STEPS}" in line, line
    assert "optim.grad_clip (1.0 -> 0.0)" in line and "opt_state" in line, line
    assert "new config.workdir" in line and "Nothing was moved" in line, line
    assert files_in(workdir) == before  # checkpoints, metrics.jsonl, config.json untouched


def test_unreadable_checkpoint_stops_with_nothing_moved(policy, reference, tmp_path):
    workdir = tmp_path / "run"
    before = copy_of_finished_run(reference, workdir)
    unreadable = workdir / "checkpoints" / str(STEPS) / "state" / "_METADATA"
    code, log = finish(start("unreadable", run_flags(policy, workdir), FAULT_PATH=str(unreadable)))
    assert code == 1, log[-3000:]
    (line,) = [x for x in log.splitlines() if x.startswith("error:")]
    assert f"cannot read the checkpoint {workdir}/checkpoints/{STEPS}" in line, line
    assert f"Permission denied: '{unreadable}'" in line and "nothing was moved" in line, line
    assert files_in(workdir) == before


def test_only_undecodable_data_counts_as_damage():
    from jaxrlvr.runtime.checkpointing import _corruption

    def wrapped(inner: Exception) -> Exception:  # as Orbax wraps a failed tensorstore read
        outer = Exception("Encountered error while reading array index")
        outer.__cause__ = inner
        return outer

    damage = [
        ValueError('OUT_OF_RANGE: Error reading "step/.zarray": Requested byte range [0, 4562) '
                   "is not valid for value of size 16"),
        ValueError('DATA_LOSS: Error decoding local file "manifest.ocdbt"'),
        ValueError('FAILED_PRECONDITION: Error reading "params.embed.value/0.0": '
                   "ZSTD_decompressStream() failed: Unknown frame descriptor"),
        json.JSONDecodeError("Expecting value", "{", 1),
    ]  # fmt: skip
    for e in damage:
        assert _corruption(e) and _corruption(wrapped(e)), e
    not_damage = [
        PermissionError(13, "Permission denied", "/ckpt/5/state/_METADATA"),
        ValueError('PERMISSION_DENIED: Error opening file "/ckpt/5/state/d/ab": Permission denied'),
        ValueError('UNAVAILABLE: Error reading "gs://b/ckpt/5/state": Truncated response'),
        ValueError('NOT_FOUND: Error reading local file "/ckpt/5/state/d/ab"'),
        ValueError("Requested shape (3,) does not match the stored (2,)"),
        RuntimeError("Event loop is closed"),
    ]
    for e in not_damage:
        assert _corruption(e) is None and _corruption(wrapped(e)) is None, e


def test_refused_writes_stop_the_run_at_the_next_step(policy, tmp_path):
    flags = run_flags(policy, tmp_path, **{"train.checkpoint_every": 1, "train.eval_every": 0})
    code, log = finish(start("file_size_limit", flags))
    assert code == 1, log[-3000:]
    assert "error: saving the checkpoint of step 1" in log and "File too large" in log, log[-2000:]
    assert max(r["step"] for r in read_metrics(tmp_path)) < STEPS  # stopped early
    assert not (tmp_path / "checkpoints" / "1").exists()  # no half-written step is listed
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------ non-finite steps


def test_diverging_run_stops_and_saves_nothing(policy, tmp_path):
    flags = run_flags(policy, tmp_path, **{"optim.lr": 1e30, "train.checkpoint_every": 0})
    code, log = finish(start("none", flags))
    assert code == 1, log[-3000:]
    assert "3 consecutive steps" in log and "non-finite" in log
    rows = read_metrics(tmp_path)[1:]
    assert rows[-1]["skipped_steps"] == 3 and rows[-1]["skip_reason"]
    assert all(r["skipped_updates"] >= 1 for r in rows[-3:])
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------ start-up refusals


def cli(*flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [sys.executable, "-m", "jaxrlvr.train", *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_unknown_config_key_is_one_line_with_the_closest_keys():
    out = cli("--config=configs/clip_higher.py", "--config.algo.eps_hihg=0.3")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: --config.algo.eps_hihg: no such config key; closest:")
    assert "algo.eps_high" in line
    out = cli("--config=configs/clip_higher.py", "--config.algo.eps_high=abc")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "eps_high" in out.stderr


def test_show_config_prints_values_defaults_and_help():
    out = cli("--config=configs/clip_higher.py", "--show_config")
    assert out.returncode == 0, out.stderr
    lines = {line.split(" = ")[0].strip(): line for line in out.stdout.splitlines()}
    assert " ".join(lines["algo.eps_high"].split()).startswith(
        "algo.eps_high = 0.28 (default 0.2) # PPO upper clip"
    )
    assert lines["train.max_skipped_steps"].endswith("consecutive steps with non-finite "
                                                     "updates before the run stops")  # fmt: skip
    assert len(lines) == len(config_lib_keys())


def config_lib_keys() -> list[str]:
    from jaxrlvr.runtime.record import flatten

    return list(flatten(json.loads(config_lib.base_config("demo").to_json())))


def tiny_config(policy, workdir, **overrides):
    c = config_lib.base_config("demo")
    c.workdir, c.model.path = str(workdir), str(policy)
    c.data.train_files, c.data.eval_files = str(policy / "train.jsonl"), ""
    c.update_from_flattened_dict(overrides)
    return c


def test_start_up_refusals_name_the_fault(policy, tmp_path, monkeypatch):
    from jaxrlvr import train

    compiled = []
    monkeypatch.setattr(train, "load_hf_checkpoint", lambda *a, **k: compiled.append(1))

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(policy, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    for f in ("vocab.json", "merges.txt"):
        (no_tokenizer / f).unlink(missing_ok=True)
    cfg = tiny_config(no_tokenizer, tmp_path / "a")
    with pytest.raises(config_lib.ConfigError, match="no tokenizer files"):
        train.Trainer(cfg)

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(config_lib.ConfigError, match="config.workdir=.*cannot write there"):
        train.Trainer(tiny_config(policy, blocker / "run"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": \n')
    with pytest.raises(config_lib.ConfigError, match=r"config.data.train_files: .*bad.jsonl:2"):
        train.Trainer(tiny_config(policy, tmp_path / "b", **{"data.train_files": str(bad)}))

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 0, 1))
    with pytest.raises(
        config_lib.ConfigError, match=r"free on its disk, less than .* one checkpoint"
    ):
        train.Trainer(tiny_config(policy, tmp_path / "c"))
    assert not compiled  # every refusal came before the model was loaded


def test_epoch_schedule_within_one_epoch_warns():
    c = config_lib.base_config("demo")
    c.algo.intervention, c.algo.pos_adv.schedule = "pos_adv", "epoch"
    (warning,) = config_lib.inert_settings(c, num_epochs=1)
    assert "lambda = (e - 1) / (E - 1) is 0 throughout" in warning and "adv_neg_only" in warning
    assert config_lib.inert_settings(c, num_epochs=3) == []


# ------------------------------------------------------------------ the record


def test_a_fresh_start_keeps_no_old_rows(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for step in range(3):
        w.write(step, {"x": float(step)})
    w.close()
    MetricsWriter(str(tmp_path), resume_step=0).close()  # rerun without a checkpoint
    assert read_metrics(tmp_path) == [] or not read_metrics(tmp_path)
    w = MetricsWriter(str(tmp_path))
    for step in range(4):
        w.write(step, {"x": float(step)})
    w = MetricsWriter(str(tmp_path), resume_step=2)  # resume from the checkpoint of step 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2] and w.last_row["x"] == 2.0


def test_config_history_records_each_changed_resume(tmp_path):
    c = config_lib.base_config("demo")
    record_config(c, str(tmp_path), start_step=0)
    first = (tmp_path / "config.json").read_text()
    record_config(c, str(tmp_path), start_step=3)  # unchanged: nothing appended
    assert not (tmp_path / HISTORY_FILE).exists()
    c.optim.lr = 1e-4
    record_config(c, str(tmp_path), start_step=5)
    c.optim.lr = 5e-5
    record_config(c, str(tmp_path), start_step=8)
    history = [json.loads(x) for x in (tmp_path / HISTORY_FILE).read_text().splitlines()]
    assert [h["changed"] for h in history] == [
        {"optim.lr": [2e-4, 1e-4]},
        {"optim.lr": [1e-4, 5e-5]},
    ]
    assert (tmp_path / "config.json").read_text() == first


# ------------------------------------------------------------------ rewards


def hanging_check(response: str, answer: str) -> str:
    if response.startswith("hang"):
        time.sleep(600)
    return "ok" if response == answer else "wrong"


def test_reward_batch_limit_bounds_a_batch_of_hanging_answers():
    items = [("hang", "1")] * 6 + [("2", "2"), ("3", "4")]
    with CheckerPool(f"{THIS}:hanging_check", num_workers=2, timeout_s=5.0) as pool:
        pool.map([("1", "1")] * 2)  # start both workers
        t0 = time.monotonic()
        out = pool.map(items, batch_timeout_s=2.0)
        elapsed = time.monotonic() - t0
    statuses = [s for s, _ in out]
    assert 2.0 <= elapsed < 4.0, elapsed
    assert statuses[:6] == ["timeout"] * 6
    assert any("batch time limit" in d for _, d in out)
    assert set(statuses[6:]) <= {"ok", "wrong", "timeout"}


def test_checker_workers_die_with_a_killed_trainer(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from jaxrlvr.rewards.pool import CheckerPool
        pool = CheckerPool("{THIS}:hanging_check", num_workers=2, timeout_s=600)
        pool.map([("1", "1")] * 2)
        print(" ".join(str(w.proc.pid) for w in pool._workers), flush=True)
        pool.map([("hang", "1")] * 2)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in parent.stdout.readline().split()]
    assert len(workers) == 2
    time.sleep(0.5)  # both workers are now inside a hanging check
    parent.kill()  # kill -9: no cleanup code runs in the parent
    parent.wait()
    deadline = time.monotonic() + 5.0
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in workers if _alive(pid)]
        time.sleep(0.05)
    assert not alive, f"orphaned checker processes {alive}"


def test_kill_9_of_a_trainer_leaves_no_checker_running(policy, tmp_path):
    flags = run_flags(policy, tmp_path, **{"reward.name": "math", "reward.num_workers": 2})
    proc = start("none", flags)
    wait_for(rows_done(tmp_path, 1), proc)  # the math checkers have scored a batch

    def checkers() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == proc.pid and b"jaxrlvr.rewards.pool" in cmd:
                found.append(int(entry))
        return found

    workers = checkers()
    assert len(workers) == 2, workers
    proc.kill()  # kill -9 of the trainer itself
    proc.wait()
    deadline = time.monotonic() + 5.0
    while (alive := [p for p in workers if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"orphaned checker processes {alive}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_preflight_disk_estimate_counts_parameters_and_moments(policy):
    c = tiny_config(policy, "unused")
    params = 19_488  # the tiny policy (see its load log)
    assert preflight.checkpoint_bytes(c) == params * 4 * 3 + 2 * 4  # fp32 p, m, v; 2 counts
    assert math.isfinite(preflight.checkpoint_bytes(c))
