"""`vitspec convert` and `vitspec inspect` on good and bad input: safety, errors, atomic output.

Every bad input ends with `error: ...` lines on stderr (one per problem, all listed at once), a
non-zero exit and no output file; never a traceback, never a pickle that runs.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

import vitspec
from vitspec import formats
from vitspec.cli.main import main
from vitspec.containers import read_safetensors, write_safetensors
from vitspec.families import family
from vitspec.formats.format import Format

SPEC = family("vit_paper")


def vitspec_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _error_lines(err: str) -> list[str]:
    """The `error: ` lines of stderr (informational lines such as the defaults used may precede them)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines and "Traceback" not in err, err
    return lines


@pytest.fixture
def canonical(tmp_path: Path) -> Path:
    path = tmp_path / "c.safetensors"
    vitspec.save_weights(path, vitspec.init_weights(SPEC, seed=0, scheme="random"), SPEC)
    return path


@pytest.fixture
def timm_file(tmp_path: Path, canonical: Path) -> Path:
    """A timm state_dict as timm users save it: no metadata."""
    out = tmp_path / "tagged.safetensors"
    formats.convert(canonical, out, to_format="timm")
    bare = tmp_path / "timm.safetensors"
    write_safetensors(bare, read_safetensors(out)[0])
    return bare


def _folder_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---- the happy path --------------------------------------------------------------------------


def test_convert_prints_the_defaults_it_used_and_writes(
    capsys, tmp_path: Path, timm_file: Path
) -> None:
    out = tmp_path / "jax.safetensors"
    code, stdout, stderr = vitspec_cli(
        capsys, "convert", str(timm_file), str(out), "--to", "flax", "--spec", "n_heads=4"
    )
    assert code == 0, stderr
    assert "reading" in stderr and "as timm" in stderr
    assert "norm_eps = 1e-06 (timm's VisionTransformer LayerNorm eps)" in stderr
    assert (
        "gelu = exact" in stderr
        and "n_heads" not in stderr.split("assumed, not read from the file")[1]
    )
    assert f"wrote {out} (flax)" in stdout
    assert formats.detect(out) == "flax"


@pytest.mark.needs("torch", "tensorflow", "jax")
def test_timm_to_jax_to_torch_to_hf_to_tensorflow_chain(
    capsys, tmp_path: Path, timm_file: Path
) -> None:
    steps = [
        ("jax.safetensors", "flax"),
        ("torch.safetensors", "torch"),
        ("hf", "hf"),
        ("model.weights.h5", "keras"),
        ("end.safetensors", "canonical"),
    ]
    src = timm_file
    for name, fmt in steps:
        dst = tmp_path / name
        code, _, stderr = vitspec_cli(
            capsys, "convert", str(src), str(dst), "--to", fmt, "--spec", "n_heads=4"
        )
        assert code == 0, stderr
        src = dst
    got, spec = vitspec.load_weights(src)
    want, _ = formats.load(timm_file, spec="n_heads=4")
    assert spec == SPEC
    for name in want:
        assert np.array_equal(got[name], want[name]), name


def test_inspect_any_format_shows_spec_and_native_tensors(
    capsys, tmp_path: Path, canonical: Path
) -> None:
    npz = tmp_path / "g.npz"
    formats.convert(canonical, npz, to_format="google")
    code, out, err = vitspec_cli(capsys, "inspect", str(npz))
    assert code == 0, err
    assert "format: google (detected), npz file" in out
    assert "spec (inferred from the tensors)" in out
    assert "n_heads: 4" in out and "gelu: tanh  # assumed, not in the file" in out
    assert (
        "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in out
        and "(32, 4, 8)" in out
    )
    assert "gelu = tanh (Flax's nn.gelu" in err


def _bare_timm(tmp_path: Path, spec: vitspec.Spec) -> Path:
    from safetensors.numpy import save_file

    weights = vitspec.init_weights(spec, seed=0, scheme="random")
    path = tmp_path / "bare.safetensors"
    save_file(
        {
            k: np.ascontiguousarray(v)
            for k, v in formats.get_format("timm").to_native(spec, weights)
        },
        path,
    )
    return path


