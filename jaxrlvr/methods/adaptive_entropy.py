"""Adaptive entropy control (Skywork-OR1): a bonus coefficient alpha that steps up when
the entropy estimate falls below the target and down when above, clipped to
[alpha_min, alpha_max]; the bonus is on only while the estimate is below the target."""

from __future__ import annotations

import dataclasses

from jaxrlvr import losses
from jaxrlvr.methods.base import Method, register, setting


@register
@dataclasses.dataclass(frozen=True)
class AdaptiveEntropy(Method):
    name = "adaptive_entropy"
    summary = "an entropy bonus whose coefficient a controller steers toward a target entropy"

    settings_doc = "Skywork-OR1's controller."
    reads_entropy_estimate = True  # the bonus is on only while H_hat < target

    target: float = setting(
        0.2,
        "target entropy of the adaptive controller (nats)",
        must="> 0",
        doc="Target entropy (nats) for `H_hat = -token-mean(old_logp)` over the rollout "
        "batch. The bonus `alpha * agg(H)` applies in a step only while H_hat < target.",
    )
    delta: float = setting(
        1e-4,
        "controller step of alpha per training step",
        must=">= 0",
        doc="Controller step: after each step alpha += delta if H_hat < target, else "
        "alpha -= delta.",
    )
    alpha_min: float = setting(0.0, "lower clip of alpha", must=">= 0", doc="Lower clip of alpha.")
    alpha_max: float = setting(
        0.005, "upper clip of alpha", doc="Upper clip of alpha. Must be >= `alpha_min`."
    )
    alpha0: float = setting(
        0.0, "initial alpha", doc="Initial alpha. Must be in [`alpha_min`, `alpha_max`]."
    )

    def validate(self, config, need, one_of) -> None:
        key = "algo.adaptive_entropy."
        need(self.alpha_min <= self.alpha_max, key + "alpha_max", "must be >= alpha_min")
        need(
            self.alpha_min <= self.alpha0 <= self.alpha_max,
            key + "alpha0",
            "must be in [alpha_min, alpha_max]",
        )

    def init_controller(self):
        return losses.adaptive_entropy_init(self.alpha0)

    def step_inputs(self, controller, ctx):
        return {"alpha": losses.adaptive_entropy_coef(controller, ctx.h_hat, target=self.target)}

    def finish_step(self, controller, entropy, inputs):
        return losses.adaptive_entropy_update(
            controller,
            inputs["h_hat"],
            target=self.target,
            delta=self.delta,
            alpha_min=self.alpha_min,
            alpha_max=self.alpha_max,
        )

    def entropy_bonus(self, inputs):
        return inputs["alpha"]

    def metrics(self, token, inputs, controller):
        return {
            "alpha": float(inputs["alpha"]),
            "entropy_estimate": float(inputs["h_hat"]),
            "alpha_next": float(controller.alpha),
        }
