"""Orbax checkpoints of the training state and the data iterator's position."""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """`workdir/checkpoints/<step>/{state, data}`: the `TrainState` pytree and JSON data state."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = directory
        self._mngr = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Save asynchronously; a checkpoint only becomes visible once complete."""
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
        )

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

    def wait(self) -> None:
        self._mngr.wait_until_finished()