def test_convert_and_inspect_mark_every_assumed_field(capsys, tmp_path: Path) -> None:
    path = _bare_timm(tmp_path, family("timm_avg_fc_norm"))
    code, out, err = vitspec_cli(capsys, "inspect", str(path), "--spec", "n_heads=4")
    assert code == 0, err
    marked = {
        line.split(":")[0]
        for line in out.splitlines()
        if line.endswith("# assumed, not in the file")
    }
    assert marked == {
        "image_size",
        "pos_embed_class_slot",
        "pooling",
        "norm_eps",
        "gelu",
        "dropout",
        "attn_dropout",
        "drop_path",
    }
    code, _, err = vitspec_cli(
        capsys, "convert", str(path), str(tmp_path / "o.safetensors"), "--spec", "n_heads=4"
    )
    assert code == 0, err
    notes = err.split("assumed, not read from the file (timm; set them with --spec FIELD=VALUE):")[
        1
    ]
    assert (
        "image_size = 32, pos_embed_class_slot = true (17 position rows read as 16 patches plus a class-token row in a square 4x4 grid"
        in notes
    )
    assert (
        "pooling = avg (a timm state_dict does not record global_pool; fc_norm comes with timm's global_pool='avg'"
        in notes
    )
    assert "pool_include_prefix=True leave the same tensors and have no vitspec equivalent" in notes
    assert "dropout, attn_dropout, drop_path = 0.0 (a training-time rate" in notes


def test_two_readings_of_the_position_table_are_an_error_until_spec_chooses(
    capsys, tmp_path: Path
) -> None:
    # a 4x6 grid with a class row: 25 rows, also a 5x5 grid without one
    path = _bare_timm(tmp_path, family("timm_token", image_size=[32, 48], patch_size=8))
    out = tmp_path / "o.safetensors"
    code, _, err = vitspec_cli(capsys, "convert", str(path), str(out), "--spec", "n_heads=4")
    assert code == 1 and not out.exists()
    assert _error_lines(err) == [
        f"error: {path}: the position embedding has 25 rows, which can be read two ways (vitspec does not guess): "
        "(a) 24 patches plus a class-token row in a non-square grid such as 4x6 or 6x4: --spec image_size=[32,48] or [48,32]; "
        "(b) 25 patches without a class-token row in a square 5x5 grid (image_size 40): --spec pos_embed_class_slot=false"
    ]
    code, _, err = vitspec_cli(
        capsys, "convert", str(path), str(out), "--spec", "n_heads=4,pos_embed_class_slot=true"
    )
    assert code == 1 and "contradicts" not in err
    assert (
        "pass image_size with --spec (for example --spec image_size=[32,48] for a 4x6 grid)"
        in _error_lines(err)[0]
    )
    code, _, err = vitspec_cli(
        capsys,
        "convert",
        str(path),
        str(out),
        "--spec",
        "n_heads=4,pos_embed_class_slot=true,image_size=[32,48]",
    )
    assert code == 0, err
    assert vitspec.load_weights(out)[1].image_size == (32, 48)
    code, out_text, err = vitspec_cli(capsys, "inspect", str(path), "--spec", "n_heads=4")
    assert code == 1 and "blocks.0.attn.qkv.weight" in out_text  # the table, then the error
    assert "can be read two ways" in _error_lines(err)[0]


def test_inspect_lists_problems_after_the_table(capsys, tmp_path: Path, timm_file: Path) -> None:
    tensors = read_safetensors(timm_file)[0]
    del tensors["blocks.1.norm2.bias"]
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, tensors)
    code, out, err = vitspec_cli(capsys, "inspect", str(bad), "--spec", "n_heads=4")
    assert code == 1
    assert "blocks.0.attn.qkv.weight" in out
    assert _error_lines(err) == [
        f"error: {bad} (timm format, spec inferred as above): missing 1 tensor(s): blocks.1.norm2.bias"
    ]


