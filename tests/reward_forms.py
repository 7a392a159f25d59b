r"""Answer forms of real Qwen2.5-Math responses, scored three ways: the cases behind the
reward table of docs/training.md ("The math reward").

Each `Form` is one response and its ground truth with the expected verdict of this
project's math reward (`jaxrlvr.rewards.math.check_math_response`) and of `math_verify`
used as its README does on the whole response (`verify(parse(f"${truth}$"),
parse(response))`); both are checked live by tests/test_reward_forms.py. The verdict of
verl's DAPO scorer (`verl/utils/reward_score/math_dapo.py`, `compute_score`) is recorded in
`VERL` (verl is not a dependency, and its wheel is only downloaded by hand), written by
this file's command line from the real module:

    pip download verl==0.9.1 --no-deps -d /tmp/verl
    python tests/reward_forms.py --verl /tmp/verl/verl-0.9.1-py3-none-any.whl --write

`--verl` takes the wheel (its version is read from the wheel's metadata) or the module
itself; it imports that one file by path (it needs only the standard library) and prints
the verdicts that changed. `--write` rewrites `VERL` below (with `--verl`) and the table
in docs/training.md, after checking that the project's and math_verify's verdicts are still
the recorded ones. Without options the table is printed. With `JAXRLVR_VERL_MATH_DAPO`
set to the wheel or the module, tests/test_reward_forms.py also runs verl live.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import re
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from jaxrlvr.rewards.types import NO_ANSWER, OK, WRONG
from jaxrlvr.study.markdown import table

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
DOC_BEGIN = "<!-- reward-forms: written by tests/reward_forms.py --write; edit the cases there -->"
DOC_END = "<!-- reward-forms: end -->"
VERL_MODULE = "verl/utils/reward_score/math_dapo.py"


class Form(NamedTuple):
    """One answer form: a response, its ground truth and the expected verdicts."""

    id: str
    form: str  # the form in a few words (the table's first column)
    response: str
    truth: str
    ours: str  # status of check_math_response: OK, WRONG or NO_ANSWER
    math_verify: str  # OK, WRONG, or NO_ANSWER when parse(response) finds nothing
    why: str = ""  # required where the three rewards differ


SEPARATED = "math_verify reads a product (1·0); this project removes digit-group separators first"
VERBATIM = "verl compares the box's text with the truth verbatim"
LONG_TAIL = (
    " This matches the condition in the problem, so it is the value we were asked for, and"
    " we can stop here: every other case was ruled out above."
)
WORK = "We compute step by step. " * 14

FORMS: tuple[Form, ...] = (
    # a box
    Form(
        "final-sentence",
        "Qwen2.5-Math's closing sentence",
        r"The final answer is $\boxed{5}$.",
        "5",
        OK,
        OK,
    ),
    Form(
        "paren-delims",
        r"box inside `\( \)`",
        r"Therefore, the answer is \(\boxed{-3}\).",
        "-3",
        OK,
        OK,
    ),
    Form("box-spaces", "spaces inside the box", r"\boxed{ 12 }", "12", OK, OK, VERBATIM),
    Form(
        "box-no-braces",
        r"`\boxed 7` without braces",
        r"so \boxed 7",
        "7",
        OK,
        OK,
        r"verl looks only for `\boxed{`",
    ),
    Form(
        "fbox",
        r"`\fbox`",
        r"\fbox{7}",
        "7",
        OK,
        NO_ANSWER,
        r"math_verify and verl look only for `\boxed`",
    ),
    Form("im-end", "special token after the box", r"\boxed{5}<|im_end|>", "5", OK, OK),
    # an `Answer:` line
    Form("answer-line", "DAPO `Answer:` line", "The sum is 42.\nAnswer: 42", "42", OK, OK),
    Form(
        "answer-bold",
        "markdown bold, inline math",
        r"**Answer:** $\frac{3}{4}$",
        r"\frac{3}{4}",
        OK,
        OK,
    ),
    Form(
        "minerva",
        "Minerva sentence",
        "Final Answer: The final answer is $12$. I hope it is correct.",
        "12",
        OK,
        OK,
    ),
    Form("answer-box", "`Answer:` with a box", r"Answer: \boxed{9}", "9", OK, OK),
    Form("answer-equation", "`Answer:` with an equation", "Answer: x = 5", "5", OK, OK),
    Form(
        "box-then-answer",
        "box, then an `Answer:` line",
        "First guess \\boxed{5}.\nAnswer: 6",
        "6",
        OK,
        WRONG,
        "math_verify prefers a box to an `Answer:` line; this project takes the later one",
    ),
    Form(
        "answer-then-box",
        "`Answer:` line, then a box",
        "Answer: 6\nCheck: \\boxed{5}",
        "6",
        WRONG,
        WRONG,
        "verl reads the `Answer:` line first; this project and math_verify take the box",
    ),
    Form(
        "answer-word",
        "`answer:` inside a sentence",
        "The answer: 17 apples.",
        "17",
        OK,
        OK,
        "verl deletes spaces and keeps the rest of the line: `17apples.`",
    ),
    Form("answer-unit", "`Answer:` line with a unit", "Answer: 10 cm", "10", OK, OK),
    Form("answer-thousands", "`Answer:` line, comma separator", "Answer: 1,000", "1000", OK, OK),
    Form(
        "answer-slash",
        "`Answer:` line, `1/2`",
        "Answer: 1/2",
        r"\frac{1}{2}",
        OK,
        OK,
        "verl's `Answer:` normalisation is textual: `1/2` is not `\\frac{1}{2}`",
    ),
    Form(
        "answer-dfrac",
        r"`Answer:` line, `\dfrac`",
        r"Answer: $\dfrac{1}{2}$",
        r"\frac{1}{2}",
        OK,
        OK,
        "verl's `Answer:` normalisation is textual: `\\dfrac` is not `\\frac`",
    ),
    Form("answer-degrees", "`Answer:` line, degrees", r"Answer: $30^\circ$", "30", OK, OK),
    # fractions
    Form(
        "frac-vs-decimal",
        r"`\frac` vs decimal truth",
        r"\boxed{\frac{1}{2}}",
        "0.5",
        OK,
        OK,
        VERBATIM,
    ),
    Form("dfrac", r"`\dfrac`", r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", OK, OK, VERBATIM),
    Form("tfrac-short", r"`\tfrac12`", r"\boxed{\tfrac12}", r"\frac{1}{2}", OK, OK, VERBATIM),
    Form("frac-short", r"`\frac12`", r"\boxed{\frac12}", r"\frac{1}{2}", OK, OK, VERBATIM),
    Form("slash", "`1/2`", r"\boxed{1/2}", r"\frac{1}{2}", OK, OK, VERBATIM),
    Form("frac-same", r"same `\frac` as the truth", r"\boxed{\frac{3}{4}}", r"\frac{3}{4}", OK, OK),
    Form(
        "frac-unreduced",
        "unreduced fraction",
        r"\boxed{\frac{2}{4}}",
        r"\frac{1}{2}",
        OK,
        OK,
        VERBATIM,
    ),
    Form(
        "frac-neg-num",
        "minus in the numerator",
        r"\boxed{\frac{-3}{4}}",
        r"-\frac{3}{4}",
        OK,
        OK,
        VERBATIM,
    ),
    Form("frac-neg", "negative fraction", r"\boxed{-\frac{3}{4}}", r"-\frac{3}{4}", OK, OK),
    Form("mixed-number", "mixed number", r"\boxed{1\frac{1}{2}}", r"\frac{3}{2}", OK, OK, VERBATIM),
    # decimals
    Form(
        "decimal-vs-frac",
        r"decimal vs `\frac` truth",
        r"\boxed{0.5}",
        r"\frac{1}{2}",
        OK,
        OK,
        VERBATIM,
    ),
    Form("trailing-zero", "trailing zero", r"\boxed{2.50}", "2.5", OK, OK, VERBATIM),
    Form("leading-dot", "no leading zero", r"\boxed{.5}", "0.5", OK, OK, VERBATIM),
    Form(
        "rounded",
        "rounded decimal",
        r"\boxed{0.333}",
        r"\frac{1}{3}",
        WRONG,
        WRONG,
        "math_verify rounds numbers to 6 decimal places",
    ),
    Form("pi-decimal", r"3.14 for `\pi`", r"\boxed{3.14}", r"\pi", WRONG, WRONG),
    # integers, negatives, powers
    Form("negative", "negative integer", r"\boxed{-7}", "-7", OK, OK),
    Form("negative-space", "space after the minus", r"\boxed{- 7}", "-7", OK, OK, VERBATIM),
    Form("var-equals", "`x = 3` in the box", r"\boxed{x = 3}", "3", OK, OK, VERBATIM),
    Form("wrong-int", "wrong integer", r"\boxed{12}", "21", WRONG, WRONG),
    Form("power", "a power", r"\boxed{2^{10}}", "1024", OK, OK, VERBATIM),
    Form("sci", "scientific notation", r"\boxed{3 \times 10^{5}}", "300000", OK, OK, VERBATIM),
    # thousands separators
    Form("comma-sep", "comma separator", r"\boxed{1,000}", "1000", OK, OK, VERBATIM),
    Form(
        "thin-space",
        r"thin space `\,`",
        r"\boxed{1\,000}",
        "1000",
        OK,
        WRONG,
        SEPARATED,
    ),
    Form("brace-comma", "`{,}`", r"\boxed{1{,}000}", "1000", OK, OK, VERBATIM),
    Form("neg-space", r"`\!`", r"\boxed{1\!000}", "1000", OK, OK, VERBATIM),
    Form(
        "minerva-sep", "MATH's `,\\!` in the truth", r"\boxed{10000}", r"10,\!000", OK, OK, VERBATIM
    ),
    Form(
        "backslash-space",
        r"`\ `",
        r"\boxed{1\ 000}",
        "1000",
        OK,
        WRONG,
        SEPARATED,
    ),
    Form(
        "plain-space",
        "plain space",
        r"\boxed{1 000}",
        "1000",
        OK,
        WRONG,
        SEPARATED,
    ),
    Form(
        "thin-space-millions",
        r"two `\,`",
        r"\boxed{10\,000\,000}",
        "10000000",
        OK,
        WRONG,
        SEPARATED,
    ),
    Form("comma-millions", "two commas", r"\boxed{1,234,567}", "1234567", OK, OK, VERBATIM),
    Form(
        "decimal-comma",
        "decimal comma",
        r"\boxed{2,5}",
        "2.5",
        WRONG,
        WRONG,
        "math_verify reads `2,5` as the list 2, 5; verl's text differs",
    ),
    # sets, lists, intervals, tuples
    Form("set", "set, other order", r"\boxed{\{1, 2\}}", r"\{2, 1\}", OK, OK, VERBATIM),
    Form("list", "list of solutions, other order", r"\boxed{2, 1}", "1, 2", OK, OK, VERBATIM),
    Form(
        "list-box-each",
        "one box per solution",
        r"$x = \boxed{1}$ or $x = \boxed{2}$",
        "1, 2",
        WRONG,
        OK,
        "math_verify gathers every box into one set; this project and verl take the last box",
    ),
    Form("interval", "half-open interval", r"\boxed{(2, 5]}", "(2, 5]", OK, OK),
    Form("interval-wrong", "wrong bracket", r"\boxed{[2, 5)}", "(2, 5]", WRONG, WRONG),
    Form(
        "interval-inf",
        "interval to infinity",
        r"\boxed{(-\infty, 3)}",
        r"(-\infty,3)",
        OK,
        OK,
        VERBATIM,
    ),
    Form(
        "union",
        "union of intervals",
        r"\boxed{(-\infty, -1) \cup (1, \infty)}",
        r"(-\infty,-1)\cup(1,\infty)",
        OK,
        OK,
        VERBATIM,
    ),
    Form("tuple", "ordered pair", r"\boxed{(3, -4)}", "(3,-4)", OK, OK, VERBATIM),
    Form("tuple-order", "ordered pair, swapped", r"\boxed{(-4, 3)}", "(3,-4)", WRONG, WRONG),
    # units, degrees, percents, money
    Form("unit-text", r"unit in `\text`", r"\boxed{10\text{ cm}}", "10", OK, OK, VERBATIM),
    Form("unit-squared", "squared unit", r"\boxed{10 \text{ cm}^2}", "10", OK, OK, VERBATIM),
    Form("unit-plain", "bare unit word", r"\boxed{10 cm}", "10", OK, OK, VERBATIM),
    Form("degrees", r"`^\circ`", r"\boxed{30^\circ}", "30", OK, OK, VERBATIM),
    Form("degrees-braced", r"`^{\circ}`", r"\boxed{30^{\circ}}", "30", OK, OK, VERBATIM),
    Form(
        "degrees-vs-radians",
        "degrees for radians",
        r"\boxed{45^\circ}",
        r"\frac{\pi}{4}",
        WRONG,
        WRONG,
    ),
    Form("percent", "percent", r"\boxed{45\%}", "45", OK, OK, VERBATIM),
    Form(
        "percent-vs-fraction",
        "percent vs fraction",
        r"\boxed{45\%}",
        "0.45",
        OK,
        OK,
        r"verl: verbatim; math_verify (so this project) reads `45\%` as 0.45, and 45 too",
    ),
    Form("dollars", "dollar sign", r"\boxed{\$18.90}", "18.90", OK, OK, VERBATIM),
    # matrices
    Form(
        "vector",
        "column vector",
        r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}",
        r"\begin{pmatrix}1\\2\end{pmatrix}",
        OK,
        OK,
        VERBATIM,
    ),
    Form(
        "matrix",
        "2x2 matrix",
        r"\boxed{\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}}",
        r"\begin{pmatrix}1&2\\3&4\end{pmatrix}",
        OK,
        OK,
        VERBATIM,
    ),
    Form(
        "bmatrix",
        "`bmatrix` vs `pmatrix`",
        r"\boxed{\begin{bmatrix} 1 & 2 \\ 3 & 4 \end{bmatrix}}",
        r"\begin{pmatrix}1&2\\3&4\end{pmatrix}",
        OK,
        OK,
        VERBATIM,
    ),
    # several boxes
    Form(
        "last-box-right",
        "two boxes, last right",
        r"Maybe \boxed{5}; no: \boxed{7}.",
        "7",
        OK,
        WRONG,
        "math_verify gathers both boxes into the set {5, 7}",
    ),
    Form(
        "first-box-right",
        "two boxes, first right",
        r"It is \boxed{5}. Check: \boxed{7}?",
        "5",
        WRONG,
        WRONG,
    ),
    # nested braces, roots, pi
    Form("nested", "nested braces", r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", OK, OK),
    Form(
        "sqrt-simplify", "unsimplified root", r"\boxed{\sqrt{50}}", r"5\sqrt{2}", OK, OK, VERBATIM
    ),
    Form("sqrt-short", r"`\sqrt2`", r"\boxed{2\sqrt2}", r"2\sqrt{2}", OK, OK, VERBATIM),
    Form("pi", r"`\pi` multiple", r"\boxed{2\pi}", r"2\pi", OK, OK),
    Form("pi-frac", r"`\frac{\pi}{4}`", r"\boxed{\frac{\pi}{4}}", r"\frac{\pi}{4}", OK, OK),
    Form("infinity", r"`\infty`", r"\boxed{\infty}", r"\infty", OK, OK),
    # expressions and equations
    Form("poly-expanded", "expanded polynomial", r"\boxed{x^2+2x+1}", "(x+1)^2", OK, OK, VERBATIM),
    Form("equation", "equation of a line", r"\boxed{y = 2x + 3}", "y=2x+3", OK, OK, VERBATIM),
    Form(
        "rhs-only", "right-hand side for an equation", r"\boxed{2x+3}", "y=2x+3", OK, OK, VERBATIM
    ),
    # text answers and choices
    Form("text", "text answer", r"\boxed{\text{Monday}}", r"\text{Monday}", OK, OK),
    Form(
        "text-plain-truth",
        "text answer, bare truth",
        r"\boxed{\text{Monday}}",
        "Monday",
        OK,
        OK,
        VERBATIM,
    ),
    Form("choice", "choice letter", r"\boxed{C}", "C", OK, OK),
    Form("choice-paren", "choice in parentheses", r"\boxed{(C)}", "C", OK, OK, VERBATIM),
    Form("choice-text", r"choice in `\text{}`", r"\boxed{\text{(C)}}", "C", OK, OK, VERBATIM),
    Form("yes-no", "yes/no", r"\boxed{\text{No}}", r"\text{No}", OK, OK),
    # no answer, truncated, long
    Form(
        "no-marker",
        "number, no box or line",
        "I think it is 5",
        "5",
        NO_ANSWER,
        OK,
        "math_verify falls back to the last number; the others need a box or an `Answer:` line",
    ),
    Form(
        "inline-only",
        "inline math only",
        "The answer is $5$.",
        "5",
        NO_ANSWER,
        OK,
        "math_verify falls back to the last math span; the others need a box or an `Answer:` line",
    ),
    Form("empty", "empty response", "", "5", NO_ANSWER, NO_ANSWER),
    Form(
        "truncated",
        "cut off inside the box",
        r"so \boxed{\frac{1}{2",
        r"\frac{1}{2}",
        NO_ANSWER,
        WRONG,
        "math_verify parses the unclosed box's fragment; the others find no answer",
    ),
    Form(
        "truncated-after-box",
        "cut off after a box",
        r"So far \boxed{4}, but we still need to subtract the cases where",
        "3",
        WRONG,
        WRONG,
    ),
    Form(
        "box-then-text",
        "box, 140 characters of text after",
        r"\boxed{5}." + LONG_TAIL,
        "5",
        OK,
        OK,
        "verl's box fallback reads only the last 100 characters",
    ),
    Form(
        "long-reasoning",
        "box after 350 characters of work",
        WORK + r"Hence $\boxed{5}$.",
        "5",
        OK,
        OK,
    ),
)

# BEGIN verl column (written by `python tests/reward_forms.py --verl WHEEL --write`)
VERL_VERSION = "0.9.1"
# sha256 of verl/utils/reward_score/math_dapo.py
VERL_SHA256 = "a1943c1379313cbde933687a496bd3071f9f830cbbb70158e615d21cf31cf713"
VERL: dict[str, str] = {
    "final-sentence": OK,
    "paren-delims": OK,
    "box-spaces": WRONG,
    "box-no-braces": NO_ANSWER,
    "fbox": NO_ANSWER,
    "im-end": OK,
    "answer-line": OK,
    "answer-bold": OK,
    "minerva": OK,
    "answer-box": OK,
    "answer-equation": OK,
    "box-then-answer": OK,
    "answer-then-box": OK,
    "answer-word": WRONG,
    "answer-unit": OK,
    "answer-thousands": OK,
    "answer-slash": WRONG,
    "answer-dfrac": WRONG,
    "answer-degrees": OK,
    "frac-vs-decimal": WRONG,
    "dfrac": WRONG,
    "tfrac-short": WRONG,
    "frac-short": WRONG,
    "slash": WRONG,
    "frac-same": OK,
    "frac-unreduced": WRONG,
    "frac-neg-num": WRONG,
    "frac-neg": OK,
    "mixed-number": WRONG,
    "decimal-vs-frac": WRONG,
    "trailing-zero": WRONG,
    "leading-dot": WRONG,
    "rounded": WRONG,
    "pi-decimal": WRONG,
    "negative": OK,
    "negative-space": WRONG,
    "var-equals": WRONG,
    "wrong-int": WRONG,
    "power": WRONG,
    "sci": WRONG,
    "comma-sep": WRONG,
    "thin-space": WRONG,
    "brace-comma": WRONG,
    "neg-space": WRONG,
    "minerva-sep": WRONG,
    "backslash-space": WRONG,
    "plain-space": WRONG,
    "thin-space-millions": WRONG,
    "comma-millions": WRONG,
    "decimal-comma": WRONG,
    "set": WRONG,
    "list": WRONG,
    "list-box-each": WRONG,
    "interval": OK,
    "interval-wrong": WRONG,
    "interval-inf": WRONG,
    "union": WRONG,
    "tuple": WRONG,
    "tuple-order": WRONG,
    "unit-text": WRONG,
    "unit-squared": WRONG,
    "unit-plain": WRONG,
    "degrees": WRONG,
    "degrees-braced": WRONG,
    "degrees-vs-radians": WRONG,
    "percent": WRONG,
    "percent-vs-fraction": WRONG,
    "dollars": WRONG,
    "vector": WRONG,
    "matrix": WRONG,
    "bmatrix": WRONG,
    "last-box-right": OK,
    "first-box-right": WRONG,
    "nested": OK,
    "sqrt-simplify": WRONG,
    "sqrt-short": WRONG,
    "pi": OK,
    "pi-frac": OK,
    "infinity": OK,
    "poly-expanded": WRONG,
    "equation": WRONG,
    "rhs-only": WRONG,
    "text": OK,
    "text-plain-truth": WRONG,
    "choice": OK,
    "choice-paren": WRONG,
    "choice-text": WRONG,
    "yes-no": OK,
    "no-marker": NO_ANSWER,
    "inline-only": NO_ANSWER,
    "empty": NO_ANSWER,
    "truncated": NO_ANSWER,
    "truncated-after-box": WRONG,
    "box-then-text": NO_ANSWER,
    "long-reasoning": OK,
}
# END verl column


def math_verify_verdict(response: str, truth: str) -> str:
    """math_verify on the whole response, as its README uses it."""
    from math_verify import parse, verify

    pred = parse(response)
    if not pred:
        return NO_ANSWER
    return OK if verify(parse(f"${truth}$"), pred) else WRONG


def load_verl_scorer(path: str | Path) -> tuple[Callable[[str, str], dict], str, str]:
    """verl's `math_dapo.compute_score`, imported by path from a verl wheel or from the
    module itself; returns (compute_score, verl version, sha256 of the module)."""
    path = Path(path)
    version = "unknown"
    with tempfile.TemporaryDirectory(prefix="verl-") as tmp:
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as whl:
                source = whl.read(VERL_MODULE)
                meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
                version = re.search(rb"^Version: (\S+)", whl.read(meta), re.M).group(1).decode()
            module_path = Path(tmp) / "math_dapo.py"
            module_path.write_bytes(source)
        elif path.suffix == ".py":
            module_path, source = path, path.read_bytes()
        else:
            raise ValueError(f"{path}: expected a verl wheel (.whl) or math_dapo.py")
        spec = importlib.util.spec_from_file_location("verl_math_dapo", module_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.compute_score, version, hashlib.sha256(source).hexdigest()


def verl_verdict(compute_score: Callable[[str, str], dict], response: str, truth: str) -> str:
    """OK for score 1; NO_ANSWER when verl extracted nothing; else WRONG."""
    out = compute_score(response, truth)
    if out["acc"]:
        return OK
    return NO_ANSWER if out["pred"] in (None, "[INVALID]") else WRONG


_CELL = {OK: "✓", WRONG: "✗", NO_ANSWER: "none"}


def _code(text: str, limit: int = 60) -> str:
    if not text:
        return "(empty)"
    if len(text) > limit:
        text = text[: limit // 2 - 2] + " … " + text[-(limit // 2 - 2) :]
    return "`" + text.replace("\n", "⏎") + "`"


def table_lines(forms: Sequence[Form], verl: dict[str, str], verl_version: str) -> list[str]:
    """The Markdown table of the forms (pipes in cells escaped)."""
    header = ["case", "form", "response", "truth", "jaxrlvr", "math_verify", f"verl {verl_version}"]
    rows = [
        [
            f.id,
            f.form,
            _code(f.response),
            _code(f.truth),
            _CELL[f.ours],
            _CELL[f.math_verify],
            _CELL[verl[f.id]],
            f.why,
        ]
        for f in forms
    ]
    return table([*header, "why"], [[c.replace("|", "\\|") for c in r] for r in rows])


def doc_table(text: str) -> list[str]:
    """The generated lines of docs/training.md's reward table (between the markers)."""
    lines = text.splitlines()
    begin, end = lines.index(DOC_BEGIN), lines.index(DOC_END)
    return lines[begin + 1 : end]


