"""safetensors files: checked by the ``safetensors`` library, read and written by us.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}`` padded with
spaces to 8 bytes, then the raw little-endian tensor bytes.

Opening a file is ``safe_open(path, framework="numpy")``: the library checks the whole header
(dtypes, shapes against byte counts, offsets covering the data exactly, string metadata). When it
refuses a file, its message ("header too small", "incomplete metadata, file not fully covered")
does not say what happened to the file; :func:`_diagnose` reads the first bytes and the header to
say it in one line (too short, truncated, not JSON, bytes appended).

Reading is not the library's ``get_tensor``, which maps the file. Once the library has checked
the header, each tensor is read at the header's offsets with ``pread`` into an array of its own
(``containers.source.FileReader``; the library does not expose the offsets). An earlier version
mapped each tensor with ``np.memmap``; a mapped file truncated by another program meanwhile
kills the process with SIGBUS, which a read turns into one line ("the file changed while it was
being read"). On a ViT-L/16 timm file (1.2 GB), ``benchmarks/bench_convert.py --repeat 3``, median
wall seconds before -> after on a shared 2-core VM: canonical 5.41 -> 5.12, torch 3.37 -> 3.65,
keras 6.03 -> 6.05, flax 5.15 -> 5.14, hf 3.21 -> 3.15, google 6.16 -> 6.29 (within the noise);
peak RSS 85 -> 82 MiB (0.07 of the file). Only the tensor being converted is held; bfloat16 is
read as bytes and viewed through ml_dtypes; the tensors keep the order they were written in (the
library's ``keys()`` are sorted).

Writing is ours too: ``safetensors.numpy.save_file`` serialises a dict, so every tensor must be
in memory at once, while a conversion produces one tensor at a time. The writer lays out the
header from the names, dtypes and shapes up front, then streams each tensor's bytes as it arrives
into a temporary file that is fsync'ed and renamed into place (``vitspec.files.atomic_file``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from vitspec.containers.source import (
    BFLOAT16,
    FileReader,
    Progress,
    Shape,
    Source,
    check_shape,
)
from vitspec.errors import FileFormatError
from vitspec.files import atomic_file, hook

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
if BFLOAT16 is not None:
    _DTYPES["BF16"] = BFLOAT16
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # the library's limit too


def dtype_code(dtype: Any) -> str:
    """The safetensors name of a NumPy dtype (``float32`` -> ``F32``)."""
    dtype = np.dtype(dtype)
    try:
        return _CODES[dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype]
    except KeyError:
        raise FileFormatError(f"dtype {dtype} cannot be stored in safetensors") from None


# ---- reading ---------------------------------------------------------------------------------


def open_safetensors(path: str | os.PathLike[str]) -> Source:
    """One safetensors file: the table from its header now, each tensor read when asked for."""
    path = Path(path)
    with _safe_open(path) as handle:  # the library checks the whole header before we read it
        metadata = handle.metadata() or {}
    length, header = _header(path)
    entries: dict[str, tuple[Shape, np.dtype]] = {}
    begin: dict[str, int] = {}
    for name, entry in header.items():  # in the order written (the library's keys() are sorted)
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            hint = ": pip install ml-dtypes" if entry["dtype"] == "BF16" else ""
            raise FileFormatError(
                f"{path}: tensor {name!r} has dtype {entry['dtype']}, which vitspec cannot read{hint}"
            )
        entries[name] = (tuple(entry["shape"]), _DTYPES[entry["dtype"]])
        check_shape(path, f"tensor {name!r}", entries[name][0], entries[name][1])
        begin[name] = 8 + length + entry["data_offsets"][0]

    reader = FileReader(path)

    def read(name: str) -> np.ndarray:
        shape, dtype = entries[name]
        return reader.read(begin[name], shape, dtype)

    return Source(
        path, entries, read, metadata=metadata, close=reader.close, container="safetensors"
    )


def _header(path: Path) -> tuple[int, Any]:
    """The header's length and its JSON (None if the file cannot hold them; length -1 if not even the length)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return -1, None
        length = int.from_bytes(head, "little")
        if 8 + length > os.fstat(f.fileno()).st_size or length > _MAX_HEADER:
            return length, None
        return length, json.loads(f.read(length))