def test_image_size_resamples(capsys, tmp_path: Path, canonical: Path) -> None:
    out = tmp_path / "hf384"
    code, _, err = vitspec_cli(capsys, "convert", str(canonical), str(out), "--image-size", "48x64")
    assert code == 0, err
    assert (
        "resampled: pos_embed grid (4, 4) -> (6, 8) (bicubic-antialias: bicubic with antialiasing"
        in err
    )
    assert json.loads((out / "config.json").read_text())["image_size"] == [48, 64]
    plain = tmp_path / "plain.safetensors"
    code, _, err = vitspec_cli(
        capsys,
        "convert",
        str(canonical),
        str(plain),
        "--image-size",
        "48x64",
        "--resample",
        "bicubic",
    )
    assert code == 0, err
    assert (
        "(bicubic: bicubic (Keys a=-0.75), align_corners=False, border-clamped, no antialiasing"
        in err
    )
    default, other = formats.load(out)[0]["pos_embed"], vitspec.load_weights(plain)[0]["pos_embed"]
    assert np.array_equal(default[0], other[0]) and not np.allclose(
        default[1:], other[1:], atol=1e-3
    )
    code, _, err = vitspec_cli(
        capsys, "convert", str(canonical), str(tmp_path / "x.safetensors"), "--resample", "bicubic"
    )
    assert (
        code == 2 and "--resample chooses how --image-size resamples; it needs --image-size" in err
    )
    assert not (tmp_path / "x.safetensors").exists()


def test_the_cli_offers_every_resampling_algorithm() -> None:
    from vitspec.cli.convert import convert
    from vitspec.formats.resample import ALGORITHMS, DEFAULT

    option = next(p for p in convert.params if p.name == "resample")
    assert list(option.type.choices) == list(ALGORITHMS) and DEFAULT == "bicubic-antialias"


def test_progress_bar_shows_on_big_files(
    capsys, tmp_path: Path, canonical: Path, monkeypatch
) -> None:
    monkeypatch.setattr(formats, "PROGRESS_BYTES", 1)
    code, _, err = vitspec_cli(
        capsys, "convert", str(canonical), str(tmp_path / "t.safetensors"), "--to", "timm"
    )
    assert code == 0, err


