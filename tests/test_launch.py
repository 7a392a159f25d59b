"""`python -m jaxrlvr.launch` against a fake `gcloud` on PATH that records its calls."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

FAKE_GCLOUD = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    if "describe" in sys.argv:
        path = os.environ["FAKE_GCLOUD_STATES"]
        states = json.load(open(path))
        state = states.pop(0) if len(states) > 1 else states[0]
        json.dump(states, open(path, "w"))
        if state == "NOT_FOUND":
            sys.stderr.write("ERROR: (gcloud) NOT_FOUND: resource not found\\n")
            sys.exit(1)
        print(state)
    """
)


@pytest.fixture
def gcloud(tmp_path):
    """Run the launcher with a fake gcloud answering `describe` with the given states."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
    fake.chmod(0o755)

    def run(states, *args):
        log, state_file = tmp_path / "calls.jsonl", tmp_path / "states.json"
        log.write_text("")
        state_file.write_text(json.dumps(states))
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
        env |= {"FAKE_GCLOUD_LOG": str(log), "FAKE_GCLOUD_STATES": str(state_file)}
        out = subprocess.run(
            [sys.executable, "-m", "jaxrlvr.launch", "tpu", "--name=rl", "--zone=us-east5-b",
             "--accelerator=v5p-64", "--repo=https://example.org/jaxrlvr.git",
             "--commit=0123abcd", "--poll_s=0", *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return out, calls

    return run


def verbs(calls):
    """('describe' | 'create' | 'delete' | 'ssh', ...) of each recorded call."""
    return [next(a for a in c if a in ("describe", "create", "delete", "ssh")) for c in calls]


def test_creates_waits_then_starts_detached_jobs(gcloud):
    out, calls = gcloud(
        ["NOT_FOUND", "WAITING_FOR_RESOURCES", "ACTIVE"], "--", "--config=configs/steer.py"
    )
    assert out.returncode == 0, out.stderr
    assert verbs(calls) == ["describe", "create", "describe", "describe", "ssh"]
    create = calls[1]
    assert create[create.index("--accelerator-type") + 1] == "v5p-64"
    ssh = calls[-1]
    assert "--worker=all" in ssh
    script = ssh[ssh.index("--command") + 1]
    assert "git checkout -q --detach 0123abcd" in script
    assert "pip install -q -e '.[tpu]'" in script
    assert "nohup python -m jaxrlvr.train --distributed --config=configs/steer.py" in script
    assert "> logs/rl-$(hostname).log 2>&1 < /dev/null &" in script
    assert "tail -n 40 -f jaxrlvr/logs/rl-*.log" in out.stdout


def test_rerun_after_preemption_recreates_the_slice(gcloud):
    out, calls = gcloud(["SUSPENDED", "PROVISIONING", "ACTIVE"])  # no train args at all
    assert out.returncode == 0, out.stderr
    assert verbs(calls) == ["describe", "delete", "create", "describe", "describe", "ssh"]
    assert "SUSPENDED (preempted or failed): deleting, recreating" in out.stdout


def test_active_slice_is_reused(gcloud):
    out, calls = gcloud(["ACTIVE"])
    assert out.returncode == 0 and verbs(calls) == ["describe", "describe", "ssh"]


def test_failed_or_stuck_slices_exit_non_zero(gcloud):
    out, calls = gcloud(["NOT_FOUND", "FAILED"])
    assert out.returncode == 1 and "ssh" not in verbs(calls)
    assert "became FAILED while waiting" in out.stderr
    out, calls = gcloud(["NOT_FOUND", "WAITING_FOR_RESOURCES"], "--wait_s=0")
    assert out.returncode == 1 and "still WAITING_FOR_RESOURCES after 0 s" in out.stderr


def test_dry_run_touches_nothing(gcloud):
    out, calls = gcloud(["ACTIVE"], "--dry_run", "--", "--config=configs/grpo.py")
    assert out.returncode == 0 and calls == []
    assert "$ gcloud compute tpus queued-resources create rl" in out.stdout
    assert "$ gcloud compute tpus tpu-vm ssh rl" in out.stdout


def test_sweep_points_get_a_slice_each(gcloud):
    out, calls = gcloud(
        ["NOT_FOUND", "ACTIVE", "NOT_FOUND", "ACTIVE"],
        "--point=--config.seed=0", "--point=--config.seed=1", "--", "--config=configs/grpo.py",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    creates = [c for c in calls if "create" in c]
    assert [c[c.index("create") + 1] for c in creates] == ["rl-0", "rl-1"]
    scripts = [c[c.index("--command") + 1] for c in calls if "ssh" in c]
    assert "--config=configs/grpo.py --config.seed=0 >" in scripts[0]
    assert "--config=configs/grpo.py --config.seed=1 >" in scripts[1]


def test_slurm_script_for_two_nodes_of_eight_gpus(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jaxrlvr.launch", "slurm", "--nodes=2", "--gpus_per_node=8",
         "--project_dir=/shared/jaxrlvr", f"--out={tmp_path / 'job.sbatch'}", "--",
         "--config=configs/steer.py:qwen2.5-math-7b", "--config.workdir=/shared/runs/steer"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    script = (tmp_path / "job.sbatch").read_text().splitlines()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "cd /shared/jaxrlvr",
    ):
        assert line in script
    (srun,) = [line for line in script if line.startswith("srun ")]
    assert srun.endswith(
        "python -m jaxrlvr.train --distributed --config=configs/steer.py:qwen2.5-math-7b "
        "--config.workdir=/shared/runs/steer"
    )
