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
    file_size = path.stat().st_size

    def _check_size(obj: Any, name: str) -> None:
        """Refuse, before reading, a dataset declaring more bytes than the file can hold (deflate
        expands at most 1032-fold), so a corrupt shape never becomes a huge allocation."""
        limit = file_size if obj.compression is None else 1032 * file_size
        if obj.nbytes > limit:
            raise FileFormatError(
                f"{path}: dataset {name} declares shape {list(obj.shape)} ({obj.nbytes} bytes), "
                f"more than a file of {file_size} bytes can hold (corrupt?)"
            )

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            if (
                obj.attrs.get("dtype") == "bfloat16"
                and obj.dtype.itemsize == 2
                and BFLOAT16 is not None
            ):
                _check_size(obj, name)
                bf16.add(name)  # Keras stores bfloat16 as 2-byte opaque values marked this way
                entries[name] = (tuple(obj.shape), BFLOAT16)
                return
            if obj.dtype.hasobject or obj.dtype.kind not in "fiub":
                raise FileFormatError(
                    f"{path}: dataset {name} has dtype {obj.dtype}, expected numbers"
                )
            _check_size(obj, name)
            entries[name] = (tuple(obj.shape), np.dtype(obj.dtype))

    try:
        f.visititems(visit)
        metadata = {str(k): _attr_str(v) for k, v in f.attrs.items()}
    except _H5_ERRORS as exc:  # found by tests/fuzz: a flipped byte in a symbol table node
        f.close()
        raise FileFormatError(
            f"{path}: not a readable HDF5 file (corrupt?): {_first_line(exc)}"
        ) from None
    except BaseException:
        f.close()
        raise

    def read(name: str) -> np.ndarray:
        try:
            array = np.asarray(f[name][()])
            return array.view(BFLOAT16) if name in bf16 and BFLOAT16 is not None else array
        except _H5_ERRORS as exc:
            raise FileFormatError(
                f"{path}: dataset {name} cannot be read (corrupt?): {_first_line(exc)}"
            ) from None

    return Source(path, entries, read, metadata=metadata, close=f.close, container="h5")


# What h5py raises on a corrupt file: OSError from HDF5's I/O, RuntimeError from a failed
# traversal ("Object visitation failed"), KeyError/ValueError/TypeError from damaged metadata.
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _attr_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
