"""The GRPO update: rollout batches, the old-policy pass, and one jit-compiled optimizer update.

A rollout batch holds N = prompts x n sequences. The model reads them packed several to a
row (`jaxrlvr.rl.packing`: segment ids, positions restarting per sequence); log-probs and
entropies are computed over the packed rows chunk by chunk
(`jaxrlvr.losses.token_logp_entropy`, never full `[rows, L, V]` float32 logits) and
gathered back per sequence, `[N, R]`, where every loss and metric is computed.

`update` is one optimizer update over one mini-batch, accumulated over micro-batches with
`lax.scan`; aggregation denominators are taken over the whole mini-batch, so the result
does not depend on the micro-batch size.

On a mesh the batch is split over its `batch_shards` = data x fsdp devices, and rows are
laid out so that every mini-batch and micro-batch is a slice *within* each device's
shard (`packing.device_order`, `packing.split_rows`): slicing never moves data, and every
micro-batch keeps all devices busy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from jaxrlvr import config as config_lib
from jaxrlvr import losses, methods
from jaxrlvr.rl.packing import device_order, merge_rows, split_rows, take_per_shard
from jaxrlvr.runtime.metrics import LOW_PROB

__all__ = ["device_order", "merge_rows", "split_rows"]  # the row layout, re-exported

Array = jax.Array


class Batch(NamedTuple):
    """One rollout batch (or a slice of it), in device order (`jaxrlvr.rl.packing.pack`).

    The token fields hold the sequences packed into rows of L tokens; the others have
    leading dimension N (one row per sequence)."""

    tokens: Array  # [rows, L] int32: sequences (prompt, response) back to back
    segment_ids: Array  # [rows, L] int32: 1, 2, ... per sequence of a row; 0 = padding
    positions: Array  # [rows, L] int32: position of each token within its sequence
    head_positions: Array  # [groups * M] int32: packed positions predicting a response token
    head_slots: Array  # [N, R] int32: where response token t sits in its group's head list
    response_mask: Array  # [N, R] float32: 1 on generated tokens
    advantages: Array  # [N] float32
    old_logp: Array  # [N, R] float32
    old_entropy: Array  # [N, R] float32: old-pass entropy (STEER's H)
    ref_logp: Array  # [N, R] float32 (zeros without a KL term)
    sampler_logp: Array | None = None  # [N, R] float32: the sampler's (rollout corrections)


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The static (hashable) settings of the loss, from `config.algo` and friends."""

    temperature: float
    eps_low: float
    eps_high: float
    dual_clip: float | None
    loss_agg: str
    kl_coef: float
    kl_estimator: str
    entropy_coef: float
    logp_chunk: int
    micro_batch: int
    logp_remat: bool = True  # recompute the LM head's chunks in the backward pass
    kl_clamp: float = 0.0  # k3 clipped to [-kl_clamp, kl_clamp]; 0 = off
    method: methods.Method = methods.Method()  # the entropy method with its settings
    total_steps: int = 1
    num_epochs: int = 1
    mini_batches: int = 1  # per step; each is one optimizer update per PPO epoch
    batch_shards: int = 1  # devices the batch is split over (data x fsdp)
    # The old log-probs and entropies are the update's own under stop_gradient (one update
    # per step, from the trainer): no separate old-policy pass (`single_pass`).
    old_from_update: bool = False
    # Rollout corrections (`jaxrlvr.losses.rollout_correction`): truncated importance
    # weights on the policy-gradient term, rejection of tokens/sequences outside a band.
    rollout_is: str = "none"
    rollout_is_threshold: float = 2.0
    rollout_rs: str = "none"
    rollout_rs_band: tuple[float, float] = (0.5, 2.0)
    cov_groups: int = 1  # Clip-Cov / KL-Cov select within this many groups of rows

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, num_epochs: int = 1, batch_shards: int = 1
    ) -> LossSettings:
        a = config.algo
        return cls(
            temperature=float(config.rollout.temperature),
            eps_low=float(a.eps_low),
            eps_high=float(a.eps_high),
            dual_clip=float(a.dual_clip) if a.dual_clip else None,
            loss_agg=a.loss_agg,
            kl_coef=float(a.kl_coef),
            kl_estimator=a.kl_estimator,
            kl_clamp=float(a.kl_clamp),
            entropy_coef=float(a.entropy_coef),
            logp_chunk=int(config.model.logp_chunk),
            logp_remat=logp_remat(config, batch_shards),
            micro_batch=int(config.train.micro_batch_sequences),
            method=methods.from_config(config),
            total_steps=int(config.train.steps),
            num_epochs=int(num_epochs),
            mini_batches=config_lib.mini_batches_per_step(config),
            batch_shards=int(batch_shards),
            old_from_update=single_pass(config),
            rollout_is=a.rollout_is,
            rollout_is_threshold=float(a.rollout_is_threshold),
            rollout_rs=a.rollout_rs,
            rollout_rs_band=rollout_rs_band(config),
            cov_groups=int(batch_shards) if a.cov_scope == "per_device" else 1,
        )