def live_mismatches(forms: Sequence[Form]) -> list[str]:
    """Forms whose live verdicts (this project's, math_verify's) differ from the recorded."""
    from jaxrlvr.rewards.math import check_math_response

    out = []
    for f in forms:
        got = (check_math_response(f.response, f.truth), math_verify_verdict(f.response, f.truth))
        if got != (f.ours, f.math_verify):
            out.append(
                f"{f.id}: recorded (ours, math_verify) = {(f.ours, f.math_verify)}, now {got}"
            )
    return out


_NAMES = {OK: "OK", WRONG: "WRONG", NO_ANSWER: "NO_ANSWER"}


def _write_verl_column(verl: dict[str, str], version: str, sha256: str) -> None:
    path = Path(__file__)
    text = path.read_text()
    begin = text.index("# BEGIN verl column")
    end = text.index("# END verl column")
    head = text[begin:].split("\n", 1)[0]
    entries = "".join(f'    "{k}": {_NAMES[v]},\n' for k, v in verl.items())
    block = (
        f'{head}\nVERL_VERSION = "{version}"\n# sha256 of {VERL_MODULE}\n'
        f'VERL_SHA256 = "{sha256}"\n'
        f"VERL: dict[str, str] = {{\n{entries}}}\n"
    )
    path.write_text(text[:begin] + block + text[end:])


