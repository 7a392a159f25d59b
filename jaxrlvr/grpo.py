"""The GRPO update: rollout batches, the old-policy pass, and one jit-compiled optimizer update.

A rollout batch holds N = prompts x n sequences laid out as `[prompt | response]`: prompts
left-padded to P tokens, responses right-padded to R tokens, so the hidden state that
predicts response token t always sits at column P - 1 + t. Log-probs and entropies are
computed chunk by chunk over the response (`jaxrlvr.losses.token_logp_entropy`), never as
full `[N, R, V]` float32 logits.

`update` is one optimizer update over one mini-batch, accumulated over micro-batches with
`lax.scan`; aggregation denominators are taken over the whole mini-batch, so the result
does not depend on the micro-batch size (METHODS.md section 2).
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

from jaxrlvr import losses

Array = jax.Array


class Batch(NamedTuple):
    """One rollout batch (or a slice of it); every field has leading dimension N."""

    input_ids: Array  # [N, P + R] int32
    attention_mask: Array  # [N, P + R] int32
    response_mask: Array  # [N, R] float32: 1 on generated tokens
    advantages: Array  # [N] float32
    old_logp: Array  # [N, R] float32
    ref_logp: Array  # [N, R] float32 (zeros without a KL term)


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The static (hashable) settings of the loss, from `config.algo` and friends."""

    prompt_len: int
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

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> LossSettings:
        a = config.algo
        return cls(
            prompt_len=config.data.max_prompt_len,
            temperature=float(config.rollout.temperature),
            eps_low=float(a.eps_low),
            eps_high=float(a.eps_high),
            dual_clip=float(a.dual_clip) if a.dual_clip else None,
            loss_agg=a.loss_agg,
            kl_coef=float(a.kl_coef),
            kl_estimator=a.kl_estimator,
            entropy_coef=float(a.entropy_coef),
            logp_chunk=int(config.model.logp_chunk),
            micro_batch=int(config.train.micro_batch_sequences),
        )


class TrainState(struct.PyTreeNode):
    """Everything a training step reads and writes; checkpointed whole."""

    step: Array  # [] int32: completed training steps
    params: Any  # nnx.State of the policy's parameters
    opt_state: Any
    rng: Array  # PRNG key threaded through the steps
    entropy: Array  # [] float32: the last step's entropy (NaN before the first step)


def make_optimizer(optim: ml_collections.ConfigDict, total_updates: int):
    """AdamW with linear warm-up then constant or cosine decay, after global-norm clipping."""
    warmup = min(optim.warmup_steps, max(total_updates - 1, 0))
    if optim.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, optim.lr, max(warmup, 1) if warmup else 0, max(total_updates, warmup + 1)
        )
    else:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)],
            [warmup],
        ) if warmup else optax.constant_schedule(optim.lr)  # fmt: skip
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
    chain = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip else []
    return optax.chain(*chain, adamw), schedule


def response_logp_entropy(
    model, batch: Batch, s: LossSettings, *, with_entropy: bool = True
) -> tuple[Array, Array]:
    """Log-probs and entropies `[N, R]` of the response tokens under `model` at temperature T."""
    hidden, _ = model.hidden_states(batch.input_ids, attention_mask=batch.attention_mask)
    p = s.prompt_len
    return losses.token_logp_entropy(
        hidden[:, p - 1 : -1],  # [N, R, D]: states that predict the response tokens
        model.unembedding(),
        batch.input_ids[:, p:],
        temperature=s.temperature,
        chunk_size=s.logp_chunk,
    )


def _micro_batches(tree, size: int):
    """[N, ...] -> [N / size, size, ...] for every leaf."""
    return jax.tree.map(lambda x: x.reshape(-1, size, *x.shape[1:]), tree)


