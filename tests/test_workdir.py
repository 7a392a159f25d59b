"""One run per workdir, URL workdirs refused, and progress that suits a log file.

Command-line runs (`python -m jaxrlvr.train`, the tiny random policy, 1-2 steps): a second
run on a busy workdir is refused naming the holder, a lock left by a `kill -9` is taken
over, a `gs://` workdir is refused before anything is created, and a run whose output
goes to a file (the rerun after the `kill -9`) logs its rate and ETA without
progress-bar frames.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_policy import write_tiny_policy

from jaxrlvr import config as config_lib
from jaxrlvr.rl import preflight
from jaxrlvr.runtime.metrics import read_metrics
from jaxrlvr.runtime.workdir_lock import LOCK_FILE, WorkdirLock

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")

# `jaxrlvr.train` whose step 2 waits until the file `$GATE` exists (creating
# `$GATE.waiting` first), so a test can act while the run holds its workdir.
GATED_TRAIN = """
import os, sys, time
from absl import app
from jaxrlvr import train

collect = train.Trainer.collect

def gated(self, step):
    if step == 2:
        open(os.environ["GATE"] + ".waiting", "w").close()
        deadline = time.monotonic() + 300
        while not os.path.exists(os.environ["GATE"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    return collect(self, step)

train.Trainer.collect = gated
train.define_flags()
app.run(train.main, argv=sys.argv, flags_parser=train.parse_flags)
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    return write_tiny_policy(tmp_path_factory.mktemp("policy"))


def run_flags(policy: Path, workdir, steps: int = 2, **overrides) -> list[str]:
    """A short run of the tiny policy: no evaluation, one checkpoint at the end."""
    values = {
        "workdir": workdir, "model.path": policy, "data.train_files": policy / "train.jsonl",
        "data.eval_files": "", "train.eval_every": 0, "rollout.n": 4,
        "rollout.max_new_tokens": 8, "rollout.max_slots": 8, "train.steps": steps,
        "train.prompts_per_step": 2, "train.mini_batch_prompts": 2,
        "train.micro_batch_sequences": 8, "train.checkpoint_every": 0,
        "optim.warmup_steps": 0,
    } | overrides  # fmt: skip
    return [f"--config={REPO / 'configs' / 'grpo.py'}"] + [
        f"--config.{k}={v}" for k, v in values.items()
    ]


def train_cli(*flags: str, cwd: Path = REPO, **kwargs) -> subprocess.CompletedProcess:
    kwargs = {"timeout": 300} | kwargs
    return subprocess.run(
        [sys.executable, "-m", "jaxrlvr.train", *flags], cwd=cwd, env=ENV, text=True, **kwargs
    )


def start_gated(flags: list[str], gate: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", GATED_TRAIN, *flags], cwd=REPO, env=dict(ENV, GATE=str(gate)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {path}"
        time.sleep(0.05)


def test_busy_workdir_refused_and_a_killed_runs_lock_taken_over(policy, tmp_path):
    """A second run on a busy workdir is refused with the holder's host and pid (both
    used to exit 0 with every step twice in `metrics.jsonl`). After a `kill -9` of the
    holder the rerun takes the stale lock over; its output goes to a file, as under
    `nohup ... > train.log 2>&1`: no progress-bar frames, a rate and ETA per step."""
    workdir, gate, log_file = tmp_path / "run", tmp_path / "gate", tmp_path / "train.log"
    first = start_gated(run_flags(policy, workdir), gate)
    try:
        wait_for(Path(f"{gate}.waiting"), first)  # step 1 is logged, step 2 waits
        second = train_cli(*run_flags(policy, workdir), capture_output=True)
    finally:
        first.kill()  # kill -9: the lock file stays
        first.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = second.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"error: config.workdir={str(workdir)!r}: in use by the run of host")
    assert f"host {socket.gethostname()} pid {first.pid} " in line, line
    assert [r["step"] for r in read_metrics(workdir)] == [1]  # the first run's only
    assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == first.pid
    with open(log_file, "w") as f:
        flags = run_flags(policy, workdir, **{"train.progress": True})
        out = train_cli(*flags, stdout=f, stderr=subprocess.STDOUT)
    log = log_file.read_text()
    assert out.returncode == 0, log[-3000:]
    assert f"taking over the stale lock of the run of host {socket.gethostname()} " in log
    assert f"pid {first.pid} " in log
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]  # each step once
    assert not (workdir / LOCK_FILE).exists()  # released at the end
    assert "\r" not in log, log[-3000:]  # no tqdm frames
    for step, eta in ((1, r"\d+s"), (2, "0s")):
        assert re.search(rf"^step {step}/2 \| [\d.e+-]+ s/step \| ETA {eta} \| ", log, re.M), log


def test_url_workdir_is_refused_before_anything_is_created(policy, tmp_path):
    out = train_cli(
        *run_flags(policy, "gs://b/x", steps=1), cwd=tmp_path, capture_output=True, timeout=120
    )
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: config.workdir='gs://b/x': a gs:// URL, not a path"), line
    assert "gcsfuse --implicit-dirs BUCKET /mnt/BUCKET" in line
    assert list(tmp_path.iterdir()) == []  # no local `gs:` directory


@pytest.mark.parametrize("path", ["s3://b/run", "file:///tmp/run", "GS://B"])
def test_check_local_path_refuses_any_url(path):
    with pytest.raises(config_lib.ConfigError, match=r"config.workdir=.*URL, not a path"):
        preflight.check_local_path("config.workdir", path)


@pytest.mark.parametrize("path", ["runs/a", "/mnt/b/run", "runs/x://y", "gs:/b"])
def test_check_local_path_passes_paths(path):
    assert preflight.check_local_path("config.workdir", path) is None


def test_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    other = {"host": "not-" + socket.gethostname(), "pid": 1, "started": "2026-01-01T00:00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(config_lib.ConfigError) as e:
        WorkdirLock.acquire(str(tmp_path))
    assert f"host not-{socket.gethostname()} pid 1 " in str(e.value)
    assert f"remove {tmp_path / LOCK_FILE} and rerun" in str(e.value)
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == other  # left as it was


def test_released_lock_leaves_a_newer_holder_alone(tmp_path):
    lock = WorkdirLock.acquire(str(tmp_path))
    with pytest.raises(config_lib.ConfigError, match=f"pid {os.getpid()} "):
        WorkdirLock.acquire(str(tmp_path))  # this process holds it: still busy
    (tmp_path / LOCK_FILE).unlink()  # removed by hand, and another run took it
    newer = WorkdirLock.acquire(str(tmp_path))
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == newer.holder
    newer.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    lock = WorkdirLock.acquire(str(tmp_path))
    holder = dict(lock.holder, proc_start=lock.holder["proc_start"] - 1)  # same pid, other start
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
    taken = WorkdirLock.acquire(str(tmp_path))
    assert taken.holder["proc_start"] == lock.holder["proc_start"]
    taken.release()
