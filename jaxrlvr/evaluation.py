"""Avg@k and Pass@k of a policy on held-out prompts."""

from __future__ import annotations

import numpy as np


def avg_and_pass_at_k(correct: np.ndarray) -> tuple[float, float]:
    """`correct` [prompts, k] booleans -> (Avg@k, Pass@k).

    Avg@k is the mean accuracy over all k samples of every prompt; Pass@k the fraction of
    prompts with at least one correct sample.
    """
    correct = np.asarray(correct, bool)
    if correct.size == 0:
        return float("nan"), float("nan")
    return float(correct.mean()), float(correct.any(axis=1).mean())
