"""What each config field means: `--show_config`, errors about `--config.KEY`, and the
field tables of docs/config.md, all from the fields' declarations
(`jaxrlvr.config_fields.FIELDS` and each method's settings).

`describe` prints a resolved config with each field's value, its default and its help;
`override_error` turns a failed `--config.KEY=VALUE` flag into one line naming the key
and the closest valid keys; `fields_markdown` is the docs' tables
(`python -m jaxrlvr.config_help --write_docs` writes them; a test checks they are
current).
"""

from __future__ import annotations

import difflib
import json
import re

import ml_collections

from jaxrlvr import methods
from jaxrlvr.config import base_config, load_config_file
from jaxrlvr.config_fields import FIELDS, SECTIONS
from jaxrlvr.fields import Field
from jaxrlvr.runtime.record import flatten

HELP: dict[str, str] = {key: field.help for key, field in FIELDS.items()} | {
    f"algo.{name}.{key}": text
    for name in methods.names()
    for key, text in methods.get(name).help().items()
}
DOCS = "docs/config.md"
# The generated part of docs/config.md lies between these lines.
BEGIN = "<!-- fields: written by `python -m jaxrlvr.config_help --write_docs` -->"
END = "<!-- fields: end -->"


def describe(config: ml_collections.ConfigDict) -> str:
    """Every field of `config`: its value, the `base_config` default where different, and
    its help, one line each."""
    values = flatten(json.loads(config.to_json()))
    defaults = flatten(json.loads(base_config(config.get("preset", "demo")).to_json()))
    width = max(len(k) for k in values)
    lines = []
    for key, value in values.items():
        default = "" if defaults.get(key) == value else f"  (default {defaults.get(key)!r})"
        lines.append(f"{key:<{width}} = {value!r}{default}  # {HELP.get(key, '')}")
    return "\n".join(lines)


def override_error(argv: list[str], error: Exception) -> str:
    """One line for a flag-parsing `error`: an unknown `--config.KEY` is named with the
    closest valid keys; anything else is the error's first line."""
    keys = _config_keys(argv)
    for arg in argv[1:]:
        m = re.match(r"--config\.([\w.]+)", arg)
        if m and keys and m.group(1) not in keys:
            hint = closest_keys(m.group(1), keys)
            return f"{arg.split('=')[0]}: no such config key{hint} (see --show_config)"
    text = str(error).strip().strip("'\"").splitlines()
    return text[0] if text else type(error).__name__


def _config_keys(argv: list[str]) -> set[str]:
    """The field names of the config file named by `--config=FILE[:ARG]` (empty if it
    cannot be loaded)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "configs/grpo.py")
    try:
        config = load_config_file(spec)
    except Exception:  # noqa: BLE001 - the caller reports the original error instead
        return set()
    return set(flatten(json.loads(config.to_json())))


def closest_keys(key: str, keys) -> str:
    """`; closest: a, b` for an unknown `key` ("" when nothing is close)."""
    close = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.5)
    return f"; closest: {', '.join(close)}" if close else ""


def fields_markdown() -> str:
    """The field tables of docs/config.md: every declared field with its `demo` and
    `qwen2.5-math-7b` values (the latter only where it differs), its text and its
    allowed values."""
    demo, paper = (
        flatten(json.loads(base_config(p).to_json())) for p in ("demo", "qwen2.5-math-7b")
    )
    out: list[str] = []

    def table(rows: list[tuple[str, str, Field]]) -> None:
        out.extend(
            ["| key | demo | qwen2.5-math-7b | meaning / allowed values |", "|---|---|---|---|"]
        )
        for shown, key, field in rows:
            text = " ".join(filter(None, (field.doc or field.help, field.allowed())))
            other = "" if paper[key] == demo[key] else f"`{_value(paper[key])}`"
            out.append(f"| `{shown}` | `{_value(demo[key])}` | {other}{other and ' '}| {text} |")
        out.append("")

    for section, intro in SECTIONS.items():
        out += [f"### {f'`{section}`' if section else 'Top level'}", ""]
        out += [intro, ""] if intro else []
        keys = [k for k in FIELDS if (k.split(".")[0] if "." in k else "") == section]
        table([(key, key, FIELDS[key]) for key in keys])
        if section != "algo":
            continue
        for name in methods.names():
            method = methods.get(name)
            if not method.fields():
                continue
            doc = f" {method.settings_doc}" if method.settings_doc else ""
            out += [f"`algo.{name}` (`intervention={name}`): {method.summary}.{doc}", ""]
            table([(k, f"algo.{name}.{k}", f) for k, f in method.fields().items()])
    return "\n".join(out).rstrip() + "\n"


def _value(value) -> str:
    """A default as docs/config.md shows it (`2e-4`, `None`, `(1, -1, 1)`)."""
    if isinstance(value, float) and value and abs(value) < 1e-3:
        return re.sub(r"e-0*(\d)", r"e-\1", f"{value:.0e}")
    if isinstance(value, list):
        return repr(tuple(value))
    return '""' if value == "" else str(value)


def write_docs(path: str = DOCS) -> bool:
    """Rewrite the generated tables of `path`; whether anything changed."""
    with open(path) as f:
        text = f.read()
    head, _, rest = text.partition(BEGIN + "\n")
    _, _, tail = rest.partition(END)
    new = head + BEGIN + "\n\n" + fields_markdown() + "\n" + END + tail
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write_docs"]:
        sys.exit("usage: python -m jaxrlvr.config_help --write_docs")
    print(f"{DOCS}: {'rewritten' if write_docs() else 'already current'}")