def policy_pass(graphdef, params, batch: Batch, s: LossSettings) -> tuple[Array, Array]:
    """Log-probs and entropies of the whole rollout batch, one micro-batch at a time."""

    def one(mb):
        return response_logp_entropy(nnx.merge(graphdef, params), mb, s)

    logp, ent = jax.lax.map(one, _micro_batches(batch, s.micro_batch))
    n = batch.input_ids.shape[0]
    return logp.reshape(n, -1), ent.reshape(n, -1)


# Metrics summed over tokens (then divided by the token count) or over micro-batches.
_TOKEN_SUMS = ("pg_clipfrac", "pg_clipfrac_lower", "approx_kl", "kl", "update_entropy")


def loss_fn(params, graphdef, mb: Batch, norm: losses.AggNorm, s: LossSettings):
    """The mini-batch-normalised GRPO loss of one micro-batch, and its metric sums."""
    model = nnx.merge(graphdef, params)
    logp, ent = response_logp_entropy(model, mb, s)
    mask = mb.response_mask
    adv = jnp.broadcast_to(mb.advantages[:, None], logp.shape)
    terms = losses.ppo_token_loss(logp, mb.old_logp, adv, s.eps_low, s.eps_high, s.dual_clip)
    agg = lambda x: losses.aggregate(x, mask, s.loss_agg, norm)  # noqa: E731
    loss = agg(terms.loss)
    if s.entropy_coef:
        loss -= s.entropy_coef * agg(ent)
    kl = losses.kl_penalty(logp, mb.ref_logp, s.kl_estimator)
    if s.kl_coef:
        loss += s.kl_coef * agg(kl)
    d = jax.lax.stop_gradient(losses.log_ratio(logp, mb.old_logp))
    sums = {
        "pg_clipfrac": jnp.sum(terms.clipped * mask),
        "pg_clipfrac_lower": jnp.sum(terms.dual_clipped * mask),
        "approx_kl": jnp.sum((jnp.exp(d) - 1 - d) * mask),  # k3 estimate of KL(old || new)
        "kl": jnp.sum(jax.lax.stop_gradient(kl) * mask),
        "update_entropy": jnp.sum(jax.lax.stop_gradient(ent) * mask),
    }
    return loss, sums


def update(state: TrainState, graphdef, tx, mini: Batch, s: LossSettings):
    """One optimizer update on a mini-batch, gradients accumulated over micro-batches."""
    norm = losses.agg_norm(mini.response_mask)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_step(carry, mb):
        grads, loss, sums = carry
        (mb_loss, mb_sums), g = grad_fn(state.params, graphdef, mb, norm, s)
        add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
        return (add(grads, g), loss + mb_loss, add(sums, mb_sums)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros(()), dict.fromkeys(_TOKEN_SUMS, jnp.zeros(())))
    (grads, loss, sums), _ = jax.lax.scan(micro_step, init, _micro_batches(mini, s.micro_batch))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    tokens = jnp.maximum(jnp.sum(mini.response_mask), 1.0)
    metrics = {k: v / tokens for k, v in sums.items()} | {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
    }
    return state.replace(params=params, opt_state=opt_state), metrics


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
    """Host-side padding of N (prompt, response) pairs into the `Batch` layout."""
    n = len(responses)
    ids = np.full((n, prompt_len + response_len), pad_id, np.int32)
    attn = np.zeros((n, prompt_len + response_len), np.int32)
    resp_mask = np.zeros((n, response_len), np.float32)
    logp = np.zeros((n, response_len), np.float32)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, sampler_logp, strict=True)):
        if len(p) > prompt_len or len(r) > response_len:
            raise ValueError(f"sequence {i}: prompt {len(p)} / response {len(r)} tokens too long")
        ids[i, prompt_len - len(p) : prompt_len] = p
        ids[i, prompt_len : prompt_len + len(r)] = r
        attn[i, prompt_len - len(p) : prompt_len + len(r)] = 1
        resp_mask[i, : len(r)] = 1
        logp[i, : len(r)] = lp
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "response_mask": resp_mask,
        "advantages": np.asarray(advantages, np.float32),
        "sampler_logp": logp,
    }
