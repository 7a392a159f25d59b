"""Orbax checkpoints of the training state and the data iterator's position.

What the trainer relies on:

- A save is atomic: Orbax writes a step into a temporary directory and renames it when
  complete, so a step directory that `all_steps` lists is a finished one; a save cut
  short (a crash, `kill -9`) leaves only a temporary directory that is never restored.
- Saves are asynchronous; `check_for_errors` raises the error of a failed background
  save (a full disk, a lost bucket) at the next step as `CheckpointError`, and `wait`
  blocks until every save is durable.
- `restore_latest` restores the newest checkpoint and never discards good state. Only a
  step whose data is provably corrupt (bytes that do not decode, a step number or
  parameters that `is_sound` rejects) is named in a warning and moved to
  `<directory>-damaged/<step>-<time>`, so the run resumes from the one before and can
  save that step again later. A step that holds a state of another structure than the
  one asked for raises `StateMismatch`, one that cannot be read (a permission error, an
  unavailable file system, any failure not proven to be damage) `CheckpointError`; both
  leave every file where it is.
- With several processes each one reads the step on its own and the verdicts are
  gathered before anything moves: a step is set aside only if every process finds it
  damaged, and every process raises the same error if any one cannot read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxrlvr.runtime import distributed

log = logging.getLogger(__name__)

# tensorstore reports undecodable bytes with these status codes or phrases (a zstd frame
# that does not decompress, a chunk shorter than its index says, a garbled manifest);
# a refused or failed read (PERMISSION_DENIED, NOT_FOUND, UNAVAILABLE, ...) is none of them.
_CORRUPT_STATUS = ("DATA_LOSS", "OUT_OF_RANGE")
_CORRUPT_TEXT = (
    "Error decoding", "decompress", "Data corruption", "Truncated", "not valid for value of size",
)  # fmt: skip

# tensorstore status codes of a read the storage refused or failed: never damage.
_READ_FAILURES = frozenset({
    "PERMISSION_DENIED", "NOT_FOUND", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
    "UNAUTHENTICATED", "ABORTED", "CANCELLED", "INTERNAL", "UNKNOWN",
})  # fmt: skip


PENDING_ROW = "pending_row"  # in a checkpoint's data state: a row awaiting its evaluation


def split_pending_row(data_state: dict[str, Any]) -> tuple[dict[str, Any], dict | None]:
    """A restored data state without its pending metrics row, and the row (or None)."""
    data_state = dict(data_state)
    return data_state, data_state.pop(PENDING_ROW, None)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the step and the cause."""


class StateMismatch(Exception):  # noqa: N818 - a finding about the run, named for what it is
    """A checkpoint holds a state of another tree structure, shapes or dtypes than the one
    to restore it onto (a changed config or code); `differences` says how, in one line."""

    def __init__(self, step: int, path: str, differences: str):
        super().__init__(f"the checkpoint {path} holds another training state ({differences})")
        self.step, self.path, self.differences = step, path, differences


@dataclasses.dataclass(frozen=True)
class _Verdict:
    """One process's reading of one step: `read`, `damaged`, `mismatch` or `unreadable`,
    with what was found."""

    kind: str
    detail: str = ""


