"""The entropy-performance law of Cui et al.: `R = -a * exp(H) + b`.

Over an RL run a policy trades entropy H for performance R; Cui et al. find that this
trade follows `R = -a exp(H) + b` closely, with a > 0 and b the score at zero entropy
(the ceiling once the entropy is spent). The law is linear in `x = exp(H)`, so the fit
is ordinary least squares of R on x (no iteration): `a = -cov(x, R) / var(x)`,
`b = mean(R) + a mean(x)`, and `rmse` is the root-mean-square residual.

A fit needs at least 3 (entropy, score) pairs and entropies that vary; otherwise
`LawFitError` says why and gives the data's range. `early_prediction` fits the pairs
of the first 15% of a run's steps and predicts the final score from the final entropy,
as Cui et al. predict final performance early in training.

Pairs come from a run's `metrics.jsonl` (`pairs`): a training metric such as
`reward_mean` (sampled from the policy before the step's updates) is paired with the
same row's `entropy` (of that policy, on those rollouts); an evaluation metric at step s
(the policy after s steps) with the entropy of row s + 1 (that policy's), and at the
last step, which has no next row, with its own row's entropy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

EARLY_FRACTION = 0.15
MIN_PAIRS = 3


class LawFitError(ValueError):
    """A fit that cannot be made; the message says why, with the data's range."""


@dataclasses.dataclass(frozen=True)
class LawFit:
    """`R = -a exp(H) + b` fitted to `n` pairs."""

    a: float
    b: float
    rmse: float
    n: int

    def predict(self, entropy: float | np.ndarray) -> float | np.ndarray:
        return -self.a * np.exp(entropy) + self.b


def fit_law(entropy: Sequence[float], score: Sequence[float]) -> LawFit:
    """Least-squares fit of `score = -a exp(entropy) + b` (see module docstring)."""
    h, r = np.asarray(entropy, float), np.asarray(score, float)
    keep = np.isfinite(h) & np.isfinite(r)
    h, r = h[keep], r[keep]
    if len(h) < MIN_PAIRS:
        raise LawFitError(f"{len(h)} (entropy, score) pairs; the fit needs at least {MIN_PAIRS}")
    x = np.exp(h)
    var = np.var(x)
    if not var > 1e-12 * max(np.mean(x) ** 2, 1e-30):
        raise LawFitError(
            f"the entropy does not vary (range {h.min():.6g} .. {h.max():.6g} nats over "
            f"{len(h)} pairs): the fit has no slope to find"
        )
    a = -float(np.mean((x - x.mean()) * (r - r.mean())) / var)
    b = float(r.mean() + a * x.mean())
    rmse = float(np.sqrt(np.mean((r - (-a * x + b)) ** 2)))
    return LawFit(a=a, b=b, rmse=rmse, n=int(len(h)))


def pairs(rows: Sequence[dict[str, Any]], score_key: str) -> tuple[np.ndarray, ...]:
    """(steps, entropy, score) of a run's metrics rows for `score_key` (see module
    docstring for which entropy each score is paired with)."""
    entropy = {r["step"]: r["entropy"] for r in rows if r.get("entropy") is not None}
    evaluation = score_key.startswith("eval")
    out = []
    for r in rows:
        score = r.get(score_key)
        if score is None:
            continue
        s = r["step"]
        h = entropy.get(s + 1, entropy.get(s)) if evaluation else entropy.get(s)
        if h is not None:
            out.append((s, h, score))
    if not out:
        return np.zeros(0, int), np.zeros(0), np.zeros(0)
    steps, h, score = map(np.asarray, zip(*out, strict=True))
    return steps, h.astype(float), score.astype(float)


def early_prediction(
    steps: np.ndarray, entropy: np.ndarray, score: np.ndarray, fraction: float = EARLY_FRACTION
) -> dict[str, float]:
    """Fit on the pairs within the first `fraction` of the steps, predict the last
    pair's score from its entropy: `predicted_final`, `actual_final`, the early `a`, `b`."""
    last = int(np.max(steps))
    early = steps <= math.floor(fraction * last)
    try:
        fit = fit_law(entropy[early], score[early])
    except LawFitError as e:
        raise LawFitError(f"first {fraction:.0%} of {last} steps: {e}") from None
    final = int(np.argmax(steps))
    return {
        "predicted_final": float(fit.predict(entropy[final])),
        "actual_final": float(score[final]),
        "early_a": fit.a,
        "early_b": fit.b,
        "early_pairs": fit.n,
    }
