"""A small pool of checker subprocesses with a hard wall-clock limit per item.

Why not threads or math-verify's own timeouts: math-verify times out with
`signal.alarm`, which only works in the main thread, and a signal cannot interrupt a
long C-level computation anyway (sympy evaluating `9^{9^{9^{9}}}` hangs inside a
bignum power). A separate process can always be killed. Each worker is a plain
`python -m jaxrlvr.rewards.pool CHECKER` subprocess (not `multiprocessing`: no fork of
a process holding JAX threads, no re-import of the trainer's `__main__`), talking JSON
lines over its stdin/stdout. The parent hands each idle worker one item at a time; an
item still running `timeout_s` after it was handed out gets its worker killed (SIGKILL)
and replaced, and scores TIMEOUT. A checker exception scores ERROR; a worker that dies
mid-item scores ERROR and is replaced. With a batch limit (`map(items, batch_timeout_s)`),
items still unscored when it runs out score TIMEOUT and the busy workers are replaced.

Workers never outlive the trainer: each asks the kernel for SIGKILL when its parent
dies (Linux `PR_SET_PDEATHSIG`; the parent is the thread that started the pool's first
`map`, so call it from a long-lived thread), and elsewhere exits when it sees its parent
gone. A trainer killed with `kill -9` leaves no checker running.

A checker is a module-level function `f(*args) -> status` named as `"module:function"`;
it runs in the worker's main thread. If its module defines `warmup()`, the worker calls
it before reporting ready, so slow first-use initialisation does not eat an item's limit.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from jaxrlvr.rewards.types import ERROR, STATUSES, TIMEOUT


def resolve_checker(spec: str) -> Callable[..., str]:
    """Import a checker given as "package.module:function"."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"checker must look like 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


class _Worker:
    """One checker subprocess and its read buffer."""

    def __init__(self, checker: str, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxrlvr.rewards.pool", checker, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # inherit: checker tracebacks and warnings stay visible
            bufsize=0,
            env=env,
            close_fds=True,
        )
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.item: int | None = None  # index of the item in flight
        self.deadline = float("inf")

    def send(self, msg: dict[str, Any]) -> None:
        data = memoryview((json.dumps(msg) + "\n").encode())
        while data:  # a raw pipe write may be partial
            data = data[self.proc.stdin.write(data) :]

    def read_messages(self) -> tuple[list[dict[str, Any]], bool]:
        """Drain available output; returns (complete messages, eof)."""
        eof = False
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()], eof

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        w.kill()
    workers.clear()


