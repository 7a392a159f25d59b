"""Reward for the embedded arithmetic demo: exact match of the integer after the last '#'.

Pure string work that cannot hang, so it runs in-process (no worker pool).
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxrlvr.data.arithmetic import extract_answer
from jaxrlvr.rewards.types import ERROR, NO_ANSWER, OK, WRONG, ScoreResult, result_from_status


def check_demo_response(response: str, answer: str | int) -> str:
    """OK if the response ends with `#<answer>`; NO_ANSWER if malformed; ERROR if the
    ground truth is not an integer."""
    try:
        gold = int(str(answer).strip())
    except ValueError:
        return ERROR
    pred = extract_answer(response)
    if pred is None:
        return NO_ANSWER
    return OK if pred == gold else WRONG


class DemoReward:
    """Reward 1 for an exactly right final answer on the arithmetic demo task, else 0."""

    name = "demo"

    def score_batch(self, responses: Sequence[str], answers: Sequence[str]) -> ScoreResult:
        """Score response i against answers[i]; returns (rewards float32 [N], statuses)."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        return result_from_status(
            [check_demo_response(r, a) for r, a in zip(responses, answers, strict=True)]
        )

    def extract_answers(self, responses: Sequence[str]) -> list[str | None]:
        """The final answer of each response as a string (None where there is none)."""
        return [None if (a := extract_answer(r)) is None else str(a) for r in responses]

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> DemoReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
