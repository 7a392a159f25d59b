"""KL-Cov (Cui et al. 2025): on the `ratio` of tokens with the largest covariance of
log-prob and advantage, the clipped surrogate is replaced by the unclipped one plus
`kl_coef * |logp - old_logp|`."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from jaxrlvr import losses
from jaxrlvr.methods.base import Method, TokenLoss, register, setting


@register
@dataclasses.dataclass(frozen=True)
class KLCov(Method):
    name = "kl_cov"
    summary = "penalise |logp - old_logp| on the tokens of largest covariance"

    settings_doc = "No ratio clipping (`l = -A r`); the selection is per micro-batch."

    ratio: float = setting(
        2e-3,
        "fraction of tokens with the highest covariance penalised",
        must="in (0, 1]",
        doc="Penalise the top `max(1, floor(ratio * N_valid))` tokens by cov.",
    )
    kl_coef: float = setting(
        1.0,
        "weight of |logp - old_logp| on the selected tokens",
        must=">= 0",
        doc="Penalty `kl_coef * abs(logp - old_logp)` on those tokens.",
    )

    def token_loss(self, key, logp, mb, adv, inputs, s):
        select = functools.partial(losses.kl_cov_token_loss, ratio=self.ratio, kl_coef=self.kl_coef)
        loss, selected = self.per_group(
            select, s.cov_groups, logp, mb.old_logp, adv, mb.response_mask
        )
        zeros = jnp.zeros_like(logp)
        return TokenLoss(loss, zeros, zeros, selected, jnp.ones_like(logp))

    def metrics(self, token, inputs, controller):
        return {"kl_cov_frac": token["intervention_frac"]}
