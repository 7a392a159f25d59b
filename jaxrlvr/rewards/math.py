r"""Math answers checked with `math-verify`, each check under a hard wall-clock limit.

Extraction (`extract_answer`): the response's final answer is whichever comes last of

- the last `\boxed{...}` (or `\fbox{...}`, or `\boxed 5`), braces matched, and
- the last DAPO-style `Answer: ...` line (case-insensitive, markdown `**` allowed);
  if that line holds inline math (`$...$`) the last such span is the answer.

Surrounding `$`, `\(...\)`, `\[...\]`, `*`, a trailing period and special-token
strings such as `<|im_end|>` are stripped.

Comparison (`check_math_response`): in the extracted answer and in the ground truth,
digit-group separators are removed (`ungroup_digits`: `1\,000`, `1{,}000`, `1\!000`,
`1\ 000`, `1~000`, `1 000` -> `1000`; math-verify reads a LaTeX space between digits as
a product, so `1\,000` would be `1*0`); both are then wrapped as `\boxed{...}`, parsed
with `math_verify.parse` and compared with `math_verify.verify(gold, pred)`, so whatever
math-verify deems equivalent scores 1 (`0.5`, `1/2`, `\frac{1}{2}`, `\dfrac12`; `1,000`
and `1000`; `\sqrt{50}` and `5\sqrt{2}`). Nothing else is added on top. How this
compares with math-verify on whole responses and with verl's DAPO scorer, form by form:
docs/training.md, "The math reward".

Time limit (`MathReward`): math-verify's own time-outs use `signal.alarm`, which works
only in the main thread and cannot interrupt C-level bignum arithmetic, so they are off
here; instead every check runs in a `CheckerPool` subprocess that is killed and replaced
when one item exceeds `timeout_s` (status TIMEOUT, reward 0, counted as an error).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence

from jaxrlvr.rewards.pool import CheckerPool
from jaxrlvr.rewards.types import NO_ANSWER, OK, WRONG, ScoreResult, result_from_status

log = logging.getLogger(__name__)

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_RE = re.compile(r"(?i)\banswer\**\s*:\s*\**[ \t]*([^\n]*)")
_INLINE_MATH_RE = re.compile(r"\$+([^$]+?)\$+")
_SPECIAL_TOKEN_RE = re.compile(r"<\|[^|<>\s]*\|>")  # e.g. <|im_end|> left in by the decoder
# A thousands separator: a thin/medium/thick/normal/negative LaTeX space, a tie, `{,}` or a
# plain space. A comma alone is left to math-verify, which reads `1,000` as 1000 but
# `1,5` as the set {1, 5}.
_GROUP_SEP = r"(?:\\[,:;! ]|\\thinspace(?![A-Za-z]) ?|~|\{,\}| )"
# A whole number in groups of three: 1-3 leading digits, then separator + 3 digits, at
# least once; not part of a longer digit run or of a decimal's fraction.
_GROUPED_RE = re.compile(rf"(?<![\d.])\d{{1,3}}(?:{_GROUP_SEP}\d{{3}})+(?![\d])")
_GROUP_SEP_RE = re.compile(_GROUP_SEP)


def _boxed_content(text: str, start: int) -> str | None:
    """Content of the \\boxed command whose name ends at `start`, or None if malformed."""
    j = start
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        depth = 0
        for k in range(j, len(text)):
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
                if depth == 0:
                    return text[j + 1 : k]
        return None  # unbalanced braces (e.g. response cut off at max length)
    if j > start:  # "\boxed 5": one token
        m = re.match(r"[^\s$]+", text[j:])
        return m.group(0) if m else None
    return None


def _clean(ans: str) -> str:
    ans = _SPECIAL_TOKEN_RE.sub("", ans).strip()
    spans = _INLINE_MATH_RE.findall(ans)
    if spans:
        ans = spans[-1]
    ans = ans.strip().strip("*").strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if ans.startswith(left) and ans.endswith(right):
            ans = ans[len(left) : -len(right)]
    ans = ans.strip().strip("$").strip()
    if ans.endswith("."):
        ans = ans[:-1].rstrip()
    return ans


def extract_answer(response: str) -> str | None:
    """The final answer of a response (see module docstring), or None if there is none."""
    boxed: tuple[int, str] | None = None
    for m in reversed(list(_BOXED_RE.finditer(response))):
        content = _boxed_content(response, m.end())
        if content is not None:
            boxed = (m.start(), content)
            break
    line: tuple[int, str] | None = None
    for m in reversed(list(_ANSWER_RE.finditer(response))):
        line = (m.start(), m.group(1))
        break
    if boxed is None and line is None:
        return None
    if line is not None and (boxed is None or line[0] > boxed[0]):
        ans = _clean(line[1])
    else:
        ans = _clean(boxed[1])
    return ans or None


def ungroup_digits(expr: str) -> str:
    r"""`expr` with the separators of digit groups removed: `1\,000\,000` -> `1000000`.

    Only whole numbers written in groups of exactly three digits qualify, so `2\,3`,
    `x\,y` and `0.123\,456` are left alone.
    """
    return _GROUPED_RE.sub(lambda m: _GROUP_SEP_RE.sub("", m.group(0)), expr)


def _parse(expr: str) -> list:
    from math_verify import parse

    # Time-outs are enforced by the worker pool (see module docstring).
    expr = ungroup_digits(expr)
    return parse("\\boxed{" + expr + "}", parsing_timeout=None, raise_on_error=True)


@functools.lru_cache(maxsize=8192)
def _parse_gold(answer: str) -> list:
    parsed = _parse(answer)
    if not parsed:
        raise ValueError(f"math-verify could not parse the ground truth {answer[:200]!r}")
    return parsed


def check_math_response(response: str, answer: str) -> str:
    """Status of one response against its ground truth: OK, WRONG or NO_ANSWER.

    Runs unguarded: call it through `MathReward` (or a `CheckerPool`) for the time limit.
    Raises on checker failures (the pool turns them into ERROR).
    """
    from math_verify import verify

    pred = extract_answer(response)
    if pred is None:
        return NO_ANSWER
    gold = _parse_gold(str(answer).strip())
    target = _parse(pred)
    if not target:
        return WRONG
    return OK if verify(gold, target, timeout_seconds=None) else WRONG


def warmup() -> None:
    """Load math-verify and its LaTeX grammar before a worker reports ready."""
    import math_verify.grader
    import math_verify.parser

    # We enforce time limits ourselves; silence math-verify's "timeout disabled" warning.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    check_math_response("\\boxed{\\frac{1}{2}}", "0.5")


def default_num_workers() -> int:
    """Half the CPUs, between 1 and 8: checks are cheap, the host has other work."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class MathReward:
    """Reward 1 when math-verify finds the response's final answer equal to the ground truth.

    `score_batch` runs the checks in `num_workers` subprocesses, each check limited to
    `timeout_s` of wall-clock time and the whole batch to `batch_timeout_s` (None = no
    limit); time-outs and exceptions score 0 and are counted.
    """

    name = "math"

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        checker: str = "jaxrlvr.rewards.math:check_math_response",
        batch_timeout_s: float | None = None,
    ):
        self.pool = CheckerPool(
            checker, num_workers=num_workers or default_num_workers(), timeout_s=timeout_s
        )
        self.batch_timeout_s = batch_timeout_s

    def score_batch(self, responses: Sequence[str], answers: Sequence[str]) -> ScoreResult:
        """Score response i against answers[i]; returns (rewards float32 [N], statuses)."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        items = [(str(r), str(a)) for r, a in zip(responses, answers, strict=True)]
        out = self.pool.map(items, batch_timeout_s=self.batch_timeout_s)
        result = result_from_status([s for s, _ in out])
        if result.num_errors:
            first = next(d for s, d in out if s not in (OK, WRONG, NO_ANSWER))
            log.warning(
                "math reward: %d of %d checks failed (%s); first: %s",
                result.num_errors,
                len(out),
                {k: v for k, v in result.counts().items() if v},
                first,
            )
        return result

    def extract_answers(self, responses: Sequence[str]) -> list[str | None]:
        """The final answer of each response (`extract_answer`; None where there is none)."""
        return [extract_answer(r) for r in responses]

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()

    def __enter__(self) -> MathReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
