"""Read prompt/answer examples from JSONL and Parquet files, failing loudly on bad rows.

Field names are dotted paths into each row, so nested layouts work: DAPO-Math-17k rows
(`prompt` a chat list of `{"role", "content"}` dicts, the answer in
`reward_model.ground_truth`) read with `answer_field="reward_model.ground_truth"`.
With `prompt_field=None` each row's prompt is `prompt` if present, else `problem`.

A prompt is a string or a non-empty chat list of `{"role": str, "content": str}` dicts;
an answer is a string or a number (converted with `str`). A row that is not a JSON
object, lacks a field or has the wrong type raises `DataError` naming the file and the
line (JSONL, 1-based) or row index (Parquet, 0-based). Blank JSONL lines are skipped.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Message = dict[str, str]
Prompt = str | list[Message]

DEFAULT_PROMPT_FIELDS: tuple[str, ...] = ("prompt", "problem")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".parquet")


class DataError(ValueError):
    """A malformed data row; the message names the file and line (or row)."""


@dataclass(frozen=True)
class Example:
    """One prompt with its ground-truth answer; `origin` is "file:line" (or "file:row N")."""

    prompt: Prompt
    answer: str
    origin: str


_MISSING = object()


def _get(row: Any, path: str) -> Any:
    """row["a"]["b"] for path "a.b", or _MISSING."""
    cur = row
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return _MISSING
        cur = cur[key]
    return cur


def _check_prompt(value: Any) -> Prompt:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and value:
        msgs = []
        for m in value:
            if not (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise TypeError("chat prompt entries must be {'role': str, 'content': str}")
            msgs.append({"role": m["role"], "content": m["content"]})
        return msgs
    raise TypeError(f"prompt must be a string or a chat list, got {type(value).__name__}")


def _check_answer(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(f"answer must be a string or a number, got {type(value).__name__}")
    return str(value)


def row_to_example(row: Any, prompt_field: str | None, answer_field: str, origin: str) -> Example:
    """Validate one decoded row and turn it into an Example (DataError naming `origin`)."""
    if not isinstance(row, dict):
        raise DataError(f"{origin}: row is not a JSON object (got {type(row).__name__})")
    fields = (prompt_field,) if prompt_field else DEFAULT_PROMPT_FIELDS
    prompt = _MISSING
    for name in fields:
        prompt = _get(row, name)
        if prompt is not _MISSING:
            break
    if prompt is _MISSING:
        names = " or ".join(repr(f) for f in fields)
        raise DataError(f"{origin}: missing prompt field {names}")
    answer = _get(row, answer_field)
    if answer is _MISSING:
        raise DataError(f"{origin}: missing answer field {answer_field!r}")
    try:
        return Example(_check_prompt(prompt), _check_answer(answer), origin)
    except TypeError as e:
        raise DataError(f"{origin}: {e}") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[Any, str]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{lineno}"
            try:
                yield json.loads(line), origin
            except json.JSONDecodeError as e:
                raise DataError(f"{origin}: not valid JSON ({e.msg})") from None


def _iter_parquet(
    path: Path, prompt_field: str | None, answer_field: str
) -> Iterator[tuple[Any, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    wanted = (prompt_field,) if prompt_field else DEFAULT_PROMPT_FIELDS
    columns = {f.split(".")[0] for f in (*wanted, answer_field)} & names
    if not any(f.split(".")[0] in names for f in wanted):
        raise DataError(f"{path}: no prompt column {' or '.join(map(repr, wanted))}")
    if answer_field.split(".")[0] not in names:
        raise DataError(f"{path}: no answer column {answer_field.split('.')[0]!r}")
    index = 0
    for batch in pf.iter_batches(batch_size=8192, columns=sorted(columns)):
        for row in batch.to_pylist():
            yield row, f"{path}: row {index}"
            index += 1


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by `paths` (a path, a glob, or a list of them), in the order given.

    A missing file, or a glob that matches nothing, raises FileNotFoundError naming it.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = str(p)
        if glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise FileNotFoundError(f"no data files match {p!r}")
            out += [Path(m) for m in matches]
        elif not Path(p).is_file():
            raise FileNotFoundError(f"data file not found: {p}")
        else:
            out.append(Path(p))
    if not out:
        raise ValueError("no data files given")
    return out


def read_examples(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    prompt_field: str | None = None,
    answer_field: str = "answer",
) -> list[Example]:
    """All examples of the given JSONL (`.jsonl`) and Parquet (`.parquet`) files, in order."""
    examples: list[Example] = []
    for path in expand_paths(paths):
        if path.suffix == ".jsonl":
            rows = _iter_jsonl(path)
        elif path.suffix == ".parquet":
            rows = _iter_parquet(path, prompt_field, answer_field)
        else:
            raise ValueError(f"{path}: unsupported data format; use one of {SUPPORTED_SUFFIXES}")
        examples += [row_to_example(r, prompt_field, answer_field, o) for r, o in rows]
    return examples