class CheckerPool:
    """Run `checker(*item)` for many items in `num_workers` subprocesses, `timeout_s` each.

    Workers start on first use and are reused across calls; `close()` (or garbage
    collection, or interpreter exit) kills them. `map` is thread-safe (serialised).
    """

    def __init__(
        self,
        checker: str,
        num_workers: int = 1,
        timeout_s: float = 5.0,
        startup_timeout_s: float = 120.0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.checker = checker
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.restarts = 0  # workers replaced after a time-out or a crash
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._env = dict(os.environ)
        # The worker must import what the parent can (tests, uninstalled checkouts), and
        # must never grab an accelerator if the checker happens to import JAX.
        paths = [p for p in sys.path if p]
        if self._env.get("PYTHONPATH"):
            paths.append(self._env["PYTHONPATH"])
        self._env["PYTHONPATH"] = os.pathsep.join(paths)
        self._env["JAX_PLATFORMS"] = "cpu"
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def close(self) -> None:
        """Kill all workers; the pool restarts them if used again."""
        with self._lock:
            _shutdown(self._workers)

    def __enter__(self) -> CheckerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        w = _Worker(self.checker, self._env)
        self._workers.append(w)
        return w

    def _replace(self, w: _Worker, sel: selectors.BaseSelector) -> _Worker:
        sel.unregister(w.fd)
        w.kill()
        self._workers.remove(w)
        self.restarts += 1
        nw = self._spawn()
        sel.register(nw.fd, selectors.EVENT_READ, nw)
        return nw

    def map(
        self, items: Sequence[Sequence[Any]], batch_timeout_s: float | None = None
    ) -> list[tuple[str, str]]:
        """Check every item; returns one (status, detail) per item, in order. Items not
        done within `batch_timeout_s` (None = no limit) score TIMEOUT."""
        with self._lock:
            return self._map(items, batch_timeout_s)

    def _map(
        self, items: Sequence[Sequence[Any]], batch_timeout_s: float | None
    ) -> list[tuple[str, str]]:
        results: list[tuple[str, str] | None] = [None] * len(items)
        if not items:
            return []
        batch_deadline = time.monotonic() + (batch_timeout_s or float("inf"))
        while len(self._workers) < self.num_workers:
            self._spawn()
        pending = deque(range(len(items)))
        remaining = len(items)
        sel = selectors.DefaultSelector()
        for w in self._workers:
            sel.register(w.fd, selectors.EVENT_READ, w)
        try:
            while remaining:
                now = time.monotonic()
                for w in list(self._workers):
                    if w.ready and w.item is None and pending:
                        i = pending.popleft()
                        try:
                            w.send({"id": i, "args": list(items[i])})
                        except (BrokenPipeError, OSError):  # died while idle: retry elsewhere
                            pending.appendleft(i)
                            self._replace(w, sel)
                            continue
                        w.item, w.deadline = i, now + self.timeout_s
                    elif not w.ready and now - w.started > self.startup_timeout_s:
                        raise RuntimeError(
                            f"reward checker worker {self.checker!r} did not start within "
                            f"{self.startup_timeout_s:.0f} s"
                        )
                busy = [w.deadline for w in self._workers if w.item is not None]
                wait = min(min(busy) if busy else now + 1.0, batch_deadline) - time.monotonic()
                wait = max(0.0, wait)
                for key, _ in sel.select(timeout=wait):
                    w: _Worker = key.data
                    msgs, eof = w.read_messages()
                    for m in msgs:
                        if "fatal" in m:
                            raise RuntimeError(
                                f"reward checker {self.checker!r} failed to load: {m['fatal']}"
                            )
                        if m.get("ready"):
                            w.ready = True
                        elif m.get("id") == w.item:
                            status = m.get("status")
                            if status not in STATUSES:
                                status, m["detail"] = ERROR, f"bad status {status!r}"
                            results[w.item] = (status, str(m.get("detail", "")))
                            remaining -= 1
                            w.item, w.deadline = None, float("inf")
                    if eof:
                        if w.item is not None:
                            results[w.item] = (ERROR, "checker worker died")
                            remaining -= 1
                        elif not w.ready:
                            raise RuntimeError(
                                f"reward checker worker {self.checker!r} exited during startup "
                                f"with code {w.proc.wait()}"
                            )
                        self._replace(w, sel)
                now = time.monotonic()
                for w in list(self._workers):
                    if w.item is not None and now >= w.deadline:
                        results[w.item] = (TIMEOUT, f"killed after {self.timeout_s:g} s")
                        remaining -= 1
                        self._replace(w, sel)
                if remaining and now >= batch_deadline:
                    remaining -= self._expire(results, pending, sel, batch_timeout_s)
        except BaseException:
            _shutdown(self._workers)  # workers may hold half-done items: start fresh next time
            raise
        finally:
            sel.close()
        return [r for r in results if r is not None]

    def _expire(self, results, pending: deque, sel, limit: float) -> int:
        """The batch limit ran out: every unscored item scores TIMEOUT, busy workers are
        replaced. Returns the number of items expired."""
        detail = f"batch time limit of {limit:g} s ran out"
        expired = 0
        for w in list(self._workers):
            if w.item is not None:
                results[w.item] = (TIMEOUT, detail)
                expired += 1
                self._replace(w, sel)
        while pending:
            results[pending.popleft()] = (TIMEOUT, detail)
            expired += 1
        return expired


def _die_with_parent(parent: int) -> None:
    """Make this worker end when `parent` does (see module docstring)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    else:  # a watchdog; it cannot preempt a check that holds the GIL

        def watch():
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _worker_main(checker_spec: str, parent: int | None = None) -> None:
    """Worker loop: read {"id", "args"} lines, answer {"id", "status", "detail"} lines."""
    if parent is not None:
        _die_with_parent(parent)
    out = os.fdopen(os.dup(1), "w", buffering=1)  # private protocol channel
    os.dup2(2, 1)  # stray prints from checker code go to stderr, not into the protocol
    try:
        fn = resolve_checker(checker_spec)
        warmup = getattr(sys.modules[checker_spec.partition(":")[0]], "warmup", None)
        if callable(warmup):
            warmup()
    except BaseException as e:  # reported to the parent, which raises
        out.write(json.dumps({"fatal": f"{type(e).__name__}: {e}"}) + "\n")
        return
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            reply = {"id": msg["id"], "status": fn(*msg["args"]), "detail": ""}
        except Exception as e:  # a checker failure scores ERROR
            reply = {"id": msg["id"], "status": ERROR, "detail": f"{type(e).__name__}: {e}"[:500]}
        out.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    _worker_main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
