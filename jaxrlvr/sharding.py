"""Device mesh and logical-axis sharding rules.

Every parameter and activation of the model names its dimensions with *logical* axes
("embed", "heads", ...). One table, `LOGICAL_AXIS_RULES`, maps them to the physical mesh
axes ``('data', 'fsdp', 'tensor')``. Changing how the model is parallelised means changing
that table or the mesh shape, never the model code.

A logical dimension whose size does not divide evenly over its mesh axes is replicated
instead (e.g. the 2 KV heads of Qwen2.5-0.5B on a 4-way tensor axis), so any model runs on
any mesh shape.

Training uses `LOGICAL_AXIS_RULES` (ZeRO-3 over 'fsdp', tensor parallel over 'tensor').
The sampler keeps its own copy of the weights under `SAMPLER_AXIS_RULES`: model parallel
over 'fsdp' x 'tensor' with the hidden dimension whole, so a decode step never gathers
weights, only small activations. `axis_rules(...)` selects the table that `constrain`
uses while a function is traced.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated). First match wins.
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]
LOGICAL_AXIS_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),  # activations: data parallel over both
    ("cache_batch", ("data", "fsdp")),  # the KV cache's slots
    ("layers", None),  # the stacked decoder layers: every device holds its share of each
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


# The sampler's copy of the weights: split over every model-parallel device, never gathered.
# Output dimensions first (vocab, MLP, heads); a weight whose heads do not divide (28 heads
# on 32 devices) is split on its hidden dimension instead.
SAMPLER_AXIS_RULES: LogicalRules = (
    ("batch", "data"),  # decode activations are small: whole on every model-parallel device
    ("cache_batch", ("data", "fsdp")),  # the KV cache is the big array: split its slots
    ("layers", None),
    ("vocab", ("fsdp", "tensor")),
    ("mlp", ("fsdp", "tensor")),
    ("heads", ("fsdp", "tensor")),
    ("kv_heads", ("fsdp", "tensor")),
    ("embed", ("fsdp", "tensor")),
    ("head_dim", None),
    ("norm", None),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
)

_ACTIVE_RULES: contextvars.ContextVar = contextvars.ContextVar(
    "jaxrlvr_axis_rules", default=LOGICAL_AXIS_RULES
)


@contextlib.contextmanager
def axis_rules(rules: LogicalRules) -> Iterator[None]:
    """Make `rules` the table `constrain` resolves logical names with (while tracing)."""
    token = _ACTIVE_RULES.set(rules)
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def batch_shards(mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES) -> int:
    """How many ways the `batch` logical axis splits on `mesh` (data x fsdp by default)."""
    return math.prod(dict(mesh.shape).get(a, 1) for a in _mesh_axes_for("batch", rules))


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

    Dimensions claim their mesh axes in the order of the rules table (earlier rules
    first), each mesh axis at most once per array; mesh axes of size 1 are dropped; a
    dimension that does not divide evenly over its mesh axes is replicated.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    order = [logical for logical, _ in rules]
    priority = sorted(
        range(len(names)), key=lambda i: -1 if names[i] is None else _rule_index(names[i], order)
    )
    used: set[str] = set()
    spec: list = [None] * len(names)
    for i in priority:
        axes = tuple(
            a for a in _mesh_axes_for(names[i], rules) if mesh_shape.get(a, 1) > 1 and a not in used
        )
        if axes and shape[i] % math.prod(mesh_shape[a] for a in axes) == 0:
            used.update(axes)
            spec[i] = axes[0] if len(axes) == 1 else axes
    return PartitionSpec(*spec)


def _rule_index(name: str, order: list[str]) -> int:
    if name not in order:
        raise KeyError(f"logical axis {name!r} has no sharding rule")
    return order.index(name)


def named_sharding(
    mesh: Mesh,
    names: Sequence[str | None],
    shape: Sequence[int],
    rules: LogicalRules = LOGICAL_AXIS_RULES,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape), rules))


def active_rules() -> LogicalRules:
    """The rules table `constrain` resolves logical names with (see `axis_rules`)."""
    return _ACTIVE_RULES.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the ambient mesh (no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(names, x.shape, dict(mesh.shape), active_rules())
    return jax.lax.with_sharding_constraint(x, spec)


def replicate(tree):
    """Every array of `tree` whole on every device of the ambient mesh (a no-op without
    one): what the host reads back, so that each process can read it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, PartitionSpec()), tree)


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
