"""Markdown tables, as the commands write them (`report`'s index.md, `sweep`'s summary.md,
`evaluate`'s eval.md)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a table: the header, its rule, then a line per row of cells."""
    line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    return [line(header), "|---" * len(header) + "|"] + [line(r) for r in rows]
