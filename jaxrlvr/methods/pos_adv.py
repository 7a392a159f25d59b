"""Positive-advantage reweighting (Wang et al. 2025, "reasoning with exploration: an
entropy perspective" ablations): tokens with A > 0 weigh lambda, tokens with A < 0 weigh
`neg_weight`. lambda follows a schedule: `constant`, `stage` (0 in the first half of the
run, 1 after), `epoch` ((e - 1) / (E - 1) over the data epochs), `entropy_guided` (a
controller stepping lambda toward keeping the entropy above `delta`), or
`rand_pos_clip` (no lambda: a random `ratio` of the A > 0 tokens is detached)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxrlvr import losses
from jaxrlvr.methods.base import Method, register, setting

SCHEDULES = losses.POS_ADV_SCHEDULES


@register
@dataclasses.dataclass(frozen=True)
class PosAdv(Method):
    name = "pos_adv"
    summary = "weigh positive- and negative-advantage tokens apart, with a lambda schedule"

    settings_doc = (
        "Weight lambda on A > 0 tokens. `stage`: lambda = 0 for the first half of "
        "`train.steps`, then linear up to 1 at the last step. `epoch`: lambda = (e - 1) / "
        "(E - 1) for data epoch e of E = ceil(steps / batches_per_epoch)."
    )

    schedule: str = setting(
        "constant",
        " | ".join(SCHEDULES),
        choices=SCHEDULES,
        doc=" \\| ".join(f"`{s}`" for s in SCHEDULES) + ". `configs/pos_adv.py` sets it "
        "from its argument (default `entropy_guided`).",
    )
    lam: float = setting(
        1.0,
        "lambda of the constant schedule (weight of A > 0 tokens)",
        must="in [0, 1]",
        doc='lambda of `constant`. `0` is the "Adv<=0 only" ablation.',
    )
    neg_weight: float = setting(
        1.0,
        "weight of A < 0 tokens",
        must=">= 0",
        doc="Weight of A < 0 tokens (all schedules except `rand_pos_clip`). `0` with "
        '`lam=1` is the "Adv>=0 only" ablation.',
    )
    delta: float = setting(
        0.2,
        "entropy_guided: target entropy",
        must=">= 0",
        doc="`entropy_guided`: target entropy. After each step, lambda -= step if that "
        "step's `entropy` < delta, else lambda += step, clipped to [0, 1].",
    )
    step: float = setting(
        0.05,
        "entropy_guided: lambda increment per step",
        must="> 0",
        doc="`entropy_guided` increment.",
    )
    lam0: float = setting(
        0.0,
        "entropy_guided: initial lambda",
        must="in [0, 1]",
        doc="`entropy_guided` initial lambda.",
    )
    ratio: float = setting(
        2e-4,
        "rand_pos_clip: fraction of A > 0 tokens zeroed",
        must="in (0, 1]",
        doc="`rand_pos_clip`: zero the weight of `max(1, floor(ratio * N_valid))` random "
        "A > 0 tokens per micro-batch.",
    )

    def inert(self, config, num_epochs):
        steps, out = config.train.steps, []
        if self.schedule == "epoch" and num_epochs == 1:
            out.append(
                f"config.algo.pos_adv.schedule='epoch': the run's {steps} steps stay within "
                "one data epoch, so lambda = (e - 1) / (E - 1) is 0 throughout and "
                "positive-advantage tokens never count: the same run as adv_neg_only. Raise "
                "train.steps, use fewer training prompts, or choose another schedule."
            )
        if self.schedule == "stage" and steps < 2:
            out.append(
                "config.algo.pos_adv.schedule='stage' needs train.steps >= 2 to raise lambda"
            )
        return out

    def init_controller(self):
        return losses.lambda_init(self.lam0 if self.schedule == "entropy_guided" else 0.0)

    def step_inputs(self, controller, ctx):
        lam = losses.pos_adv_lambda(
            self.schedule,
            controller,
            lam=self.lam,
            step=ctx.step,
            total_steps=ctx.total_steps,
            epoch=ctx.epoch + 1,
            num_epochs=ctx.num_epochs,
        )
        return {"lam": jnp.float32(lam)}

    def finish_step(self, controller, entropy, inputs):
        return losses.lambda_update(
            self.schedule, controller, entropy, delta=self.delta, step=self.step
        )

    def token_loss(self, key, logp, mb, adv, inputs, s):
        selected = jnp.zeros_like(logp)
        if self.schedule == "rand_pos_clip":
            selected = losses.rand_pos_clip_select(key, adv, mb.response_mask, ratio=self.ratio)
            weights = 1.0 - selected
        else:
            weights = losses.pos_adv_weights(adv, inputs["lam"], self.neg_weight)
        return self.weighted_ppo(logp, mb, adv, s, weights, selected)

    def metrics(self, token, inputs, controller):
        if self.schedule == "rand_pos_clip":
            return {"rand_pos_clip_frac": token["intervention_frac"]}
        out = {"lambda": float(inputs["lam"])}
        if self.schedule == "entropy_guided":
            out["lambda_next"] = float(controller.lam)
        return out
