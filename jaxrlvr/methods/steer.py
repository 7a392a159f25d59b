"""STEER: per-token weights from the token's share of the step's entropy change
(docs/algorithms.md#steer). Each token's first-order entropy change omega is estimated
from its log-prob, old log-prob and old entropy; weights are mapped into
[lambda_min, lambda_max] (exponentially, or linearly with `linear`), normalised over
groups of `norm_sequences` sequences, and detached."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxrlvr import losses
from jaxrlvr.methods.base import Method, register, setting


@register
@dataclasses.dataclass(frozen=True)
class Steer(Method):
    name = "steer"
    summary = "token weights in [lambda_min, lambda_max] from each token's entropy change"

    lambda_min: float = setting(
        0.8, "smallest STEER token weight", must="in (0, 1]", doc="Smallest token weight."
    )
    lambda_max: float = setting(
        1.0,
        "largest weight of the linear variant",
        doc="Largest weight of the linear variant. Not used by the exponential variant. "
        "Must be >= `lambda_min`.",
    )
    linear: bool = setting(
        False,
        "linear (True) or exponential (False) weights",
        doc="`False`: exponential weights. `True`: linear weights (`configs/steer.py:linear` "
        "also sets `lambda_max=1.2`).",
    )
    norm_sequences: int = setting(
        8,
        "sequences per normalisation group (divides the micro-batch)",
        doc="Max/min of Omega are taken over groups of this many consecutive sequences. "
        "Must be >= 1 and divide `train.micro_batch_sequences`.",
    )

    def validate(self, config, need, one_of) -> None:
        key, micro = "algo.steer.", config.train.micro_batch_sequences
        need(self.lambda_max >= self.lambda_min, key + "lambda_max", "must be >= lambda_min")
        need(
            self.norm_sequences >= 1 and micro % self.norm_sequences == 0,
            key + "norm_sequences",
            f"must be >= 1 and divide train.micro_batch_sequences ({micro}) so groups never "
            "straddle micro-batches",
        )

    def token_loss(self, key, logp, mb, adv, inputs, s):
        weights = losses.steer_weights(
            logp, mb.old_logp, mb.old_entropy, adv, mb.response_mask,
            lambda_min=self.lambda_min, lambda_max=self.lambda_max,
            linear=self.linear, norm_sequences=self.norm_sequences,
        )  # fmt: skip
        return self.weighted_ppo(logp, mb, adv, s, weights, selected=jnp.zeros_like(logp))

    def metrics(self, token, inputs, controller):
        return {"steer_weight_mean": token["weight_mean"], "steer_weight_min": token["weight_min"]}
