"""Verifiable rewards: math answers (math-verify, time-limited) and the demo task's checker.

`get_reward_fn(name)` is the registry the trainer uses; every reward function has
`score_batch(responses, answers) -> ScoreResult(rewards float32 [N], status per item)`
and `close()`.
"""

from __future__ import annotations

from typing import Any

from jaxrlvr.rewards.types import (
    ERROR,
    FAILURE_STATUSES,
    NO_ANSWER,
    OK,
    STATUSES,
    TIMEOUT,
    WRONG,
    RewardFn,
    ScoreResult,
)

REWARD_NAMES: tuple[str, ...] = ("math", "demo")


def get_reward_fn(name: str, **kwargs: Any) -> RewardFn:
    """Build the reward function called `name` ("math" or "demo"); kwargs go to its class
    (for "math": `num_workers`, `timeout_s`)."""
    if name == "math":
        from jaxrlvr.rewards.math import MathReward

        return MathReward(**kwargs)
    if name == "demo":
        from jaxrlvr.rewards.demo import DemoReward

        return DemoReward(**kwargs)
    raise ValueError(f"unknown reward {name!r}; choose one of {REWARD_NAMES}")


__all__ = [
    "ERROR",
    "FAILURE_STATUSES",
    "NO_ANSWER",
    "OK",
    "REWARD_NAMES",
    "STATUSES",
    "TIMEOUT",
    "WRONG",
    "RewardFn",
    "ScoreResult",
    "get_reward_fn",
]
