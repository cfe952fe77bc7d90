"""HDF5 files (Keras ``.weights.h5``), read through h5py one dataset at a time.

Keras stores bfloat16 as 2-byte opaque values with a ``dtype`` attribute saying so; they are read
back as bfloat16. The file's attributes become the Source's metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.containers.source import BFLOAT16, Shape, Source
from vitspec.errors import FileFormatError


def open_h5(path: str | os.PathLike[str]) -> Source:
    """Every dataset of an HDF5 file, by its full path (without the leading '/')."""
    path = Path(path)
    try:
        import h5py
    except ImportError:
        raise FileFormatError(f"{path}: reading .h5 files needs h5py: pip install h5py") from None
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FileFormatError(
            f"{path}: not a readable HDF5 file (truncated or corrupt?): {str(exc).splitlines()[0][:200]}"
        ) from None
    entries: dict[str, tuple[Shape, np.dtype]] = {}

    bf16: set[str] = set()

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            if (
                obj.attrs.get("dtype") == "bfloat16"
                and obj.dtype.itemsize == 2
                and BFLOAT16 is not None
            ):
                bf16.add(name)  # Keras stores bfloat16 as 2-byte opaque values marked this way
                entries[name] = (tuple(obj.shape), BFLOAT16)
                return
            if obj.dtype.hasobject or obj.dtype.kind not in "fiub":
                raise FileFormatError(
                    f"{path}: dataset {name} has dtype {obj.dtype}, expected numbers"
                )
            entries[name] = (tuple(obj.shape), np.dtype(obj.dtype))

    try:
        f.visititems(visit)
        metadata = {str(k): _attr_str(v) for k, v in f.attrs.items()}
    except BaseException:
        f.close()
        raise

    def read(name: str) -> np.ndarray:
        try:
            array = np.asarray(f[name][()])
            return array.view(BFLOAT16) if name in bf16 and BFLOAT16 is not None else array
        except OSError as exc:
            raise FileFormatError(
                f"{path}: dataset {name} cannot be read (corrupt?): {str(exc).splitlines()[0][:200]}"
            ) from None

    return Source(path, entries, read, metadata=metadata, close=f.close, container="h5")


def _attr_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
