"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the PPO clip on the
sequence's importance ratio, the geometric mean of its tokens' ratios, instead of each
token's (verl's `gspo` policy loss). The clip range is `algo.eps_low` / `algo.eps_high`
(GSPO's are tiny, 3e-4 / 4e-4: `configs/gspo.py`); there is no dual clip."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxrlvr import losses
from jaxrlvr.methods.base import Method, TokenLoss, register, setting


@register
@dataclasses.dataclass(frozen=True)
class Gspo(Method):
    name = "gspo"
    summary = "the PPO clip on each sequence's importance ratio (GSPO)"

    settings_doc = "The clip range is `algo.eps_low` / `algo.eps_high`."

    log_ratio_cap: float = setting(
        10.0,
        "upper bound of the sequence log-ratio (verl: 10)",
        must="> 0",
        doc="Upper bound of each token's copy of the sequence log-ratio (verl's clamp).",
    )

    def inert(self, config, num_epochs):
        a, out = config.algo, []
        if a.dual_clip:
            out.append(
                f"config.algo.dual_clip={a.dual_clip}: GSPO has no dual clip; it is not applied"
            )
        if a.loss_agg != "seq-mean-token-mean":
            out.append(
                f"config.algo.loss_agg={a.loss_agg!r}: GSPO is defined (and verl runs it) with "
                "seq-mean-token-mean"
            )
        return out

    def token_loss(self, key, logp, mb, adv, inputs, s):
        terms = losses.gspo_token_loss(
            logp, mb.old_logp, adv, mb.response_mask, s.eps_low, s.eps_high, self.log_ratio_cap
        )
        ones = jnp.ones_like(logp)
        return TokenLoss(terms.loss, terms.clipped, terms.dual_clipped, jnp.zeros_like(logp), ones)
