"""Checkpoint containers, read lazily and written one tensor at a time.

A :class:`Source` knows every tensor's name, shape and dtype as soon as it is opened (from the
file's header or index) and reads an array only when asked for it:

- safetensors: each tensor is memory-mapped on its own (``np.memmap``) and unmapped when dropped,
  so the resident memory of a conversion stays near one tensor, not the file;
- ``.npz``: members stored uncompressed (``np.savez``) are memory-mapped the same way; compressed
  members (``np.savez_compressed``) are inflated one at a time. ``allow_pickle`` is never set: a
  member holding Python objects is refused before anything is read;
- ``.pt``/``.pth``/``.bin``: ``torch.load(weights_only=True, mmap=True)`` only; a pickle that
  would build anything but tensors and plain containers is refused and runs nothing;
- ``.h5``: h5py, one dataset at a time.

Writers take an iterator of ``(name, array)`` and write each array as it comes, into a temporary
file that is renamed into place only when everything succeeded (see ``vitspec.files``).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.errors import FileFormatError
from vitspec.files import atomic_file
from vitspec.tensorfile import TensorFile, write_tensors

Shape = tuple[int, ...]
Progress = Callable[[int], None]

try:  # bfloat16 arrives with ml_dtypes (installed with jax and tensorflow)
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

    # ---- the table -------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> Shape:
        return self.entries[name][0]

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][1]

    @property
    def shapes(self) -> dict[str, Shape]:
        return {name: shape for name, (shape, _) in self.entries.items()}

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in self.entries.values())

    # ---- the data --------------------------------------------------------------------------

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
        return Source(self.path, {n: e for n, e in self.entries.items() if n in keep}, self._read, metadata=self.metadata, config=self.config, container=self.container)

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- safetensors -----------------------------------------------------------------------------


def _safetensors_dtype(code: str) -> np.dtype:
    from vitspec.tensorfile import _DTYPES

    return _DTYPES[code]


def _memmap(path: Path, dtype: np.dtype, offset: int, shape: Shape) -> np.ndarray:
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype)
    # np.memmap cannot map bfloat16 by name; map raw 2-byte words and view them.
    raw = np.memmap(path, dtype=dtype if dtype != BFLOAT16 else np.uint16, mode="r", offset=offset, shape=shape)
    return raw.view(dtype) if dtype == BFLOAT16 else raw


def open_safetensors(path: Path) -> Source:
    """One safetensors file; each tensor is memory-mapped when read."""
    with TensorFile(path) as tf:
        metadata = dict(tf.metadata)
        infos = {name: tf.info(name) for name in tf.names}
    with open(path, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    entries = {name: (info.shape, _safetensors_dtype(info.dtype)) for name, info in infos.items()}

    def read(name: str) -> np.ndarray:
        shape, dtype = entries[name]
        return _memmap(path, dtype, data_start + infos[name].begin, shape)

    return Source(path, entries, read, metadata=metadata, container="safetensors")


def open_sharded_safetensors(index_path: Path) -> Source:
    """A sharded checkpoint: ``*.safetensors.index.json`` with a ``weight_map`` of name -> shard."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise FileFormatError(f"{index_path}: not a safetensors index (expected JSON with a 'weight_map' object)") from None
    shards: dict[str, Source] = {}
    problems: list[str] = []
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if Path(shard).name != shard:
            raise FileFormatError(f"{index_path}: shard {shard!r} is not a file name in the same folder")
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
    stray = [f"{n} (in {s})" for s, src in shards.items() for n in src.entries if weight_map.get(n) != s]
    if stray:
        problems.append(f"tensors stored in a shard but not listed in the index: {', '.join(stray)}")
    if problems:
        raise FileFormatError(f"{index_path}: " + "; ".join(problems))
    metadata = next(iter(shards.values())).metadata if shards else {}
    return Source(index_path, entries, lambda name: owner[name]._read(name), metadata=metadata, container="safetensors-sharded")


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
    write_tensors(
        path,
        _cast(items, dtype, progress),
        metadata,
        overwrite=overwrite,
        layout=[(name, dtype, shape) for name, shape in layout],
    )


def _cast(items: Iterable[tuple[str, np.ndarray]], dtype: np.dtype | None, progress: Progress | None) -> Iterator[tuple[str, np.ndarray]]:
    """Each array C-contiguous (and of ``dtype``), ready to write; ``progress`` told after each."""
    from vitspec.formats._common import contiguous

    for name, array in items:
        array = contiguous(array)
        if dtype is not None and array.dtype != dtype:
            array = array.astype(dtype)
        yield name, array
        if progress is not None:
            progress(array.nbytes)


