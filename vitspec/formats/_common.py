"""Pieces every format shares: reading a spec from tensor names, refusals, fast transposes."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from vitspec.errors import SpecError, WeightsError
from vitspec.layout import param_table
from vitspec.spec import Spec

Shape = tuple[int, ...]


class LazyView(Mapping[str, np.ndarray]):
    """Canonical names of ``spec``, each computed when it is looked up (nothing cached)."""

    def __init__(self, spec: Spec, compute: Callable[[str], np.ndarray]) -> None:
        self._names = [p.name for p in param_table(spec)]
        self._known = set(self._names)
        self._compute = compute

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        return self._compute(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._known


def block_count(names: list[str], pattern: str, what: str) -> int:
    """Number of blocks, from names matching ``pattern`` (one group: the index); indices must be 0..n-1."""
    rx = re.compile(pattern)
    found = sorted({int(m.group(1)) for n in names if (m := rx.match(n))})
    if not found:
        return 0
    if found != list(range(len(found))):
        gaps = sorted(set(range(max(found) + 1)) - set(found))
        raise WeightsError([f"{what} indices are not contiguous: missing block(s) {', '.join(map(str, gaps))}"])
    return len(found)


def need(shapes: Mapping[str, Shape], name: str, ndim: int, what: str, canonical: str, native: str | None = None) -> Shape:
    """The shape of a tensor the format requires, or an error naming it by the format's own name
    (``native``, when ``shapes`` is keyed otherwise; else ``name``) with the canonical name beside it."""
    shown = native or name
    beside = f"canonical {canonical}, " if canonical != shown else ""
    if name not in shapes:
        raise WeightsError([f"missing tensor {shown} ({beside}{what}); is this file of the format it was read as?"])
    shape = shapes[name]
    if len(shape) != ndim:
        raise WeightsError([f"{shown}: expected {ndim} dimensions ({beside}{what}), found shape {list(shape)}"])
    return shape


def refuse(problems: list[str], fmt: str) -> None:
    """One SpecError for every feature of a spec that format ``fmt`` cannot hold."""
    if problems:
        raise SpecError([f"cannot write the {fmt} format: {p}" for p in problems])


def reject_features(names: list[str], features: Mapping[str, str], fmt: str) -> None:
    """Error out on tensors of features a vitspec spec cannot express (name pattern -> feature)."""
    problems = []
    for pattern, feature in features.items():
        hits = [n for n in names if re.search(pattern, n)]
        if hits:
            shown = ", ".join(hits[:3]) + (f" and {len(hits) - 3} more" if len(hits) > 3 else "")
            problems.append(f"this {fmt} checkpoint uses {feature} ({shown}), which a vitspec spec cannot express")
    if problems:
        raise WeightsError(problems)


_STRIP = 16  # rows per strip: 16 float32 values fill a 64-byte cache line of the output
_PARALLEL_BYTES = 1 << 20  # below this a second thread costs more than it saves


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="vitspec-transpose")


def contiguous(array: Any) -> np.ndarray:
    """A C-contiguous copy of ``array`` (itself if it already is one).

    A transposed matrix is copied in strips of 16 source rows: each strip stays in cache while its
    columns are written out, which is several times faster than NumPy's element-order copy for
    the large (out, in) <-> (in, out) kernels a conversion transposes. A large matrix is split
    between two threads (NumPy releases the GIL while it copies): 1.6-1.9x on 2 cores.
    """
    array = np.asarray(array)
    if array.flags.c_contiguous:
        return array
    if array.ndim != 2 or not array.T.flags.c_contiguous or array.shape[1] < 4 * _STRIP:
        return np.ascontiguousarray(array)
    source = array.T  # C-contiguous (cols, rows)
    out = np.empty(array.shape, array.dtype)

    def copy(lo: int, hi: int) -> None:
        for start in range(lo, hi, _STRIP):
            out[:, start : start + _STRIP] = source[start : start + _STRIP].T

    n = source.shape[0]
    if array.nbytes < _PARALLEL_BYTES or (os.cpu_count() or 1) < 2:
        copy(0, n)
    else:
        half = n // 2 // _STRIP * _STRIP
        for done in [_pool().submit(copy, 0, half), _pool().submit(copy, half, n)]:
            done.result()
    return out


class Materialized(Mapping[str, np.ndarray]):
    """A mapping whose arrays are made C-contiguous (with ``contiguous``) as they are looked up."""

    def __init__(self, inner: Mapping[str, np.ndarray]) -> None:
        self._inner = inner

    def __getitem__(self, name: str) -> np.ndarray:
        return contiguous(self._inner[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)

    def __contains__(self, name: object) -> bool:
        return name in self._inner
