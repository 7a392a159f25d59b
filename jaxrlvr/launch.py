"""Launch training on a Cloud TPU slice or a SLURM GPU cluster.

    python -m jaxrlvr.launch tpu --name=rlvr-7b --zone=us-east5-b --accelerator=v5p-64 \\
        --repo=https://github.com/ORG/jaxrlvr.git [--commit=SHA] [--spot] [--dry_run] \\
        -- --config=configs/steer.py:qwen2.5-math-7b --config.workdir=/mnt/runs/steer-7b
    python -m jaxrlvr.launch slurm --nodes=2 --gpus_per_node=8 [--submit] \\
        -- --config=configs/steer.py:qwen2.5-math-7b --config.workdir=/shared/runs/steer-7b

TPU: first checks that the commit to run is on a branch or tag of `--repo` (the VMs
clone it; a commit only here would fail on every worker) and warns about uncommitted
changes here, which will not run. Then it requests the queued resource (or reuses an
ACTIVE one; deletes and recreates one left FAILED or SUSPENDED by a preemption), waits
for it with a time limit, and on every worker checks out the exact commit (detached),
installs `.[tpu]` and starts `python -m jaxrlvr.train --distributed ...` under `nohup`, so
the job outlives the ssh session, with one log per worker; it prints the command that
tails the logs. Several `--point="..."` argument sets start one job each, on slices of
their own (NAME-0, NAME-1, ...): every queued resource is requested before any is waited
for, each job starts as soon as its slice is ACTIVE, and a point that fails does not stop
the others. `--dry_run` prints every gcloud command and runs none.

SLURM: renders an sbatch script (one process per node, `jax.distributed` through SLURM's
environment; every user value shell-quoted) and with `--submit` hands it to `sbatch`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Queued-resource states (`gcloud compute tpus queued-resources describe`).
READY = "ACTIVE"
BROKEN = ("FAILED", "SUSPENDED", "SUSPENDING")
PENDING = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING")


class LaunchError(RuntimeError):
    """The launch cannot go on; the message says why and what to do."""


class StartupError(LaunchError):
    """Refused before any gcloud call (exit 2): the input itself is wrong."""


@dataclass
class Gcloud:
    """Runs (or, dry, only prints) gcloud commands; records them either way."""

    dry_run: bool = False
    echo: Callable[[str], None] = print
    calls: list[list[str]] = field(default_factory=list)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = ["gcloud", *args]
        self.calls.append(cmd)
        self.echo("$ " + shlex.join(cmd))
        if self.dry_run:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.run(cmd, capture_output=True, text=True)

    def __call__(self, *args: str) -> str:
        out = self.run(*args)
        if out.returncode != 0:
            last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
            raise LaunchError(
                f"`{shlex.join(out.args[:6])} ...` failed (exit {out.returncode}) {last}"
            )
        return out.stdout.strip()


@dataclass
class TpuJob:
    name: str
    zone: str
    accelerator: str
    repo: str
    commit: str
    train_args: list[str]
    runtime: str = "v2-alpha-tpuv5"
    spot: bool = False
    mount_cmd: str = ""
    wait_s: float = 3600.0
    poll_s: float = 30.0
    project_dir: str = "jaxrlvr"

    def qr(self, *args: str) -> list[str]:
        return ["compute", "tpus", "queued-resources", *args, "--zone", self.zone]

    def state(self, gcloud: Gcloud) -> str | None:
        """The queued resource's state, or None when there is none."""
        out = gcloud.run(*self.qr("describe", self.name), "--format=value(state.state)")
        if out.returncode != 0:
            if "not_found" in out.stderr.lower() or "not found" in out.stderr.lower():
                return None
            raise LaunchError(f"cannot describe queued resource {self.name}: {out.stderr.strip()}")
        return out.stdout.strip() or None

    def create(self, gcloud: Gcloud) -> None:
        args = self.qr("create", self.name)
        args += ["--node-id", self.name, "--accelerator-type", self.accelerator]
        args += ["--runtime-version", self.runtime]
        gcloud(*args, *(["--spot"] if self.spot else []))

    def request(self, gcloud: Gcloud) -> None:
        """Ask for the slice without waiting: reuse it, recreate it after a preemption or
        failure, or create it."""
        state = self.state(gcloud)
        if state in BROKEN:
            gcloud.echo(f"{self.name} is {state} (preempted or failed): deleting, recreating")
            gcloud(*self.qr("delete", self.name), "--force", "--quiet")
            state = None
        if state is None:
            self.create(gcloud)

    def check_ready(self, gcloud: Gcloud, waited_s: float) -> bool:
        """Whether the slice is ACTIVE; raises when it broke or `wait_s` has passed."""
        state = self.state(gcloud)
        if state == READY:
            return True
        if state in BROKEN:
            raise LaunchError(
                f"queued resource {self.name} became {state} while waiting; rerun to "
                "recreate it, or check quota and zone"
            )
        if waited_s >= self.wait_s:
            raise LaunchError(
                f"queued resource {self.name} still {state} after {waited_s:.0f} s; "
                "it stays queued: rerun later to keep waiting, or delete it"
            )
        return False

    def worker_script(self) -> str:
        """What every worker runs: the exact commit, `.[tpu]`, the job under nohup."""
        d, name = shlex.quote(self.project_dir), shlex.quote(self.name)
        train = shlex.join(["python", "-m", "jaxrlvr.train", "--distributed", *self.train_args])
        lines = [
            "set -euo pipefail",
            self.mount_cmd or "true",  # a shell command by design
            f"[ -d {d}/.git ] || git clone -q {shlex.quote(self.repo)} {d}",
            f"cd {d}",
            f"git fetch -q origin && git checkout -q --detach {shlex.quote(self.commit)}",
            "[ -d .venv ] || python3 -m venv .venv",
            ". .venv/bin/activate",
            "pip install -q -e '.[tpu]'",
            "mkdir -p logs",
            f"nohup {train} > logs/{name}-$(hostname).log 2>&1 < /dev/null &",
            f"echo started on $(hostname): {d}/logs/{name}-$(hostname).log",
        ]
        return "\n".join(lines)

    def start(self, gcloud: Gcloud) -> None:
        ssh = ["compute", "tpus", "tpu-vm", "ssh", self.name, "--zone", self.zone]
        gcloud(*ssh, "--worker=all", "--command", self.worker_script())

    def tail_command(self) -> str:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, "--zone", self.zone]
        logs = f"{shlex.quote(self.project_dir)}/logs/{shlex.quote(self.name)}-*.log"
        tail = f"tail -n 40 -f {logs}"
        return shlex.join([*cmd, "--worker=all", "--command", tail])


