"""A config field declared once: default, allowed values, one-line help, documentation.

`Field` is the single declaration from which the config tree's defaults
(`config.base_config`), its range checks (`config.validate`), `--show_config`
(`config_help.describe`) and the field tables of `docs/config.md`
(`config_help.fields_markdown`) are made. Allowed values are written as the user reads
them, e.g. `must=">= 1"`, `must="in (0, 1]"`, `must="> 1", special=(0, "off")`.
Checks that relate several fields (divisibility, orderings) stay with their owner.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from typing import Any

_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_BOUND = re.compile(r"^(>=|>|<=|<) (\S+)$")
_INTERVAL = re.compile(r"^in ([\[(])(\S+), (\S+)([\])])$")


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field.

    `must` is a range (`">= 0"`, `"> 0"`, `"in [0, 1)"`) or "" (any value of the type);
    `choices` the allowed values of a string field; `special` a `(value, meaning)` pair
    that is allowed besides the range (`(0, "off")`); `type` the type of a field whose
    default is None; `doc` the Markdown text of docs/config.md ("" = `help`)."""

    default: Any
    help: str
    must: str = ""
    choices: tuple = ()
    special: tuple = ()
    type: type | None = None
    doc: str = ""

    def __post_init__(self):
        if self.must:
            _parse(self.must)  # a malformed range fails at import, not at validation
        problem = self.problem(self.default)
        if problem:
            raise ValueError(f"default {self.default!r} {problem}")

    def problem(self, value: Any) -> str | None:
        """`must be ...` when `value` is not allowed, else None."""
        if self.choices:
            if value not in self.choices:
                return f"must be one of {', '.join(map(str, self.choices))}"
            return None
        if not self.must or value is None:
            return None
        if self.special and value == self.special[0]:
            return None
        if _parse(self.must)(value):
            return None
        return "must be " + self._range_text()

    def allowed(self) -> str:
        """The allowed values as a docs sentence ("" when only the type restricts them)."""
        if self.choices:
            if all(f"`{c}`" in self.doc for c in self.choices):
                return ""  # the doc already explains each choice
            return "One of " + " \\| ".join(f"`{c}`" for c in self.choices) + "."
        if self.must:
            return "Must be " + self._range_text() + "."
        return ""

    def _range_text(self) -> str:
        if not self.special:
            return self.must
        value, meaning = self.special
        if _parse(self.must)(value):
            return f"{self.must} ({value} = {meaning})"
        return f"{value} ({meaning}) or {self.must}"


def _parse(must: str):
    """The predicate of a range written as `>= x` / `in [a, b)`."""
    if m := _BOUND.match(must):
        compare, bound = _COMPARE[m.group(1)], float(m.group(2))
        return lambda v: _number(v) and compare(v, bound)
    if m := _INTERVAL.match(must):
        low, high = float(m.group(2)), float(m.group(3))
        above = operator.ge if m.group(1) == "[" else operator.gt
        below = operator.le if m.group(4) == "]" else operator.lt
        return lambda v: _number(v) and above(v, low) and below(v, high)
    raise ValueError(f"unknown range {must!r}: write '>= x', '> x', 'in [a, b]', ...")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)