# ---- safety ----------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint does: call a function while unpickling
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(
    capsys, tmp_path: Path, how: str
) -> None:
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    payload = {"cls_token": torch.zeros(1, 1, 32), "evil": _RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    out = tmp_path / "out.safetensors"
    code, _, err = vitspec_cli(capsys, "convert", str(evil), str(out), "--from", "timm")
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and "refused" in lines[0] and "nothing was executed" in lines[0]
    assert not marker.exists() and not out.exists()


def test_npz_with_python_objects_is_refused(capsys, tmp_path: Path) -> None:
    evil = tmp_path / "evil.npz"
    np.savez(evil, **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
    code, _, err = vitspec_cli(capsys, "inspect", str(evil), "--from", "google")
    assert code == 1
    assert _error_lines(err) == [
        f"error: {evil}: member 'embedding/kernel.npy' holds Python objects (a pickle); refused: vitspec never unpickles"
    ]


# ---- bad input: one clear line each ----------------------------------------------------------


def test_truncated_files(capsys, tmp_path: Path, canonical: Path) -> None:
    data = canonical.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = vitspec_cli(capsys, "convert", str(cut), str(tmp_path / "o.safetensors"))
    assert code == 1 and "the file is truncated" in _error_lines(err)[0]

    npz = tmp_path / "g.npz"
    formats.convert(canonical, npz, to_format="google")
    cut_npz = tmp_path / "cut.npz"
    cut_npz.write_bytes(npz.read_bytes()[:-200])
    code, _, err = vitspec_cli(
        capsys, "convert", str(cut_npz), str(tmp_path / "o2.safetensors"), "--from", "google"
    )
    assert code == 1 and "not a valid .npz file" in _error_lines(err)[0]

    import torch

    pth = tmp_path / "w.pth"
    torch.save({k: torch.from_numpy(v) for k, v in read_safetensors(canonical)[0].items()}, pth)
    cut_pth = tmp_path / "cut.pth"
    cut_pth.write_bytes(pth.read_bytes()[:1000])
    code, _, err = vitspec_cli(
        capsys, "convert", str(cut_pth), str(tmp_path / "o3.safetensors"), "--from", "timm"
    )
    assert code == 1 and "not a readable PyTorch checkpoint" in _error_lines(err)[0]
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_corrupt_compressed_npz_member(capsys, tmp_path: Path, canonical: Path) -> None:
    arrays = {k.replace(".", "/"): v for k, v in read_safetensors(canonical)[0].items()}
    npz = tmp_path / "z.npz"
    np.savez_compressed(npz, **arrays)
    raw = bytearray(npz.read_bytes())
    with zipfile.ZipFile(npz) as z:
        info = max(z.infolist(), key=lambda i: i.compress_size)
    mid = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    raw[mid : mid + 16] = bytes(16)
    npz.write_bytes(bytes(raw))
    with pytest.raises(vitspec.FileFormatError, match="is corrupt"):
        src = formats.get_format("google").read(npz)
        src[info.filename[:-4]]


def test_wrong_shapes_missing_and_unexpected_all_at_once(
    capsys, tmp_path: Path, timm_file: Path
) -> None:
    tensors = read_safetensors(timm_file)[0]
    del tensors["blocks.1.norm2.bias"], tensors["head.bias"]
    tensors["blocks.0.attn.proj.weight"] = np.zeros((32, 31), np.float32)
    tensors["extra.thing"] = np.zeros(3, np.float32)
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, tensors)
    out = tmp_path / "out.safetensors"
    code, _, err = vitspec_cli(capsys, "convert", str(bad), str(out), "--spec", "n_heads=4")
    assert code == 1 and not out.exists()
    lines = _error_lines(err)
    assert any("missing 2 tensor(s): blocks.1.norm2.bias, head.bias" in line for line in lines)
    assert any("unexpected 1 tensor(s): extra.thing" in line for line in lines)
    assert any(
        "blocks.0.attn.proj.weight: expected shape [32, 32], found [32, 31]" in line
        for line in lines
    )
    assert len(lines) == 3


def test_nan_and_inf_are_reported_by_name_and_nothing_is_written(
    capsys, tmp_path: Path, timm_file: Path
) -> None:
    tensors = read_safetensors(timm_file)[0]
    tensors["blocks.0.mlp.fc1.weight"][3, 5] = np.nan
    tensors["pos_embed"][0, 2, 1] = np.inf
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, tensors)
    out = tmp_path / "out"
    code, _, err = vitspec_cli(capsys, "convert", str(bad), str(out), "--spec", "n_heads=4")
    assert code == 1
    lines = _error_lines(err)
    assert (
        f"error: {bad}: blocks.0.mlp.fc1.weight: 1 NaN and 0 Inf values (first at index [3, 5])"
        in lines
    )
    assert f"error: {bad}: pos_embed: 0 NaN and 1 Inf values (first at index [0, 2, 1])" in lines
    assert _folder_files(tmp_path) == {
        "bad.safetensors",
        "timm.safetensors",
        "tagged.safetensors",
        "c.safetensors",
    }


def test_spec_that_contradicts_the_file(capsys, tmp_path: Path, canonical: Path) -> None:
    code, _, err = vitspec_cli(
        capsys,
        "convert",
        str(canonical),
        str(tmp_path / "o.safetensors"),
        "--spec",
        "depth=3,gelu=tanh",
    )
    assert code == 1
    lines = _error_lines(err)
    assert (
        f"error: {canonical}: the given spec contradicts the file: depth: the file says 2, --spec says 3"
        in lines
    )
    assert (
        f"error: {canonical}: the given spec contradicts the file: gelu: the file says exact, --spec says tanh"
        in lines
    )


def test_a_spec_the_target_cannot_express(capsys, tmp_path: Path) -> None:
    spec = family("big_vision_sincos")
    path = tmp_path / "s.safetensors"
    vitspec.save_weights(path, vitspec.init_weights(spec), spec)
    code, _, err = vitspec_cli(capsys, "convert", str(path), str(tmp_path / "hf"))
    assert code == 1
    assert (
        "error: cannot write the hf format: HF ViT always has a class token" in _error_lines(err)[0]
    )
    assert not (tmp_path / "hf").exists()