def _write_doc(lines: list[str]) -> None:
    doc = DOC.read_text().split("\n")
    begin, end = doc.index(DOC_BEGIN), doc.index(DOC_END)
    DOC.write_text("\n".join(doc[: begin + 1] + lines + doc[end:]))


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; re-score the verl column (--verl); write both (--write)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--verl", help="a verl wheel, or its verl/utils/reward_score/math_dapo.py")
    p.add_argument("--write", action="store_true", help="write the verl column and the doc")
    args = p.parse_args(argv)
    verl, version, sha256 = VERL, VERL_VERSION, VERL_SHA256
    if args.verl:
        try:
            compute_score, version, sha256 = load_verl_scorer(args.verl)
        except (
            OSError,
            ValueError,
            KeyError,
            SyntaxError,
            AttributeError,
            zipfile.BadZipFile,
        ) as e:
            print(f"error: --verl={args.verl}: {e}", file=sys.stderr)
            return 2
        verl = {f.id: verl_verdict(compute_score, f.response, f.truth) for f in FORMS}
        for f in FORMS:
            if VERL.get(f.id) != verl[f.id]:
                print(f"verl {version}: {f.id}: {VERL.get(f.id)} -> {verl[f.id]}")
    lines = table_lines(FORMS, verl, version)
    if not args.write:
        print("\n".join(lines))
        return 0
    if stale := live_mismatches(FORMS):
        print("error: update these forms first:\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    if args.verl:
        _write_verl_column(verl, version, sha256)
    _write_doc(lines)
    print(f"wrote {len(FORMS)} forms to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
