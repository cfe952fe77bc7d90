"""What the fuzzing campaign (tests/fuzz/test_fuzz.py) found, one regression test each: every input
here once ended in another exception than a one-line VitspecError (a traceback in the CLI)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import vitspec
from vitspec.containers import open_container
from vitspec.errors import VitspecError
from vitspec.families import family


def _one_line(exc: pytest.ExceptionInfo[VitspecError], path: Path) -> None:
    text = str(exc.value)
    assert "\n" not in text and str(path) in text, text


def test_h5_with_a_byte_inserted_mid_file(tmp_path: Path) -> None:
    """h5py raised RuntimeError: Object visitation failed (bad symbol table node signature)."""
    import h5py

    path = tmp_path / "k.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_group("layers/dense/vars").create_dataset("0", data=np.ones((2, 3), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + b"\x00" + data[len(data) // 2 :])
    with (
        pytest.raises(vitspec.FileFormatError, match="not a readable HDF5 file") as info,
        open_container(path) as source,
    ):
        for name in source:
            source[name]
    _one_line(info, path)


def test_h5_dataset_declaring_more_than_the_file_holds(tmp_path: Path) -> None:
    """A dataset with no storage written reads back as fill values of any declared size."""
    import h5py

    path = tmp_path / "k.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("big", shape=(1 << 20, 1 << 10), dtype=np.float32)  # 4 GiB, never written
    with pytest.raises(vitspec.FileFormatError, match=r"declares shape \[1048576, 1024\]") as info:
        open_container(path)
    _one_line(info, path)


def test_torch_file_with_its_first_byte_flipped(tmp_path: Path) -> None:
    """torch's weights-only unpickler raised IndexError: pop from empty list."""
    import torch

    path = tmp_path / "w.pth"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "h": torch.ones(2)}, path)
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(vitspec.FileFormatError, match="not a readable PyTorch checkpoint") as info:
        open_container(path)
    _one_line(info, path)


def test_torch_file_read_by_the_legacy_path_allocates_only_what_it_holds(tmp_path: Path) -> None:
    """A byte inserted at the front sends torch.load down its legacy (non-zip) path, which read a
    length the damaged pickle declared: 55 MB allocated for a 1.6 KB file (a real file's read(n)
    allocates n bytes up front)."""
    import tracemalloc

    import torch
    from harness import mutate

    path = tmp_path / "w.pth"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "h": torch.ones(2)}, path)
    ops = [("insert", 0.0, b"\x00"), ("delete", 0.5, 2), ("dup", 0.09257455844541586, 1, 0.0)]
    data = mutate(path.read_bytes(), ops)
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(
            vitspec.FileFormatError, match="not a readable PyTorch checkpoint"
        ) as info:
            open_container(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _one_line(info, path)
    assert peak <= 2 * len(data) + (1 << 20), peak


DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_config_json(tmp_path: Path) -> None:
    """json.loads raised RecursionError."""
    from vitspec.formats.hf import read_config

    path = tmp_path / "config.json"
    path.write_text(DEEP)
    with pytest.raises(vitspec.FileFormatError, match="nested past the recursion limit") as info:
        read_config(path)
    _one_line(info, path)


@pytest.mark.parametrize("name", ["s.json", "s.yaml"])
def test_deeply_nested_spec_files(tmp_path: Path, name: str) -> None:
    """json.loads and PyYAML's composer raised RecursionError; PyYAML took 9 s on 5000 levels
    (its scanner is quadratic in the nesting), over the campaign's deadline."""
    path = tmp_path / name
    path.write_text(DEEP if name.endswith(".json") else "a: " + "[" * 5000 + "]" * 5000)
    start = time.perf_counter()
    with pytest.raises(vitspec.SpecError, match="nested too deeply to be a spec") as info:
        vitspec.load_spec(path)
    assert time.perf_counter() - start < 3
    _one_line(info, path)


@pytest.mark.parametrize(
    ("key", "value"),
    [("image_size", []), ("image_size", None), ("hidden_dropout_prob", None), ("qkv_bias", "x")],
)
def test_config_json_values_of_the_wrong_kind(tmp_path: Path, key: str, value: object) -> None:
    """hf.infer raised IndexError/TypeError on a config value of the wrong JSON type."""
    from vitspec.formats.hf import config_for, read_config

    config = config_for(family("vit_paper"))
    config[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(vitspec.FileFormatError, match=f"{key} must be") as info:
        read_config(path)
    _one_line(info, path)


def test_deeply_nested_case_manifest(tmp_path: Path) -> None:
    """json.loads raised RecursionError."""
    from vitspec.conformance.case import load_case, shipped_case_dirs

    folder = tmp_path / "case"
    shutil.copytree(shipped_case_dirs()[0], folder)
    (folder / "manifest.json").write_text(DEEP)
    with pytest.raises(VitspecError, match="nested past the recursion limit") as info:
        load_case(folder)
    _one_line(info, folder)


@pytest.mark.parametrize(
    "shape", [b"(0, 9223372036854775807)", b"(0, 1099511627776, 1099511627776)"]
)
def test_npz_member_with_an_empty_but_huge_shape(tmp_path: Path, shape: bytes) -> None:
    """NumPy raised ValueError: array is too big (no bytes, yet no array can have the shape)."""
    import zipfile

    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + b"}"
    magic = b"\x93NUMPY\x01\x00"
    pad = -(len(magic) + 2 + len(header) + 1) % 64
    npy = magic + (len(header) + pad + 1).to_bytes(2, "little") + header + b" " * pad + b"\n"
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w.npy", npy)
    with (
        pytest.raises(vitspec.FileFormatError, match="which no array can have") as info,
        open_container(path) as source,
    ):
        source["w"]
    _one_line(info, path)


def _compressed_npz(path: Path) -> bytes:
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "f": np.ones((3, 2))}
    np.savez_compressed(path, **arrays)
    return path.read_bytes()


def _central(data: bytes, member: int) -> int:
    """Where the ``member``-th central directory entry of a zip starts."""
    at = -1
    for _ in range(member + 1):
        at = data.index(b"PK\x01\x02", at + 1)
    return at


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        # zipfile allocated the declared compressed size (16 MiB for a 400-byte file) before reading
        (lambda d, c: d[: c + 20] + (1 << 24).to_bytes(4, "little") + d[c + 24 :], "past the end"),
        # zipfile raised NotImplementedError: That compression method is not supported
        (
            lambda d, c: d[: c + 10] + (99).to_bytes(2, "little") + d[c + 12 :],
            "compression method is not supported",
        ),
        # zlib.error: invalid block type (the deflate stream of the first member)
        (lambda d, c: d[:52] + b"\xff" * 4 + d[56:], "not a valid .npy array"),
    ],
)
def test_damaged_compressed_npz(tmp_path: Path, damage, message: str) -> None:
    path = tmp_path / "w.npz"
    data = _compressed_npz(path)
    path.write_bytes(damage(data, _central(data, 1)))
    with (
        pytest.raises(vitspec.FileFormatError, match=message) as info,
        open_container(path) as source,
    ):
        for name in source:
            source[name]
    _one_line(info, path)


