"""Evaluation of a policy on held-out benchmarks: accuracy, Pass@k, majority vote,
calibration and diversity of its n samples per prompt.

An eval set is named and carries its own file(s), prompt and answer fields and prompt
template, written `name=NAME,path=PATH,prompt_field=F,answer_field=F,template=T` (every
key but `path` optional; `PATH` a local path, a glob or a URL) or, in short,
`NAME=PATH[:answer_field[:template]]`; a set without a name is named after its file
(`jaxrlvr.data.files`). The
trainer's in-loop evaluation and `python -m jaxrlvr.evaluate` both sample through
`Evaluator` and compute the same metrics with `benchmark_metrics`:

- `avg@n`: mean correctness over all n samples of every prompt;
- `pass@k` for k = 1, 2, 4, ... up to n (and n): the unbiased estimator
  `1 - C(n - c, k) / C(n, k)` of the chance that k samples hold a correct one, with c
  correct among the prompt's n, averaged over prompts;
- `maj@n`: the prompt counts as solved when the most frequent extracted answer (answers
  compared as strings after whitespace normalisation; ties go to the first seen) is a
  correct one;
- `length`: mean response length in tokens;
- `ece`: expected calibration error of the confidence `exp(mean token log-prob)` (the
  sequence's geometric-mean token probability at the sampling temperature) against
  correctness, over 10 equal-width bins: `sum_b |B_b| / N * |mean conf_b - mean acc_b|`;
- `distinct_1`, `distinct_2`: distinct token n-grams over all n-grams of a prompt's n
  responses, averaged over prompts;
- `dissimilarity`: mean over pairs of a prompt's responses of `1 - Jaccard` of their
  token-bigram sets (0: identical, 1: nothing shared), averaged over prompts.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrlvr.data.files import DataSpec, parse_specs
from jaxrlvr.study import markdown

ECE_BINS = 10


EvalSpec = DataSpec  # an eval set: a `DataSpec` with its name


def parse_eval_specs(
    text: str | Sequence[str] | None, answer_field: str = "", template: str = ""
) -> list[EvalSpec]:
    """The eval sets of `text` (`jaxrlvr.data.files` syntax) with distinct names; a set's
    unset answer field and template take the given defaults."""
    return [
        dataclasses.replace(
            s, answer_field=s.answer_field or answer_field, template=s.template or template
        )
        for s in parse_specs(text, eval_sets=True)
    ]


# ---------------------------------------------------------------------------- metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k of the reported Pass@k: 1, 2, 4, ... below n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i < n]
    return [*ks, n]


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent extracted answer is a correct one (None never votes)."""
    norm = [" ".join(a.split()) if a is not None else None for a in answers]
    votes = Counter(a for a in norm if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in norm if a is not None and votes[a] == top)  # first seen wins ties
    return any(ok for a, ok in zip(norm, correct, strict=True) if a == winner)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS):
    """ECE over `bins` equal-width confidence bins (see module docstring)."""
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, float)
    if confidence.size == 0:
        return float("nan")
    idx = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(confidence[sel].mean() - correct[sel].mean())
    return float(total)


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(responses: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of a group of responses (NaN if none)."""
    grams = [g for r in responses for g in _ngrams(r, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def pairwise_dissimilarity(responses: Sequence[Sequence[int]], n: int = 2) -> float:
    """Mean over pairs of `1 - Jaccard(n-gram sets)` (NaN with fewer than 2 responses)."""
    sets = [set(_ngrams(r, n)) or {tuple(r)} for r in responses]
    values = [
        1.0 - len(a & b) / len(a | b) if a | b else 0.0
        for i, a in enumerate(sets)
        for b in sets[i + 1 :]
    ]
    return float(np.mean(values)) if values else float("nan")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sampled response to an eval prompt, scored."""

    benchmark: str
    prompt_index: int
    sample_index: int
    token_ids: tuple[int, ...]
    text: str
    answer: str | None  # the extracted final answer
    correct: bool
    mean_logp: float  # mean token log-prob at the sampling temperature

    def record(self) -> dict[str, Any]:
        """The `samples.jsonl` row."""
        return {
            "benchmark": self.benchmark,
            "prompt_index": self.prompt_index,
            "sample_index": self.sample_index,
            "response": self.text,
            "answer": self.answer,
            "correct": self.correct,
            "length": len(self.token_ids),
        }


def benchmark_metrics(samples: Sequence[Sample], n: int) -> dict[str, float]:
    """Every metric of the module docstring over the samples of one benchmark (or of
    several pooled), n samples per prompt."""
    groups: dict[tuple[str, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.benchmark, s.prompt_index), []).append(s)
    if not groups:
        return {}
    if any(len(g) != n for g in groups.values()):
        raise ValueError(f"every prompt needs exactly n={n} samples")
    correct = [[s.correct for s in g] for g in groups.values()]
    out = {f"avg@{n}": float(np.mean(correct))}
    for k in pass_ks(n):
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, sum(c), k) for c in correct]))
    out[f"maj@{n}"] = float(
        np.mean(
            [
                majority_correct([s.answer for s in g], [s.correct for s in g])
                for g in groups.values()
            ]
        )
    )
    out["length"] = float(np.mean([len(s.token_ids) for s in samples]))
    conf = np.exp([s.mean_logp for s in samples])
    out["ece"] = expected_calibration_error(conf, [s.correct for s in samples])
    tokens = [[list(s.token_ids) for s in g] for g in groups.values()]
    for k in (1, 2):
        out[f"distinct_{k}"] = float(np.nanmean([distinct_n(t, k) for t in tokens]))
    out["dissimilarity"] = float(np.nanmean([pairwise_dissimilarity(t) for t in tokens]))
    out["prompts"] = len(groups)
    return out


