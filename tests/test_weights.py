"""Canonical weights: the parameter table, deterministic init, safetensors files written safely."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

import vitspec
from vitspec import Spec, SpecError, WeightsError
from vitspec.containers import open_safetensors, read_safetensors, write_safetensors
from vitspec.errors import FileFormatError
from vitspec.families import FAMILIES, family
from vitspec.files import OutputExistsError, atomic_dir, atomic_file

# ---- layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_table_is_consistent_with_the_spec(name: str) -> None:
    spec = family(name)
    table = vitspec.param_table(spec)
    names = [p.name for p in table]
    assert len(names) == len(set(names))
    assert sum(math.prod(p.shape) for p in table) == spec.n_params
    assert ("class_token" in names) == spec.class_token
    assert ("pos_embed" in names) == (spec.pos_embed == "learned")
    assert ("blocks.0.attn.query.bias" in names) == spec.qkv_bias
    assert ("head.kernel" in names) == bool(spec.n_classes)
    assert ("pre_logits.kernel" in names) == bool(spec.pre_logits_dim)
    shapes = vitspec.param_shapes(spec)
    d = spec.hidden_dim
    assert shapes["patch_embed.kernel"] == (*spec.patch_size, spec.in_channels, d)
    assert shapes[f"blocks.{spec.depth - 1}.mlp.fc1.kernel"] == (d, spec.mlp_dim)
    if spec.pos_embed == "learned":
        assert shapes["pos_embed"] == (spec.n_positions, d)


# ---- init -----------------------------------------------------------------------------------


def test_init_is_deterministic_and_per_tensor() -> None:
    spec = family("vit_paper")
    a, b = vitspec.init_weights(spec, seed=1), vitspec.init_weights(spec, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = vitspec.init_weights(spec, seed=2)
    assert not np.array_equal(a["blocks.0.attn.query.kernel"], c["blocks.0.attn.query.kernel"])
    deeper = vitspec.init_weights(spec.replace(depth=3), seed=1)
    assert np.array_equal(deeper["blocks.1.mlp.fc1.kernel"], a["blocks.1.mlp.fc1.kernel"])
    assert list(a) == [p.name for p in vitspec.param_table(spec)]
    assert all(v.dtype == np.float32 for v in a.values())


def test_init_distributions() -> None:
    spec = preset = vitspec.preset("S/16")
    del preset
    w = vitspec.init_weights(spec, seed=0)
    q = w["blocks.0.attn.query.kernel"]
    assert abs(q.std() - 0.02) < 0.001 and np.abs(q).max() <= 0.04 / 0.8796 + 1e-6
    patch = w["patch_embed.kernel"]
    assert abs(patch.std() - math.sqrt(1 / (16 * 16 * 3))) < 0.002
    assert np.all(w["blocks.3.norm1.scale"] == 1) and np.all(w["blocks.3.norm1.bias"] == 0)
    assert np.abs(w["class_token"]).max() < 1e-5
    assert abs(w["head.kernel"].std() - 0.02) < 0.001 and np.all(w["head.bias"] == 0)
    # Every kernel is drawn from the documented distributions: none is left at zero.
    assert all(
        np.any(w[p.name] != 0) for p in vitspec.param_table(spec) if p.name.endswith("kernel")
    )
    r = vitspec.init_weights(family("vit_paper"), seed=0, scheme="random")
    assert all(np.any(v != 0) and np.any(v != 1) for v in r.values())


def test_init_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="seed must be a non-negative integer, found -1"):
        vitspec.init_weights(family("vit_paper"), seed=-1)
    with pytest.raises(
        ValueError, match="init scheme must be 'default' or 'random', found 'xavier'"
    ):
        vitspec.init_weights(family("vit_paper"), scheme="xavier")  # type: ignore[arg-type]


# ---- files ----------------------------------------------------------------------------------


def test_save_load_round_trip_bit_exact(tmp_path: Path) -> None:
    spec = family("non_square")
    w = vitspec.init_weights(spec, seed=3, scheme="random")
    path = tmp_path / "w.safetensors"
    vitspec.save_weights(path, w, spec)
    loaded, loaded_spec = vitspec.load_weights(path)
    assert loaded_spec == spec
    assert list(loaded) == list(w)
    assert all(np.array_equal(loaded[k], w[k]) and loaded[k].dtype == w[k].dtype for k in w)


def test_files_are_readable_by_the_safetensors_library(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    spec = family("vit_paper")
    w = vitspec.init_weights(spec, seed=0, scheme="random")
    ours = tmp_path / "ours.safetensors"
    vitspec.save_weights(ours, w, spec)
    theirs = load_file(str(ours))
    assert all(np.array_equal(theirs[k], w[k]) for k in w)
    with safe_open(str(ours), framework="np") as f:
        assert json.loads(f.metadata()["vitspec.spec"]) == json.loads(spec.to_json())
    # ...and we read theirs, float64 and float16 included.
    mixed = {
        "a": np.arange(6, dtype=np.float64).reshape(2, 3),
        "b": np.ones(4, np.float16),
        "c": np.zeros((0, 2), np.float32),
    }
    save_file(mixed, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    back, meta = read_safetensors(tmp_path / "theirs.safetensors")
    assert meta == {"k": "v"}
    assert all(np.array_equal(back[k], mixed[k]) and back[k].dtype == mixed[k].dtype for k in mixed)


def test_streaming_write_takes_a_generator(tmp_path: Path) -> None:
    produced = []

    def gen():
        for i in range(3):
            produced.append(i)
            yield f"t{i}", np.full((2, 2), i, np.float32)

    layout = [(f"t{i}", np.float32, (2, 2)) for i in range(3)]
    write_safetensors(tmp_path / "s.safetensors", gen(), layout=layout)
    back, _ = read_safetensors(tmp_path / "s.safetensors")
    assert [float(back[f"t{i}"][0, 0]) for i in range(3)] == [0.0, 1.0, 2.0]
    with pytest.raises(
        ValueError, match="tensor 't0': float32\\[3\\] written, the layout says float32\\[2, 2\\]"
    ):
        write_safetensors(
            tmp_path / "bad.safetensors", [("t0", np.zeros(3, np.float32))], layout=layout[:1]
        )
    assert not (tmp_path / "bad.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_existing_output_is_never_overwritten_without_force(tmp_path: Path) -> None:
    spec = family("mnist")
    w = vitspec.init_weights(spec)
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        vitspec.save_weights(path, w, spec)
    assert path.read_bytes() == b"precious"
    vitspec.save_weights(path, w, spec, overwrite=True)
    assert vitspec.load_weights(path)[1] == spec


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"

    class Interrupt(BaseException):
        pass

    with pytest.raises(Interrupt), atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise Interrupt
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep").write_text("x")
    with pytest.raises(Interrupt), atomic_dir(tmp_path / "old", overwrite=True) as tmpdir:
        (tmpdir / "new").write_text("y")
        raise Interrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (tmp_path / "old" / "keep").read_text() == "x"


def test_unwritable_destination(tmp_path: Path) -> None:
    spec = family("mnist")
    with pytest.raises(vitspec.VitspecError, match="folder .* does not exist"):
        vitspec.save_weights(tmp_path / "nope" / "w.safetensors", vitspec.init_weights(spec), spec)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(vitspec.VitspecError, match="is not writable"):
            vitspec.save_weights(locked / "w.safetensors", vitspec.init_weights(spec), spec)


def test_every_mismatch_is_listed_at_once(tmp_path: Path) -> None:
    spec = family("vit_paper")
    w = dict(vitspec.init_weights(spec))
    del w["norm.bias"]
    del w["head.bias"]
    w["extra.kernel"] = np.zeros(2, np.float32)
    w["blocks.1.attn.key.kernel"] = np.zeros((32, 31), np.float32)
    w["blocks.0.mlp.fc2.bias"] = np.zeros(32, np.int32)
    with pytest.raises(WeightsError) as info:
        vitspec.check_weights(spec, w)
    assert info.value.problems == [
        "missing 2 tensor(s): norm.bias, head.bias",
        "unexpected 1 tensor(s): extra.kernel",
        "blocks.0.mlp.fc2.bias: expected a float dtype (float16, bfloat16, float32, float64), found int32",
        "blocks.1.attn.key.kernel: expected shape [32, 32], found [32, 31]",
    ]


def test_file_checked_against_its_spec_before_reading_data(tmp_path: Path) -> None:
    spec = family("vit_paper")
    w = vitspec.init_weights(spec)
    w.pop("head.kernel")
    write_safetensors(tmp_path / "w.safetensors", w, {"vitspec.spec": spec.to_json()})
    with pytest.raises(WeightsError, match=r"w.safetensors: missing 1 tensor\(s\): head.kernel"):
        vitspec.load_weights(tmp_path / "w.safetensors")


def test_nan_and_inf_are_reported_by_name(tmp_path: Path) -> None:
    spec = family("mnist")
    w = vitspec.init_weights(spec)
    w["blocks.1.mlp.fc1.kernel"][3, 5] = np.nan
    w["head.bias"][2] = np.inf
    vitspec.save_weights(tmp_path / "w.safetensors", w, spec)
    with pytest.raises(WeightsError) as info:
        vitspec.load_weights(tmp_path / "w.safetensors")
    assert "blocks.1.mlp.fc1.kernel: 1 NaN and 0 Inf values (first at index [3, 5])" in str(
        info.value
    )
    assert "head.bias: 0 NaN and 1 Inf values (first at index [2])" in str(info.value)


def test_spec_in_file_and_given_spec_must_agree(tmp_path: Path) -> None:
    spec = family("vit_paper")
    vitspec.save_weights(tmp_path / "w.safetensors", vitspec.init_weights(spec), spec)
    with pytest.raises(
        SpecError, match="contradicts the embedded one \\(norm_eps: file 1e-06, given 1e-05\\)"
    ):
        vitspec.load_weights(tmp_path / "w.safetensors", spec.replace(norm_eps=1e-5))
    write_safetensors(tmp_path / "bare.safetensors", vitspec.init_weights(spec))
    with pytest.raises(SpecError, match="has no embedded vitspec spec"):
        vitspec.load_weights(tmp_path / "bare.safetensors")
    assert vitspec.load_weights(tmp_path / "bare.safetensors", spec)[1] == spec


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is 0 bytes, too short for a header"),
        (b"PK\x03\x04 not safetensors at all", "does not fit in a file"),
        ((10).to_bytes(8, "little") + b"not json!!", "header is not JSON"),
        ((2).to_bytes(8, "little") + b"[]", "header is not a JSON object"),
    ],
)
def test_corrupt_files_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=message):
        open_safetensors(path)


def test_truncated_file_is_detected(tmp_path: Path) -> None:
    spec = family("mnist")
    path = tmp_path / "w.safetensors"
    vitspec.save_weights(path, vitspec.init_weights(spec), spec)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(FileFormatError, match="the file is truncated"):
        vitspec.load_weights(path)
    with pytest.raises(FileFormatError, match="no such file"):
        vitspec.load_weights(tmp_path / "missing.safetensors")


def test_spec_round_trips_through_metadata_for_every_family(tmp_path: Path) -> None:
    for name in FAMILIES:
        spec = family(name)
        vitspec.save_weights(tmp_path / f"{name}.safetensors", vitspec.init_weights(spec), spec)
        assert vitspec.load_weights(tmp_path / f"{name}.safetensors")[1] == spec


def test_spec_is_equal_after_json() -> None:
    spec = Spec.from_dict(
        {
            "image_size": [8, 12],
            "patch_size": [4, 2],
            "hidden_dim": 24,
            "n_heads": 2,
            "depth": 1,
            "mlp_ratio": 35 / 24,
            "norm_eps": 1e-12,
        }
    )
    assert spec.mlp_dim == 35
    assert Spec.from_dict(json.loads(spec.to_json())) == spec


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_and_folders_get_the_usual_modes(tmp_path: Path, umask: int) -> None:
    """As open() and mkdir() would: 0666 / 0777 less the umask; a replaced file keeps its mode."""
    spec = family("mnist")
    w = vitspec.init_weights(spec)
    old = os.umask(umask)
    try:
        vitspec.save_weights(tmp_path / "w.safetensors", w, spec)
        with atomic_file(tmp_path / "plain.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("y")
        (tmp_path / "kept.safetensors").write_bytes(b"old")
        os.chmod(tmp_path / "kept.safetensors", 0o640)
        vitspec.save_weights(tmp_path / "kept.safetensors", w, spec, overwrite=True)
    finally:
        os.umask(old)
    mode = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert mode == {
        "w.safetensors": 0o666 & ~umask,
        "plain.txt": 0o666 & ~umask,
        "folder": 0o777 & ~umask,
        "inside.txt": 0o666 & ~umask,
        "kept.safetensors": 0o640,
    }


# ---- killing the survivors of `make mutants PART=weights` -------------------------------------


def test_weights_functions_take_their_arguments_by_keyword(tmp_path: Path) -> None:
    spec = family("mnist", depth=1)
    w = vitspec.init_weights(spec)
    vitspec.check_weights(spec=spec, weights=w)
    vitspec.save_weights(path=tmp_path / "w.safetensors", weights=w, spec=spec)
    back, got = vitspec.load_weights(path=tmp_path / "w.safetensors", spec=spec.replace())
    assert got == spec and all(np.array_equal(back[k], w[k]) for k in w)


def test_check_weights_reports_every_tensor_after_a_missing_one_and_a_larger_shape() -> None:
    from vitspec.weights import check_weights

    spec = family("mnist", depth=1)
    w = vitspec.init_weights(spec)
    first = vitspec.param_table(spec)[0].name
    del w[first]
    w["norm.bias"] = np.zeros(spec.hidden_dim + 1, np.float32)  # larger: a tuple "<" would miss it
    with pytest.raises(WeightsError) as info:
        check_weights(spec, w)
    text = str(info.value)
    assert f"missing 1 tensor(s): {first}" in text
    assert f"norm.bias: expected shape [{spec.hidden_dim}], found [{spec.hidden_dim + 1}]" in text
    check_weights(spec, vitspec.init_weights(spec), check_values=True)  # finite values: no problem


def test_embedded_spec_that_is_larger_in_a_field_than_the_given_one_is_a_contradiction(
    tmp_path: Path,
) -> None:
    spec = family("mnist", depth=1, norm_eps=1e-5)
    vitspec.save_weights(tmp_path / "w.safetensors", vitspec.init_weights(spec), spec)
    with pytest.raises(
        SpecError, match="contradicts the embedded one \\(norm_eps: file 1e-05, given 1e-06\\)"
    ):
        vitspec.load_weights(tmp_path / "w.safetensors", spec.replace(norm_eps=1e-6))


def test_embedded_spec_that_is_not_json_is_a_spec_error(tmp_path: Path) -> None:
    from vitspec.weights import SPEC_KEY

    spec = family("mnist", depth=1)
    w = vitspec.init_weights(spec)
    write_safetensors(
        tmp_path / "w.safetensors", list(w.items()), {"format": "vitspec", SPEC_KEY: "{not json"}
    )
    with pytest.raises(SpecError, match="the embedded spec is not JSON"):
        vitspec.load_weights(tmp_path / "w.safetensors")
