"""The device half of a training step: the train state and the compiled programs around it.

`Learner` owns the `TrainState` (parameters, optimizer, controllers, PRNG key) and the
step's programs (`jaxrlvr.rl.programs`). `step` takes one step's rollout arrays from the
host, packs them into rows (`jaxrlvr.rl.packing`), runs the old-policy (and reference)
pass, the step's optimizer updates and the controllers, and returns the step's metrics
as Python numbers.

Non-finite updates are skipped on device (see `grpo.update`); `step` reports how many
and why (`skipped_updates`, `skip_reason`), and the trainer stops a run that keeps
skipping.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxrlvr import config as config_lib
from jaxrlvr import losses
from jaxrlvr.rl import grpo, packing, programs
from jaxrlvr.runtime import distributed
from jaxrlvr.sharding import batch_shards

SKIP_REASONS = ("loss", "grad_norm", "params")  # bits of `grpo.update`'s `skip_code`


def skip_reason(code: int) -> str:
    """The names of the non-finite quantities in a `skip_code` bit set ("" when none)."""
    return ", ".join(name for bit, name in enumerate(SKIP_REASONS) if int(code) >> bit & 1)


class Learner:
    """The train state and the step's compiled programs (see module docstring)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        graphdef,
        params,
        mesh: Mesh,
        num_epochs: int,
    ):
        self.config = c = config
        self.graphdef = graphdef
        self.mesh = mesh
        # The frozen reference (initial policy) needs its own buffers: updates donate the state.
        self.ref_params = jax.tree.map(jnp.copy, params) if c.algo.kl_coef > 0 else None
        self.tx, self.schedule = grpo.make_optimizer(
            c.optim, c.train.steps, config_lib.updates_per_step(c)
        )
        self.shards = shards = batch_shards(mesh)
        self.settings = grpo.LossSettings.from_config(c, num_epochs=num_epochs, batch_shards=shards)
        num_sequences = c.train.prompts_per_step * c.rollout.n
        abstract_state = programs.abstract_train_state(params, self.tx, c)
        self.programs = programs.build(
            graphdef, self.tx, self.settings, mesh, abstract_state, num_sequences
        )
        init = jax.jit(
            lambda p: grpo.init_state(p, self.tx, c), out_shardings=self.programs.state_shardings
        )
        self.state: grpo.TrainState = init(params)
        self._all_finite = jax.jit(grpo.all_finite)

    def params_finite(self, params=None) -> bool:
        """Whether every parameter of `params` (default: the state's) is finite; checked
        before a checkpoint or an export, and of a restored checkpoint."""
        params = self.state.params if params is None else params
        return bool(distributed.to_host(self._all_finite(params)))

    def set_state(self, state: grpo.TrainState) -> None:
        self.state = jax.device_put(state, self.programs.state_shardings)

    def _put(self, x: np.ndarray) -> jax.Array:
        """A host array in device order (the same on every process) on the mesh."""
        return distributed.global_array(x, self.programs.batch_sharding)

    def device_batch(self, arrays: dict[str, np.ndarray]) -> tuple[grpo.Batch, jax.Array, dict]:
        """The rollout arrays packed and on the mesh (log-prob fields zero), the sampler's
        log-probs, and the packing stats."""
        c = self.config
        packed, stats = packing.pack(
            arrays,
            micro_batch=c.train.micro_batch_sequences,
            shards=self.shards,
            row_len=c.data.max_prompt_len + c.rollout.max_new_tokens,
            enabled=c.train.pack,
            buckets=c.train.pack_buckets,
        )
        dev = {k: self._put(v) for k, v in packed.items()}
        zeros = self._put(np.zeros(arrays["response_mask"].shape, np.float32))
        fields = {k: dev[k] for k in grpo.Batch._fields if k in dev}
        batch = grpo.Batch(**fields, old_logp=zeros, old_entropy=zeros, ref_logp=zeros)
        return batch, dev["sampler_logp"], stats

    def step(self, arrays: dict[str, np.ndarray], epoch: int, check_entropy: bool) -> dict:
        """Old-policy pass, the step's optimizer updates and controllers, and diagnostics."""
        with jax.set_mesh(self.mesh):
            return self._step(arrays, epoch, check_entropy)

    def _step(self, arrays: dict[str, np.ndarray], epoch: int, check_entropy: bool) -> dict:
        c, fns = self.config, self.programs
        batch, sampler_logp, pack_stats = self.device_batch(arrays)
        mask, epoch = batch.response_mask, np.int32(epoch)
        if self.ref_params is not None:
            batch = batch._replace(ref_logp=fns.policy_pass(self.ref_params, batch)[0])
        single_pass = self.settings.old_from_update
        if not single_pass:  # the old policy's log-probs, before any update of the step
            logp, entropy = fns.policy_pass(self.state.params, batch)
            old_logp = sampler_logp if c.algo.old_logp_source == "sampler" else logp
            batch = batch._replace(old_logp=old_logp, old_entropy=entropy)
        # With a single pass the method's inputs do not read the (still zero) old log-probs.
        inputs = fns.step_inputs(self.state, batch.old_logp, mask, epoch)
        params_before = None
        if check_entropy:  # a copy: the updates donate the state's buffers
            params_before = jax.tree.map(jnp.copy, self.state.params)
        per_update = []
        for _ in range(c.train.ppo_epochs):  # each epoch visits the mini-batches in order
            for index in range(self.settings.mini_batches):  # sliced on device, per shard
                self.state, m, old = fns.update(self.state, batch, np.int32(index), inputs)
                per_update.append(m)
        if single_pass:  # the one update's own log-probs, under the parameters before it
            logp, entropy = old
            batch = batch._replace(old_logp=logp, old_entropy=entropy)
            # The update kept the step and the controller: the same inputs, now with h_hat.
            inputs = fns.step_inputs(self.state, logp, mask, epoch)
        step_entropy = losses.masked_mean(entropy, mask)
        entropy_delta = step_entropy - self.state.entropy  # NaN on the first step
        self.state = fns.finish_step(self.state, step_entropy, inputs)  # donates the state
        tokens = jnp.maximum(jnp.sum(mask), 1.0)
        stats = {
            "entropy": step_entropy,
            "entropy_delta": entropy_delta,
            "sampler_logp_abs_diff": jnp.sum(jnp.abs(logp - sampler_logp) * mask) / tokens,
            **fns.mismatch(logp, sampler_logp, mask),
            **fns.diagnostics(batch.old_logp, batch.advantages, mask),
        }
        if params_before is not None:
            stats |= fns.entropy_check(params_before, self.state.params, batch)
        stats, per_update, inputs = distributed.to_host((stats, per_update, inputs))

        codes = [int(m.pop("skip_code")) for m in per_update]
        applied = [m for m, code in zip(per_update, codes, strict=True) if not code] or per_update
        metrics = {k: float(v) for k, v in stats.items()} | pack_stats
        for key in per_update[0]:  # means over the updates that were applied
            metrics[key] = float(np.mean([m[key] for m in applied]))
        metrics["skipped_updates"] = sum(bool(code) for code in codes)
        if any(codes):
            metrics["skip_reason"] = skip_reason(np.bitwise_or.reduce(codes))
        metrics["lr"] = float(self.schedule(int(self.state.step) * len(per_update) - 1))
        if not c.algo.kl_coef:
            metrics.pop("kl")
        if c.algo.rollout_is == "none":
            metrics.pop("rollout_is_mean"), metrics.pop("rollout_is_clip_frac")
        if c.algo.rollout_rs == "none":
            metrics.pop("rollout_rs_masked_frac")
        token = {k: metrics.pop(k) for k in ("intervention_frac", "weight_mean", "weight_min")}
        token["weight_min"] = float(np.min([m["weight_min"] for m in applied]))
        host_controller = distributed.to_host(self.state.controller)
        return metrics | self.settings.method.metrics(token, inputs, host_controller)

    def host_state(self) -> dict[str, Any]:
        """The host-side view of the state every process must hold identically."""
        st = self.state
        return distributed.to_host(
            (st.step, st.controller, jax.random.key_data(st.rng), st.entropy)
        )
