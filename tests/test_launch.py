"""`python -m jaxrlvr.launch` against a fake `gcloud` on PATH that records its calls, run
from a clone of a local bare repository given as `--repo` (no network)."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

FAKE_GCLOUD = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys, time
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    if "describe" in sys.argv:
        time.sleep(float(os.environ.get("FAKE_GCLOUD_DESCRIBE_S", "0")))
        path = os.environ["FAKE_GCLOUD_STATES"]
        every = json.load(open(path))  # a list of states, or one list per resource name
        name = sys.argv[sys.argv.index("describe") + 1]
        states = every[name] if isinstance(every, dict) else every
        state = states.pop(0) if len(states) > 1 else states[0]
        json.dump(every, open(path, "w"))
        if state == "NOT_FOUND":
            sys.stderr.write("ERROR: (gcloud) NOT_FOUND: resource not found\\n")
            sys.exit(1)
        print(state)
    """
)
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull}  # fmt: skip


def git(*args, cwd) -> str:
    env = dict(os.environ, **GIT_ENV)
    out = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def repo(tmp_path) -> tuple[Path, Path, str]:
    """(bare repository, a clean clone of it, the pushed commit)."""
    bare, work = tmp_path / "origin.git", tmp_path / "work"
    git("init", "-q", "--bare", str(bare), cwd=tmp_path)
    git("clone", "-q", str(bare), str(work), cwd=tmp_path)
    (work / "README").write_text("jaxrlvr\n")
    git("add", "README", cwd=work)
    git("commit", "-q", "-m", "one", cwd=work)
    git("push", "-q", "origin", "HEAD", cwd=work)
    return bare, work, git("rev-parse", "HEAD", cwd=work)