def rollout_rs_band(config: ml_collections.ConfigDict) -> tuple[float, float]:
    """The importance-ratio band `[lower, upper]` rejection sampling keeps."""
    upper = float(config.algo.rollout_rs_threshold)
    return (float(config.algo.rollout_rs_threshold_lower) or 1.0 / upper, upper)


def single_pass(config: ml_collections.ConfigDict) -> bool:
    """Whether a step folds the old-policy pass into its update: with exactly one update
    per step and old log-probs from the trainer, the ratio's denominator is the update's
    own log-prob under stop_gradient (ratio 1; the same loss and gradients), as verl and
    Tunix do on-policy. Not for a method that needs the old log-probs before the update
    (`Method.reads_entropy_estimate`), nor with `train.single_pass=False`."""
    return bool(
        config.train.single_pass
        and config_lib.updates_per_step(config) == 1
        and config.algo.old_logp_source == "trainer"
        and config.algo.rollout_rs == "none"  # its mask is set before the update
        and not methods.from_config(config).reads_entropy_estimate
    )


class TrainState(struct.PyTreeNode):
    """Everything a training step reads and writes; checkpointed whole."""

    step: Array  # [] int32: completed training steps
    params: Any  # nnx.State of the policy's parameters
    opt_state: Any
    rng: Array  # PRNG key threaded through the steps (random token selections)
    entropy: Array  # [] float32: the last step's entropy (NaN before the first step)
    controller: Any  # the entropy method's controller state (`Method.init_controller`)


def init_state(params, tx, config: ml_collections.ConfigDict, step: int = 0) -> TrainState:
    """The train state before the first step: fresh optimizer, PRNG key from `config.seed`."""
    return TrainState(
        step=jnp.int32(step),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key(config.seed),
        entropy=jnp.full((), jnp.nan, jnp.float32),
        controller=methods.from_config(config).init_controller(),
    )


def step_inputs(state: TrainState, old_logp: Array, mask: Array, epoch: Array, s: LossSettings):
    """Scalars fixed for all updates of the step (before any update): `h_hat`, the entropy
    estimate -mean(old_logp), and the method's own (`Method.step_inputs`)."""
    h_hat = losses.entropy_estimate(old_logp, mask)
    ctx = methods.StepContext(state.step, epoch, h_hat, s.total_steps, s.num_epochs)
    return {"h_hat": h_hat} | s.method.step_inputs(state.controller, ctx)


def finish_step(state: TrainState, entropy: Array, inputs: dict[str, Array], s: LossSettings):
    """Advance the step counter and the method's controller from this step's entropy."""
    controller = s.method.finish_step(state.controller, entropy, inputs)
    # A non-finite entropy (a diverged policy) leaves the controller and the last entropy.
    ok = jnp.isfinite(entropy) & jnp.isfinite(inputs["h_hat"])
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    return state.replace(
        step=state.step + 1,
        entropy=keep(entropy, state.entropy),
        controller=jax.tree.map(keep, controller, state.controller),
    )


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, updates_per_step: int):
    """AdamW with linear warm-up then constant or cosine decay, after global-norm clipping.

    Warm-up is counted in training steps (as verl/DAPO do), the schedule itself in
    optimizer updates: `updates_per_step` updates share one step's stretch of it. Cosine
    decays to 0 at the last update.
    """
    total = max(total_steps * updates_per_step, 1)
    warmup = min(optim.warmup_steps * updates_per_step, total - 1)
    if optim.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(total - 1, 1))
    elif warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)],
            [warmup],
        )
    else:
        schedule = optax.constant_schedule(optim.lr)
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
    chain = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip else []
    return optax.chain(*chain, adamw), schedule


def packed_hidden(model, batch: Batch) -> Array:
    """Final hidden states `[rows, L, D]` of the packed rows."""
    hidden, _ = model.hidden_states(batch.tokens, batch.positions, segment_ids=batch.segment_ids)
    return hidden