# ---------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A named set of tokenized eval prompts (`jaxrlvr.data.PromptSet`)."""

    spec: EvalSpec
    prompts: Any

    @classmethod
    def checked(cls, spec: EvalSpec, prompts: Any, max_prompt_len: int) -> EvalSet:
        """The set, unless it keeps no prompt: an empty set would score nothing and still
        read like a result (`ValueError` naming the file)."""
        if not len(prompts):
            raise ValueError(
                f"no prompt of {spec.path} is kept ({prompts.num_dropped} longer than "
                f"max_prompt_len={max_prompt_len} tokens)"
            )
        return cls(spec, prompts)


class Evaluator:
    """Samples `n` responses per prompt of every eval set and scores them.

    `rollouts` is a `jaxrlvr.rl.rollouts.RolloutCollector` (its engine holds the policy to
    evaluate); `max_prompts` keeps the first prompts of each set (0 = all).
    """

    def __init__(self, sets: Sequence[EvalSet], rollouts, n: int, max_prompts: int = 0):
        self.sets, self.rollouts, self.n, self.max_prompts = list(sets), rollouts, n, max_prompts

    def sample(self, seed: int) -> tuple[list[Sample], tuple[int, int]]:
        """Scored samples of every set (all sets in one generation call), and the counts
        of checker errors and time-outs."""
        ids, answers, owners = [], [], []
        for set_index, s in enumerate(self.sets):
            count = (
                len(s.prompts) if not self.max_prompts else min(self.max_prompts, len(s.prompts))
            )
            for i in range(count):
                ids.append([int(t) for t in s.prompts.input_ids[i]])
                answers.append(s.prompts.answers[i])
                owners.append((set_index, i))
        out = self.rollouts.generate(ids, self.n, seed)
        flat = [comp for group in out for comp in group]
        scores = self.rollouts.score(flat, answers, self.n)
        texts = [self.rollouts.decode(c.token_ids) for c in flat]
        extracted = self.rollouts.reward_fn.extract_answers(texts)
        samples = []
        for j, comp in enumerate(flat):
            set_index, prompt_index = owners[j // self.n]
            samples.append(
                Sample(
                    benchmark=self.sets[set_index].spec.name,
                    prompt_index=prompt_index,
                    sample_index=j % self.n,
                    token_ids=tuple(comp.token_ids),
                    text=texts[j],
                    answer=extracted[j],
                    correct=bool(scores.rewards[j] >= 1.0),
                    mean_logp=float(np.mean(comp.logprobs)) if comp.logprobs else 0.0,
                )
            )
        return samples, (scores.errors, scores.timeouts)

    def metrics(self, samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
        """`{benchmark: {metric: value}}`, plus `all` pooling every set when there are
        several."""
        out = {
            s.spec.name: benchmark_metrics(
                [x for x in samples if x.benchmark == s.spec.name], self.n
            )
            for s in self.sets
        }
        if len(self.sets) > 1:
            out["all"] = benchmark_metrics(samples, self.n)
        return out


def flat_eval_metrics(per_benchmark: dict[str, dict[str, float]]) -> dict[str, float]:
    """The `metrics.jsonl` keys of an evaluation: `eval_<metric>` over all prompts and,
    with several sets, `eval/<benchmark>/<metric>` for each."""
    pooled = per_benchmark.get("all") or next(iter(per_benchmark.values()))
    out = {f"eval_{k}": v for k, v in pooled.items()}
    if "all" in per_benchmark:
        for name, metrics in per_benchmark.items():
            if name != "all":
                out |= {f"eval/{name}/{k}": v for k, v in metrics.items()}
    return out


def markdown_table(per_benchmark: dict[str, dict[str, float]]) -> str:
    """One row per benchmark, one column per metric."""
    keys = list(next(iter(per_benchmark.values())))
    rows = [
        [name, *(f"{m[k]:.4g}" if isinstance(m[k], float) else str(m[k]) for k in keys)]
        for name, m in per_benchmark.items()
    ]
    return "\n".join(markdown.table(["benchmark", *keys], rows)) + "\n"
