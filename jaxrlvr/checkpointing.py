"""Orbax checkpoints of the training state and the data iterator's position.

What the trainer relies on:

- A save is atomic: Orbax writes a step into a temporary directory and renames it when
  complete, so a step directory that `all_steps` lists is a finished one; a save cut
  short (a crash, `kill -9`) leaves only a temporary directory that is never restored.
- Saves are asynchronous; `check_for_errors` raises the error of a failed background
  save (a full disk, a lost bucket) at the next step as `CheckpointError`, and `wait`
  blocks until every save is durable.
- `restore_latest` restores the newest checkpoint that restores completely and holds a
  finite state. A damaged one is named in a warning and moved to
  `<directory>-damaged/<step>`, so the run resumes from the one before and can save that
  step again later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the step and the cause."""


class Checkpointer:
    """`workdir/checkpoints/<step>/{state, data}`: the `TrainState` pytree and JSON data state."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = directory
        self._last_saved: int | None = None
        self._mngr = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Save asynchronously; a checkpoint only becomes visible once complete. The
        previous save must have succeeded (else `CheckpointError` names its step)."""
        self.wait()
        with self._failure_of(step):
            self._mngr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
                ),
            )
        self._last_saved = step

    def check_for_errors(self) -> None:
        """Raise `CheckpointError` if a background save has failed."""
        with self._failure_of(self._last_saved):
            self._mngr.check_for_errors()

    @contextlib.contextmanager
    def _failure_of(self, step: int | None):
        """Any error inside becomes a `CheckpointError` naming the save of `step`."""
        try:
            yield
        except Exception as e:
            raise CheckpointError(
                f"saving the checkpoint of step {step} in {self.directory} failed: {_cause(e)}"
            ) from e

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restore onto the shardings and dtypes of `like` (a state of the same structure)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        return out.state, out.data

    def restore_latest(
        self, like: Any, is_sound: Callable[[int, Any], str | None]
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest checkpoint that restores and passes `is_sound(step, state)` (which
        returns what is wrong, or None): (step, state, data state), or None if none does."""
        for step in reversed(self.all_steps()):
            try:
                state, data = self.restore(step, like)
                problem = is_sound(step, state)
            except Exception as e:  # noqa: BLE001 - any failure means a damaged checkpoint
                problem = _cause(e)
            if problem is None:
                return step, state, data
            self._set_aside(step, problem)
        return None

    def _set_aside(self, step: int, problem: str) -> None:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(f"{self.directory}-damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning(
            "checkpoint %s is damaged (%s); moved to %s, trying the one before", src, problem, dst
        )
        if jax.process_index() == 0 and os.path.exists(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.move(src, dst)
        if jax.process_count() > 1:  # every process sees the move before going on
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self._mngr.reload()

    def wait(self) -> None:
        """Block until every save is durable; raise `CheckpointError` if one failed."""
        with self._failure_of(self._last_saved):
            self._mngr.wait_until_finished()
        self.check_for_errors()


def _cause(e: BaseException) -> str:
    """The innermost cause of an exception, in one line."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