class Checkpointer:
    """`workdir/checkpoints/<step>/{state, data}`: the `TrainState` pytree and JSON data state."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = directory
        self._last_saved: int | None = None
        self._mngr = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )
        # Restores read each item with its handler: the manager's restore ends in a barrier
        # that a process whose read failed never reaches (the others would wait forever).
        self._state_handler = ocp.StandardCheckpointHandler()
        self._data_handler = ocp.JsonCheckpointHandler()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(
        self, step: int, state: Any, data_state: dict[str, Any], pending_row: dict | None = None
    ) -> None:
        """Save asynchronously; a checkpoint only becomes visible once complete. The
        previous save must have succeeded (else `CheckpointError` names its step).
        `pending_row` is the step's metrics row when its evaluation was cut short: the
        resumed run evaluates the step and writes the row (`split_pending_row`)."""
        self.wait()
        if pending_row is not None:
            data_state = data_state | {PENDING_ROW: pending_row}
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
        """The newest checkpoint, restored onto `like`'s shardings: (step, state, data
        state), or None if there is none left. A step every process finds damaged, or
        that fails `is_sound(step, state)` (which returns what is wrong, or None), is set
        aside for the one before. Raises `StateMismatch` when the newest step's tree
        differs from `like`'s and `CheckpointError` when a process cannot read it (or the
        processes disagree), on every process, with nothing moved."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        for step in reversed(self.all_steps()):
            verdict, restored = self._read(step, abstract)
            problem = self._agreed_damage(step, verdict)
            if problem is None:  # every process has read it; its contents decide
                state, data = restored
                problem = is_sound(step, state)
                if problem is None:
                    return step, state, data
            self._set_aside(step, problem)
        return None

    def _read(self, step: int, abstract: Any) -> tuple[_Verdict, tuple[Any, Any] | None]:
        """This process's reading of `step`, with no collective (a process whose read
        fails must still reach the gathering of the verdicts)."""
        path = epath.Path(self.directory) / str(step)
        try:
            stored = self._state_handler.metadata(path / "state").tree
            differences = _tree_differences(stored, abstract)
            if differences:
                return _Verdict("mismatch", differences), None
            state = self._state_handler.restore(
                path / "state", args=ocp.args.StandardRestore(abstract)
            )
            data = self._data_handler.restore(path / "data", args=ocp.args.JsonRestore())
        except Exception as e:  # noqa: BLE001 - sorted below: damage only when proven
            damage = _corruption(e)
            if damage is not None:
                return _Verdict("damaged", damage), None
            return _Verdict("unreadable", _cause(e)), None
        return _Verdict("read"), (state, data)

    def _agreed_damage(self, step: int, verdict: _Verdict) -> str | None:
        """Every process's verdict on `step`: None if all have read it, what is wrong if
        all find it damaged; otherwise the same error on every process."""
        path = os.path.join(self.directory, str(step))
        verdicts = [
            _Verdict(**json.loads(v))
            for v in distributed.gather_text(json.dumps(dataclasses.asdict(verdict)))
        ]
        several = len(verdicts) > 1

        def where(i: int) -> str:
            return f" (process {i} of {len(verdicts)})" if several else ""

        for i, v in enumerate(verdicts):
            if v.kind == "mismatch":
                raise StateMismatch(step, path, v.detail + where(i))
        for i, v in enumerate(verdicts):
            if v.kind == "unreadable":
                raise CheckpointError(
                    f"cannot read the checkpoint {path}{where(i)}: {v.detail}; nothing was "
                    "moved (fix the cause and rerun, or move the step away to resume from "
                    "the one before)"
                )
        kinds = {v.kind for v in verdicts}
        if kinds == {"read"}:
            return None
        if kinds == {"damaged"}:
            return verdicts[0].detail
        damaged = next(i for i, v in enumerate(verdicts) if v.kind == "damaged")
        read = next(i for i, v in enumerate(verdicts) if v.kind == "read")
        raise CheckpointError(
            f"the processes disagree about the checkpoint {path}: process {damaged} finds it "
            f"damaged ({verdicts[damaged].detail}), process {read} reads it; nothing was moved"
        )

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


def _tree_differences(stored: Any, abstract: Any) -> str:
    """How the arrays a checkpoint holds (its tree metadata: names, shapes, dtypes) differ
    from those of `abstract`, in one line; empty if they do not."""
    have = {m.name: _shape_dtype(m) for m in jax.tree.leaves(stored)}
    names = jax.tree.leaves(ocp.tree.get_param_names(abstract, include_empty_nodes=False))
    want = dict(zip(names, map(_shape_dtype, jax.tree.leaves(abstract)), strict=True))
    found = [f"{k} is not in this config's state" for k in have.keys() - want.keys()]
    found += [f"{k} is not in the checkpoint" for k in want.keys() - have.keys()]
    found += [
        f"{k} is {_describe(*have[k])} there, {_describe(*want[k])} here"
        for k in have.keys() & want.keys()
        if have[k] != want[k]
    ]
    found.sort()
    more = f"; and {len(found) - 2} more" if len(found) > 2 else ""
    return "; ".join(found[:2]) + more


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    """A leaf's shape and dtype as stored (a typed PRNG key is stored as its key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.eval_shape(jax.random.key_data, x)
    return tuple(x.shape), np.dtype(x.dtype)


def _describe(shape: tuple[int, ...], dtype: np.dtype) -> str:
    return f"{dtype.name}{list(shape)}"


def _chain(e: BaseException) -> list[BaseException]:
    """An exception and its causes, outermost first."""
    out = [e]
    while (e := e.__cause__ or e.__context__) is not None and e not in out:
        out.append(e)
    return out


def _corruption(e: BaseException) -> str | None:
    """What proves a failed read to be damaged data (bytes or JSON that do not decode), or
    None: an error of the operating system or storage, or one not understood, is not."""
    chain = _chain(e)
    if any(isinstance(x, OSError) for x in chain):
        return None
    for x in chain:
        if isinstance(x, json.JSONDecodeError | UnicodeDecodeError):
            return f"its metadata does not decode: {_cause(x)}"
        text = str(x)
        status = text.split(":", 1)[0]
        corrupt = status in _CORRUPT_STATUS or any(t in text for t in _CORRUPT_TEXT)
        if isinstance(x, ValueError) and corrupt and status not in _READ_FAILURES:
            return _cause(x)
    return None


def _cause(e: BaseException) -> str:
    """The innermost cause of an exception, in one line (without tensorstore's spec)."""
    e = _chain(e)[-1]
    text = str(e).split(" [tensorstore_spec=", 1)[0].strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]
