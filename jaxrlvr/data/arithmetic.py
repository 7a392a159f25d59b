"""The embedded demo task: short integer arithmetic with a written chain of thought.

A problem is 1-4 additions/subtractions of integers in [0, 99], e.g. prompt `12+7-5=`;
its worked solution writes one step per operation, then the answer after `#`:
`12+7=19;19-5=14;#14`. Intermediate results and answers may be negative
(`3-50=-47;#-47`). The number of operations varies, so responses vary in length and the
policy's entropy is spread over many tokens, as in real reasoning.

The answer is checked exactly (`check_answer`): the response must end with `#` followed
by an integer equal to the ground truth; anything malformed scores 0.

The demo tokenizer is character-level (one token per character, plus `<pad>`, `<bos>`,
`<eos>`, `<unk>`), built in code as a `transformers` fast tokenizer; it prepends `<bos>`
when encoding with special tokens, and has no chat template (use the `raw` template).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

OPS: tuple[str, ...] = ("+", "-")
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0, 1, 2, 3
# Every character the task writes, plus a few spares so near-miss outputs stay decodable.
VOCAB_CHARS: str = "0123456789+-=;#*() \n"

CAREFUL_MARK: str = "("  # opens a solution written in the careful style (`write_solution`)

_ANSWER_RE = re.compile(r"#(-?\d{1,18})\s*$")


@dataclass(frozen=True)
class ArithmeticProblem:
    """`operands[0] ops[0] operands[1] ops[1] ...`, evaluated left to right."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.operands) != len(self.ops) + 1 or not self.ops:
            raise ValueError("need at least one op and one more operand than ops")
        if any(op not in OPS for op in self.ops):
            raise ValueError(f"ops must be in {OPS}, got {self.ops}")

    @property
    def prompt(self) -> str:
        """The question, e.g. `12+7-5=`."""
        parts = [str(self.operands[0])]
        for op, x in zip(self.ops, self.operands[1:], strict=True):
            parts += [op, str(x)]
        return "".join(parts) + "="

    @property
    def answer(self) -> int:
        """The value of the expression."""
        return _steps(self)[-1][2]


def _steps(problem: ArithmeticProblem) -> list[tuple[int, str, int, int]]:
    """(left, op, result, right) for each operation, left to right."""
    acc = problem.operands[0]
    out = []
    for op, x in zip(problem.ops, problem.operands[1:], strict=True):
        new = acc + x if op == "+" else acc - x
        out.append((acc, op, new, x))
        acc = new
    return out


def generate_problems(
    n: int,
    seed: int,
    min_ops: int = 1,
    max_ops: int = 4,
    max_operand: int = 99,
) -> list[ArithmeticProblem]:
    """`n` random problems, a pure function of the arguments (NumPy PCG64 seeded by `seed`)."""
    if not 1 <= min_ops <= max_ops:
        raise ValueError(f"need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
    if max_operand < 0:
        raise ValueError(f"max_operand must be >= 0, got {max_operand}")
    rng = np.random.default_rng(seed)
    problems = []
    for _ in range(n):
        k = int(rng.integers(min_ops, max_ops + 1))
        operands = tuple(int(v) for v in rng.integers(0, max_operand + 1, size=k + 1))
        ops = tuple(OPS[int(i)] for i in rng.integers(0, len(OPS), size=k))
        problems.append(ArithmeticProblem(operands, ops))
    return problems


def write_solution(
    problem: ArithmeticProblem,
    rng: np.random.Generator | None = None,
    error_rate: float = 0.0,
    *,
    careful_frac: float = 0.0,
    careful_error_rate: float = 0.0,
) -> str:
    """The worked solution `a+b=r1;r1-c=r2;#r2`.

    With `rng` and `error_rate > 0`, each step's result is independently off by a small
    nonzero amount with probability `error_rate`, and later steps carry the mistake on:
    noisy demonstrations for a warm start that is right only some of the time.

    With `rng` and `careful_frac > 0`, that fraction of solutions is written in a second,
    *careful* style: marked by a leading `(`, each step's result off with probability
    `careful_error_rate` instead, and each step ended by `;` or a space at random:
    `(a+b=r1 r1-c=r2;#r2`. A policy warm-started on the mixture starts most responses
    the common way and a few the careful way, which is more often right: a rare,
    better strategy chosen by the first token, with free choices along the way.
    """
    careful = rng is not None and careful_frac > 0 and rng.random() < careful_frac
    rate = careful_error_rate if careful else error_rate
    acc = problem.operands[0]
    parts = []
    for op, x in zip(problem.ops, problem.operands[1:], strict=True):
        new = acc + x if op == "+" else acc - x
        if rng is not None and rate > 0 and rng.random() < rate:
            new += int(rng.choice([-10, -2, -1, 1, 2, 10]))
        end = (";" if rng.random() < 0.5 else " ") if careful else ";"
        parts.append(f"{acc}{op}{x}={new}{end}")
        acc = new
    return (CAREFUL_MARK if careful else "") + "".join(parts) + f"#{acc}"


def extract_answer(response: str) -> int | None:
    """The integer after the final `#` if the response ends with `#<integer>`, else None."""
    m = _ANSWER_RE.search(response)
    return int(m.group(1)) if m else None


def check_answer(response: str, answer: int | str) -> bool:
    """Exact check: does the response end with `#` and the right integer?"""
    pred = extract_answer(response)
    try:
        return pred is not None and pred == int(str(answer).strip())
    except ValueError:
        return False


def write_demo_dataset(
    directory: str | Path,
    num_train: int = 4096,
    num_eval: int = 256,
    seed: int = 0,
    min_ops: int = 1,
    max_ops: int = 4,
    max_operand: int = 99,
) -> dict[str, Path]:
    """Write `train.jsonl` and `eval.jsonl` (fields `prompt`, `answer`, `solution`).

    The same files the trainer reads for real data, so the demo goes through the same
    data path. Eval prompts never appear in train. Returns {"train": path, "eval": path}.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kw = dict(min_ops=min_ops, max_ops=max_ops, max_operand=max_operand)
    train = generate_problems(num_train, seed=seed, **kw)
    seen = {p.prompt for p in train}
    eval_: list[ArithmeticProblem] = []
    eval_seed = seed + 1_000_003
    while len(eval_) < num_eval:
        fresh = [p for p in generate_problems(num_eval, eval_seed, **kw) if p.prompt not in seen]
        seen.update(p.prompt for p in fresh)
        eval_ += fresh[: num_eval - len(eval_)]
        eval_seed += 1
    paths = {}
    for split, problems in (("train", train), ("eval", eval_)):
        path = directory / f"{split}.jsonl"
        with path.open("w") as f:
            for p in problems:
                row = {"prompt": p.prompt, "answer": str(p.answer), "solution": write_solution(p)}
                f.write(json.dumps(row) + "\n")
        paths[split] = path
    return paths


def build_demo_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """The character-level demo tokenizer: ids 0-3 are `<pad> <bos> <eos> <unk>`, then one
    id per character of VOCAB_CHARS. Encoding with special tokens prepends `<bos>`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *VOCAB_CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    bos_id = vocab["<bos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def save_demo_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Build the demo tokenizer and `save_pretrained` it to `directory`; reload it with
    `transformers.AutoTokenizer.from_pretrained(directory)`."""
    tok = build_demo_tokenizer()
    tok.save_pretrained(str(directory))
    return tok
