"""Native layouts as data: for each backend and checkpoint family, one table built from the spec.

A row says which native tensor holds which canonical tensor(s) and by which move
(``vitspec.layouts.moves``). Everything else is generic and written once here: the native names
and shapes, canonical -> native (``to_native``), native -> canonical (``from_native``, and a lazy
random-access view, ``canonical``). Backends load and export through their table; formats read and
write through theirs; a new family is a new table (a module in this package) and nothing else.

Native shapes are derived from the moves and the canonical shapes, never written twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from vitspec.layout import param_shapes
from vitspec.layouts.moves import SAME, Move, Shape
from vitspec.spec import Spec


@dataclass(frozen=True)
class Row:
    """One native tensor: its name, the move, and the canonical tensor(s) it holds."""

    native: str
    move: Move
    canonical: tuple[str, ...]


def row(native: str, canonical: str | tuple[str, ...], move: Move = SAME) -> Row:
    return Row(native, move, (canonical,) if isinstance(canonical, str) else canonical)


class Table:
    """A layout applied to one spec: the rows with their shapes, and the conversions."""

    def __init__(self, spec: Spec, rows: list[Row]) -> None:
        self.spec = spec
        self.rows = rows
        self.canonical_shapes = param_shapes(spec)
        self.shapes: dict[str, Shape] = {
            r.native: r.move.shape([self.canonical_shapes[c] for c in r.canonical]) for r in rows
        }
        # canonical name -> (row, index of the part within the row)
        self.where: dict[str, tuple[Row, int]] = {
            c: (r, j) for r in rows for j, c in enumerate(r.canonical)
        }

    def native_layout(self) -> list[tuple[str, Shape]]:
        """(native name, native shape) of every native tensor, in the family's own order."""
        return list(self.shapes.items())

    def to_native(self, weights: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
        """Canonical -> (native name, array), one native tensor at a time; each canonical read once."""
        for r in self.rows:
            yield r.native, r.move.forward([np.asarray(weights[c]) for c in r.canonical])

    def part(self, name: str, native: np.ndarray) -> np.ndarray:
        """Canonical tensor ``name`` taken out of its native tensor (a view where possible)."""
        r, j = self.where[name]
        return r.move.inverse(native, j, [self.canonical_shapes[c] for c in r.canonical])

    def from_native(self, native: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
        """Native -> (canonical name, C-contiguous array) in canonical table order; a fused tensor is
        read once. (C order matters: BLAS rounds transposed operands differently.)"""
        view = self.canonical(native)
        for name in self.canonical_shapes:
            yield name, np.ascontiguousarray(view[name])

    def canonical(self, native: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        """A lazy canonical view of native tensors: each computed when looked up, nothing kept
        but the last native tensor read (so q, k and v of one fused tensor read it once)."""
        return _View(self, native)


class _View(Mapping[str, np.ndarray]):
    def __init__(self, table: Table, native: Mapping[str, Any]) -> None:
        self._table = table
        self._native = native
        self._last: tuple[str, np.ndarray] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._table.where:
            raise KeyError(name)
        source = self._table.where[name][0].native
        if self._last is None or self._last[0] != source:
            self._last = (source, np.asarray(self._native[source]))
        return self._table.part(name, self._last[1])

    def __iter__(self) -> Iterator[str]:
        return iter(self._table.canonical_shapes)

    def __len__(self) -> int:
        return len(self._table.canonical_shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._table.where


@dataclass(frozen=True)
class Layout:
    """A family's layout: a function from a spec to its rows, and how it keeps dense kernels."""

    name: str
    rows: Callable[[Spec], list[Row]]
    # "out_in" when dense kernels are stored transposed (torch.nn.Linear); conversions between two
    # families that differ here transpose each kernel once, cache-blocked (formats.contiguous).
    dense: Literal["in_out", "out_in"] = "in_out"

    def table(self, spec: Spec) -> Table:
        return Table(spec, self.rows(spec))

    def native_layout(self, spec: Spec) -> list[tuple[str, Shape]]:
        return self.table(spec).native_layout()

    def to_native(self, spec: Spec, weights: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
        return self.table(spec).to_native(weights)

    def from_native(
        self, spec: Spec, native: Mapping[str, Any]
    ) -> Iterator[tuple[str, np.ndarray]]:
        return self.table(spec).from_native(native)

    def canonical(self, spec: Spec, native: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        return self.table(spec).canonical(native)


def canonical_rows(spec: Spec) -> list[Row]:
    """The identity layout: every canonical tensor as itself."""
    return [row(name, name) for name in param_shapes(spec)]


CANONICAL = Layout("canonical", canonical_rows)

__all__ = ["CANONICAL", "Layout", "Row", "Table", "canonical_rows", "row"]
