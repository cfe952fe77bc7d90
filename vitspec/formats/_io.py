"""Temporary: the container names the format modules import, now from ``vitspec.containers``.

The readers and writers live in :mod:`vitspec.containers` (one module per container). This shim
keeps the names and signatures the format modules use until they import from there; the writers
here first make each array C-contiguous with the formats' fast transpose and cast it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from vitspec import containers
from vitspec.containers import (
    BFLOAT16,
    FLOAT_KINDS,
    Progress,
    Shape,
    Source,
    fsync,
    is_float,
    nonfinite_summary,
    open_h5,
    open_npz,
    open_safetensors,
    open_sharded_safetensors,
    open_torch_pickle,
    sniff_container,
)

__all__ = [
    "BFLOAT16",
    "FLOAT_KINDS",
    "Progress",
    "Shape",
    "Source",
    "fsync",
    "is_float",
    "nonfinite_summary",
    "open_h5",
    "open_npz",
    "open_safetensors",
    "open_sharded_safetensors",
    "open_torch_pickle",
    "sniff_container",
    "write_npz",
    "write_safetensors",
    "write_torch_pickle",
]


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
        _cast(items, dtype, None),
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
    containers.write_npz(path, _cast(items, None, None), overwrite=overwrite, progress=progress)


def write_torch_pickle(
    path: Path,
    items: Iterable[tuple[str, np.ndarray]],
    *,
    overwrite: bool,
    progress: Progress | None = None,
) -> None:
    containers.write_torch_pickle(
        path, _cast(items, None, None), overwrite=overwrite, progress=progress
    )


def _cast(
    items: Iterable[tuple[str, np.ndarray]], dtype: np.dtype | None, progress: Progress | None
) -> Iterator[tuple[str, np.ndarray]]:
    """Each array C-contiguous (and of ``dtype``), ready to write; ``progress`` told after each."""
    from vitspec.formats._common import contiguous

    for name, array in items:
        array = contiguous(array)
        if dtype is not None and array.dtype != dtype:
            array = array.astype(dtype)
        yield name, array
        if progress is not None:
            progress(array.nbytes)
