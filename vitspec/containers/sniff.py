"""What kind of container a file is, from its bytes (its name only breaks ties), and opening it."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from vitspec.containers.h5 import open_h5
from vitspec.containers.npz import open_npz
from vitspec.containers.safetensors import open_safetensors, open_sharded_safetensors
from vitspec.containers.source import Source
from vitspec.containers.torchzip import open_torch_pickle
from vitspec.errors import FileFormatError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


def sniff_container(path: str | os.PathLike[str]) -> str:
    """'folder', 'safetensors', 'safetensors-index', 'npz', 'torch-pickle', 'h5' or 'msgpack', from the bytes."""
    path = Path(path)
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
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
            names = []  # a damaged zip: its reader says what is wrong with it
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-pickle"
        return "npz" if name.endswith(".npz") else "torch-pickle"
    if (
        len(head) >= 9
        and head[8:9] == b"{"
        and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size
    ):
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


def open_container(path: str | os.PathLike[str], container: str | None = None) -> Source:
    """A file opened with the reader of its container (``container`` as :func:`sniff_container` says)."""
    path = Path(path)
    container = container or sniff_container(path)
    readers = {
        "safetensors": open_safetensors,
        "safetensors-index": open_sharded_safetensors,
        "npz": open_npz,
        "torch-pickle": open_torch_pickle,
        "h5": open_h5,
    }
    if container not in readers:
        raise FileFormatError(f"{path}: vitspec has no reader for a {container} container")
    return readers[container](path)
