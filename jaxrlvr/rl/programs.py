"""The jit-compiled programs of one training step, with their shardings.

The trainer calls them; `jaxrlvr.plan` lowers and compiles the very same programs ahead
of time from abstract arrays. Every input and output has an explicit sharding, so a
program compiles once and the state keeps its layout from step to step:

- parameters by the logical-axis rules, optimizer moments like their parameters, scalars
  (step, PRNG key, the method's controller) replicated;
- the rollout batch split over data x fsdp on its leading (row) axis, laid out by
  `grpo.device_order` so that mini- and micro-batches are local slices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlvr import losses
from jaxrlvr.rl import grpo
from jaxrlvr.sharding import logical_to_spec, state_shardings


@dataclasses.dataclass(frozen=True)
class StepPrograms:
    """The jitted functions of a training step (see `build`) and the shardings they use."""

    policy_pass: Callable  # (params, batch) -> (logp, entropy) [N, R]
    update: Callable  # (state, batch, k, inputs) -> (state, metrics); state donated
    step_inputs: Callable  # (state, old_logp, mask, epoch) -> {name: scalar}
    finish_step: Callable  # (state, entropy, inputs) -> state; state donated
    diagnostics: Callable  # (old_logp, advantages, response_mask) -> metrics
    mismatch: Callable  # (learner logp, sampler logp, response_mask) -> metrics
    entropy_check: Callable  # (params_before, params_after, batch) -> metrics
    state_shardings: Any  # a TrainState of shardings
    batch_sharding: NamedSharding  # every Batch field (split on rows)
    replicated: NamedSharding


def batch_sharding(mesh: Mesh, num_sequences: int) -> NamedSharding:
    """Rows split over the `batch` logical axis (data x fsdp); other dimensions whole."""
    return NamedSharding(mesh, logical_to_spec(("batch",), (num_sequences,), dict(mesh.shape)))


def train_state_shardings(abstract_state: grpo.TrainState, tx, mesh: Mesh) -> grpo.TrainState:
    """Shardings of a `TrainState`: parameters by their logical axes, every optimizer
    moment like its parameter, everything else replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = state_shardings(abstract_state.params, mesh)
    opt_state = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_state.opt_state,
        params,
        transform_non_params=lambda _: replicated,
    )
    others = jax.tree.map(lambda _: replicated, abstract_state.replace(params=None, opt_state=None))
    return others.replace(params=params, opt_state=opt_state)


def abstract_train_state(abstract_params, tx, config) -> grpo.TrainState:
    """The `TrainState` of `abstract_params` as shapes and dtypes (nothing allocated)."""
    return jax.eval_shape(lambda p: grpo.init_state(p, tx, config), abstract_params)


def build(
    graphdef,
    tx,
    settings: grpo.LossSettings,
    mesh: Mesh,
    abstract_state: grpo.TrainState,
    num_sequences: int,
) -> StepPrograms:
    """Jit every program of a step for `num_sequences` rollouts per step on `mesh`."""
    s = settings
    state_sh = train_state_shardings(abstract_state, tx, mesh)
    params_sh = state_sh.params
    rows = batch_sharding(mesh, num_sequences)
    repl = NamedSharding(mesh, PartitionSpec())

    def policy_pass(params, batch):
        return grpo.policy_pass(graphdef, params, batch, s)

    def update(state, batch, index, inputs):
        """The new state, the update's scalar metrics, and (`s.old_from_update` only) the
        batch's old log-probs and entropies `(old_logp, old_entropy)`, else ()."""
        state, metrics = grpo.update(state, graphdef, tx, batch, index, inputs, s)
        old = tuple(metrics.pop(name) for name in ("old_logp", "old_entropy") if name in metrics)
        return state, metrics, old

    def step_inputs(state, old_logp, mask, epoch):
        return grpo.step_inputs(state, old_logp, mask, epoch, s)

    def finish_step(state, entropy, inputs):
        return grpo.finish_step(state, entropy, inputs, s)

    def entropy_check(before, after, batch):
        return grpo.entropy_check(graphdef, before, after, batch, s)

    return StepPrograms(
        policy_pass=jax.jit(policy_pass, in_shardings=(params_sh, rows), out_shardings=rows),
        update=jax.jit(
            update,
            in_shardings=(state_sh, rows, repl, repl),
            out_shardings=(state_sh, repl, rows),
            donate_argnums=0,
        ),
        step_inputs=jax.jit(
            step_inputs, in_shardings=(state_sh, rows, rows, repl), out_shardings=repl
        ),
        finish_step=jax.jit(
            finish_step,
            in_shardings=(state_sh, repl, repl),
            out_shardings=state_sh,
            donate_argnums=0,
        ),
        diagnostics=jax.jit(grpo.rollout_diagnostics, in_shardings=rows, out_shardings=repl),
        mismatch=jax.jit(losses.mismatch_metrics, in_shardings=rows, out_shardings=repl),
        entropy_check=jax.jit(
            entropy_check, in_shardings=(params_sh, params_sh, rows), out_shardings=repl
        ),
        state_shardings=state_sh,
        batch_sharding=rows,
        replicated=repl,
    )


def abstract_batch(
    num_sequences: int, prompt_len: int, response_len: int, sharding: NamedSharding
) -> grpo.Batch:
    """A `Batch` of `ShapeDtypeStruct`s with `sharding` (for ahead-of-time compilation), at
    its largest: one sequence per row, as when nothing packs."""

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    n, t, r = num_sequences, prompt_len + response_len, response_len
    return grpo.Batch(
        tokens=spec((n, t), jnp.int32),
        segment_ids=spec((n, t), jnp.int32),
        positions=spec((n, t), jnp.int32),
        head_positions=spec((n * r,), jnp.int32),
        head_slots=spec((n, r), jnp.int32),
        response_mask=spec((n, r), jnp.float32),
        advantages=spec((n,), jnp.float32),
        old_logp=spec((n, r), jnp.float32),
        old_entropy=spec((n, r), jnp.float32),
        ref_logp=spec((n, r), jnp.float32),
        sampler_logp=spec((n, r), jnp.float32),
    )