def _safe_open(path: Path) -> Any:
    if path.is_dir():
        raise FileFormatError(f"{path}: is a folder, expected a .safetensors file")
    try:
        return safe_open(str(path), framework="numpy")
    except SafetensorError as exc:
        raise FileFormatError(
            f"{path}: not a valid safetensors file: {_diagnose(path, exc)}"
        ) from None
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such file") from None
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _diagnose(path: Path, error: Exception) -> str:
    """What is wrong with a file the library refused, in words that say what happened to it."""
    size = path.stat().st_size
    try:
        length, header = _header(path)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both are
        return f"header is not JSON ({exc})"
    if length < 0:
        return f"the file is {size} bytes, too short for a header"
    if header is None and 8 + length > size:
        return f"header length {length} does not fit in a file of {size} bytes (truncated or not safetensors)"
    if header is None:
        return f"header length {length} is over the format's limit of {_MAX_HEADER} bytes (not safetensors)"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    ends: dict[str, int] = {}
    for name, entry in header.items():
        try:
            ends[name] = int(entry["data_offsets"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    data = size - 8 - length
    last = max(ends, key=ends.__getitem__, default=None)
    if last is not None and ends[last] > data:
        return f"tensor {last!r} ends at byte {ends[last]} but the data section has {data} bytes (the file is truncated)"
    if last is not None and ends[last] < data:
        return f"{data - ends[last]} bytes follow the last tensor's data (appended to, or a corrupt header)"
    return str(error).removeprefix("Error while deserializing header: ")


def open_sharded_safetensors(index_path: str | os.PathLike[str]) -> Source:
    """A sharded checkpoint: ``*.safetensors.index.json`` with a ``weight_map`` of name -> shard."""
    index_path = Path(index_path)
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise FileFormatError(
            f"{index_path}: not a safetensors index (expected JSON with a 'weight_map' object)"
        ) from None
    shards: dict[str, Source] = {}
    problems: list[str] = []
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise FileFormatError(
                f"{index_path}: shard {shard!r} is not a file name in the same folder"
            )
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            problems.append(f"shard {shard} (listed in {index_path.name}) is missing")
            continue
        shards[shard] = open_safetensors(shard_path)
    if problems:
        raise FileFormatError(f"{index_path}: " + "; ".join(problems))
    entries: dict[str, tuple[Shape, np.dtype]] = {}
    owner: dict[str, Source] = {}
    for name, shard in weight_map.items():
        source = shards[shard]
        if name not in source.entries:
            problems.append(f"tensor {name} is listed in {shard} but not stored there")
            continue
        entries[name], owner[name] = source.entries[name], source
    stray = [
        f"{n} (in {s})" for s, src in shards.items() for n in src.entries if weight_map.get(n) != s
    ]
    if stray:
        problems.append(
            f"tensors stored in a shard but not listed in the index: {', '.join(stray)}"
        )
    if problems:
        raise FileFormatError(f"{index_path}: " + "; ".join(problems))
    metadata = next(iter(shards.values())).metadata if shards else {}

    def close() -> None:
        for source in shards.values():
            source.close()

    return Source(
        index_path,
        entries,
        lambda name: owner[name]._read(name),
        metadata=metadata,
        close=close,
        container="safetensors-sharded",
    )


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor (in file order, each a copy of its own) and the metadata of a safetensors file."""
    source = open_safetensors(path)
    return {name: np.array(source[name]) for name in source}, source.metadata


# ---- writing ---------------------------------------------------------------------------------


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
    *,
    layout: Iterable[tuple[str, Any, Shape]] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> None:
    """Write tensors atomically, in order.

    With ``layout`` (name, dtype, shape for every tensor, in order), ``tensors`` may be a
    generator that produces one array at a time: only one tensor is in memory at once.
    A tensor that does not match its layout row is a caller's bug (ValueError), and nothing is left.
    """
    items: Iterable[tuple[str, np.ndarray]] = (
        tensors.items() if isinstance(tensors, Mapping) else tensors
    )
    if layout is None:
        items = list(items)
        layout = [(name, arr.dtype, arr.shape) for name, arr in items]
    rows = [(name, np.dtype(dtype), tuple(int(s) for s in shape)) for name, dtype, shape in layout]
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in rows:
        if name in header:
            raise ValueError(f"tensor {name!r} appears twice")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": dtype_code(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    size = 8 + len(blob) + offset
    with atomic_file(path, overwrite=overwrite, size=size) as tmp, open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        written = 0
        for (name, arr), (want_name, dtype, shape) in zip(items, rows, strict=True):
            if name != want_name:
                raise ValueError(f"tensor {name!r} written where the layout expects {want_name!r}")
            arr = np.asarray(arr)
            if arr.shape != shape or arr.dtype != dtype:
                raise ValueError(
                    f"tensor {name!r}: {arr.dtype}{list(arr.shape)} written, the layout says {dtype}{list(shape)}"
                )
            data = np.ascontiguousarray(arr.astype(dtype.newbyteorder("<"), copy=False))
            f.write(data.reshape(-1).view(np.uint8).data)  # a byte view works for bfloat16 too
            written += data.nbytes
            if progress is not None:
                progress(data.nbytes)
            hook("tensor")
        if written != offset:
            raise ValueError(f"wrote {written} bytes of tensor data, expected {offset}")
        f.flush()
        os.fsync(f.fileno())
