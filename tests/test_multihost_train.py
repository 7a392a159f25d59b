"""`python -m jaxrlvr.train` as 2 processes x 4 CPU devices on one global mesh.

Each run is compared with a single process on 8 devices, same config and mesh shape:
the metrics of every step agree to 1e-5. One pair is killed after its first checkpoint,
restarted, resumes and exports.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import portpicker
import pytest
from tiny_policy import write_tiny_policy

from jaxrlvr.runtime.metrics import read_metrics

COMPARED = ("reward_mean", "entropy", "loss", "grad_norm", "approx_kl", "kl", "eval_avg@2")


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_tiny_policy(tmp_path_factory.mktemp("policy"))


def train_args(policy, workdir, mesh: str) -> list[str]:
    return [
        sys.executable, "-m", "jaxrlvr.train", "--config=configs/grpo.py",
        f"--config.model.path={policy}",
        f"--config.data.train_files={policy / 'train.jsonl'}",
        f"--config.data.eval_files={policy / 'eval.jsonl'}",
        f"--config.workdir={workdir}", f"--config.mesh.shape={mesh}",
        "--config.rollout.n=4", "--config.rollout.max_new_tokens=12",
        "--config.rollout.max_slots=16", "--config.data.max_prompt_len=16",
        "--config.train.steps=3", "--config.train.prompts_per_step=4",
        "--config.train.mini_batch_prompts=2", "--config.train.micro_batch_sequences=8",
        "--config.train.eval_every=2", "--config.train.eval_n=2",
        "--config.train.eval_max_prompts=4", "--config.train.checkpoint_every=1",
        "--config.train.progress=False", "--config.reward.num_workers=1",
        "--config.algo.entropy_coef=0.05", "--config.algo.kl_coef=0.05",
    ]  # fmt: skip


def env(devices: int) -> dict:
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )


def start_pair(args: list[str], env_of: dict[int, dict] | None = None) -> list[subprocess.Popen]:
    """Both processes of a run; `env_of[i]` adds variables to process i's environment."""
    coordinator = f"localhost:{portpicker.pick_unused_port()}"
    return [
        subprocess.Popen(
            [
                *args,
                f"--coordinator_address={coordinator}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            env=env(4) | (env_of or {}).get(i, {}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 400) -> list[str]:
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs


def assert_same_metrics(reference, other):
    a, b = read_metrics(reference), read_metrics(other)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in COMPARED:
            if key in ra:
                np.testing.assert_allclose(
                    rb[key], ra[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} at {ra['step']}"
                )
    assert a[-1]["grad_norm"] > 0


@pytest.mark.parametrize("mesh", ["(1,4,2)", "(2,2,2)"])
def test_two_processes_match_one(policy, tmp_path, mesh):
    ref = tmp_path / "one"
    out = subprocess.run(
        train_args(policy, ref, mesh), env=env(8), capture_output=True, text=True, timeout=400
    )
    assert out.returncode == 0, out.stderr[-3000:]

    pair = tmp_path / "two"
    if mesh == "(1,4,2)":
        finish(start_pair(train_args(policy, pair, mesh)))
    else:  # killed after its first checkpoint, restarted: resumes, finishes, exports
        procs = start_pair(train_args(policy, pair, mesh))
        first = pair / "checkpoints" / "1"
        deadline = time.time() + 300
        while not first.exists() and time.time() < deadline and procs[1].poll() is None:
            time.sleep(0.05)
        assert first.exists(), procs[1].communicate()[0][-3000:]
        procs[1].send_signal(signal.SIGKILL)
        time.sleep(2)
        procs[0].kill()
        for p in procs:
            p.communicate()
        assert not (pair / "hf").exists()  # the run did not finish
        outputs = finish(start_pair(train_args(policy, pair, mesh)))
        assert "resumed from" in outputs[0]
    assert_same_metrics(ref, pair)
    assert (pair / "hf" / "model.safetensors").exists()
    assert json.loads((pair / "config.json").read_text())["mesh"]["shape"] == list(eval(mesh))


def test_bad_process_setups_fail_in_one_line(policy, tmp_path):
    args = train_args(policy, tmp_path / "run", "(1,4,4)")  # 16 devices; the pair has 8
    outputs = [o.strip().splitlines()[-1] for o in _run_pair_expecting_failure(args)]
    assert all(o.startswith("error: config.mesh.shape=") for o in outputs), outputs
    assert all("needs 16 devices, have 8" in o for o in outputs), outputs
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    lonely = subprocess.run(
        [*train_args(policy, tmp_path / "x", "(1,4,1)"),
         f"--coordinator_address=localhost:{portpicker.pick_unused_port()}",
         "--num_processes=2", "--process_id=1", "--distributed_timeout_s=5"],
        env=env(4), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert lonely.returncode == 2
    assert lonely.stderr.strip().splitlines()[-1].startswith("error: could not join the run at")


def _run_pair_expecting_failure(args) -> list[str]:
    procs = start_pair(args)
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 2 for p in procs), outputs
    return outputs


def stop_lines_with_a_fault_on_process_1(policy, run: Path, fault: str) -> tuple[Path, list]:
    """Train one step and checkpoint it (one process), then resume with both processes,
    process 1 under `fault` on the checkpoint's tree metadata: both must exit 1 with one
    `error:` line each and leave every file where it was. Returns the faulted file and
    the error lines."""
    args = train_args(policy, run, "(1,4,2)")
    one_step = [*args, "--config.train.steps=1", "--config.train.eval_every=0"]
    out = subprocess.run(one_step, env=env(8), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    faulted = run / "checkpoints" / "1" / "state" / "_METADATA"
    runner = [sys.executable, str(Path(__file__).parent / "fault_runner.py"), fault]
    procs = start_pair([*runner, *one_step[3:]], env_of={1: {"FAULT_PATH": str(faulted)}})
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    lines = []
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 1, output[-3000:]
        (line,) = [x for x in output.splitlines() if x.startswith("error:")]
        lines.append(line)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    return faulted, lines


def test_a_checkpoint_one_process_cannot_read_stops_both(policy, tmp_path):
    """Process 1 cannot open a file of the newest checkpoint, process 0 can: both exit
    with process 1's error (no hang), and the checkpoint stays where it is."""
    run = tmp_path / "run"
    unreadable, lines = stop_lines_with_a_fault_on_process_1(policy, run, "unreadable")
    for line in lines:
        assert line.startswith(
            f"error: cannot read the checkpoint {run}/checkpoints/1 (process 1"
        ), line
        assert f"Permission denied: '{unreadable}'" in line, line


def test_processes_that_disagree_about_a_checkpoint_move_nothing(policy, tmp_path):
    """Process 1 reads garbage for the newest checkpoint's metadata (a damaged copy of its
    own), process 0 reads it whole: a step is set aside only when every process finds it
    damaged, so both stop with the same error and the checkpoint stays where it is."""
    run = tmp_path / "run"
    _, lines = stop_lines_with_a_fault_on_process_1(policy, run, "garbled")
    for line in lines:
        assert line.startswith(
            f"error: the processes disagree about the checkpoint {run}/checkpoints/1: "
            "process 1 finds it damaged ("
        ), line
        assert line.endswith("process 0 reads it; nothing was moved"), line