def head_hidden(model, batch: Batch, shards: int) -> tuple[Array, Array]:
    """The hidden states `[groups * M, D]` that predict the response tokens (the head list)
    and the next tokens `[groups * M]` they predict."""
    targets = jnp.pad(batch.tokens[:, 1:], ((0, 0), (0, 1)))  # [rows, L]
    hidden = take_per_shard(packed_hidden(model, batch), batch.head_positions, shards, keep=1)
    return hidden, take_per_shard(targets, batch.head_positions, shards)


def per_sequence(x: Array, batch: Batch, shards: int, keep: int = 0) -> Array:
    """Head-list values `[groups * M, ...]` -> `[N, R, ...]` per response token."""
    return take_per_shard(x, batch.head_slots, shards, keep)


def response_hidden(model, batch: Batch, shards: int) -> tuple[Array, Array, bool]:
    """The hidden states `[N, R, D]` that predict the response tokens, and the LM head as
    stored (`Qwen2.head_matrix`: the matrix and whether it is `[V, D]`)."""
    hidden, _ = head_hidden(model, batch, shards)
    return per_sequence(hidden, batch, shards, keep=1), *model.head_matrix()


def response_logp_entropy(model, batch: Batch, s: LossSettings) -> tuple[Array, Array]:
    """Log-probs and entropies `[N, R]` of the response tokens under `model` at temperature T.

    The LM head runs on the head list only (`jaxrlvr.rl.packing`): its work follows the
    response tokens, not the padded `[N, R]` or the prompts."""
    shards = s.batch_shards
    hidden, targets = head_hidden(model, batch, shards)  # [G * M, D], [G * M]
    g = shards  # one row of head states per device: chunks stay device-local
    head, vocab_major = model.head_matrix()
    logp, ent = losses.token_logp_entropy(
        hidden.reshape(g, -1, hidden.shape[-1]),
        head,
        targets.reshape(g, -1),
        temperature=s.temperature,
        chunk_size=s.logp_chunk,
        remat=s.logp_remat,
        vocab_major=vocab_major,
    )
    both = per_sequence(jnp.stack([logp, ent], -1).reshape(-1, 2), batch, shards, keep=1)
    return both[..., 0], both[..., 1]


def _map_micro_batches(fn, batch: Batch, s: LossSettings):
    """`fn` over micro-batches (bounded memory); outputs back in the batch's row order."""
    parts = batch.advantages.shape[0] // s.micro_batch
    out = jax.lax.map(fn, split_rows(batch, parts, s.batch_shards))
    return merge_rows(out, s.batch_shards)


def mini_batch(batch: Batch, k: Array, s: LossSettings) -> Batch:
    """Mini-batch k (a traced index) of the step's batch, sliced within each device."""
    return jax.tree.map(lambda x: x[k], split_rows(batch, s.mini_batches, s.batch_shards))


def policy_pass(graphdef, params, batch: Batch, s: LossSettings) -> tuple[Array, Array]:
    """Log-probs and entropies of the whole rollout batch, one micro-batch at a time."""
    return _map_micro_batches(
        lambda mb: response_logp_entropy(nnx.merge(graphdef, params), mb, s), batch, s
    )


# Per-token metrics summed over micro-batches, then divided by the mini-batch token count.
_TOKEN_SUMS = (
    "pg_clipfrac", "pg_clipfrac_pos", "pg_clipfrac_pos_lowp", "pg_clipfrac_lower",
    "approx_kl", "kl", "update_entropy", "intervention_frac", "weight_mean",
    "rollout_is_mean", "rollout_is_clip_frac",
)  # fmt: skip


