""".npz archives (what ``np.savez`` writes), read member by member and written one array at a time.

Members stored uncompressed (``np.savez``) are read with ``pread`` at their offsets (never mapped:
see ``containers.source.FileReader``); compressed members (``np.savez_compressed``) are inflated
one at a time. ``allow_pickle`` is never set: a member holding Python objects is refused before
anything is read. big_vision's bfloat16 arrays (stored as 2-byte voids) are read back as bfloat16
and written the same way.
"""

from __future__ import annotations

import math
import os
import tokenize
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np

from vitspec.containers.source import (
    BFLOAT16,
    FileReader,
    Progress,
    Shape,
    Source,
    check_shape,
    fsync,
)
from vitspec.errors import FileFormatError
from vitspec.files import atomic_file, hook

# What zipfile raises on a damaged archive or member: a corrupt deflate stream is zlib.error, an
# unknown compression method NotImplementedError, a name that is not UTF-8 UnicodeDecodeError.
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error)
_LOCAL_HEADER = 30  # fixed part of a zip local file header; the name and extra field follow


def open_npz(path: str | os.PathLike[str]) -> Source:
    """An ``.npz`` archive, member by member, never unpickling (``allow_pickle=False`` semantics)."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS[1:]:  # a name that is not UTF-8, a bad zip64 record... (tests/fuzz)
        raise FileFormatError(
            f"{path}: not a valid .npz file (its zip directory is corrupt)"
        ) from None
    except zipfile.BadZipFile:
        size = path.stat().st_size
        raise FileFormatError(
            f"{path}: not a valid .npz file (no zip directory found in {size} bytes: truncated or not an npz)"
        ) from None
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    file_size = path.stat().st_size
    entries: dict[str, tuple[Shape, np.dtype]] = {}
    where: dict[str, tuple[zipfile.ZipInfo, int, bool, int | None]] = {}
    try:
        with open(path, "rb") as raw:
            for info in archive.infolist():
                if info.filename.endswith(
                    "/"
                ):  # a folder (is_dir() fails on an empty name: tests/fuzz)
                    continue
                if not info.filename.endswith(".npy"):
                    raise FileFormatError(f"{path}: member {info.filename!r} is not a .npy array")
                name = info.filename[: -len(".npy")]
                if info.header_offset + _LOCAL_HEADER + info.compress_size > file_size:
                    # zipfile would allocate the declared size before finding it missing (tests/fuzz)
                    raise FileFormatError(
                        f"{path}: member {info.filename!r} declares {info.compress_size} bytes, past the end of the file ({file_size} bytes)"
                    )
                shape, fortran, dtype, header_len = _npy_header(archive, info, path)
                check_shape(path, f"member {info.filename!r}", shape, dtype)
                expected = header_len + math.prod(shape) * dtype.itemsize
                if info.file_size != expected:
                    raise FileFormatError(
                        f"{path}: member {info.filename!r} holds {info.file_size} bytes, expected {expected} for shape {list(shape)} {dtype}"
                    )
                offset = None
                if info.compress_type == zipfile.ZIP_STORED:
                    raw.seek(info.header_offset)
                    local = raw.read(_LOCAL_HEADER)
                    if len(local) < _LOCAL_HEADER or local[:4] != b"PK\x03\x04":
                        raise FileFormatError(
                            f"{path}: member {info.filename!r} has a corrupt zip header"
                        )
                    n_name, n_extra = (
                        int.from_bytes(local[26:28], "little"),
                        int.from_bytes(local[28:30], "little"),
                    )
                    offset = info.header_offset + _LOCAL_HEADER + n_name + n_extra + header_len
                    if offset + expected - header_len > file_size:
                        raise FileFormatError(
                            f"{path}: member {info.filename!r} runs past the end of the file (truncated)"
                        )
                if dtype.kind == "V" and dtype.itemsize == 2 and BFLOAT16 is not None:
                    dtype_out = BFLOAT16  # big_vision stores bfloat16 as 2-byte voids
                else:
                    dtype_out = dtype
                entries[name] = (shape, dtype_out)
                where[name] = (info, header_len, fortran, offset)
        reader = FileReader(path)
    except BaseException:
        archive.close()
        raise

    def read(name: str) -> np.ndarray:
        info, header_len, fortran, offset = where[name]
        shape, dtype = entries[name]
        order: Literal["C", "F"] = "F" if fortran else "C"
        if offset is not None:
            return reader.read(offset, shape, dtype, order)
        try:
            with archive.open(info) as member:  # inflated and CRC-checked by zipfile
                data = member.read()
        except _ZIP_ERRORS as exc:
            raise FileFormatError(f"{path}: member {info.filename!r} is corrupt ({exc})") from None
        return np.frombuffer(memoryview(data)[header_len:], dtype=dtype).reshape(shape, order=order)

    def close() -> None:
        archive.close()
        reader.close()

    return Source(path, entries, read, close=close, container="npz")


def _npy_header(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path
) -> tuple[Shape, bool, np.dtype, int]:
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            header_len = member.tell()
    # numpy parses the header with ast and, for old files, tokenize: either may refuse it
    except (*_ZIP_ERRORS, TypeError, SyntaxError, tokenize.TokenError) as exc:
        raise FileFormatError(
            f"{path}: member {info.filename!r} is not a valid .npy array ({exc})"
        ) from None
    if dtype.hasobject:
        raise FileFormatError(
            f"{path}: member {info.filename!r} holds Python objects (a pickle); refused: vitspec never unpickles"
        )
    return tuple(int(s) for s in shape), bool(fortran), dtype, header_len


def write_npz(
    path: str | os.PathLike[str],
    items: Iterable[tuple[str, np.ndarray]],
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> None:
    """Stream ``items`` into an uncompressed ``.npz`` (what ``np.savez`` writes), one member at a time.

    bfloat16 arrays are stored as 2-byte voids, as big_vision does (its loader views them back).
    """
    with atomic_file(path, overwrite=overwrite) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in items:
                array = np.ascontiguousarray(array)
                if BFLOAT16 is not None and array.dtype == BFLOAT16:
                    array = array.view("V2")
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    # The .npy header, then the bytes straight from the array (write_array would
                    # copy a zip member's data through a buffer first).
                    np.lib.format.write_array_header_1_0(
                        member, np.lib.format.header_data_from_array_1_0(array)
                    )
                    member.write(array.reshape(-1).view(np.uint8).data)
                if progress is not None:
                    progress(array.nbytes)
                hook("tensor")
        fsync(tmp)