def git(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def git_head() -> str:
    out = git("rev-parse", "HEAD")
    if out.returncode != 0:
        raise StartupError("--commit not given and `git rev-parse HEAD` failed; pass --commit=SHA")
    return out.stdout.strip()


def check_commit(repo: str, commit: str) -> str:
    """The full SHA of `commit` as the VMs will see it: a commit on a branch or tag of
    `repo` (they clone it and check the commit out). Fetches the commit graph only (no
    file contents) into a temporary repository; raises `StartupError` if it is not there."""
    with tempfile.TemporaryDirectory(prefix="jaxrlvr-launch-") as tmp:
        out = git("clone", "--quiet", "--bare", "--filter=tree:0", repo, tmp)
        if out.returncode != 0:
            last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
            raise StartupError(
                f"--repo={repo}: cannot clone it from here to check --commit ({last}); "
                "pass --no-check_commit if only the TPU VMs can reach it"
            )
        found = git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}", cwd=tmp)
        if found.returncode != 0:
            raise StartupError(
                f"--commit={commit}: no such commit on a branch or tag of --repo={repo}; "
                "push it first (the TPU VMs clone --repo and check the commit out)"
            )
        return found.stdout.strip()


def uncommitted_files(limit: int = 10) -> str | None:
    """The files with uncommitted changes in the git work tree here, or None if clean
    (or not a work tree)."""
    out = git("status", "--porcelain", "--untracked-files=normal")
    if out.returncode != 0 or not out.stdout.strip():
        return None
    files = [line[3:] for line in out.stdout.splitlines() if line.strip()]
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(files[:limit]) + more