def test_existing_output_needs_force_and_unwritable_destinations(
    capsys, tmp_path: Path, canonical: Path
) -> None:
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = vitspec_cli(capsys, "convert", str(canonical), str(out), "--to", "timm")
    assert code == 1 and _error_lines(err) == [
        f"error: {out} already exists; pass --force (overwrite=True) to replace it"
    ]
    assert out.read_bytes() == b"keep me"
    code, _, err = vitspec_cli(
        capsys, "convert", str(canonical), str(out), "--to", "timm", "--force"
    )
    assert code == 0 and formats.detect(out) == "timm"

    nowhere = tmp_path / "no" / "such" / "dir" / "o.safetensors"
    code, _, err = vitspec_cli(capsys, "convert", str(canonical), str(nowhere))
    assert code == 1 and _error_lines(err) == [
        f"error: cannot write {nowhere}: folder {nowhere.parent} does not exist"
    ]
    under_a_file = canonical / "o.safetensors"
    code, _, err = vitspec_cli(capsys, "convert", str(canonical), str(under_a_file))
    assert code == 1 and "does not exist" in _error_lines(err)[0]


def _sharded_hf_output(folder: Path, canonical: Path) -> dict[str, str]:
    """An earlier sharded save_pretrained output in ``folder``: an index naming two shards."""
    tensors = read_safetensors(canonical)[0]
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for shard, part in shards.items():
        write_safetensors(folder / shard, {n: tensors[n] for n in part})
    weight_map = {n: shard for shard, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return weight_map


def test_force_into_an_existing_folder_touches_only_the_files_the_format_writes(
    capsys, tmp_path: Path, canonical: Path
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    (victim / "model-00001-of-00009.safetensors").write_bytes(
        b"a shard no index of this folder names"
    )
    (victim / "config.json").write_text("{}")
    _sharded_hf_output(victim, canonical)
    code, _, err = vitspec_cli(capsys, "convert", str(canonical), str(victim), "--to", "hf")
    assert code == 1 and _error_lines(err) == [
        f"error: {victim} already exists; pass --force (overwrite=True) to replace config.json, model.safetensors, "
        "model.safetensors.index.json, model-00001-of-00002.safetensors and model-00002-of-00002.safetensors in it "
        "(nothing else there is touched)"
    ]
    assert (victim / "config.json").read_text() == "{}"
    code, _, err = vitspec_cli(
        capsys, "convert", str(canonical), str(victim), "--to", "hf", "--force"
    )
    assert code == 0, err
    # the user's files stay; the earlier output's index and the shards it names go; nothing half-written is left
    assert _folder_files(victim) == {
        "notes.txt",
        "model-00001-of-00009.safetensors",
        "config.json",
        "model.safetensors",
    }
    assert (victim / "notes.txt").read_text() == "mine"
    assert (
        victim / "model-00001-of-00009.safetensors"
    ).read_bytes() == b"a shard no index of this folder names"
    assert json.loads((victim / "config.json").read_text())["hidden_size"] == SPEC.hidden_dim
    weights, spec = formats.load(victim)
    assert spec == SPEC
    for name, value in vitspec.load_weights(canonical)[0].items():
        assert np.array_equal(weights[name], value), name


def test_force_into_the_current_folder(
    capsys, tmp_path: Path, canonical: Path, monkeypatch
) -> None:
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    code, stdout, err = vitspec_cli(capsys, "convert", str(canonical), ".", "--force")
    assert code == 0, err
    assert "wrote . (hf)" in stdout
    assert _folder_files(here) == {"notes.txt", "config.json", "model.safetensors"}
    assert formats.load(".")[1] == SPEC
    # a one-file format cannot be written as a folder: said in one line, nothing written
    code, _, err = vitspec_cli(capsys, "convert", str(canonical), ".", "--to", "timm", "--force")
    assert code == 1 and _error_lines(err) == [
        "error: .: is a folder, and the timm format writes a single file; name the file to write (for example model.safetensors)"
    ]
    # the folder's own weights are the input: writing would replace them
    code, _, err = vitspec_cli(
        capsys, "convert", "model.safetensors", ".", "--force", "--image-size", "48"
    )
    assert code == 1 and _error_lines(err) == [
        "error: .: refusing to convert a checkpoint onto itself (writing it would replace model.safetensors)"
    ]
    assert _folder_files(here) == {"notes.txt", "config.json", "model.safetensors"}


def test_an_interrupted_write_into_an_existing_folder_leaves_it_as_it_was(
    tmp_path: Path, canonical: Path, monkeypatch
) -> None:
    victim = tmp_path / "victim"
    formats.convert(canonical, victim, to_format="hf")
    (victim / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    real = Format.to_native

    def interrupted(self, spec, weights):
        for i, item in enumerate(real(self, spec, weights)):
            if i == 5:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(Format, "to_native", interrupted)
    with pytest.raises(KeyboardInterrupt):
        formats.convert(canonical, victim, to_format="hf", image_size=48, overwrite=True)
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before


def test_read_only_folder(capsys, tmp_path: Path, canonical: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    # Root writes through mode bits; an immutable folder (chattr +i) stops root too.
    immutable = os.geteuid() == 0
    if (
        immutable
        and subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0
    ):
        pytest.skip(
            "running as root where chattr +i is not permitted: no folder is read-only to root"
        )
    try:
        code, _, err = vitspec_cli(capsys, "convert", str(canonical), str(locked / "o.safetensors"))
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert code == 1 and _error_lines(err) == [
        f"error: cannot write {locked / 'o.safetensors'}: folder {locked} is not writable"
    ]
    assert list(locked.iterdir()) == []


def test_unknown_file_and_format_errors(capsys, tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin2"
    junk.write_bytes(b"\x01\x02" * 100)
    code, _, err = vitspec_cli(capsys, "convert", str(junk), str(tmp_path / "o.safetensors"))
    assert code == 1 and "cannot tell what kind of file this is" in _error_lines(err)[0]
    code, _, err = vitspec_cli(
        capsys, "convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors")
    )
    assert code == 1 and "no such file" in _error_lines(err)[0]
    code, _, err = vitspec_cli(capsys, "convert", str(junk), str(tmp_path / "o.npz"))
    assert code == 1 and "--to google or --to big_vision" in _error_lines(err)[0]
    npz = tmp_path / "a.npz"
    np.savez(npz, x=np.zeros(3))
    code, _, err = vitspec_cli(capsys, "inspect", str(npz), "--from", "timm")
    assert _error_lines(err) == [
        f"error: {npz}: is an .npz file, which cannot hold a timm checkpoint (timm VisionTransformer state_dict (safetensors or .pt/.pth)); check --from"
    ]
    code, _, err = vitspec_cli(capsys, "inspect", str(npz))
    assert (
        code == 1
        and "cannot tell which checkpoint format this npz file is (tensors: x)"
        in _error_lines(err)[0]
    )
    msgpack = tmp_path / "state.msgpack"
    msgpack.write_bytes(b"\x81\xa1a\x01")
    code, _, err = vitspec_cli(capsys, "inspect", str(msgpack))
    assert code == 1 and "msgpack checkpoints are not read" in _error_lines(err)[0]


@pytest.mark.parametrize("to", ["timm", "hf", "google", "keras"])
def test_an_interrupted_conversion_leaves_nothing(
    tmp_path: Path, canonical: Path, monkeypatch, to: str
) -> None:
    real = Format.to_native

    def interrupted(self, spec, weights):
        for i, item in enumerate(real(self, spec, weights)):
            if i == 5:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(Format, "to_native", interrupted)
    out = tmp_path / {"hf": "hf", "google": "g.npz", "keras": "k.weights.h5"}.get(
        to, "t.safetensors"
    )
    with pytest.raises(KeyboardInterrupt):
        formats.convert(canonical, out, to_format=to)
    assert _folder_files(tmp_path) == {"c.safetensors"}


def test_interrupt_in_the_cli_exits_130_with_a_message(
    capsys, tmp_path: Path, canonical: Path, monkeypatch
) -> None:
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Format, "to_native", stop)
    code, _, err = vitspec_cli(
        capsys, "convert", str(canonical), str(tmp_path / "t.safetensors"), "--to", "timm"
    )
    assert code == 130 and ("aborted" in err or "interrupted" in err)
    assert _folder_files(tmp_path) == {"c.safetensors"}
