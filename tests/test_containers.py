"""The container layer: each reader against the library that writes the format, lazy mapped reads,
one-line errors on damaged files, and the shim the format modules still import."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from vitspec import containers
from vitspec.containers import (
    open_container,
    open_npz,
    open_safetensors,
    read_safetensors,
    sniff_container,
    write_safetensors,
)
from vitspec.errors import FileFormatError

ml_dtypes = pytest.importorskip("ml_dtypes")

MIXED = {
    "b": np.arange(6, dtype=np.float64).reshape(2, 3),
    "a": np.linspace(-2, 2, 5, dtype=np.float32).astype(ml_dtypes.bfloat16),
    "z": np.zeros((0, 4), np.float16),
    "i": np.arange(3, dtype=np.int64),
}


def test_safetensors_round_trip_with_the_library(tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, MIXED, {"k": "v"})
    theirs = load_file(str(ours))
    assert {k: (v.dtype, v.tobytes()) for k, v in theirs.items()} == {
        k: (v.dtype, v.tobytes()) for k, v in MIXED.items()
    }
    save_file(
        {k: v for k, v in MIXED.items() if k != "a"},
        str(tmp_path / "theirs.safetensors"),
        metadata={"m": "1"},
    )
    back, meta = read_safetensors(tmp_path / "theirs.safetensors")
    assert meta == {"m": "1"}
    assert all(back[k].dtype == MIXED[k].dtype and np.array_equal(back[k], MIXED[k]) for k in back)


def test_safetensors_reads_are_lazy_unmapped_and_in_file_order(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    write_safetensors(path, MIXED)
    source = open_safetensors(path)
    assert source.names == ["b", "a", "z", "i"]  # as written, not sorted
    assert source.shapes == {"b": (2, 3), "a": (5,), "z": (0, 4), "i": (3,)}
    b = source["b"]
    # read with pread into an array of its own, never mapped (a truncated map is a SIGBUS)
    assert not isinstance(b, np.memmap) and not isinstance(b.base, np.memmap)
    assert np.array_equal(b, MIXED["b"])
    assert source["a"].dtype == ml_dtypes.bfloat16 and source["a"].tobytes() == MIXED["a"].tobytes()
    copies, _ = read_safetensors(path)
    assert all(v.flags.writeable and not isinstance(v, np.memmap) for v in copies.values())


def test_nan_and_inf_are_collected_by_name(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    bad = np.ones((3, 4), np.float32)
    bad[1, 2] = np.nan
    write_safetensors(
        path, {"ok": np.ones(2, np.float32), "bad": bad, "inf": np.array([0, np.inf], np.float16)}
    )
    source = open_container(path)
    for name in source:
        source[name]
    assert source.nonfinite == {
        "bad": "1 NaN and 0 Inf values (first at index [1, 2])",
        "inf": "0 NaN and 1 Inf values (first at index [1])",
    }


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda data: data[:-3],
            r"tensor 'i' ends at byte \d+ but the data section has \d+ bytes \(the file is truncated\)",
        ),
        (lambda data: data + b"junk", "4 bytes follow the last tensor's data"),
        (lambda data: data[:5], "the file is 5 bytes, too short for a header"),
    ],
)
def test_damaged_safetensors_are_one_line_errors(tmp_path, damage, message: str) -> None:
    good = tmp_path / "good.safetensors"
    write_safetensors(good, MIXED)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(FileFormatError, match=message) as info:
        open_safetensors(bad)
    assert str(info.value).startswith(f"{bad}: not a valid safetensors file: ") and "\n" not in str(
        info.value
    )


def test_npz_round_trip_reads_stored_members_and_refuses_pickles(tmp_path) -> None:
    path = tmp_path / "w.npz"
    containers.write_npz(
        path, [("x/kernel", np.arange(12, dtype=np.float32).reshape(3, 4).T), ("y", MIXED["a"])]
    )
    with np.load(path) as theirs:  # what np.savez would have written
        assert np.array_equal(theirs["x/kernel"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
    assert sniff_container(path) == "npz"
    source = open_container(path)
    kernel = source["x/kernel"]
    assert not isinstance(kernel, np.memmap) and source.shape("x/kernel") == (4, 3)
    assert np.array_equal(kernel, np.arange(12, dtype=np.float32).reshape(3, 4).T)
    assert source["y"].dtype == ml_dtypes.bfloat16  # stored as 2-byte voids, read back as bfloat16
    np.savez(tmp_path / "evil.npz", obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(FileFormatError, match="holds Python objects"):
        open_container(tmp_path / "evil.npz")


def test_torch_zip_round_trip_and_weights_only(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "w.pt"
    containers.write_torch_pickle(path, [("w", np.eye(3, dtype=np.float32)), ("h", MIXED["a"])])
    assert sniff_container(path) == "torch-pickle"
    source = open_container(path)
    assert np.array_equal(source["w"], np.eye(3)) and source["h"].tobytes() == MIXED["a"].tobytes()
    torch.save({"module.w": torch.ones(2)}, tmp_path / "ddp.pt")
    assert open_container(tmp_path / "ddp.pt").names == ["w"]


def test_h5_datasets_by_path(tmp_path) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "w.weights.h5"
    with h5py.File(path, "w") as f:
        f.attrs["note"] = "hi"
        f.create_dataset("layer/vars/0", data=np.ones((2, 2), np.float32))
    assert sniff_container(path) == "h5"
    with open_container(path) as source:
        assert source.names == ["layer/vars/0"] and source.metadata == {"note": "hi"}
        assert np.array_equal(source["layer/vars/0"], np.ones((2, 2)))


def _npz_with_header(path, header: bytes) -> None:
    """An .npz whose one member has the .npy header ``header`` (found by tests/fuzz)."""
    magic = b"\x93NUMPY\x01\x00"
    pad = -(len(magic) + 2 + len(header) + 1) % 64
    npy = magic + (len(header) + pad + 1).to_bytes(2, "little") + header + b" " * pad + b"\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w.npy", npy + bytes(8))


@pytest.mark.parametrize(
    "header",
    [
        b"z'descr': '<f4', 'fortran_order': False, 'shape': ()}",  # tokenize.TokenError
        b"{'descr': '<f4', 'fortran_order': False, 'shape': 7}",
    ],
)
def test_a_garbled_npy_header_is_one_line(tmp_path, header: bytes) -> None:
    path = tmp_path / "w.npz"
    _npz_with_header(path, header)
    with pytest.raises(FileFormatError, match=r"member 'w.npy' is not a valid .npy array") as info:
        open_npz(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
