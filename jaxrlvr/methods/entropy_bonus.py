"""Entropy regularisation: `loss -= algo.entropy_coef * agg(H)` (the coefficient is the
GRPO setting `algo.entropy_coef`; this method only insists it is on)."""

from __future__ import annotations

import dataclasses

from jaxrlvr.methods.base import Method, register


@register
@dataclasses.dataclass(frozen=True)
class EntropyBonus(Method):
    name = "entropy_bonus"
    summary = "a fixed entropy bonus, algo.entropy_coef * H subtracted from the loss"

    def validate(self, config, need, one_of) -> None:
        a = config.algo
        need(a.entropy_coef > 0, "algo.entropy_coef", "must be > 0 with intervention=entropy_bonus")
