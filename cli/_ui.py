"""Shared terminal output: one rich console, tables, numbers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# Width given to output that is not a terminal: wide enough that no line or table row is wrapped.
UNWRAPPED_WIDTH = 100_000


def console(stderr: bool = False) -> Any:
    """A rich console that wraps to the terminal, and wraps nothing when piped or redirected."""
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False, soft_wrap=False)
    if (
        not out.is_terminal
    ):  # a file or a pipe: rich would wrap at 80 columns (or $COLUMNS), mid-phrase
        out.soft_wrap = True
        out.width = UNWRAPPED_WIDTH
    return out


def table(
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    justify: Sequence[str] | None = None,
) -> Any:
    """A rich table; ``justify`` gives each column's alignment ("left"/"right")."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for i, col in enumerate(columns):
        t.add_column(col, justify=(justify[i] if justify else "left"), overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        t.add_row(*[str(c) for c in row])
    return t


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
