"""Streaming conversion: canonical views computed on demand, fast transposes, and writers that cast
and write one tensor at a time (the containers themselves are ``vitspec.containers``)."""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec import containers
from vitspec.containers import Progress, Shape
from vitspec.formats.format import Writer
from vitspec.layout import param_table
from vitspec.layouts import Layout
from vitspec.spec import Spec


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


_STRIP = 16  # rows per strip: 16 float32 values fill a 64-byte cache line of the output
_PARALLEL_BYTES = 1 << 20  # below this a second thread costs more than it saves


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=2, thread_name_prefix="vitspec-transpose"
    )


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


def prepared(
    items: Iterable[tuple[str, np.ndarray]], dtype: np.dtype | None, progress: Progress | None
) -> Iterator[tuple[str, np.ndarray]]:
    """Each array C-contiguous (and of ``dtype``), ready to write; ``progress`` told after each."""
    for name, array in items:
        array = contiguous(array)
        if dtype is not None and array.dtype != dtype:
            array = array.astype(dtype)
        yield name, array
        if progress is not None:
            progress(array.nbytes)


def write_safetensors(
    path: Path,
    layout: list[tuple[str, Shape]],
    items: Iterable[tuple[str, np.ndarray]],
    dtype: np.dtype,
    metadata: Mapping[str, str],
    *,
    overwrite: bool,
    progress: Progress | None = None,
) -> None:
    """Stream ``items`` (in ``layout`` order) into one safetensors file, all of ``dtype``."""
    rows = [(name, dtype, shape) for name, shape in layout]
    containers.write_safetensors(
        path,
        prepared(items, dtype, None),
        metadata,
        layout=rows,
        overwrite=overwrite,
        progress=progress,
    )


def write_npz(
    path: Path,
    items: Iterable[tuple[str, np.ndarray]],
    *,
    overwrite: bool,
    progress: Progress | None = None,
) -> None:
    containers.write_npz(path, prepared(items, None, None), overwrite=overwrite, progress=progress)


def write_torch_pickle(
    path: Path,
    items: Iterable[tuple[str, np.ndarray]],
    *,
    overwrite: bool,
    progress: Progress | None = None,
) -> None:
    containers.write_torch_pickle(
        path, prepared(items, None, None), overwrite=overwrite, progress=progress
    )


def safetensors_writer(
    layout: Layout, tags: Mapping[str, str], *, torch_save: bool = False
) -> Writer:
    """A format's writer: one safetensors file in ``layout`` order, ``tags`` and the spec in its
    metadata; with ``torch_save``, a ``torch.save`` file when the path ends in .pt/.pth/.bin."""

    def write(
        path: Path,
        spec: Spec,
        items: Iterator[tuple[str, np.ndarray]],
        dtype: np.dtype,
        *,
        overwrite: bool,
        progress: Progress | None = None,
    ) -> None:
        if torch_save and path.suffix.lower() in (".pt", ".pth", ".bin"):
            write_torch_pickle(path, items, overwrite=overwrite, progress=progress)
            return
        metadata = {**tags, "vitspec.spec": spec.to_json()}
        write_safetensors(
            path,
            layout.native_layout(spec),
            items,
            dtype,
            metadata,
            overwrite=overwrite,
            progress=progress,
        )

    return write