def launch_tpu(args: argparse.Namespace, train_args: list[str], gcloud: Gcloud) -> list[TpuJob]:
    """Request every point's slice, then wait for them together, starting each job as
    soon as its slice is ACTIVE. Returns the started jobs; raises `LaunchError` naming
    every point that failed (after the others were started)."""
    commit = args.commit or git_head()
    if args.check_commit:
        commit = check_commit(args.repo, commit)
    if (changed := uncommitted_files()) is not None:
        print(
            f"warning: uncommitted changes here will not run ({changed}): the TPU VMs run "
            f"commit {commit[:12]} of {args.repo}",
            file=sys.stderr,
        )
    points = [shlex.split(p) for p in args.point] or [[]]
    jobs = [
        TpuJob(
            name=args.name if len(points) == 1 else f"{args.name}-{i}",
            zone=args.zone,
            accelerator=args.accelerator,
            repo=args.repo,
            commit=commit,
            train_args=[*train_args, *point],
            runtime=args.runtime,
            spot=args.spot,
            mount_cmd=args.mount_cmd,
            wait_s=args.wait_s,
            poll_s=args.poll_s,
        )
        for i, point in enumerate(points)
    ]
    failed: dict[str, str] = {}
    waiting = []
    for job in jobs:
        try:
            job.request(gcloud)
            waiting.append(job)
        except LaunchError as e:
            failed[job.name] = str(e)
            gcloud.echo(f"{job.name} failed: {e}")
    started = []
    t0 = time.monotonic()
    while waiting:
        for job in list(waiting):
            try:
                if not (gcloud.dry_run or job.check_ready(gcloud, time.monotonic() - t0)):
                    continue
                waiting.remove(job)
                job.start(gcloud)
                gcloud.echo(f"logs: {job.tail_command()}")
                started.append(job)
            except LaunchError as e:
                if job in waiting:
                    waiting.remove(job)
                failed[job.name] = str(e)
                gcloud.echo(f"{job.name} failed: {e}")
        if waiting:
            time.sleep(args.poll_s)
    if failed:
        if len(jobs) == 1:
            raise LaunchError(failed[jobs[0].name])
        raise LaunchError(
            f"{len(failed)} of {len(jobs)} points failed, {len(started)} started: "
            + "; ".join(failed.values())
        )
    return started


def slurm_script(args: argparse.Namespace, train_args: Sequence[str]) -> str:
    """An sbatch script: one process per node, `jax.distributed` from SLURM's environment."""
    q = shlex.quote  # sbatch reads #SBATCH values with the shell's quoting too
    train = shlex.join(["python", "-m", "jaxrlvr.train", "--distributed", *train_args])
    log_file = q(f"{args.log_dir}/%x-%j-%t.log")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={q(args.job_name)}",
        f"#SBATCH --nodes={args.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        f"#SBATCH --cpus-per-task={args.cpus_per_task}",
        f"#SBATCH --time={q(args.time)}",
        f"#SBATCH --output={log_file}",
        *([f"#SBATCH --partition={q(args.partition)}"] if args.partition else []),
        "set -euo pipefail",
        f"cd {q(args.project_dir)}",
        ". .venv/bin/activate  # pip install -e '.[cuda]' on the shared file system",
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",
        f"srun --output={log_file} {train}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m jaxrlvr.launch", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="target", required=True)
    t = sub.add_parser("tpu", help="a Cloud TPU slice through a queued resource")
    t.add_argument("--name", required=True)
    t.add_argument("--zone", required=True)
    t.add_argument("--accelerator", required=True, help="e.g. v5p-64, v5litepod-32")
    t.add_argument("--repo", required=True, help="git URL of this repository the VMs can clone")
    t.add_argument("--commit", default=None, help="exact commit to run (default: git HEAD)")
    t.add_argument(
        "--check_commit", action=argparse.BooleanOptionalAction, default=True,
        help="check before any gcloud call that --commit is on a branch or tag of --repo "
        "(clones its commit graph); --no-check_commit where only the VMs can reach --repo",
    )  # fmt: skip
    t.add_argument("--runtime", default="v2-alpha-tpuv5")
    t.add_argument("--spot", action="store_true")
    t.add_argument("--mount_cmd", default="", help="shell command that mounts shared storage")
    t.add_argument("--wait_s", type=float, default=3600.0, help="time limit for ACTIVE")
    t.add_argument("--poll_s", type=float, default=30.0, help="seconds between state checks")
    t.add_argument("--point", action="append", default=[], help="one sweep point's train args")
    t.add_argument("--dry_run", action="store_true", help="print the gcloud commands only")
    s = sub.add_parser("slurm", help="a SLURM GPU cluster, one process per node")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus_per_node", type=int, default=8)
    s.add_argument("--cpus_per_task", type=int, default=32)
    s.add_argument("--time", default="48:00:00")
    s.add_argument("--partition", default="")
    s.add_argument("--job_name", default="jaxrlvr")
    s.add_argument("--project_dir", default=".", help="the checkout on the shared file system")
    s.add_argument("--log_dir", default="logs")
    s.add_argument("--out", default="", help="write the script here (default: print it)")
    s.add_argument("--submit", action="store_true", help="sbatch the written script")
    args = p.parse_args(argv)
    try:
        if args.target == "tpu":
            launch_tpu(args, train_args, Gcloud(dry_run=args.dry_run))
            return 0
        script = slurm_script(args, train_args)
        if not args.out:
            print(script, end="")
            return 0
        with open(args.out, "w") as f:
            f.write(script)
        if args.submit:
            return subprocess.run(["sbatch", args.out]).returncode
        print(f"wrote {args.out}; submit with: sbatch {args.out}")
        return 0
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
