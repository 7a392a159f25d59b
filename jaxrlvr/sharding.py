"""Device mesh and logical-axis sharding rules.

Every parameter and activation of the model names its dimensions with *logical* axes
("embed", "heads", ...). One table, `LOGICAL_AXIS_RULES`, maps them to the physical mesh
axes ``('data', 'fsdp', 'tensor')``. Changing how the model is parallelised means changing
that table or the mesh shape, never the model code.

A logical dimension whose size does not divide evenly over its mesh axes is replicated
instead (e.g. the 2 KV heads of Qwen2.5-0.5B on a 4-way tensor axis), so any model runs on
any mesh shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated). First match wins.
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]
LOGICAL_AXIS_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),  # activations and KV cache: data parallel over both
    ("vocab", "tensor"),
    ("embed", "fsdp"),  # parameters: ZeRO-3 style over fsdp
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),  # the hidden dimension of activations stays whole
)


def make_mesh(shape: Sequence[int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over ``('data', 'fsdp', 'tensor')``.

    `shape=None` puts every device on 'fsdp'. One entry may be -1 (inferred). A shape
    smaller than the device count uses the first devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    shape = [1, n, 1] if shape is None else list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(
            f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}"
        )
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one entry may be -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise ValueError(f"mesh shape {tuple(shape)} does not divide {n} devices")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) > n or min(shape) < 1:
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {n}")
    # A smaller mesh uses the first devices (e.g. the demo on one of several devices).
    return Mesh(np.asarray(devices[: math.prod(shape)]).reshape(shape), MESH_AXES)


def _mesh_axes_for(name: str | None, rules: LogicalRules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, physical in rules:
        if logical == name:
            if physical is None:
                return ()
            return (physical,) if isinstance(physical, str) else tuple(physical)
    raise KeyError(f"logical axis {name!r} has no sharding rule")


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh_shape: dict[str, int],
    rules: LogicalRules = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Resolve logical axis names to a `PartitionSpec` for an array of `shape`.

    Mesh axes of size 1 are dropped; a dimension that does not divide evenly over its mesh
    axes is replicated; a mesh axis is used at most once per array.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        axes = tuple(
            a for a in _mesh_axes_for(name, rules) if mesh_shape.get(a, 1) > 1 and a not in used
        )
        if axes and dim % math.prod(mesh_shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh,
    names: Sequence[str | None],
    shape: Sequence[int],
    rules: LogicalRules = LOGICAL_AXIS_RULES,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape), rules))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the ambient mesh (no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(names, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def logical_axes_of(variable) -> tuple[str | None, ...]:
    """The logical axis names an NNX variable was created with (replicated if none)."""
    names = variable.get_metadata().get("logical_axes")
    return tuple(names) if names is not None else (None,) * len(variable.shape)


def state_shardings(state, mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES):
    """For an NNX `State` (concrete or abstract), the `NamedSharding` of every leaf."""
    from flax import nnx

    return jax.tree.map(
        lambda v: v.replace(named_sharding(mesh, logical_axes_of(v), v.shape, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model, mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES):
    """Place every parameter of an NNX module on its mesh sharding (in place); returns it."""
    from flax import nnx

    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model
