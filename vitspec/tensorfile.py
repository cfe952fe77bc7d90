"""safetensors files, read memory-mapped and written one tensor at a time.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}`` padded with
spaces to 8 bytes, then the raw little-endian tensor bytes. Reading maps the file and copies one
tensor at a time; writing streams tensors in order, so a model is never held twice in memory.
Files are checked as they are opened: a truncated or corrupt file is an error naming what is wrong.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vitspec.errors import FileFormatError
from vitspec.files import atomic_file

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
try:  # bfloat16 comes with ml_dtypes (installed with jax and tensorflow); optional here.
    import ml_dtypes

    _DTYPES["BF16"] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    pass
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100_000_000


def dtype_code(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return _CODES[dtype]
    except KeyError:
        raise FileFormatError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class TensorFile:
    """A safetensors file opened for reading: ``names``, ``metadata``, ``info(name)``, ``get(name)``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: BinaryIO | None = None
        self._map: mmap.mmap | None = None
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except FileNotFoundError:
            raise FileFormatError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise FileFormatError(f"{self.path}: is a folder, expected a .safetensors file") from None
        except OSError as exc:
            raise FileFormatError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        try:
            self.metadata, self._infos, self._data_start = self._read_header()
        except BaseException:
            self.close()
            raise
        size = self._data_start + max((i.end for i in self._infos.values()), default=0)
        if size > 0 and os.fstat(self._file.fileno()).st_size > 0:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def _fail(self, what: str) -> FileFormatError:
        return FileFormatError(f"{self.path}: not a valid safetensors file: {what}")

    def _read_header(self) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
        assert self._file is not None
        file_size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._fail(f"the file is {file_size} bytes, too short for a header")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > file_size:
            raise self._fail(f"header length {n} does not fit in a file of {file_size} bytes (truncated or not safetensors)")
        raw = self._file.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(f"header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ must map strings to strings")
        infos: dict[str, TensorInfo] = {}
        data_size = file_size - 8 - n
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"tensor {name!r} has a malformed header entry") from None
            if dtype not in _DTYPES:
                raise self._fail(f"tensor {name!r} has unsupported dtype {dtype!r}")
            expected = math.prod(shape) * _DTYPES[dtype].itemsize
            if end - begin != expected or begin < 0:
                raise self._fail(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} {dtype}, expected {expected}")
            if end > data_size:
                raise self._fail(
                    f"tensor {name!r} ends at byte {end} but the data section has {data_size} bytes (the file is truncated)"
                )
            infos[name] = TensorInfo(dtype, shape, begin, end)
        return metadata, infos, 8 + n

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def get(self, name: str) -> np.ndarray:
        """A copy of one tensor (the map is not held by the result)."""
        info = self._infos[name]
        dtype = _DTYPES[info.dtype]
        if info.nbytes == 0 or self._map is None:
            return np.zeros(info.shape, dtype)
        start = self._data_start + info.begin
        return np.frombuffer(self._map, dtype=dtype, count=math.prod(info.shape), offset=start).reshape(info.shape).copy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    layout: Iterable[tuple[str, Any, tuple[int, ...]]] | None = None,
) -> None:
    """Write tensors atomically.

    With ``layout`` (name, dtype, shape for every tensor, in order), ``tensors`` may be a
    generator that produces one array at a time: only one tensor is in memory at once.
    """
    items: Iterable[tuple[str, np.ndarray]] = tensors.items() if isinstance(tensors, Mapping) else tensors
    if layout is None:
        items = list(items)
        layout = [(name, arr.dtype, arr.shape) for name, arr in items]
    layout = [(name, np.dtype(dtype), tuple(int(s) for s in shape)) for name, dtype, shape in layout]
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in layout:
        if name in header:
            raise ValueError(f"tensor {name!r} appears twice")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_file(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        written = 0
        for (name, arr), (want_name, dtype, shape) in zip(items, layout, strict=True):
            if name != want_name:
                raise ValueError(f"tensor {name!r} written where the layout expects {want_name!r}")
            arr = np.asarray(arr)
            if arr.shape != shape or arr.dtype != dtype:
                raise ValueError(f"tensor {name!r}: {arr.dtype}{list(arr.shape)} written, the layout says {dtype}{list(shape)}")
            data = np.ascontiguousarray(arr.astype(dtype.newbyteorder("<"), copy=False))
            f.write(memoryview(data.reshape(-1).view(np.uint8)))  # a byte view works for bfloat16 too
            written += data.nbytes
        if written != offset:
            raise ValueError(f"wrote {written} bytes of tensor data, expected {offset}")
        f.flush()
        os.fsync(f.fileno())


def read_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors and the metadata of a safetensors file."""
    with TensorFile(path) as tf:
        return {name: tf.get(name) for name in tf.names}, dict(tf.metadata)
