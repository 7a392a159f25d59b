"""The data files a config names: train-file and eval-set specs, and reading them.

`data.train_files`, `data.eval_files` and `jaxrlvr.evaluate --eval` hold comma-separated
entries of two forms:

- simple: a path or glob (train files), or `[NAME=]PATH[:answer_field[:template]]`
  (eval sets; a URL path such as `gs://b/x.parquet` keeps its `scheme://`);
- keyed: `key=value` items, `path=`, `prompt_field=`, `answer_field=`, `template=` and,
  for eval sets, `name=`, e.g. `name=aime,path=gs://b/aime.parquet,prompt_field=question`.
  The items of one entry are written together; a key given again starts the next entry.

An entry's unset fields take `data.prompt_field`, `data.answer_field` and
`data.prompt_template`; an unset (empty) field is detected per row from the ordered
candidates of `jaxrlvr.data.sources`. An eval set without a name is named after its file.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence
from typing import Any

from jaxrlvr.data.sources import URL_PREFIX, DataError
from jaxrlvr.data.templates import TEMPLATES
from jaxrlvr.errors import ConfigError

SPEC_KEYS: tuple[str, ...] = ("name", "path", "prompt_field", "answer_field", "template")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """One train-file entry or eval set; empty fields take the config's defaults."""

    path: str
    name: str = ""  # eval sets only
    prompt_field: str = ""
    answer_field: str = ""
    template: str = ""


def split_files(spec: str | None) -> list[str]:
    """The entries of a comma-separated file list."""
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def _split_simple_eval(token: str) -> dict[str, str]:
    name, sep, rest = token.partition("=")
    if not sep or URL_PREFIX.match(token):
        name, rest = "", token
    scheme = m.group(0) if (m := URL_PREFIX.match(rest)) else ""
    path, *extra = rest[len(scheme) :].split(":")
    if len(extra) > 2 or not path:
        raise ConfigError(
            f"eval set {token!r}: expected NAME=PATH[:answer_field[:template]] "
            "or name=NAME,path=PATH,..."
        )
    fields = dict(zip(("answer_field", "template"), extra, strict=False))
    return {"name": name, "path": scheme + path, **fields}


def _finish(fields: dict[str, str], text: str, eval_sets: bool) -> DataSpec:
    if not fields.get("path"):
        raise ConfigError(f"{text!r}: an entry has no path= (it has {sorted(fields)})")
    if fields.get("template") and fields["template"] not in TEMPLATES:
        raise ConfigError(
            f"{text!r}: template={fields['template']!r}; choose one of {', '.join(TEMPLATES)}"
        )
    if eval_sets:
        path = fields["path"]
        name = fields.get("name") or os.path.splitext(os.path.basename(path))[0].replace("*", "")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"eval set {text!r}: name {name!r} must be letters, digits, - _ .")
        fields = {**fields, "name": name}
    return DataSpec(**fields)


def parse_specs(text: str | Sequence[str] | None, eval_sets: bool) -> list[DataSpec]:
    """The entries of `text` (a comma-separated string, or a list of them) in order; see
    the module docstring. Raises `ConfigError` naming the bad entry."""
    items = [text] if isinstance(text, str) or text is None else list(text)
    keys = SPEC_KEYS if eval_sets else SPEC_KEYS[1:]
    specs: list[DataSpec] = []
    for item in items:
        keyed: dict[str, str] | None = None
        for token in split_files(item):
            key, sep, value = token.partition("=")
            if sep and key in keys and not URL_PREFIX.match(token):
                if keyed is not None and key in keyed:
                    specs.append(_finish(keyed, item, eval_sets))
                    keyed = None
                if not value:
                    raise ConfigError(f"{item!r}: {key}= is empty")
                keyed = {**(keyed or {}), key: value}
                continue
            if key == "name" and sep and not eval_sets:
                raise ConfigError(f"{item!r}: name= is for eval sets only")
            if keyed is not None:
                specs.append(_finish(keyed, item, eval_sets))
                keyed = None
            simple = _split_simple_eval(token) if eval_sets else {"path": token}
            specs.append(_finish({k: v for k, v in simple.items() if v}, token, eval_sets))
        if keyed is not None:
            specs.append(_finish(keyed, item, eval_sets))
    names = [s.name for s in specs]
    if eval_sets and len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"eval sets: the name {dup!r} is used twice; give each set a name=")
    return specs


def spec_errors(config: Any) -> list[str]:
    """Start-up problems of `data.train_files` and `data.eval_files`: bad syntax, local
    paths that match no file or are neither `.jsonl` nor `.parquet` (URLs are checked
    when read, still before anything compiles)."""
    errors = []
    for key in ("train_files", "eval_files"):
        try:
            specs = parse_specs(config.data[key], eval_sets=key == "eval_files")
        except ConfigError as e:
            errors.append(f"config.data.{key}: {e}")
            continue
        for s in specs:
            if not s.path.endswith((".jsonl", ".parquet")):
                errors.append(f"config.data.{key}: {s.path!r} is not a .jsonl or .parquet file")
            elif not URL_PREFIX.match(s.path) and not glob.glob(s.path):
                errors.append(f"config.data.{key}: {s.path!r} matches no file")
    return errors


def read_prompts(config: Any, key: str, tokenizer: Any, spec: DataSpec | None = None):
    """The `PromptSet` of `config.data.<key>` (or of the one eval set `spec`): each
    entry's files read with its own fields and template, then one length filter over all.

    Unreadable or malformed files raise `ConfigError` naming the key, the file and the
    line (or what is damaged)."""
    from jaxrlvr.data.pipeline import prepare_prompts
    from jaxrlvr.data.sources import read_examples

    d = config.data
    try:
        specs = parse_specs(d[key], eval_sets=key == "eval_files") if spec is None else [spec]
        examples, templates = [], []
        for s in specs:
            part = read_examples(
                s.path,
                prompt_field=s.prompt_field or d.prompt_field or None,
                answer_field=s.answer_field or d.answer_field or None,
            )
            examples += part
            templates += [s.template or d.prompt_template] * len(part)
        return prepare_prompts(examples, tokenizer, templates, d.max_prompt_len)
    except (DataError, OSError, ValueError) as e:
        raise ConfigError(f"config.data.{key}: {e}") from None
