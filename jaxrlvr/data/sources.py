"""Read prompt/answer examples from JSONL and Parquet files, failing loudly on bad rows.

Field names are dotted paths into each row, so nested layouts work: DAPO-Math-17k rows
(`prompt` a chat list of `{"role", "content"}` dicts, the answer in
`reward_model.ground_truth`) read with `answer_field="reward_model.ground_truth"`.
A field left unset (None) is found per row: the first of `DEFAULT_PROMPT_FIELDS`
(`prompt`, `problem`, `question`) or of `DEFAULT_ANSWER_FIELDS`
(`reward_model.ground_truth`, `answer`) that the row has, so verl-format Parquet,
MATH-style `problem`/`answer` and AMC-style `question`/`answer` files mix in one run.

A prompt is a string or a non-empty chat list of `{"role": str, "content": str}` dicts;
an answer is a string or a number (converted with `str`). A row that is not a JSON
object, lacks a field or has the wrong type raises `DataError` naming the file and the
line (JSONL, 1-based) or row index (Parquet, 0-based). Blank JSONL lines are skipped.
A file that is not UTF-8 (JSONL) or not readable Parquet raises `DataError` naming the
file and the line, or the damaged part (footer, row group).

Paths are local, or `scheme://` URLs read through fsspec (`memory://`, and `gs://` with
`gcsfs` installed).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Message = dict[str, str]
Prompt = str | list[Message]

DEFAULT_PROMPT_FIELDS: tuple[str, ...] = ("prompt", "problem", "question")
DEFAULT_ANSWER_FIELDS: tuple[str, ...] = ("reward_model.ground_truth", "answer")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".parquet")
URL_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # a `scheme://` URL


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


def _first(row: dict, fields: tuple[str, ...]) -> Any:
    for name in fields:
        if (value := _get(row, name)) is not _MISSING:
            return value
    return _MISSING


def _names(fields: tuple[str, ...]) -> str:
    quoted = [repr(f) for f in fields]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def row_to_example(
    row: Any, prompt_field: str | None, answer_field: str | None, origin: str
) -> Example:
    """Validate one decoded row and turn it into an Example (DataError naming `origin`);
    a None field is the row's first of the default candidates."""
    if not isinstance(row, dict):
        raise DataError(f"{origin}: row is not a JSON object (got {type(row).__name__})")
    prompt_fields = (prompt_field,) if prompt_field else DEFAULT_PROMPT_FIELDS
    answer_fields = (answer_field,) if answer_field else DEFAULT_ANSWER_FIELDS
    prompt = _first(row, prompt_fields)
    if prompt is _MISSING:
        raise DataError(f"{origin}: missing prompt field {_names(prompt_fields)}")
    answer = _first(row, answer_fields)
    if answer is _MISSING:
        raise DataError(f"{origin}: missing answer field {_names(answer_fields)}")
    try:
        return Example(_check_prompt(prompt), _check_answer(answer), origin)
    except TypeError as e:
        raise DataError(f"{origin}: {e}") from None


def is_url(path: str) -> bool:
    """Whether `path` is a `scheme://` URL (read through fsspec)."""
    return bool(URL_PREFIX.match(path))


def _open(path: str):
    """`path` opened for binary reading (fsspec for URLs)."""
    if not is_url(path):
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    fs, inner = _filesystem(path)
    return fs.open(inner, "rb")


def _filesystem(url: str):
    """(fsspec filesystem, path in it) of a URL; a missing backend is a DataError."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise DataError(f"{url}: this URL scheme needs a filesystem package ({e})") from None
    except ValueError as e:  # unknown protocol
        raise DataError(f"{url}: {e}") from None


def _iter_jsonl(path: str) -> Iterator[tuple[Any, str]]:
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            origin = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{origin}: not UTF-8 text (byte {e.start + 1} of the line is "
                    f"{raw[e.start : e.start + 1]!r})"
                ) from None
            if not line.strip():
                continue
            try:
                yield json.loads(line), origin
            except json.JSONDecodeError as e:
                raise DataError(f"{origin}: not valid JSON ({e.msg})") from None


def _has_column(schema: Any, dotted: str) -> bool:
    """Whether the Arrow schema has the (possibly nested struct) field `dotted`."""
    import pyarrow as pa

    fields = schema
    for key in dotted.split("."):
        if not isinstance(fields, pa.Schema | pa.StructType) or fields.get_field_index(key) < 0:
            return False
        fields = fields.field(key).type
    return True


def _iter_parquet(
    path: str, prompt_field: str | None, answer_field: str | None
) -> Iterator[tuple[Any, str]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(_open(path))
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file (damaged footer: {e})") from None
    prompt_fields = (prompt_field,) if prompt_field else DEFAULT_PROMPT_FIELDS
    answer_fields = (answer_field,) if answer_field else DEFAULT_ANSWER_FIELDS
    for what, fields in (("prompt", prompt_fields), ("answer", answer_fields)):
        if not any(_has_column(schema, f) for f in fields):
            raise DataError(f"{path}: no {what} column {_names(fields)}")
    columns = {f.split(".")[0] for f in (*prompt_fields, *answer_fields) if _has_column(schema, f)}
    index = 0
    for group in range(pf.num_row_groups):
        try:
            rows = pf.read_row_group(group, columns=sorted(columns)).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(
                f"{path}: row group {group} of {pf.num_row_groups} (from row {index}) "
                f"is damaged: {e}"
            ) from None
        for row in rows:
            yield row, f"{path}: row {index}"
            index += 1


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Files named by `paths` (a path, a URL, a glob of either, or a list of them), in the
    order given.

    A missing file, or a glob that matches nothing, raises FileNotFoundError naming it.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = str(p)
        if is_url(p):
            fs, inner = _filesystem(p)
            if glob.has_magic(p):
                files = [fs.unstrip_protocol(m) for m in sorted(fs.glob(inner)) if fs.isfile(m)]
            else:
                files = [p] if fs.isfile(inner) else []
            if not files:
                raise FileNotFoundError(
                    f"no data files match {p!r}"
                    if glob.has_magic(p)
                    else f"data file not found: {p}"
                )
            out += files
        elif glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise FileNotFoundError(f"no data files match {p!r}")
            out += matches
        elif not Path(p).is_file():
            raise FileNotFoundError(f"data file not found: {p}")
        else:
            out.append(p)
    if not out:
        raise ValueError("no data files given")
    return out


def read_examples(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    prompt_field: str | None = None,
    answer_field: str | None = None,
) -> list[Example]:
    """All examples of the given JSONL (`.jsonl`) and Parquet (`.parquet`) files, in order;
    a None field is found per row (module docstring)."""
    examples: list[Example] = []
    for path in expand_paths(paths):
        if path.endswith(".jsonl"):
            rows = _iter_jsonl(path)
        elif path.endswith(".parquet"):
            rows = _iter_parquet(path, prompt_field, answer_field)
        else:
            raise ValueError(f"{path}: unsupported data format; use one of {SUPPORTED_SUFFIXES}")
        examples += [row_to_example(r, prompt_field, answer_field, o) for r, o in rows]
    return examples