def fsync(path: Path) -> None:
    """Flush a written file to disk before it is renamed into place (as write_tensors does)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- npz -------------------------------------------------------------------------------------

_LOCAL_HEADER = 30  # fixed part of a zip local file header; the name and extra field follow


def open_npz(path: Path) -> Source:
    """An ``.npz`` archive, member by member, never unpickling (``allow_pickle=False`` semantics)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        size = path.stat().st_size
        raise FileFormatError(f"{path}: not a valid .npz file (no zip directory found in {size} bytes: truncated or not an npz)") from None
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    file_size = path.stat().st_size
    entries: dict[str, tuple[Shape, np.dtype]] = {}
    where: dict[str, tuple[zipfile.ZipInfo, int, bool, int | None]] = {}
    try:
        with open(path, "rb") as raw:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                if not info.filename.endswith(".npy"):
                    raise FileFormatError(f"{path}: member {info.filename!r} is not a .npy array")
                name = info.filename[: -len(".npy")]
                shape, fortran, dtype, header_len = _npy_header(archive, info, path)
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
                        raise FileFormatError(f"{path}: member {info.filename!r} has a corrupt zip header")
                    n_name, n_extra = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
                    offset = info.header_offset + _LOCAL_HEADER + n_name + n_extra + header_len
                    if offset + expected - header_len > file_size:
                        raise FileFormatError(f"{path}: member {info.filename!r} runs past the end of the file (truncated)")
                if dtype.kind == "V" and dtype.itemsize == 2 and BFLOAT16 is not None:
                    dtype_out = BFLOAT16  # big_vision stores bfloat16 as 2-byte voids
                else:
                    dtype_out = dtype
                entries[name] = (shape, dtype_out)
                where[name] = (info, header_len, fortran, offset)
    except BaseException:
        archive.close()
        raise

    def read(name: str) -> np.ndarray:
        info, header_len, fortran, offset = where[name]
        shape, dtype = entries[name]
        order = "F" if fortran else "C"
        if offset is not None:
            mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(math.prod(shape) * dtype.itemsize,))
            return mapped.view(dtype).reshape(shape, order=order)
        try:
            with archive.open(info) as member:  # inflated and CRC-checked by zipfile
                data = member.read()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise FileFormatError(f"{path}: member {info.filename!r} is corrupt ({exc})") from None
        return np.frombuffer(memoryview(data)[header_len:], dtype=dtype).reshape(shape, order=order)

    return Source(path, entries, read, close=archive.close, container="npz")


def _npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> tuple[Shape, bool, np.dtype, int]:
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
    except (ValueError, zipfile.BadZipFile, OSError, EOFError, SyntaxError) as exc:
        raise FileFormatError(f"{path}: member {info.filename!r} is not a valid .npy array ({exc})") from None
    if dtype.hasobject:
        raise FileFormatError(
            f"{path}: member {info.filename!r} holds Python objects (a pickle); refused: vitspec never unpickles"
        )
    return tuple(int(s) for s in shape), bool(fortran), dtype, header_len


def write_npz(
    path: Path,
    items: Iterable[tuple[str, np.ndarray]],
    *,
    overwrite: bool,
    progress: Progress | None = None,
) -> None:
    """Stream ``items`` into an uncompressed ``.npz`` (what ``np.savez`` writes), one member at a time.

    bfloat16 arrays are stored as 2-byte voids, as big_vision does (its loader views them back).
    """
    with atomic_file(path, overwrite=overwrite) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in _cast(items, None, progress):
                if BFLOAT16 is not None and array.dtype == BFLOAT16:
                    array = array.view("V2")
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    # The .npy header, then the bytes straight from the array (write_array would
                    # copy a zip member's data through a buffer first).
                    np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(array))
                    member.write(memoryview(array.reshape(-1).view(np.uint8)))
        fsync(tmp)


# ---- torch pickles (.pt / .pth / .bin) -------------------------------------------------------

_STATE_DICT_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")


def open_torch_pickle(path: Path) -> Source:
    """A ``torch.save`` file of a state_dict, loaded with ``weights_only=True`` (never runs code)."""
    try:
        import torch
    except ImportError:
        raise FileFormatError(f"{path}: reading .pt/.pth/.bin files needs PyTorch: pip install 'vitspec[torch]'") from None
    obj = _torch_load(torch, path)
    state = _find_state_dict(obj, path, torch)
    if all(name.startswith("module.") for name in state):  # saved from DistributedDataParallel
        state = {name[len("module."):]: t for name, t in state.items()}
    entries: dict[str, tuple[Shape, np.dtype]] = {}
    for name, tensor in state.items():
        entries[name] = (tuple(tensor.shape), _torch_numpy_dtype(torch, tensor.dtype, name, path))

    def read(name: str) -> np.ndarray:
        tensor = state[name].detach()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(BFLOAT16)
        return tensor.numpy()

    return Source(path, entries, read, container="torch-pickle")


