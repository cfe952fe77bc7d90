"""What every container shares: the ``Source`` a reader returns, the float dtypes, and fsync.

A :class:`Source` knows every tensor's name, shape and dtype as soon as it is opened (from the
file's header or index) and reads an array only when asked for it, so a conversion holds about
one tensor at a time, never the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.errors import FileFormatError

Shape = tuple[int, ...]
Progress = Callable[[int], None]  # told the bytes of each tensor as it is written

try:  # bfloat16 arrives with ml_dtypes (installed with jax and tensorflow); optional here.
    import ml_dtypes

    BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    BFLOAT16 = None

FLOAT_KINDS = ("float16", "bfloat16", "float32", "float64")


def is_float(dtype: np.dtype) -> bool:
    return str(dtype) in FLOAT_KINDS


def nonfinite_summary(array: np.ndarray) -> str:
    """'' if every value is finite, else how many NaN/Inf values and where the first one is."""
    if not is_float(array.dtype) or array.size == 0:
        return ""
    # A sum is NaN or Inf whenever any element is (an overflow only sends us to the exact count
    # below); it is cheap and allocates nothing. 16-bit floats are summed in float32.
    with np.errstate(all="ignore"):
        total = array.sum(dtype=np.float32 if array.dtype.itemsize < 4 else None)
    if np.isfinite(total):
        return ""
    as64 = np.asarray(array, np.float64)
    n_nan, n_inf = int(np.isnan(as64).sum()), int(np.isinf(as64).sum())
    if not (n_nan or n_inf):
        return ""
    first = [int(i) for i in np.argwhere(~np.isfinite(as64))[0]]
    return f"{n_nan} NaN and {n_inf} Inf values (first at index {first})"


def fsync(path: Path) -> None:
    """Flush a written file to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Source(Mapping[str, np.ndarray]):
    """A checkpoint opened for reading: the table up front, arrays one at a time.

    Every float array handed out is checked for NaN/Inf once; ``nonfinite`` collects what was
    found (name -> summary) so a conversion can report every bad tensor by name at the end.
    """

    def __init__(
        self,
        path: Path,
        entries: Mapping[str, tuple[Shape, np.dtype]],
        read: Callable[[str], np.ndarray],
        *,
        metadata: Mapping[str, str] | None = None,
        config: dict[str, Any] | None = None,
        close: Callable[[], None] | None = None,
        container: str = "",
    ) -> None:
        self.path = path
        self.entries = dict(entries)
        self.metadata = dict(metadata or {})
        self.config = config
        self.container = container
        self.nonfinite: dict[str, str] = {}
        self._read = read
        self._close = close
        self._checked: set[str] = set()

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> Shape:
        return self.entries[name][0]

    @property
    def shapes(self) -> dict[str, Shape]:
        return {name: shape for name, (shape, _) in self.entries.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise KeyError(name)
        array = self._read(name)
        if name not in self._checked:
            self._checked.add(name)
            bad = nonfinite_summary(array)
            if bad:
                self.nonfinite[name] = bad
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def renamed(self, rename: Mapping[str, str]) -> Source:
        """The same file under other names (``rename``: file name -> new name; others kept)."""
        back = {rename.get(n, n): n for n in self.entries}
        if len(back) != len(self.entries):
            raise FileFormatError(f"{self.path}: two tensors map to the same name after renaming")
        entries = {rename.get(n, n): e for n, e in self.entries.items()}
        source = Source(
            self.path,
            entries,
            lambda name: self._read(back[name]),
            metadata=self.metadata,
            config=self.config,
            close=self.close,
            container=self.container,
        )
        source.nonfinite = self.nonfinite
        return source

    def subset(self, names: Iterable[str]) -> Source:
        """The same file with only ``names`` visible."""
        keep = set(names)
        entries = {n: e for n, e in self.entries.items() if n in keep}
        return Source(
            self.path,
            entries,
            self._read,
            metadata=self.metadata,
            config=self.config,
            container=self.container,
        )

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