def loss_fn(params, graphdef, key, mb: Batch, norm: losses.AggNorm, inputs, s: LossSettings):
    """The mini-batch-normalised GRPO loss of one micro-batch, and its metric sums."""
    model = nnx.merge(graphdef, params)
    logp, ent = response_logp_entropy(model, mb, s)
    if s.old_from_update:  # on-policy: the old policy is this one, before the update
        mb = mb._replace(
            old_logp=jax.lax.stop_gradient(logp), old_entropy=jax.lax.stop_gradient(ent)
        )
    mask = mb.response_mask
    agg = lambda x: losses.aggregate(x, mask, s.loss_agg, norm)  # noqa: E731
    adv = jnp.broadcast_to(mb.advantages[:, None], logp.shape)
    token = s.method.token_loss(key, logp, mb, adv, inputs, s)
    is_weights, is_truncated = jnp.ones_like(logp), jnp.zeros_like(logp)
    if s.rollout_is != "none":  # the learner's policy over the sampler's, truncated
        is_weights, is_truncated = losses.rollout_is_weights(
            mb.old_logp, mb.sampler_logp, mask, level=s.rollout_is, threshold=s.rollout_is_threshold
        )
    loss = agg(token.loss * is_weights)
    bonus = s.method.entropy_bonus(inputs)
    if s.entropy_coef or bonus is not None:
        loss -= (s.entropy_coef + (0.0 if bonus is None else bonus)) * agg(ent)
    kl = losses.kl_penalty(logp, mb.ref_logp, s.kl_estimator, s.kl_clamp)
    if s.kl_coef:
        loss += s.kl_coef * agg(kl)
    d = jax.lax.stop_gradient(losses.log_ratio(logp, mb.old_logp))
    sg = jax.lax.stop_gradient
    upper = token.clipped * (mb.advantages[:, None] > 0)  # A > 0, so the ratio passed 1 + eps_high
    sums = {
        "pg_clipfrac": jnp.sum(token.clipped * mask),
        "pg_clipfrac_pos": jnp.sum(upper * mask),
        "pg_clipfrac_pos_lowp": jnp.sum(upper * (mb.old_logp < np.log(LOW_PROB)) * mask),
        "pg_clipfrac_lower": jnp.sum(token.dual_clipped * mask),
        "approx_kl": jnp.sum((jnp.exp(d) - 1 - d) * mask),  # k3 estimate of KL(old || new)
        "kl": jnp.sum(sg(kl) * mask),
        "update_entropy": jnp.sum(sg(ent) * mask),
        "intervention_frac": jnp.sum(token.selected * mask),
        "weight_mean": jnp.sum(token.weights * mask),
        "rollout_is_mean": jnp.sum(is_weights * mask),
        "rollout_is_clip_frac": jnp.sum(is_truncated * mask),
    }
    weight_min = jnp.min(jnp.where(mask > 0, token.weights, jnp.inf))
    return loss, (sums, weight_min, (mb.old_logp, mb.old_entropy))


