"""Launch training on a Cloud TPU slice or a SLURM GPU cluster.

    python -m jaxrlvr.launch tpu --name=rlvr-7b --zone=us-east5-b --accelerator=v5p-64 \\
        --repo=https://github.com/ORG/jaxrlvr.git [--commit=SHA] [--spot] [--dry_run] \\
        -- --config=configs/steer.py:qwen2.5-math-7b --config.workdir=/mnt/runs/steer-7b
    python -m jaxrlvr.launch slurm --nodes=2 --gpus_per_node=8 [--submit] \\
        -- --config=configs/steer.py:qwen2.5-math-7b --config.workdir=/shared/runs/steer-7b

TPU: creates the queued resource (or reuses an ACTIVE one; deletes and recreates one left
FAILED or SUSPENDED by a preemption), waits for it with a time limit, then on every
worker checks out the exact commit (detached), installs `.[tpu]` and starts
`python -m jaxrlvr.train --distributed ...` under `nohup`, so the job outlives the ssh
session, with one log per worker; it prints the command that tails the logs. Several
`--point="..."` argument sets start one job each, on slices of their own (NAME-0, NAME-1,
...), so no point waits for another. `--dry_run` prints every gcloud command and runs none.

SLURM: renders an sbatch script (one process per node, `jax.distributed` through SLURM's
environment) and with `--submit` hands it to `sbatch`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Queued-resource states (`gcloud compute tpus queued-resources describe`).
READY = "ACTIVE"
BROKEN = ("FAILED", "SUSPENDED", "SUSPENDING")
PENDING = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING")


class LaunchError(RuntimeError):
    """The launch cannot go on; the message says why and what to do."""


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

    def acquire(self, gcloud: Gcloud, sleep: Callable[[float], None] = time.sleep) -> None:
        """An ACTIVE slice: reuse, recreate after a preemption or failure, or create."""
        state = self.state(gcloud)
        if state in BROKEN:
            gcloud.echo(f"{self.name} is {state} (preempted or failed): deleting, recreating")
            gcloud(*self.qr("delete", self.name), "--force", "--quiet")
            state = None
        if state is None:
            self.create(gcloud)
        if gcloud.dry_run:
            return
        waited = 0.0
        while (state := self.state(gcloud)) != READY:
            if state in BROKEN:
                raise LaunchError(
                    f"queued resource {self.name} became {state} while waiting; rerun to "
                    "recreate it, or check quota and zone"
                )
            if waited >= self.wait_s:
                raise LaunchError(
                    f"queued resource {self.name} still {state} after {self.wait_s:.0f} s; "
                    "it stays queued: rerun later to keep waiting, or delete it"
                )
            sleep(self.poll_s)
            waited += self.poll_s

    def worker_script(self) -> str:
        """What every worker runs: the exact commit, `.[tpu]`, the job under nohup."""
        d = self.project_dir
        train = shlex.join(["python", "-m", "jaxrlvr.train", "--distributed", *self.train_args])
        lines = [
            "set -euo pipefail",
            self.mount_cmd or "true",
            f"[ -d {d}/.git ] || git clone -q {shlex.quote(self.repo)} {d}",
            f"cd {d}",
            f"git fetch -q origin && git checkout -q --detach {shlex.quote(self.commit)}",
            "[ -d .venv ] || python3 -m venv .venv",
            ". .venv/bin/activate",
            "pip install -q -e '.[tpu]'",
            "mkdir -p logs",
            f"nohup {train} > logs/{self.name}-$(hostname).log 2>&1 < /dev/null &",
            f"echo started on $(hostname): {d}/logs/{self.name}-$(hostname).log",
        ]
        return "\n".join(lines)

    def start(self, gcloud: Gcloud) -> None:
        ssh = ["compute", "tpus", "tpu-vm", "ssh", self.name, "--zone", self.zone]
        gcloud(*ssh, "--worker=all", "--command", self.worker_script())

    def tail_command(self) -> str:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, "--zone", self.zone]
        tail = f"tail -n 40 -f {self.project_dir}/logs/{self.name}-*.log"
        return shlex.join([*cmd, "--worker=all", "--command", tail])


def git_head() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if out.returncode != 0:
        raise LaunchError("--commit not given and `git rev-parse HEAD` failed; pass --commit=SHA")
    return out.stdout.strip()


def launch_tpu(args: argparse.Namespace, train_args: list[str], gcloud: Gcloud) -> list[TpuJob]:
    points = [shlex.split(p) for p in args.point] or [[]]
    jobs = []
    for i, point in enumerate(points):
        job = TpuJob(
            name=args.name if len(points) == 1 else f"{args.name}-{i}",
            zone=args.zone,
            accelerator=args.accelerator,
            repo=args.repo,
            commit=args.commit or git_head(),
            train_args=[*train_args, *point],
            runtime=args.runtime,
            spot=args.spot,
            mount_cmd=args.mount_cmd,
            wait_s=args.wait_s,
            poll_s=args.poll_s,
        )
        job.acquire(gcloud)
        job.start(gcloud)
        gcloud.echo(f"logs: {job.tail_command()}")
        jobs.append(job)
    return jobs


def slurm_script(args: argparse.Namespace, train_args: Sequence[str]) -> str:
    """An sbatch script: one process per node, `jax.distributed` from SLURM's environment."""
    train = shlex.join(["python", "-m", "jaxrlvr.train", "--distributed", *train_args])
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        f"#SBATCH --cpus-per-task={args.cpus_per_task}",
        f"#SBATCH --time={args.time}",
        f"#SBATCH --output={args.log_dir}/%x-%j-%t.log",
        *([f"#SBATCH --partition={args.partition}"] if args.partition else []),
        "set -euo pipefail",
        f"cd {shlex.quote(args.project_dir)}",
        ". .venv/bin/activate  # pip install -e '.[cuda]' on the shared file system",
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",
        f"srun --output={args.log_dir}/%x-%j-%t.log {train}",
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
    t.add_argument("--runtime", default="v2-alpha-tpuv5")
    t.add_argument("--spot", action="store_true")
    t.add_argument("--mount_cmd", default="", help="shell command that mounts shared storage")
    t.add_argument("--wait_s", type=float, default=3600.0, help="time limit for ACTIVE")
    t.add_argument("--poll_s", type=float, default=30.0)
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
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
