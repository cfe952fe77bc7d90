"""What every container shares: the ``Source`` a reader returns, the float dtypes, and fsync.

A :class:`Source` knows every tensor's name, shape and dtype as soon as it is opened (from the
file's header or index) and reads an array only when asked for it, so a conversion holds about
one tensor at a time, never the model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.errors import FileFormatError
from vitspec.files import hook

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


# No array may have a dimension whose bytes overflow NumPy's index type (2**63), even one with
# no elements: NumPy refuses to make an array of shape (0, 2**63 - 1) with ValueError.
_MAX_DIM_BYTES = 2**62


def check_shape(path: Path, what: str, shape: Shape, dtype: np.dtype) -> None:
    """Refuse a shape no array can have (found by tests/fuzz: an empty array with a huge dimension)."""
    # each dimension and the product of the non-zero ones (an empty (0, 2**40, 2**40) too: tests/fuzz)
    span = math.prod(d for d in shape if d) * max(dtype.itemsize, 1)
    if any(d < 0 for d in shape) or span >= _MAX_DIM_BYTES:
        raise FileFormatError(f"{path}: {what} has shape {list(shape)}, which no array can have")


class FileReader:
    """Byte ranges of one open file, read with ``pread`` into arrays of their own.

    Not memory-mapped on purpose: a mapped file that another program truncates kills the reader
    with SIGBUS when it touches a page past the new end, and nothing in Python can catch that.
    A read copies each byte once (from the page cache, as a mapped read's page faults do), and
    only the tensor being read is held. The file stays open from the start, so one deleted or
    replaced meanwhile is still read as it was; one truncated or rewritten in place (its size or
    modification time changed, or a read comes up short) is refused in one line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise FileFormatError(f"{path}: no such file") from None
        except OSError as exc:
            raise FileFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
        info = os.fstat(self._fd)
        self.size, self._mtime = info.st_size, info.st_mtime_ns

    def _check(self, fd: int) -> None:
        info = os.fstat(fd)
        if (info.st_size, info.st_mtime_ns) != (self.size, self._mtime):
            self._changed(f"it was {self.size} bytes, now {info.st_size}")

    def _changed(self, how: str) -> None:
        raise FileFormatError(
            f"{self.path}: the file changed while it was being read ({how}): another program "
            "truncated or rewrote it; read it again once it is complete"
        )

    def read(self, offset: int, shape: Shape, dtype: np.dtype, order: str = "C") -> np.ndarray:
        """The ``shape`` array of ``dtype`` stored at byte ``offset`` (a fresh, writable array)."""
        fd = self._fd
        if fd is None:
            raise ValueError(f"{self.path} was closed")
        nbytes = math.prod(shape) * dtype.itemsize
        self._check(fd)
        if (
            offset + nbytes > self.size
        ):  # the readers check this when opening; never allocate past the file
            raise FileFormatError(
                f"{self.path}: {nbytes} bytes at offset {offset} run past the end of the file ({self.size} bytes)"
            )
        out = np.empty(nbytes, np.uint8)
        view = out.data  # a memoryview of the new array
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                self._changed(f"a read at byte {offset + done} found the end of the file")
            done += got
        self._check(fd)
        return out.view(dtype).reshape(shape, order=order)  # type: ignore[call-overload]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
        hook("read")
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