def update(
    state: TrainState, graphdef, tx, batch: Batch, index: Array, inputs: dict, s: LossSettings
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update on mini-batch `index` of the step's batch, gradients accumulated
    over micro-batches. With `s.old_from_update` the metrics also hold the batch's
    `old_logp` and `old_entropy` `[N, R]` (this update's own, before it)."""
    mini = mini_batch(batch, index, s)
    valid = mini.response_mask
    if s.rollout_rs != "none":  # rejected tokens leave the loss and its denominators
        lower, upper = s.rollout_rs_band
        keep = losses.rollout_rs_keep(
            mini.old_logp, mini.sampler_logp, valid, level=s.rollout_rs, lower=lower, upper=upper
        )
        mini = mini._replace(response_mask=valid * keep)
    norm = losses.agg_norm(mini.response_mask)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    rng, key = jax.random.split(state.rng)
    micro = split_rows(mini, mini.advantages.shape[0] // s.micro_batch, s.batch_shards)
    keys = jax.random.split(key, micro.advantages.shape[0])

    def micro_step(carry, xs):
        grads, loss, sums, wmin = carry
        mb_key, mb = xs
        (mb_loss, (mb_sums, mb_wmin, old)), g = grad_fn(
            state.params, graphdef, mb_key, mb, norm, inputs, s
        )
        add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
        carry = (add(grads, g), loss + mb_loss, add(sums, mb_sums), jnp.minimum(wmin, mb_wmin))
        return carry, old if s.old_from_update else None

    if micro.advantages.shape[0] == 1:  # one micro-batch: no accumulator to zero and add to
        (loss, (sums, wmin, old)), grads = grad_fn(
            state.params, graphdef, keys[0], jax.tree.map(lambda x: x[0], micro), norm, inputs, s
        )
        old = jax.tree.map(lambda x: x[None], old)
    else:
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (
            zeros,
            jnp.zeros(()),
            dict.fromkeys(_TOKEN_SUMS, jnp.zeros(())),
            jnp.float32(jnp.inf),
        )
        (grads, loss, sums, wmin), old = jax.lax.scan(micro_step, init, (keys, micro))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    # The non-finite guard: an update whose loss, gradient norm or new parameters are not
    # finite leaves parameters and optimizer state as they were (bits: loss, grad, params).
    skip_code = (
        (~jnp.isfinite(loss)).astype(jnp.int32)
        | (~jnp.isfinite(grad_norm)).astype(jnp.int32) << 1
        | (~all_finite(params)).astype(jnp.int32) << 2
    )
    keep = lambda new, old: jnp.where(skip_code == 0, new, old)  # noqa: E731
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    tokens = jnp.maximum(jnp.sum(mini.response_mask), 1.0)
    metrics = {name: v / tokens for name, v in sums.items()} | {
        "rollout_rs_masked_frac": 1.0
        - jnp.sum(mini.response_mask) / jnp.maximum(jnp.sum(valid), 1),
        "loss": loss,
        "grad_norm": grad_norm,
        "weight_min": wmin,
        "skip_code": skip_code,
    }
    if s.old_from_update:  # back in the batch's row order (the only mini-batch)
        old_logp, old_entropy = (merge_rows(x, s.batch_shards) for x in old)
        metrics |= {"old_logp": old_logp, "old_entropy": old_entropy}
    return state.replace(params=params, opt_state=opt_state, rng=rng), metrics


def all_finite(tree) -> Array:
    """[] bool: whether every element of every floating-point leaf of `tree` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def rollout_diagnostics(old_logp: Array, advantages: Array, mask: Array) -> dict[str, Array]:
    """The statistics of docs/algorithms.md#entropy-diagnostics of a rollout batch under the
    old policy (`[N, R]` log-probs and mask, `[N]` advantages)."""
    adv = jnp.broadcast_to(advantages[:, None], mask.shape)
    cov = losses.token_covariance(old_logp, adv, mask)
    return losses.cov_stats(cov, mask) | losses.advantage_stats(adv, mask)


def entropy_check(graphdef, before, after, batch: Batch, s: LossSettings) -> dict[str, Array]:
    """Actual vs Lemma-1-predicted entropy change of the step's updates on its rollouts."""

    def one(mb):
        hb, ub, vocab_major = response_hidden(nnx.merge(graphdef, before), mb, s.batch_shards)
        ha, ua, _ = response_hidden(nnx.merge(graphdef, after), mb, s.batch_shards)
        return losses.token_entropy_change(
            hb,
            ub,
            ha,
            ua,
            temperature=s.temperature,
            chunk_size=s.logp_chunk,
            vocab_major=vocab_major,
        )

    actual, predicted = _map_micro_batches(one, batch, s)
    return losses.entropy_change_summary(actual, predicted, batch.response_mask)


def rollout_batch(
    prompts: list[list[int]],
    responses: list[list[int]],
    sampler_logp: list[list[float]],
    advantages: np.ndarray,
    *,
    prompt_len: int,
    response_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """N (prompt, response) pairs as host arrays: `tokens` `[N, P + R]` holds each prompt then
    its response from column 0 (`pad_id` after), `prompt_lengths` `[N]`, and the `[N, R]`
    response fields; `jaxrlvr.rl.packing.pack` lays them out for the device."""
    n = len(responses)
    ids = np.full((n, prompt_len + response_len), pad_id, np.int32)
    plen = np.zeros((n,), np.int64)
    resp_mask = np.zeros((n, response_len), np.float32)
    logp = np.zeros((n, response_len), np.float32)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, sampler_logp, strict=True)):
        if len(p) > prompt_len or len(r) > response_len:
            raise ValueError(f"sequence {i}: prompt {len(p)} / response {len(r)} tokens too long")
        ids[i, : len(p) + len(r)] = list(p) + list(r)
        plen[i] = len(p)
        resp_mask[i, : len(r)] = 1
        logp[i, : len(r)] = lp
    return {
        "tokens": ids,
        "prompt_lengths": plen,
        "response_mask": resp_mask,
        "advantages": np.asarray(advantages, np.float32),
        "sampler_logp": logp,
    }


# Without recompute the backward pass keeps about two float32 [rows, L, V] arrays of the LM
# head per micro-batch (the logits and the probabilities); above this, `auto` recomputes.
LOGP_REMAT_BYTES = 1 << 30


def logp_remat(config: ml_collections.ConfigDict, batch_shards: int = 1) -> bool:
    """Whether the update recomputes the LM head's chunks in the backward pass
    (`model.logp_remat`: on, off, or auto = on where a micro-batch's kept logits per
    device would exceed `LOGP_REMAT_BYTES`)."""
    choice = config.model.logp_remat
    if choice != "auto":
        return choice == "on"
    rows = max(config.train.micro_batch_sequences // max(batch_shards, 1), 1)
    length = config.data.max_prompt_len + config.rollout.max_new_tokens
    return 2 * 4 * rows * length * vocab_size(config) > LOGP_REMAT_BYTES


def vocab_size(config: ml_collections.ConfigDict) -> int:
    """The policy's vocabulary, from `model.path`'s config.json or the preset."""
    return config_lib.model_architecture(config).vocab_size
