"""Checkpoint formats without the frameworks: round trips, detection, spec inference, streaming.

Every format must round-trip bit for bit through canonical, and every pair of formats must
convert into each other. The libraries themselves are checked in test_convert_libraries.py.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import rel_err

import vitspec
from vitspec import formats, reference
from vitspec import resample as resample_core
from vitspec.errors import SpecError, WeightsError
from vitspec.families import family
from vitspec.formats import resample
from vitspec.formats.infer import default_heads, load_partial_spec

ALL = list(formats.FORMATS)
SUFFIX = {"hf": "", "google": ".npz", "big_vision": ".npz", "keras": ".weights.h5"}
# What an npz cannot record (Flax shapes carry heads, not GELU or eps): given back on reading.
NPZ_HINT = ("gelu", "norm_eps")


def _out(folder: Path, stem: str, fmt: str) -> Path:
    return folder / f"{stem}{SUFFIX.get(fmt, '.safetensors')}"


def _hint(spec: vitspec.Spec, fmt: str) -> dict | None:
    return {k: getattr(spec, k) for k in NPZ_HINT} if fmt in ("google", "big_vision") else None


def _canonical(
    tmp_path: Path, spec: vitspec.Spec, dtype: type = np.float32
) -> tuple[Path, dict[str, np.ndarray]]:
    weights = vitspec.init_weights(spec, seed=4, scheme="random", dtype=dtype)
    path = tmp_path / "canonical.safetensors"
    vitspec.save_weights(path, weights, spec)
    return path, weights


def _assert_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].tobytes() == b[name].tobytes(), name


# ---- lossless: every format, every pair --------------------------------------------------------

EVERYWHERE = family("vit_paper", depth=2)  # expressible in all eight formats


@pytest.mark.parametrize("a", ALL)
def test_every_pair_of_formats_converts_bit_for_bit(tmp_path: Path, a: str) -> None:
    spec = EVERYWHERE
    canonical, weights = _canonical(tmp_path, spec)
    first = _out(tmp_path, f"a-{a}", a)
    formats.convert(canonical, first, to_format=a)
    assert formats.detect(first) == a
    for b in ALL:
        second = _out(tmp_path, f"b-{a}-{b}", b)
        formats.convert(first, second, to_format=b, spec=_hint(spec, a))
        back = tmp_path / f"back-{a}-{b}.safetensors"
        formats.convert(second, back, spec=_hint(spec, b))
        got, got_spec = vitspec.load_weights(back)
        assert got_spec == spec, (a, b)
        _assert_bits(got, weights)


def _expressible(fmt: str, spec: vitspec.Spec) -> bool:
    try:
        formats.get_format(fmt).check_spec(spec)
    except SpecError:
        return False
    return True


FAMILY_SPECS = {name: family(name) for name in vitspec.families.FAMILIES}


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("name", list(FAMILY_SPECS))
def test_every_family_round_trips_through_every_format_that_expresses_it(
    tmp_path: Path, fmt: str, name: str
) -> None:
    spec = FAMILY_SPECS[name]
    canonical, weights = _canonical(tmp_path, spec)
    out = _out(tmp_path, "x", fmt)
    if not _expressible(fmt, spec):
        with pytest.raises(SpecError, match=f"cannot write the {fmt} format"):
            formats.convert(canonical, out, to_format=fmt)
        assert not out.exists()
        return
    formats.convert(canonical, out, to_format=fmt)
    hint = _hint(spec, fmt)  # only the npz formats carry no spec of their own
    if hint is not None and (
        spec.pos_embed != "learned" or spec.image_size[0] != spec.image_size[1]
    ):
        hint["image_size"] = spec.image_size
    got, got_spec = formats.load(out, spec=hint)
    assert got_spec == spec
    _assert_bits(got, weights)


def test_keras_expresses_every_variant_and_round_trips_them(tmp_path: Path) -> None:
    from vitspec.formats.format import EVERY_VARIANT

    assert formats.get_format("keras").expresses == EVERY_VARIANT
    for n, changes in enumerate(
        [
            dict(
                reg_tokens=2,
                distillation_token=True,
                layer_scale=0.1,
                pre_norm=True,
                patch_norm=True,
                patch_bias=False,
                qk_norm=True,
                mlp="swiglu",
                mlp_norm=True,
                head_bias=False,
                gelu="quick",
                dynamic_image_size=True,
                pos_embed_resample="bicubic",
            ),
            dict(
                class_token=False,
                pos_embed_class_slot=False,
                pooling="map",
                norm="rms",
                qkv_bias=False,
                proj_bias=False,
                mlp_bias=False,
                final_norm="none",
                pre_logits_dim=6,
            ),
            dict(pooling="avgmax", pool_include_prefix=True, reg_tokens=1, proj_bias=False),
        ]
    ):
        spec = EVERYWHERE.replace(**changes)
        formats.get_format("keras").check(spec)  # refuses nothing
        folder = tmp_path / str(n)
        folder.mkdir()
        canonical, weights = _canonical(folder, spec)
        out = folder / "model.weights.h5"
        formats.convert(canonical, out)
        assert formats.detect(out) == "keras"
        back = folder / "back.safetensors"
        formats.convert(out, back)
        got, got_spec = vitspec.load_weights(back)
        assert got_spec == spec
        _assert_bits(got, weights)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("fmt", ["timm", "hf", "big_vision", "keras", "flax"])
def test_dtypes_are_kept(tmp_path: Path, fmt: str, dtype: str) -> None:
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    spec = EVERYWHERE
    canonical, weights = _canonical(tmp_path, spec, dtype=np_dtype)
    out = _out(tmp_path, "x", fmt)
    formats.convert(canonical, out, to_format=fmt)
    back = tmp_path / "back.safetensors"
    formats.convert(out, back, spec=_hint(spec, fmt))
    got, _ = vitspec.load_weights(back)
    _assert_bits(got, weights)


def test_mixed_dtypes_widen_without_changing_a_value(tmp_path: Path) -> None:
    spec = EVERYWHERE
    weights = vitspec.init_weights(spec, seed=1, scheme="random")
    weights["head.bias"] = weights["head.bias"].astype(np.float16)
    path = tmp_path / "mixed.safetensors"
    vitspec.save_weights(path, weights, spec)
    out = tmp_path / "timm.safetensors"
    result = formats.convert(path, out, to_format="timm")
    assert result.dtype == "float32"
    got, _ = formats.load(out)
    assert got["head.bias"].dtype == np.float32
    assert np.array_equal(got["head.bias"], weights["head.bias"].astype(np.float32))


# ---- detection ---------------------------------------------------------------------------------


def test_destination_format_from_the_name(tmp_path: Path) -> None:
    assert formats.destination_format(tmp_path / "w.safetensors") == "canonical"
    assert formats.destination_format(tmp_path / "model.weights.h5") == "keras"
    assert formats.destination_format(tmp_path / "hf_folder") == "hf"
    with pytest.raises(vitspec.FileFormatError, match="--to google or --to big_vision"):
        formats.destination_format(tmp_path / "w.npz")
    with pytest.raises(vitspec.FileFormatError, match="--to timm, --to torchvision or --to torch"):
        formats.destination_format(tmp_path / "w.pth")


def test_a_foreign_file_without_metadata_is_detected_by_its_names(tmp_path: Path) -> None:
    from vitspec.containers import read_safetensors, write_safetensors

    spec = EVERYWHERE
    canonical, _ = _canonical(tmp_path, spec)
    for fmt in ("timm", "hf", "flax", "canonical"):
        out = _out(tmp_path, f"tagged-{fmt}", fmt)
        formats.convert(canonical, out, to_format=fmt)
        file = out / "model.safetensors" if fmt == "hf" else out
        tensors, _ = read_safetensors(file)
        bare = tmp_path / f"bare-{fmt}.safetensors"
        write_safetensors(bare, tensors)  # no metadata at all
        assert formats.detect(bare) == fmt


# ---- spec inference ----------------------------------------------------------------------------


def test_timm_spec_inference_reports_what_came_from_defaults(tmp_path: Path) -> None:
    spec = family("timm_token", hidden_dim=64, n_heads=1)
    canonical, _ = _canonical(tmp_path, spec)
    out = tmp_path / "timm.safetensors"
    formats.convert(canonical, out, to_format="timm")
    from vitspec.containers import read_safetensors, write_safetensors

    bare = tmp_path / "bare.safetensors"
    write_safetensors(bare, read_safetensors(out)[0])
    with formats.open_checkpoint(bare) as ckpt:
        inferred = ckpt.inference
    assert inferred.spec.n_heads == 1  # width 64: head_dim 64, no preset has it
    # everything the tensors cannot tell is assumed and said so, down to the training-only rates
    assert set(inferred.assumed) == {
        "n_heads",
        "norm_eps",
        "gelu",
        "pooling",
        "image_size",
        "pos_embed_class_slot",
        "dropout",
        "attn_dropout",
        "drop_path",
    }
    assert set(inferred.known) | set(inferred.assumed) == set(vitspec.Spec.model_fields)
    notes = "\n".join(inferred.notes())
    assert "n_heads = 1 (head_dim 64" in notes and "gelu = exact (timm's nn.GELU)" in notes
    assert (
        "image_size = 32, pos_embed_class_slot = true (17 position rows read as 16 patches plus a class-token row in a square 4x4 grid"
        in notes
    )
    assert inferred.spec.replace(n_heads=1) == spec


def test_partial_spec_fills_what_the_file_cannot_tell_and_refuses_contradictions(
    tmp_path: Path,
) -> None:
    spec = family("gelu_tanh", norm_eps=1e-5)
    canonical, _weights = _canonical(tmp_path, spec)
    npz = tmp_path / "g.npz"
    formats.convert(canonical, npz, to_format="google")
    partial = tmp_path / "partial.yaml"
    partial.write_text("gelu: tanh\nnorm_eps: 1.0e-5\n")
    _got, got_spec = formats.load(npz, spec=partial)
    assert got_spec == spec
    with pytest.raises(SpecError) as info:
        formats.load(npz, spec={"n_heads": 2, "hidden_dim": 64})
    message = str(info.value)
    assert "n_heads: the file says 4, --spec says 2" in message
    assert "hidden_dim: the file says 32, --spec says 64" in message
    with pytest.raises(SpecError, match="unknown field 'n_head'; did you mean 'n_heads'"):
        load_partial_spec("n_head=3")


def test_inline_and_preset_partial_specs() -> None:
    assert load_partial_spec("n_heads=4,image_size=[24, 40],gelu=tanh") == {
        "n_heads": 4,
        "image_size": (24, 40),
        "gelu": "tanh",
    }
    assert load_partial_spec("B/16")["n_heads"] == 12


def test_default_heads_follow_the_presets() -> None:
    assert default_heads(768) == (12, "the B preset has 12 heads at width 768")
    assert default_heads(1280)[0] == 16  # H/14: head_dim 80
    assert default_heads(320) == (5, "head_dim 64 (width 320 matches no preset)")
    assert default_heads(100) is None


def test_non_square_grid_needs_the_image_size(tmp_path: Path) -> None:
    spec = family("non_square")
    canonical, _weights = _canonical(tmp_path, spec)
    out = tmp_path / "timm.safetensors"
    formats.convert(canonical, out, to_format="timm")
    from vitspec.containers import read_safetensors, write_safetensors

    bare = tmp_path / "bare.safetensors"
    write_safetensors(bare, read_safetensors(out)[0])
    with pytest.raises(
        SpecError, match="cannot tell the image size: the position embedding has 21 rows"
    ):
        formats.load(bare, spec="n_heads=4")
    _got, got_spec = formats.load(bare, spec="n_heads=4,image_size=[24, 40]")
    assert got_spec == spec
    with pytest.raises(
        SpecError,
        match=r"image_size: --spec says 24x24 \(12 patches of 6x8\), but the file's position embedding has 21 rows",
    ):
        formats.load(bare, spec="n_heads=4,image_size=24")


def _bare(
    tmp_path: Path, spec: vitspec.Spec, fmt: str = "timm"
) -> tuple[Path, dict[str, np.ndarray]]:
    """A file of ``fmt`` as its library saves it: native tensors, no metadata, no spec."""
    from safetensors.numpy import save_file

    weights = vitspec.init_weights(spec, seed=5, scheme="random")
    path = tmp_path / f"bare-{fmt}.safetensors"
    save_file(
        {k: np.ascontiguousarray(v) for k, v in formats.get_format(fmt).to_native(spec, weights)},
        path,
    )
    return path, weights


def _sized(spec: vitspec.Spec) -> list[int]:
    return list(spec.image_size)


# (grid, patch): grids of n x (n+2) patches, whose table plus a class-token row has (n+1)^2 rows,
# so it also reads as a square grid without the row. Not the 14x16: other heights and widths.
TWO_READINGS = [
    ((3, 5), (4, 4)),
    ((5, 3), (4, 4)),
    ((6, 8), (2, 3)),
    ((2, 4), (8, 8)),
    ((8, 6), (4, 2)),
]


@pytest.mark.parametrize(("grid", "patch"), TWO_READINGS)
def test_a_table_with_two_readings_is_listed_never_guessed(
    tmp_path: Path, grid: tuple[int, int], patch: tuple[int, int]
) -> None:
    spec = family(
        "timm_token", image_size=[grid[0] * patch[0], grid[1] * patch[1]], patch_size=list(patch)
    )
    path, weights = _bare(tmp_path, spec)
    rows, side = grid[0] * grid[1] + 1, min(grid) + 1
    with pytest.raises(SpecError) as info:
        formats.load(path, spec="n_heads=4")
    message = str(info.value)
    assert (
        f"the position embedding has {rows} rows, which can be read two ways (vitspec does not guess)"
        in message
    )
    assert f"(a) {rows - 1} patches plus a class-token row in a non-square grid such as" in message
    assert (
        f"{grid[0]}x{grid[1]}" in message
        and f"[{spec.image_size[0]},{spec.image_size[1]}]" in message
    )
    assert f"(b) {rows} patches without a class-token row in a square {side}x{side} grid" in message
    assert "--spec pos_embed_class_slot=false" in message
    # the image size picks reading (a); with the class slot given too it is accepted, not a contradiction
    for given in (
        {"image_size": _sized(spec)},
        {"image_size": _sized(spec), "pos_embed_class_slot": True},
    ):
        got, got_spec = formats.load(path, spec={"n_heads": 4, **given})
        assert got_spec == spec
        _assert_bits(got, weights)
    # the class slot alone still needs the grid: asked for by name, with an example that fits
    with pytest.raises(
        SpecError,
        match=rf"cannot tell the image size: the position embedding has {rows} rows, {rows - 1} patches plus a class-token row, which is not a square grid; pass image_size with --spec \(for example --spec image_size=\[",
    ):
        formats.load(path, spec="n_heads=4,pos_embed_class_slot=true")
    # reading (b), chosen by the user: the square grid is taken and marked as assumed
    with formats.open_checkpoint(path, spec="n_heads=4,pos_embed_class_slot=false") as ckpt:
        assert (
            ckpt.spec.image_size == (side * patch[0], side * patch[1])
            and not ckpt.spec.pos_embed_class_slot
        )
        assert set(ckpt.inference.assumed) >= {"image_size", "pooling"}
        assert "pos_embed_class_slot" in ckpt.inference.given


def test_the_mirror_case_a_square_table_without_the_class_row_is_not_guessed_either(
    tmp_path: Path,
) -> None:
    # timm no_embed_class=True (DeiT III): 5x5 patches and a class token, but no row for it: 25 rows,
    # which timm's usual class row would read as 24 patches in a 4x6 grid.
    spec = family("timm_no_embed_class", image_size=40, patch_size=8)
    path, weights = _bare(tmp_path, spec)
    with pytest.raises(
        SpecError,
        match=r"has 25 rows, which can be read two ways .*\(a\) 24 patches plus a class-token row in a non-square grid such as 4x6 or 6x4: --spec image_size=\[32,48\] or \[48,32\]; \(b\) 25 patches without a class-token row in a square 5x5 grid \(image_size 40\): --spec pos_embed_class_slot=false",
    ):
        formats.load(path, spec="n_heads=4")
    got, got_spec = formats.load(path, spec="n_heads=4,pos_embed_class_slot=false")
    assert got_spec == spec
    _assert_bits(got, weights)


@pytest.mark.parametrize("grid", [(3, 5), (4, 7), (6, 4)])
def test_without_a_class_token_a_non_square_grid_needs_the_size(
    tmp_path: Path, grid: tuple[int, int]
) -> None:
    spec = family("big_vision_gap", image_size=[grid[0] * 4, grid[1] * 4], patch_size=4)
    path, weights = _bare(tmp_path, spec)
    n = grid[0] * grid[1]
    with pytest.raises(
        SpecError,
        match=rf"cannot tell the image size: the position embedding has {n} rows, {n} patches without a class-token row, which is not a square grid",
    ):
        formats.load(path, spec="n_heads=4")
    got, got_spec = formats.load(path, spec={"n_heads": 4, "image_size": _sized(spec)})
    assert got_spec == spec
    _assert_bits(got, weights)
    with pytest.raises(
        SpecError,
        match="the given spec contradicts the file: pos_embed_class_slot: the file says false, --spec says true",
    ):
        formats.load(
            path, spec={"n_heads": 4, "image_size": _sized(spec), "pos_embed_class_slot": True}
        )


@pytest.mark.parametrize(
    ("fmt", "family_name", "side"),
    [("timm", "timm_token", 4), ("timm", "big_vision_gap", 5), ("canonical", "vit_paper", 3)],
)
def test_a_square_reading_is_taken_only_as_an_assumption(
    tmp_path: Path, fmt: str, family_name: str, side: int
) -> None:
    spec = family(family_name, image_size=side * 8, patch_size=8)
    path, _ = _bare(tmp_path, spec, fmt)
    with formats.open_checkpoint(path, from_format=fmt, spec="n_heads=4") as ckpt:
        inference = ckpt.inference
    assert inference.spec == spec
    assert (
        inference.assumed["image_size"] == (side * 8, side * 8)
        and "image_size" not in inference.known
    )
    assert (
        "pos_embed_class_slot" in inference.assumed
    ) == spec.class_token  # read from the file without one
    assert f"in a square {side}x{side} grid" in inference.why["image_size"]


def test_big_vision_old_style_class_row_is_read_because_the_usual_layout_fits_no_grid(
    tmp_path: Path,
) -> None:
    spec = family(
        "vit_paper", image_size=32, patch_size=8
    )  # 16 patches + a class row: 17 rows, prime
    canonical, _weights = _canonical(tmp_path, spec)
    npz = tmp_path / "bv.npz"
    formats.convert(canonical, npz, to_format="big_vision")
    with formats.open_checkpoint(npz, spec={"gelu": "exact"}) as ckpt:
        assert ckpt.spec == spec
        assert (
            "17 patches without a class-token row, big_vision's usual layout, make no plausible grid"
            in ckpt.inference.why["pos_embed_class_slot"]
        )


def test_plausible_grids() -> None:
    from vitspec.formats.infer import plausible_grids

    assert plausible_grids(224)[:2] == [(14, 16), (16, 14)]
    assert plausible_grids(197) == []  # ViT-B/16's table read without its class row: prime, no grid
    assert plausible_grids(196) == []  # 14x14 is square; 7x28 is wider than 2:1
    assert plausible_grids(50) == [(5, 10), (10, 5)]  # 2:1 is the widest counted
    assert plausible_grids(51) == []  # 3x17


def test_hf_config_must_agree_with_the_tensors(tmp_path: Path) -> None:
    spec = family("hf_vit")
    canonical, _ = _canonical(tmp_path, spec)
    folder = tmp_path / "hf"
    formats.convert(canonical, folder, to_format="hf")
    from vitspec.containers import read_safetensors, write_safetensors

    tensors, _meta = read_safetensors(folder / "model.safetensors")
    write_safetensors(
        folder / "model.safetensors", tensors, {"format": "pt"}, overwrite=True
    )  # drop the embedded spec
    config = json.loads((folder / "config.json").read_text())
    assert formats.load(folder)[1] == spec  # everything from config.json
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        SpecError, match="config.json has num_hidden_layers=3 but the tensors say depth 2"
    ):
        formats.load(folder)


def test_big_vision_scanned_encoder_reads_block_by_block(tmp_path: Path) -> None:
    spec = family("big_vision_gap", depth=3)
    canonical, weights = _canonical(tmp_path, spec)
    npz = tmp_path / "bv.npz"
    formats.convert(canonical, npz, to_format="big_vision")
    arrays = dict(np.load(npz, allow_pickle=False))
    scanned: dict[str, np.ndarray] = {}
    for name in sorted(arrays):
        if "/encoderblock_" in name:
            head, rest = name.split("/encoderblock_", 1)
            _, leaf = rest.split("/", 1)
            key = f"{head}/encoderblock/{leaf}"
            if key not in scanned:
                scanned[key] = np.stack(
                    [
                        arrays[
                            name.replace(f"encoderblock_{rest.split('/')[0]}", f"encoderblock_{i}")
                        ]
                        for i in range(3)
                    ]
                )
        else:
            scanned[name] = arrays[name]
    scan = tmp_path / "scan.npz"
    np.savez_compressed(scan, **scanned)
    got, got_spec = formats.load(scan, spec={"gelu": "exact"})
    assert got_spec == spec
    _assert_bits(got, weights)


def test_unsupported_features_are_named(tmp_path: Path) -> None:
    from vitspec.containers import write_safetensors

    spec = family("timm_token")
    canonical, _ = _canonical(tmp_path, spec)
    timm = tmp_path / "timm.safetensors"
    formats.convert(canonical, timm, to_format="timm")
    tensors = dict(formats.load(timm)[0])  # canonical
    native = dict(formats.get_format("timm").to_native(spec, tensors))
    native["blocks.0.ls1.gamma"] = np.ones(32, np.float32)
    native["reg_token"] = np.ones((1, 4, 32), np.float32)
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, native)
    with pytest.raises(WeightsError) as info:
        formats.load(bad)
    assert "register tokens (reg_tokens > 0) (reg_token)" in str(info.value)
    assert "LayerScale (init_values) (blocks.0.ls1.gamma)" in str(info.value)


# ---- resampling ------------------------------------------------------------------------------


def test_resampling_keeps_constants_and_the_class_row(tmp_path: Path) -> None:
    spec = family("vit_paper")  # 4x4 grid with a class row
    table = np.concatenate([np.full((1, 32), 7.0), np.full((16, 32), -2.5)]).astype(np.float32)
    for algorithm in resample.ALGORITHMS:
        for grid in ((6, 6), (3, 2)):
            out = resample.resample_pos_embed(spec, table, grid, algorithm)
            assert out.shape == (1 + grid[0] * grid[1], 32) and out.dtype == np.float32
            assert np.all(out[0] == 7.0) and np.allclose(out[1:], -2.5, atol=1e-6)
    for n_in, n_out in ((4, 6), (6, 4), (14, 5), (3, 16)):
        assert np.allclose(resample_core.bicubic_matrix(n_in, n_out).sum(axis=1), 1.0)
        assert np.allclose(resample_core.antialiased_bicubic_matrix(n_in, n_out).sum(axis=1), 1.0)
    # downsampling 8x with antialiasing averages every input row in; plain bicubic (4 taps) skips some
    assert (resample_core.antialiased_bicubic_matrix(32, 4) != 0).any(axis=0).all()
    assert not (resample_core.bicubic_matrix(32, 4) != 0).any(axis=0).all()
    with pytest.raises(
        ValueError,
        match="unknown resampling algorithm 'lanczos'; expected one of bicubic-antialias, bicubic",
    ):
        formats.convert(
            _canonical(tmp_path, spec)[0],
            tmp_path / "o.safetensors",
            image_size=48,
            resample="lanczos",
        )


def test_convert_with_image_size_resamples_and_runs(tmp_path: Path) -> None:
    spec = family("vit_paper")
    canonical, weights = _canonical(tmp_path, spec)
    out = tmp_path / "big.safetensors"
    result = formats.convert(canonical, out, image_size=48)
    assert result.spec.image_size == (48, 48) and "4, 4) -> (6, 6)" in result.resampled
    got, got_spec = vitspec.load_weights(out)
    assert got["pos_embed"].shape == (37, 32)
    assert np.array_equal(got["pos_embed"][0], weights["pos_embed"][0])
    for name in weights:
        if name != "pos_embed":
            assert np.array_equal(got[name], weights[name]), name
    images = np.random.default_rng(0).standard_normal((1, 48, 48, 3))
    assert np.isfinite(reference.forward(got_spec, got, images)["output"]).all()


# ---- streaming -------------------------------------------------------------------------------

STREAM_SPEC = vitspec.Spec(
    image_size=64, patch_size=8, hidden_dim=256, n_heads=4, depth=4, n_classes=100
)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("timm", "canonical"),
        ("canonical", "hf"),
        ("google", "timm"),
        ("canonical", "big_vision"),
        ("torch", "flax"),
    ],
)
def test_conversion_holds_about_one_block_not_the_model(tmp_path: Path, a: str, b: str) -> None:
    spec = STREAM_SPEC
    canonical, weights = _canonical(tmp_path, spec)
    model_bytes = sum(w.nbytes for w in weights.values())
    block_bytes = sum(w.nbytes for n, w in weights.items() if n.startswith("blocks.0."))
    del weights
    src = _out(tmp_path, "src", a)
    formats.convert(canonical, src, to_format=a)
    dst = _out(tmp_path, "dst", b)
    tracemalloc.start()
    try:
        formats.convert(src, dst, to_format=b, spec=_hint(spec, a))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < block_bytes + model_bytes // 8, (
        f"peak {peak} bytes for a {model_bytes}-byte model"
    )


def test_progress_reports_every_byte(tmp_path: Path) -> None:
    canonical, weights = _canonical(tmp_path, EVERYWHERE)
    seen: list[tuple[int, int]] = []
    result = formats.convert(
        canonical,
        tmp_path / "t.safetensors",
        to_format="timm",
        progress=lambda d, t: seen.append((d, t)),
    )
    assert len(seen) == result.n_tensors
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert (
        seen[-1] == (result.nbytes, result.nbytes) == (sum(w.nbytes for w in weights.values()),) * 2
    )


def test_load_gives_the_numbers_of_the_original(tmp_path: Path) -> None:
    spec = family("timm_avg_fc_norm")
    canonical, weights = _canonical(tmp_path, spec)
    out = tmp_path / "t.safetensors"
    formats.convert(canonical, out, to_format="timm")
    got, got_spec = formats.load(out)
    images = np.random.default_rng(1).standard_normal((2, 32, 32, 3))
    assert (
        rel_err(
            reference.forward(got_spec, got, images)["output"],
            reference.forward(spec, weights, images)["output"],
        )
        == 0.0
    )


# ---- the docs name what the code writes --------------------------------------------------------


def _stem(name: str) -> str:
    """A native name as the docs write it: block 0 as {i}, key/value like query, the leaf dropped."""
    for block, generic in (
        ("blocks.0.", "blocks.{i}."),
        ("blocks_0", "blocks_{i}"),
        ("encoder.layer.0.", "encoder.layer.{i}."),
        ("encoderblock_0", "encoderblock_{i}"),
        ("encoder_layer_0.", "encoder_layer_{i}."),
    ):
        name = name.replace(block, generic)
    name = name.removeprefix("vit.").removeprefix("params/")
    for part in ("key", "value"):
        name = name.replace(f".{part}.", ".query.").replace(f"/{part}/", "/query/")
    return re.sub(r"([./](weight|bias|scale|kernel)|/vars/\d)$", "", name)


def test_convert_docs_name_every_native_tensor() -> None:
    from vitspec.layouts.keras import h5_layout

    page = (Path(__file__).resolve().parent.parent / "docs" / "convert.md").read_text()
    headings = [line for line in page.splitlines() if line.startswith("#### ")]
    specs = [
        family("vit_paper", depth=1),
        family("vit_paper_pre_logits", depth=1),
        family("timm_avg_fc_norm", depth=1),
        family("vit_paper_pre_logits", depth=1, n_classes=0),
    ]
    for fmt in ALL:
        assert fmt == "canonical" or any(f"`{fmt}`" in h for h in headings), fmt
        module = formats.get_format(fmt)
        for spec in specs:
            if not _expressible(fmt, spec):
                continue
            names = (
                [d for _, d in h5_layout(spec)]
                if fmt == "keras"
                else [n for n, _ in module.native_layout(spec)]
            )
            for name in names:
                stem = _stem(name)
                if fmt in ("flax", "canonical") and not stem.startswith(
                    ("patch_embed", "blocks.{i}.attn.qkv")
                ):
                    continue  # documented as "every other canonical name: itself"
                assert stem in page, (fmt, name, stem)


def test_formats_import_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, vitspec.formats as f\n"
        "for name in f.FORMATS: f.get_format(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'keras', 'jax', 'flax')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("shape", [(3, 5), (64, 70), (1024, 4096), (4096, 1000), (1000, 17)])
def test_strip_transpose_is_exact_at_every_size(shape: tuple[int, int]) -> None:
    from vitspec.formats.streaming import contiguous

    source = np.random.default_rng(0).standard_normal(shape[::-1]).astype(np.float32)
    got = contiguous(source.T)  # large ones go through two threads
    assert got.flags.c_contiguous and got.shape == shape
    assert np.array_equal(got, np.ascontiguousarray(source.T))


# transformers' ViTConfig defaults, used when config.json leaves a key out.
HF_DEFAULTS = [
    ("num_attention_heads", "n_heads", 12),
    ("layer_norm_eps", "norm_eps", 1e-12),
    ("hidden_dropout_prob", "dropout", 0.0),
    ("attention_probs_dropout_prob", "attn_dropout", 0.0),
    ("hidden_act", "gelu", "exact"),
]


@pytest.mark.parametrize(
    ("key", "field", "default"), HF_DEFAULTS, ids=[k for k, _, _ in HF_DEFAULTS]
)
def test_hf_config_without_a_key_gets_transformers_default(
    tmp_path: Path, key: str, field: str, default
) -> None:
    # Every field differs from transformers' default, so only the default can produce the value read.
    spec = family(
        "hf_vit",
        hidden_dim=48,
        n_heads=4,
        norm_eps=1e-6,
        dropout=0.1,
        attn_dropout=0.2,
        gelu="tanh",
    )
    assert getattr(spec, field) != default
    canonical, _ = _canonical(tmp_path, spec)
    folder = tmp_path / "hf"
    formats.convert(canonical, folder, to_format="hf")
    from vitspec.containers import read_safetensors, write_safetensors

    tensors, _meta = read_safetensors(folder / "model.safetensors")
    write_safetensors(
        folder / "model.safetensors", tensors, {"format": "pt"}, overwrite=True
    )  # drop the embedded spec
    config = json.loads((folder / "config.json").read_text())
    del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    assert formats.load(folder)[1] == spec.replace(**{field: default})


def test_hf_config_without_pooler_act_reads_tanh(tmp_path: Path) -> None:
    spec = family("hf_vit", pre_logits_dim=32, n_classes=0)
    canonical, _ = _canonical(tmp_path, spec)
    folder = tmp_path / "hf"
    formats.convert(canonical, folder, to_format="hf")
    from vitspec.containers import read_safetensors, write_safetensors

    tensors, _meta = read_safetensors(folder / "model.safetensors")
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"}, overwrite=True)
    config = json.loads((folder / "config.json").read_text())
    del config["pooler_act"]
    (folder / "config.json").write_text(json.dumps(config))
    assert formats.load(folder)[1] == spec
    config["pooler_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        SpecError, match="pooler_act 'relu'; vitspec's pre-logits layer is dense \\+ tanh"
    ):
        formats.load(folder)


# ---- the variants of issue 10 in the flax and big_vision formats --------------------------------

# One spec per variant field (and per new value of an old field), every one of EVERY_VARIANT.
ONE_VARIANT = {
    "reg_tokens": {"reg_tokens": 2},
    "distillation_token": {"distillation_token": True},
    "pool_include_prefix": {"pooling": "avg", "pool_include_prefix": True},
    "dynamic_image_size": {"dynamic_image_size": True},
    "pos_embed_resample": {"dynamic_image_size": True, "pos_embed_resample": "bicubic"},
    "patch_bias": {"patch_bias": False},
    "patch_norm": {"patch_norm": True},
    "pre_norm": {"pre_norm": True},
    "qk_norm": {"qk_norm": True},
    "proj_bias": {"proj_bias": False},
    "layer_scale": {"layer_scale": 1e-5},
    "mlp": {"mlp": "swiglu"},
    "mlp_bias": {"mlp_bias": False},
    "mlp_norm": {"mlp_norm": True},
    "norm": {"norm": "rms"},
    "head_bias": {"head_bias": False},
    "pooling=max": {"pooling": "max"},
    "pooling=avgmax": {"pooling": "avgmax"},
    "pooling=map": {"pooling": "map", "class_token": False},
    "gelu=quick": {"gelu": "quick"},
    "final_norm=none": {"final_norm": "none"},
}


def test_one_variant_names_every_variant() -> None:
    from vitspec.formats.format import EVERY_VARIANT, NEW_VALUES

    fields = {key.split("=")[0] for key in ONE_VARIANT}
    assert fields == set(EVERY_VARIANT)
    for field, values in NEW_VALUES.items():
        assert {k for k in ONE_VARIANT if k.startswith(f"{field}=")} == {
            f"{field}={v}" for v in values
        }


def test_flax_expresses_every_variant() -> None:
    from vitspec.formats.format import EVERY_VARIANT

    assert formats.get_format("flax").expresses == EVERY_VARIANT


@pytest.mark.parametrize("key", list(ONE_VARIANT))
def test_flax_round_trips_every_variant(tmp_path: Path, key: str) -> None:
    spec = family("timm_token", **ONE_VARIANT[key])
    assert spec != family("timm_token")
    canonical, weights = _canonical(tmp_path, spec)
    out = tmp_path / "flax.safetensors"
    formats.convert(canonical, out, to_format="flax")
    assert formats.detect(out) == "flax"
    got, got_spec = formats.load(out)
    assert got_spec == spec
    _assert_bits(got, weights)


def test_flax_holds_a_combination_of_every_block_variant(tmp_path: Path) -> None:
    spec = family(
        "timm_token",
        reg_tokens=2,
        layer_scale=0.1,
        qk_norm=True,
        mlp="swiglu",
        mlp_norm=True,
        norm="rms",
        patch_norm=True,
        patch_bias=False,
        pre_norm=True,
        qkv_bias=False,
        proj_bias=False,
        pooling="map",
        class_token=False,
        gelu="quick",
        head_bias=False,
        dynamic_image_size=True,
    )
    canonical, weights = _canonical(tmp_path, spec)
    out = tmp_path / "flax.safetensors"
    formats.convert(canonical, out, to_format="flax")
    from vitspec.containers import read_safetensors

    tensors, _ = read_safetensors(out)
    d = spec.hidden_dim
    # the MAP pool's key and value are one fused (D, 2D) kernel, key first, as the model holds them
    assert tensors["pool.kv.kernel"].shape == (d, 2 * d)
    assert np.array_equal(tensors["pool.kv.kernel"][:, d:], weights["pool.value.kernel"])
    assert "pool.key.kernel" not in tensors and "pool.query.kernel" in tensors
    got, got_spec = formats.load(out)
    assert got_spec == spec
    _assert_bits(got, weights)


MAP_SPEC = family("big_vision_gap", pooling="map", n_classes=5)


def test_big_vision_writes_the_map_head_and_reads_it_back(tmp_path: Path) -> None:
    spec = MAP_SPEC
    canonical, weights = _canonical(tmp_path, spec)
    npz = tmp_path / "map.npz"
    formats.convert(canonical, npz, to_format="big_vision")
    assert formats.detect(npz) == "big_vision"
    arrays = dict(np.load(npz, allow_pickle=False))
    d, h, hd = spec.hidden_dim, spec.n_heads, spec.head_dim
    mha = "params/MAPHead_0/MultiHeadDotProductAttention_0"
    assert arrays["params/MAPHead_0/probe"].shape == (1, 1, d)
    assert np.array_equal(arrays["params/MAPHead_0/probe"].reshape(d), weights["pool.probe"])
    assert arrays[f"{mha}/key/kernel"].shape == (d, h, hd)
    assert np.array_equal(
        arrays[f"{mha}/key/kernel"][:, 1], weights["pool.key.kernel"][:, hd : 2 * hd]
    )
    assert arrays[f"{mha}/out/kernel"].shape == (h, hd, d)
    assert arrays["params/MAPHead_0/MlpBlock_0/Dense_1/kernel"].shape == (spec.mlp_dim, d)
    assert arrays["params/MAPHead_0/LayerNorm_0/scale"].shape == (d,)
    assert "params/cls" not in arrays
    got, got_spec = formats.load(npz, spec=_hint(spec, "big_vision"))
    assert got_spec == spec  # pooling 'map' read from MAPHead_0
    _assert_bits(got, weights)
    # and through the flax format and back, bit for bit
    flax = tmp_path / "map.safetensors"
    formats.convert(npz, flax, to_format="flax", spec=_hint(spec, "big_vision"))
    again = tmp_path / "again.npz"
    formats.convert(flax, again, to_format="big_vision")
    got, got_spec = formats.load(again, spec=_hint(spec, "big_vision"))
    assert got_spec == spec
    _assert_bits(got, weights)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pooling": "max"}, "big_vision pools by 'tok', 'gap' or 'map' (spec has pooling 'max')"),
        ({"pooling": "avgmax"}, "(spec has pooling 'avgmax')"),
        (
            {"pooling": "map", "class_token": True},
            "big_vision's MAP head (pool_type='map') is for a model without cls",
        ),
        ({"pooling": "map", "reg_tokens": 1}, "it has no way to hold register tokens"),
    ],
)
def test_big_vision_refuses_the_pooling_it_cannot_hold(
    tmp_path: Path, fields: dict, message: str
) -> None:
    spec = family("big_vision_gap", **fields)
    canonical, _ = _canonical(tmp_path, spec)
    out = tmp_path / "x.npz"
    with pytest.raises(SpecError, match=re.escape(message)) as info:
        formats.convert(canonical, out, to_format="big_vision")
    assert all(p.startswith("cannot write the big_vision format: ") for p in info.value.problems)
    assert not out.exists()


def test_google_refuses_map_pooling(tmp_path: Path) -> None:
    with pytest.raises(
        SpecError, match="cannot write the google format: it cannot hold pooling 'map'"
    ):
        formats.get_format("google").check(MAP_SPEC)