@pytest.fixture
def gcloud(tmp_path, repo):
    """Run the launcher with a fake gcloud answering `describe` with the given states."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
    fake.chmod(0o755)
    bare, work, commit = repo

    def run(states, *args, commit=commit, env_vars=None):
        log, state_file = tmp_path / "calls.jsonl", tmp_path / "states.json"
        log.write_text("")
        state_file.write_text(json.dumps(states))
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **GIT_ENV)
        env |= {"FAKE_GCLOUD_LOG": str(log), "FAKE_GCLOUD_STATES": str(state_file)}
        env |= env_vars or {}
        out = subprocess.run(
            [sys.executable, "-m", "jaxrlvr.launch", "tpu", "--name=rl", "--zone=us-east5-b",
             "--accelerator=v5p-64", f"--repo={bare}", "--poll_s=0",
             *([f"--commit={commit}"] if commit else []), *args],
            cwd=work, env=env, capture_output=True, text=True, timeout=30,
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
    assert re.search(r"git checkout -q --detach [0-9a-f]{40}\n", script)
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
        {"rl-0": ["NOT_FOUND", "ACTIVE"], "rl-1": ["NOT_FOUND", "ACTIVE"]},
        "--point=--config.seed=0", "--point=--config.seed=1", "--", "--config=configs/grpo.py",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    creates = [c for c in calls if "create" in c]
    assert [c[c.index("create") + 1] for c in creates] == ["rl-0", "rl-1"]
    scripts = [c[c.index("--command") + 1] for c in calls if "ssh" in c]
    assert "--config=configs/grpo.py --config.seed=0 >" in scripts[0]
    assert "--config=configs/grpo.py --config.seed=1 >" in scripts[1]


def test_every_slice_is_requested_before_any_wait(gcloud):
    """Point 0 never becomes ACTIVE: point 1 is still requested, started, and the timeout
    names the real time waited (each describe takes 0.3 s; --poll_s=0)."""
    t0 = time.monotonic()
    out, calls = gcloud(
        {"rl-0": ["NOT_FOUND", "WAITING_FOR_RESOURCES"],
         "rl-1": ["NOT_FOUND", "PROVISIONING", "ACTIVE"]},
        "--wait_s=1", "--point=--config.seed=0", "--point=--config.seed=1",
        env_vars={"FAKE_GCLOUD_DESCRIBE_S": "0.3"},
    )  # fmt: skip
    wall = time.monotonic() - t0
    assert out.returncode == 1, out.stderr
    named = [(v, c[c.index(v) + 1]) for v, c in zip(verbs(calls), calls, strict=True)]
    assert named[:4] == [("describe", "rl-0"), ("create", "rl-0"),
                         ("describe", "rl-1"), ("create", "rl-1")]  # fmt: skip
    assert ("ssh", "rl-1") in named and ("ssh", "rl-0") not in named
    assert "error: 1 of 2 points failed, 1 started: queued resource rl-0 still" in out.stderr
    waited = int(re.search(r"WAITING_FOR_RESOURCES after (\d+) s", out.stderr).group(1))
    assert 1 <= waited <= wall + 0.5


def test_one_failing_point_does_not_stop_the_others(gcloud):
    out, calls = gcloud(
        {"rl-0": ["NOT_FOUND", "FAILED"], "rl-1": ["NOT_FOUND", "ACTIVE"],
         "rl-2": ["ACTIVE"]},
        *(f"--point=--config.seed={i}" for i in range(3)),
    )  # fmt: skip
    assert out.returncode == 1
    started = [c[c.index("ssh") + 1] for c in calls if "ssh" in c]
    assert started == ["rl-1", "rl-2"]
    assert "1 of 3 points failed, 2 started: queued resource rl-0 became FAILED" in out.stderr


def test_a_commit_not_on_the_repo_is_refused_before_any_gcloud_call(gcloud, repo):
    out, calls = gcloud(["ACTIVE"], commit="0123abcd")
    assert out.returncode == 2 and calls == []
    assert out.stderr.startswith("error: --commit=0123abcd: no such commit on a branch or tag")
    assert len(out.stderr.strip().splitlines()) == 1
    _, work, _ = repo
    (work / "new.py").write_text("x = 1\n")
    git("add", "new.py", cwd=work)
    git("commit", "-q", "-m", "not pushed", cwd=work)
    out, calls = gcloud(["ACTIVE"], commit=None)  # HEAD: committed here, never pushed
    assert out.returncode == 2 and calls == [] and "push it first" in out.stderr


def test_uncommitted_changes_are_named_in_a_warning(gcloud, repo):
    _, work, commit = repo
    (work / "README").write_text("edited\n")
    (work / "notes.py").write_text("y = 2\n")
    out, calls = gcloud(["ACTIVE"])
    assert out.returncode == 0 and verbs(calls) == ["describe", "describe", "ssh"]
    assert (
        f"warning: uncommitted changes here will not run (README, notes.py): the TPU VMs "
        f"run commit {commit[:12]}" in out.stderr
    )
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "two", cwd=work)
    git("push", "-q", "origin", "HEAD", cwd=work)
    out, calls = gcloud(["ACTIVE"], commit=None)  # clean and pushed: no warning
    assert out.returncode == 0 and "warning" not in out.stderr


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


def test_slurm_script_quotes_every_user_value(tmp_path):
    """A log dir with a space and `$(...)`: one argument of srun, nothing executed."""
    project = tmp_path / "project"
    (project / ".venv" / "bin").mkdir(parents=True)
    (project / ".venv" / "bin" / "activate").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    srun.chmod(0o755)
    log_dir = f"{tmp_path}/my logs/$(touch pwned)"
    out = subprocess.run(
        [sys.executable, "-m", "jaxrlvr.launch", "slurm", "--nodes=1", f"--log_dir={log_dir}",
         "--job_name=rl run", f"--project_dir={project}", f"--out={tmp_path / 'job.sbatch'}",
         "--", "--config.workdir=/runs/a b"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    script = (tmp_path / "job.sbatch").read_text()
    assert "#SBATCH --job-name='rl run'" in script
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    ran = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    argv = json.loads(ran.stdout)
    assert argv[0] == f"--output={log_dir}/%x-%j-%t.log"
    assert argv[-1] == "--config.workdir=/runs/a b"
    assert not list(tmp_path.rglob("pwned"))
