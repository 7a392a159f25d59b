"""Per-item check statuses and the result type every reward function returns.

Every checker reports *why* an item scored what it did, so the trainer can log
`reward_errors` (exceptions and time-outs) separately from plain wrong answers.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple, Protocol

import numpy as np

OK = "ok"  # answer found and equivalent to the ground truth: reward 1
WRONG = "wrong"  # answer found, not equivalent: reward 0
NO_ANSWER = "no_answer"  # no final answer could be extracted: reward 0
ERROR = "error"  # the checker raised (or its worker died): reward 0, counted
TIMEOUT = "timeout"  # the check ran past its wall-clock limit and was killed: reward 0, counted

STATUSES: tuple[str, ...] = (OK, WRONG, NO_ANSWER, ERROR, TIMEOUT)
FAILURE_STATUSES: frozenset[str] = frozenset({ERROR, TIMEOUT})


class ScoreResult(NamedTuple):
    """Rewards for a batch plus one status per item; unpacks as `rewards, status`."""

    rewards: np.ndarray  # float32 [N]: 1.0 for OK, 0.0 otherwise
    status: tuple[str, ...]  # one of STATUSES per item

    @property
    def num_errors(self) -> int:
        """Items that raised or timed out (the `reward_errors` metric)."""
        return sum(s in FAILURE_STATUSES for s in self.status)

    def counts(self) -> dict[str, int]:
        """Number of items per status, every status present (zeros included)."""
        c = Counter(self.status)
        return {s: int(c.get(s, 0)) for s in STATUSES}


def result_from_status(status: list[str] | tuple[str, ...]) -> ScoreResult:
    """Build a ScoreResult whose rewards are 1.0 exactly where status is OK."""
    status = tuple(status)
    unknown = set(status) - set(STATUSES)
    if unknown:
        raise ValueError(f"unknown check status {sorted(unknown)}; allowed: {STATUSES}")
    rewards = np.asarray([1.0 if s == OK else 0.0 for s in status], dtype=np.float32)
    return ScoreResult(rewards=rewards, status=status)


class RewardFn(Protocol):
    """What the trainer calls: score a batch of responses against ground-truth answers."""

    def score_batch(self, responses: list[str], answers: list[str]) -> ScoreResult: ...

    def extract_answers(self, responses: list[str]) -> list[str | None]: ...

    def close(self) -> None: ...
