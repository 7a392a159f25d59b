"""Clip-Cov (Cui et al. 2025): detach from the gradient a random `ratio` of the tokens
whose centred covariance of log-prob and advantage lies in (lb, ub)."""

from __future__ import annotations

import dataclasses
import functools

from jaxrlvr import losses
from jaxrlvr.methods.base import Method, TokenLoss, register, setting


@register
@dataclasses.dataclass(frozen=True)
class ClipCov(Method):
    name = "clip_cov"
    summary = "detach a random ratio of the tokens whose covariance lies in (lb, ub)"

    settings_doc = "The selection is made per micro-batch, as in the reference code."

    ratio: float = setting(
        2e-4,
        "fraction of tokens detached among the covariance candidates",
        must="in (0, 1]",
        doc="Detach `max(1, floor(ratio * N_valid))` random tokens among the candidates.",
    )
    lb: float = setting(
        1.0,
        "candidates have covariance > lb",
        doc="Candidates: `lb < cov < ub`, not PPO-clipped, valid.",
    )
    ub: float = setting(5.0, "candidates have covariance < ub", doc="Must be > `lb`.")

    def validate(self, config, need, one_of) -> None:
        need(self.lb < self.ub, "algo.clip_cov.ub", "must be > algo.clip_cov.lb")

    def token_loss(self, key, logp, mb, adv, inputs, s):
        select = functools.partial(
            losses.clip_cov_token_loss, eps_low=s.eps_low, eps_high=s.eps_high,
            ratio=self.ratio, lb=self.lb, ub=self.ub,
        )  # fmt: skip
        terms, selected = self.per_group(
            select, s.cov_groups, logp, mb.old_logp, adv, mb.response_mask, key=key
        )
        return TokenLoss(terms.loss, terms.clipped, terms.dual_clipped, selected, 1.0 - selected)

    def metrics(self, token, inputs, controller):
        return {"clip_cov_frac": token["intervention_frac"]}
