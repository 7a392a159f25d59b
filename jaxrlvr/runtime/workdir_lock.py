"""One run per workdir: a lock file that process 0 of a training run holds while it runs.

`workdir/run.lock` is created atomically (`O_CREAT | O_EXCL`, which also holds on NFS and
gcsfuse mounts) and holds its holder's host, pid and start time. A second run on the
same workdir is refused with the holder named: two runs would both append to
`metrics.jsonl` and overwrite each other's checkpoints.

A lock whose holder is gone is stale: on the holder's own host the pid is checked (and,
on Linux, the process's start time and the boot, so a reused pid or a reboot is not
mistaken for the holder), and a stale lock is taken over with a warning. A lock from
another host cannot be checked from here; it is refused, with how to remove it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from jaxrlvr.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class WorkdirLock:
    """A held lock on `workdir`; `release` (or leaving a `with` block) removes it."""

    def __init__(self, path: str, holder: dict[str, Any]):
        self.path = path
        self.holder = holder

    @classmethod
    def acquire(cls, workdir: str, key: str = "config.workdir") -> WorkdirLock:
        """Lock `workdir` (which must exist) for this process, taking over a stale lock;
        raise `ConfigError` naming `key` when another live run, or a run whose liveness
        cannot be checked, holds it."""
        path = os.path.join(workdir, LOCK_FILE)
        where = f"{key}={workdir!r}"
        me = _this_process()
        for _ in range(3):  # a takeover races at most with another takeover
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                fd = None
            if fd is not None:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                return cls(path, me)
            raw = _read(path)
            if raw is None:  # released in the meantime
                continue
            holder = _parse(raw)
            refusal = _refusal(where, path, holder, me)
            if refusal:
                raise ConfigError(refusal)
            log.warning(
                "%s: taking over the stale lock of %s (%s)", path, _describe(holder),
                "its process is gone" if holder else "unreadable, and older than a minute",
            )  # fmt: skip
            _remove_if_unchanged(path, raw)
        raise ConfigError(f"{where}: {path} keeps changing hands; is another run starting?")

    def release(self) -> None:
        """Remove the lock file if it is still this holder's (idempotent)."""
        raw = _read(self.path)
        if raw is not None and _parse(raw) == self.holder:
            _remove_if_unchanged(self.path, raw)

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "boot_id": _boot_id(),
        "proc_start": _proc_start(pid),
        "token": uuid.uuid4().hex,  # tells this lock from a later one of the same process
    }


def _refusal(where: str, path: str, holder: dict[str, Any] | None, me: dict[str, Any]) -> str:
    """Why the lock `holder` (None: unreadable) blocks this run, or "" if it is stale."""
    if holder is None:
        if time.time() - _mtime(path) > 60:  # no holder finishes writing it that slowly
            return ""
        return f"{where}: {path} is being written by a run starting there; try again later"
    busy = f"{where}: in use by {_describe(holder)} (lock file {path})"
    if holder.get("host") != me["host"]:
        return (
            f"{busy}, which cannot be checked from host {me['host']}. If no run uses this "
            f"workdir any more, remove {path} and rerun; else use another workdir"
        )
    if _alive(holder, me):
        return f"{busy}; wait for it to end, stop it, or use another workdir"
    return ""


def _alive(holder: dict[str, Any], me: dict[str, Any]) -> bool:
    """Whether the holder (on this host) still runs: same boot, same process start."""
    if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
        return False  # the machine has rebooted since
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    started = _proc_start(pid)
    return not (started and holder.get("proc_start") and started != holder["proc_start"])


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown run"
    return (
        f"the run of host {holder.get('host')!s} pid {holder.get('pid')!s} "
        f"started {holder.get('started')!s}"
    )


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _parse(raw: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0


def _remove_if_unchanged(path: str, raw: str) -> None:
    """Remove the lock file if it still holds `raw`. It is first renamed to a name of this
    process's own (atomic), so of two processes removing one stale lock only one removes
    it, and a lock a third process has created meanwhile is put back untouched."""
    aside = f"{path}.{socket.gethostname()}.{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) == raw:
        os.remove(aside)
        return
    try:  # not the one read: someone else's fresh lock, back it goes (never over another)
        os.link(aside, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links (gcsfuse): a rename, unless a lock is there again
        if not os.path.exists(path):
            os.rename(aside, path)
            return
    os.remove(aside)


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (Linux), telling a reused pid
    from the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