def test_zip_names_that_are_not_utf8(tmp_path: Path) -> None:
    """zipfile raised UnicodeDecodeError (a name flagged UTF-8 that is not) from sniffing."""
    path = tmp_path / "w.npz"
    data = bytearray(_compressed_npz(path))
    c = _central(bytes(data), 0)
    data[c + 8 : c + 10] = (0x800).to_bytes(2, "little")  # the UTF-8 name flag
    data[c + 46] = 0xFF  # the name's first byte
    path.write_bytes(bytes(data))
    with pytest.raises(vitspec.FileFormatError) as info:
        open_container(path)
    _one_line(info, path)


def test_a_safetensors_file_behind_a_zip_signature(tmp_path: Path) -> None:
    """Read as a torch file, torch.load raised safetensors' own SafetensorError."""
    from vitspec.containers import write_safetensors

    good = tmp_path / "g.safetensors"
    write_safetensors(good, {"w": np.ones(3, np.float32)})
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"PK\x03\x04" + good.read_bytes())
    with pytest.raises(vitspec.FileFormatError) as info:
        open_container(path)
    _one_line(info, path)


def test_a_spec_string_pydantic_cannot_encode(tmp_path: Path) -> None:
    """A key with a lone surrogate (JSON "\\ud800") made pydantic report an error without a
    location, and the spec's error formatting raised IndexError."""
    config = family("vit_paper").to_dict()
    config["\ud800"] = 1
    path = tmp_path / "s.json"
    path.write_text(json.dumps(config))
    with pytest.raises(vitspec.SpecError) as info:
        vitspec.load_spec(path)
    assert str(path) in str(info.value)


def test_npz_member_with_an_empty_name(tmp_path: Path) -> None:
    """zipfile's ZipInfo.is_dir() raised IndexError on a member whose name is empty (the
    campaign's input: the central directory's name length overwritten)."""
    from harness import mutate
    from test_fuzz import npz_seed

    path = tmp_path / "w.npz"
    path.write_bytes(mutate(npz_seed(False), [("int64", 0.9453125, 4_611_686_018_427_387_904)]))
    with pytest.raises(vitspec.FileFormatError) as info:
        open_container(path)
    _one_line(info, path)
