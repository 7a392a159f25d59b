"""`python tests/fault_runner.py FAULT [train flags...]`: `jaxrlvr.train` with a fault injected.

FAULT is one of:
- `none`: the plain command line.
- `slow_save`: every checkpoint save first creates `$FAULT_MARKER` and then sleeps 3 s,
  so a signal sent when the marker appears lands in the middle of a save.
- `slow_eval`: the evaluation of step 2 first creates `$FAULT_MARKER` and sleeps 5 s, so
  a signal sent when the marker appears lands in the middle of an evaluation.
- `file_size_limit`: the kernel refuses writes that grow a file past 32 KiB (as a full
  disk refuses them); the demo's checkpoint files are larger, its metrics file smaller.
- `unreadable`: opening a file whose path matches the pattern `$FAULT_PATH` (`fnmatch`)
  fails with a PermissionError, as for a file whose mode or owner a copy got wrong (tests
  run as root, which no mode keeps out); without `$FAULT_PATH` every file opens.
- `garbled`: a file whose path matches `$FAULT_PATH` reads as bytes that decode to
  nothing (as a file a faulty copy or disk returned wrong), for this process only.
"""

import builtins
import errno
import fnmatch
import io
import os
import resource
import signal
import sys
import time

from absl import app

from jaxrlvr import train
from jaxrlvr.runtime.checkpointing import Checkpointer


def slow_save():
    save = Checkpointer.save

    def slow(self, step, state, data_state, pending_row=None):
        open(os.environ["FAULT_MARKER"], "w").close()
        time.sleep(3.0)
        save(self, step, state, data_state, pending_row)

    Checkpointer.save = slow


def slow_eval():
    evaluate = train.Trainer.evaluate

    def slow(self, step):
        if step == 2:
            open(os.environ["FAULT_MARKER"], "w").close()
            time.sleep(5.0)
        return evaluate(self, step)

    train.Trainer.evaluate = slow


def file_size_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, 32 << 10))


def unreadable():
    pattern, real_open = os.environ.get("FAULT_PATH"), builtins.open
    if pattern is None:
        return

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and fnmatch.fnmatch(os.fspath(file), pattern):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real_open(file, *args, **kwargs)

    builtins.open = io.open = refusing_open


def garbled():
    pattern, real_open = os.environ.get("FAULT_PATH"), builtins.open
    if pattern is None:
        return

    def garbling_open(file, mode="r", *args, **kwargs):
        reading = "r" in mode and "+" not in mode
        if reading and isinstance(file, str | os.PathLike) and fnmatch.fnmatch(file, pattern):
            junk = b"\x93\x00not a checkpoint\xff"
            return io.BytesIO(junk) if "b" in mode else io.StringIO(junk.decode("latin-1"))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = garbling_open


if __name__ == "__main__":
    fault, argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    faults = {
        "slow_save": slow_save, "slow_eval": slow_eval, "file_size_limit": file_size_limit,
        "unreadable": unreadable,
        "garbled": garbled,
    }  # fmt: skip
    faults.get(fault, lambda: None)()
    train.define_flags()
    app.run(train.main, argv=argv, flags_parser=train.parse_flags)