def _torch_load(torch: Any, path: Path) -> Any:
    def load(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zipfile" not in str(exc):
                raise
            return load(mmap=False)  # the legacy (pre-1.6, non-zip) format cannot be mapped
    except pickle.UnpicklingError as exc:
        detail = str(exc).strip().splitlines()
        reason = next((line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line), detail[0] if detail else "")
        raise FileFormatError(
            f"{path}: refused: the pickle holds more than tensors and would run code when loaded ({reason[:200]}); "
            "nothing was executed. Re-save it as a plain state_dict or as safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first[:200]}") from None


def _find_state_dict(obj: Any, path: Path, torch: Any) -> dict[str, Any]:
    def tensors_only(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())

    if tensors_only(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if tensors_only(obj.get(key)):
                return dict(obj[key])
    kind = type(obj).__name__ if not isinstance(obj, dict) else f"a dict with keys {', '.join(map(str, list(obj)[:8]))}"
    raise FileFormatError(
        f"{path}: expected a state_dict (a dict of tensors, or one under 'state_dict'/'model'), found {kind}"
    )


def _torch_numpy_dtype(torch: Any, dtype: Any, name: str, path: Path) -> np.dtype:
    table = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
    if dtype in table:
        return np.dtype(table[dtype])
    if dtype == torch.bfloat16 and BFLOAT16 is not None:
        return BFLOAT16
    if dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
        return np.dtype(str(dtype).replace("torch.", ""))
    raise FileFormatError(f"{path}: tensor {name} has dtype {dtype}, which vitspec cannot convert")


def write_torch_pickle(
    path: Path,
    items: Iterable[tuple[str, np.ndarray]],
    *,
    overwrite: bool,
    progress: Progress | None = None,
) -> None:
    """``torch.save`` of a state_dict. torch.save needs the whole dict, so this holds one copy of the model."""
    import torch

    state: dict[str, Any] = {}
    for name, array in _cast(items, None, progress):
        if not array.flags.writeable:  # a memory-mapped source: torch wants memory of its own
            array = array.copy()
        if BFLOAT16 is not None and array.dtype == BFLOAT16:
            state[name] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(array)
    with atomic_file(path, overwrite=overwrite) as tmp:
        torch.save(state, tmp)
        fsync(tmp)


# ---- HDF5 ------------------------------------------------------------------------------------


def open_h5(path: Path) -> Source:
    """Every dataset of an HDF5 file, by its full path (without the leading '/')."""
    try:
        import h5py
    except ImportError:
        raise FileFormatError(f"{path}: reading .h5 files needs h5py: pip install h5py") from None
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FileFormatError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {str(exc).splitlines()[0][:200]}") from None
    entries: dict[str, tuple[Shape, np.dtype]] = {}

    bf16: set[str] = set()

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            if obj.attrs.get("dtype") == "bfloat16" and obj.dtype.itemsize == 2 and BFLOAT16 is not None:
                bf16.add(name)  # Keras stores bfloat16 as 2-byte opaque values marked this way
                entries[name] = (tuple(obj.shape), BFLOAT16)
                return
            if obj.dtype.hasobject or obj.dtype.kind not in "fiub":
                raise FileFormatError(f"{path}: dataset {name} has dtype {obj.dtype}, expected numbers")
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
            return array.view(BFLOAT16) if name in bf16 else array
        except OSError as exc:
            raise FileFormatError(f"{path}: dataset {name} cannot be read (corrupt?): {str(exc).splitlines()[0][:200]}") from None

    return Source(path, entries, read, metadata=metadata, close=f.close, container="h5")


def _attr_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# ---- what a file is --------------------------------------------------------------------------

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


def sniff_container(path: Path) -> str:
    """'folder', 'safetensors', 'safetensors-index', 'npz', 'torch-pickle', 'h5' or 'msgpack', from the bytes."""
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise FileFormatError(f"{path}: no such file")
    name = path.name.lower()
    if name.endswith(".index.json"):
        return "safetensors-index"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if head.startswith(HDF5_MAGIC):
        return "h5"
    if head.startswith(ZIP_MAGIC):
        # torch.save files are zips too, with a data.pkl inside; npz members are .npy arrays.
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            names = []
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-pickle"
        return "npz" if name.endswith(".npz") else "torch-pickle"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith((".pt", ".pth", ".bin", ".ckpt")) or head[:1] == b"\x80":
        return "torch-pickle"
    if name.endswith(".msgpack"):
        return "msgpack"
    if name.endswith(".safetensors"):
        return "safetensors"
    raise FileFormatError(
        f"{path}: cannot tell what kind of file this is (expected safetensors, .npz, .pt/.pth/.bin, .weights.h5 or an HF folder)"
    )
