"""The conformance suite's parts: the corpus, the case format, tolerances, the checker, reports.

Expected numbers here come from the float64 reference or from perturbations built by hand; none
is copied from the checker's own output.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import vitspec
from vitspec.backends.numpy import NumpyBackend
from vitspec.conformance import report as rep
from vitspec.conformance.case import (
    CASES_DIR,
    MAX_CASE_BYTES,
    MIN_CASES,
    CaseError,
    load_case,
    make_case,
    shipped_case_dirs,
    shipped_cases,
    write_case,
)
from vitspec.conformance.check import check_outputs, check_pair, compare, run_backend
from vitspec.conformance.corpus import CORPUS
from vitspec.conformance.generate import drift
from vitspec.conformance.suite import (
    Expectation,
    ExpectationsError,
    apply_expectations,
    load_expectations,
    run_suite,
)
from vitspec.conformance.tolerances import Tolerance, ToleranceError, load_tolerances
from vitspec.families import FAMILIES, family
from vitspec.layout import capture_points, capture_shapes
from vitspec.spec import Spec

F32 = Tolerance("float32", 1e-5, 1e-5, "test")


@pytest.fixture(scope="module")
def cases() -> dict[str, vitspec.conformance.Case]:
    return {c.name: c for c in shipped_cases()}


@pytest.fixture
def tiny_case() -> vitspec.conformance.Case:
    spec = family("vit_paper", hidden_dim=16, n_heads=2, depth=2, image_size=16, patch_size=8)
    return make_case(spec, name="tiny", batch=2, seed=3)


# ---- the corpus ---------------------------------------------------------------------------------


def test_corpus_has_enough_small_cases() -> None:
    dirs = shipped_case_dirs()
    assert len(dirs) >= MIN_CASES == 24
    assert [d.name for d in dirs] == sorted(c.name for c in CORPUS)
    for d in dirs:
        size = sum(f.stat().st_size for f in d.iterdir())
        assert size <= MAX_CASE_BYTES, f"{d.name}: {size} bytes"


def test_frozen_corpus_matches_a_fresh_generation() -> None:
    assert drift() == []


def test_every_case_loads_with_every_capture_point(cases) -> None:
    for case in cases.values():
        assert case.points == capture_points(case.spec), case.name
        shapes = capture_shapes(case.spec, case.batch, case.image_size)
        for point, value in case.expected.items():
            assert value.shape == shapes[point] and value.dtype == np.float64, (case.name, point)
        assert case.images.dtype == np.float32
        assert case.images.shape == (case.batch, *case.image_size, case.spec.in_channels)
        # Only a dynamic spec runs on another size, and every dynamic case does.
        assert (case.image_size != case.spec.image_size) == case.spec.dynamic_image_size, case.name


def test_dynamic_cases_run_another_grid_than_their_spec(cases) -> None:
    dynamic = [c for c in cases.values() if c.spec.dynamic_image_size]
    assert {c.spec.pos_embed for c in dynamic} >= {"learned", "sincos2d"}
    assert {c.spec.pos_embed_resample for c in dynamic if c.spec.pos_embed == "learned"} == {
        "bicubic-antialias",
        "bicubic",
    }
    grows = shrinks = False
    for case in dynamic:
        grid = (
            case.image_size[0] // case.spec.patch_size[0],
            case.image_size[1] // case.spec.patch_size[1],
        )
        assert grid != case.spec.grid, case.name
        grows |= any(g > s for g, s in zip(grid, case.spec.grid, strict=True))
        shrinks |= any(g < s for g, s in zip(grid, case.spec.grid, strict=True))
    assert grows and shrinks


def test_expected_values_are_the_float64_reference(cases) -> None:
    for name in ("family_vit_paper", "norm_eps_sensitive", "one_channel_no_head"):
        case = cases[name]
        fresh = vitspec.reference.forward(
            case.spec, case.weights, case.images, dtype=np.float64, capture="all"
        )
        for point, value in case.expected.items():
            np.testing.assert_allclose(
                value, fresh[point], rtol=1e-12, atol=1e-13, err_msg=f"{name}/{point}"
            )


def test_corpus_covers_every_spec_option(cases) -> None:
    specs = [c.spec for c in cases.values()]
    for field, info in Spec.model_fields.items():
        values = {json.dumps(getattr(s, field)) for s in specs}
        assert len(values) >= 2, f"every case has the same {field}: {values}"
        args = getattr(info.annotation, "__args__", ())
        literal = [a for a in args if isinstance(a, str)]
        for option in literal:
            assert json.dumps(option) in values, f"no case has {field} = {option!r}"
    assert {True, False} <= {s.class_token for s in specs}
    assert {True, False} <= {s.qkv_bias for s in specs}
    assert {True, False} <= {s.pos_embed_class_slot for s in specs}
    assert {"token", "avg"} <= {s.pooling for s in specs}
    assert {"learned", "sincos2d", "none"} <= {s.pos_embed for s in specs}
    assert {"exact", "tanh"} <= {s.gelu for s in specs}
    assert len({s.norm_eps for s in specs}) >= 3
    assert {1, 2, 3, 4} <= {s.depth for s in specs}
    assert set(range(1, 9)) <= {s.n_heads for s in specs}
    assert 1 in {s.in_channels for s in specs} and 0 in {s.n_classes for s in specs}
    assert any(s.image_size[0] != s.image_size[1] for s in specs)
    assert any(s.patch_size[0] != s.patch_size[1] for s in specs)
    assert any(s.pre_logits_dim and not s.n_classes for s in specs)
    assert any(s.dropout and s.attn_dropout and s.drop_path for s in specs)
    batches = {c.batch for c in cases.values()}
    assert 1 in batches and max(batches) >= 4


# Issue 10's features: each has a case of its own (a name in CORPUS) that has it.
FEATURES = {
    "registers_with_positions": lambda s: s.reg_tokens and s.pos_embed_class_slot,
    "registers_without_positions": lambda s: s.reg_tokens and not s.pos_embed_class_slot,
    "distillation_token": lambda s: s.distillation_token and s.n_classes,
    "distillation_token_no_head": lambda s: s.distillation_token and not s.n_classes,
    "layer_scale": lambda s: s.layer_scale is not None,
    "pre_norm": lambda s: s.pre_norm,
    "patch_norm": lambda s: s.patch_norm,
    "final_norm_none": lambda s: s.final_norm == "none",
    "pool_max": lambda s: s.pooling == "max",
    "pool_avgmax_register": lambda s: s.pooling == "avgmax" and s.reg_tokens,
    "pool_map": lambda s: s.pooling == "map",
    "pool_include_prefix": lambda s: s.pool_include_prefix and s.n_prefix_tokens,
    "qk_norm": lambda s: s.qk_norm,
    "no_patch_bias": lambda s: not s.patch_bias,
    "no_proj_bias": lambda s: not s.proj_bias,
    "no_mlp_bias": lambda s: not s.mlp_bias,
    "no_head_bias": lambda s: not s.head_bias and s.n_classes,
    "quick_gelu": lambda s: s.gelu == "quick",
    "mlp_norm": lambda s: s.mlp_norm and s.mlp == "standard",
    "swiglu_mlp_norm": lambda s: s.mlp == "swiglu" and s.mlp_norm,
    "rms_norm": lambda s: s.norm == "rms",
    "dynamic_image_size_up": lambda s: s.dynamic_image_size and s.pos_embed == "learned",
    "dynamic_image_size_down_bicubic": lambda s: (
        s.dynamic_image_size and s.pos_embed_resample == "bicubic"
    ),
    "dynamic_image_size_sincos": lambda s: s.dynamic_image_size and s.pos_embed == "sincos2d",
}
LIKE = {
    "deit3": lambda s: s.layer_scale is not None and not s.pos_embed_class_slot,
    "deit_distilled": lambda s: s.distillation_token and s.n_classes,
    "dinov2": lambda s: s.layer_scale is not None and s.pos_embed_class_slot,
    "dinov2_reg": lambda s: s.layer_scale is not None and s.reg_tokens == 4,
    "dinov2_giant": lambda s: s.layer_scale is not None and s.mlp == "swiglu",
    "clip_quickgelu": lambda s: (
        s.gelu == "quick" and s.pre_norm and not s.patch_bias and not s.head_bias
    ),
    "siglip": lambda s: s.pooling == "map" and not s.class_token,
    "aimv2": lambda s: (
        s.norm == "rms"
        and s.mlp == "swiglu"
        and s.patch_norm
        and not (s.qkv_bias or s.proj_bias or s.mlp_bias)
    ),
}


def test_every_new_feature_and_family_has_a_small_case(cases) -> None:
    for name, has in FEATURES.items():
        assert has(cases[name].spec), name
    for name, has in LIKE.items():
        case = cases[f"like_{name}"]
        assert has(case.spec) and case.manifest["inputs"]["family"] == name, name
    for name in [*FEATURES, *(f"like_{n}" for n in LIKE)]:
        assert cases[name].corpus_version >= 2 and cases[name].spec.depth <= 2, name
        assert cases[name].spec.n_params < 20_000, name


def test_every_family_has_a_case(cases) -> None:
    for name, fields in FAMILIES.items():
        matching = [c for c in cases.values() if c.manifest["inputs"].get("family") == name]
        assert matching, f"no case for family {name}"
        for c in matching:
            for key, value in fields.items():
                got = getattr(c.spec, key)
                want = tuple(value) if isinstance(value, list) else value
                if key in ("image_size", "patch_size") and isinstance(value, int):
                    want = (value, value)
                if key not in (
                    "image_size",
                    "pre_logits_dim",
                ):  # sizes are shrunk to keep cases small
                    assert got == want, (name, key, got, want)


def test_manifest_records_provenance_and_the_tolerance_in_force(cases) -> None:
    manifest = cases["family_mnist"].manifest
    assert manifest["generator"]["vitspec"] == vitspec.__version__
    assert manifest["generator"]["numpy"] == np.__version__
    assert manifest["inputs"]["weights"] == {
        "init": "vitspec.init_weights",
        "scheme": "random",
        "seed": 13,
    }
    shipped = load_tolerances()
    for name, tol in shipped.classes.items():
        assert manifest["tolerance"][name] == {
            "atol": tol.atol,
            "rtol": tol.rtol,
            "reason": tol.reason,
        }
    for fname in ("spec.yaml", "weights.safetensors", "data.safetensors"):
        entry = manifest["files"][fname]
        assert (
            len(entry["sha256"]) == 64
            and entry["bytes"] == (CASES_DIR / "family_mnist" / fname).stat().st_size
        )


# ---- the case format ----------------------------------------------------------------------------


def test_write_then_load_is_lossless(tmp_path: Path, tiny_case) -> None:
    path = write_case(tiny_case, tmp_path / "tiny")
    assert sorted(p.name for p in path.iterdir()) == [
        "data.safetensors",
        "manifest.json",
        "spec.yaml",
        "weights.safetensors",
    ]
    back = load_case(path)
    assert back.spec == tiny_case.spec and back.points == tiny_case.points
    for k, v in tiny_case.weights.items():
        assert np.array_equal(back.weights[k], v)
    for k, v in tiny_case.expected.items():
        assert np.array_equal(back.expected[k], v)
    # Any safetensors reader sees the same tensors, images under "images", the output under "output".
    from safetensors.numpy import load_file

    data = load_file(path / "data.safetensors")
    assert np.array_equal(data["images"], tiny_case.images)
    assert np.array_equal(data["output"], tiny_case.expected["output"])
    weights, spec = vitspec.load_weights(path / "weights.safetensors")
    assert spec == tiny_case.spec and list(weights) == list(tiny_case.weights)


def test_a_changed_file_fails_its_checksum(tmp_path: Path) -> None:
    path = tmp_path / "case"
    shutil.copytree(CASES_DIR / "family_mnist", path)
    data = bytearray((path / "data.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "data.safetensors").write_bytes(bytes(data))
    with pytest.raises(CaseError, match=r"data\.safetensors does not match its checksum"):
        load_case(path)


def test_case_folder_problems_are_named(tmp_path: Path, tiny_case) -> None:
    with pytest.raises(CaseError, match="no such case folder"):
        load_case(tmp_path / "nope")
    path = write_case(tiny_case, tmp_path / "c")
    (path / "weights.safetensors").unlink()
    with pytest.raises(CaseError, match="weights.safetensors is missing"):
        load_case(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format"] = "something/9"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CaseError, match=r"expected format 'vitspec.conformance.case/1', found 'something/9'"
    ):
        load_case(path)


def test_a_thin_corpus_is_refused(tmp_path: Path) -> None:
    for name in ("family_mnist", "nan_pixel"):
        shutil.copytree(CASES_DIR / name, tmp_path / name)
    with pytest.raises(CaseError, match="holds 2 case"):
        shipped_cases(tmp_path)


# ---- tolerances ---------------------------------------------------------------------------------


def test_tolerance_file_states_a_reason_for_every_class() -> None:
    tols = load_tolerances()
    assert {"float64", "float32", "float16", "bfloat16"} <= set(tols.classes)
    for t in tols.classes.values():
        assert t.reason and t.atol > 0
    assert (
        tols.classes["float64"].atol < tols.classes["float32"].atol < tols.classes["float16"].atol
    )


def test_pairwise_tolerance_is_the_coarser_class_times_the_factor() -> None:
    tols = load_tolerances()
    pair = tols.pairwise("float64", "float32")
    assert pair.atol == pytest.approx(tols.pairwise_factor * tols.classes["float32"].atol)
    assert pair.rtol == pytest.approx(tols.pairwise_factor * tols.classes["float32"].rtol)


def test_a_case_may_tighten_but_not_silently_loosen() -> None:
    tols = load_tolerances()
    base = tols.classes["float32"]
    tight = tols.for_case(
        "c", {"float32": {"atol": base.atol / 10, "rtol": base.rtol, "reason": "tiny model"}}
    )
    assert tight.classes["float32"].atol == base.atol / 10 and not tight.classes["float32"].loosened
    assert tight.classes["float32"].source == "case c"
    loose = {"float32": {"atol": base.atol * 10, "rtol": base.rtol, "reason": "why not"}}
    with pytest.raises(
        ToleranceError, match=r"case 'c': tolerance float32 is looser than .*atol 0.0001 > 1e-05"
    ):
        tols.for_case("c", loose)
    loose["float32"]["loosens"] = True
    allowed = tols.for_case("c", loose)
    assert allowed.classes["float32"].loosened and allowed.loosened_by
    with pytest.raises(ToleranceError, match="missing reason"):
        tols.for_case("c", {"float32": {"atol": 1e-6, "rtol": 1e-6}})
    with pytest.raises(ToleranceError, match="unknown dtype class"):
        tols.for_case("c", {"float8": {"atol": 1, "rtol": 1, "reason": "x"}})


def test_a_loosening_case_is_flagged_in_every_report(cases) -> None:
    report = run_suite([NumpyBackend()], [cases["sharp_attention"]], expectations=[])
    (result,) = report.results
    assert result.passed and result.loosened and "float32" in result.loosened
    assert report.notes and "sharp_attention" in report.notes[0]
    assert rep.cell(result).endswith("*")
    assert json.loads(rep.to_json(report))["results"][0]["loosened"]
    assert "loosened tolerance: case sharp_attention" in rep.to_markdown(report)


def test_bad_tolerance_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    data = json.loads(load_tolerances().path and Path(load_tolerances().path).read_text())
    data["classes"]["float32"]["atol"] = -1
    path.write_text(json.dumps(data))
    with pytest.raises(
        ToleranceError, match=r"float32: atol must be a finite number >= 0, found -1"
    ):
        load_tolerances(path)
    path.write_text("{}")
    with pytest.raises(ToleranceError, match="expected format"):
        load_tolerances(path)


# ---- the checker --------------------------------------------------------------------------------


def test_compare_reports_the_exact_error_and_where() -> None:
    rng = np.random.default_rng(0)
    expected = rng.standard_normal((2, 3, 4))
    got = expected.astype(np.float32).astype(np.float64)
    got[1, 2, 3] += 0.5
    got[0, 1, 2] = expected[0, 1, 2] * (1 + 3e-3)
    check = compare("x", got.astype(np.float32), expected, F32)
    assert not check.passed
    assert check.max_abs_index == (1, 2, 3)
    assert check.max_abs == pytest.approx(
        abs(np.float32(got[1, 2, 3]) - expected[1, 2, 3]), rel=1e-6
    )
    assert check.worst_index == (1, 2, 3)
    assert "2 of 24 element(s) outside tolerance; worst at [1, 2, 3]" in check.problems[0]
    # Relative error counts where the relative term dominates: |expected| >= atol / rtol = 1.
    rel = np.where(
        np.abs(expected) >= 1.0, np.abs(got.astype(np.float32) - expected) / np.abs(expected), 0.0
    )
    assert check.max_rel == pytest.approx(rel.max(), rel=1e-9)
    assert check.max_rel_index == tuple(np.unravel_index(np.argmax(rel), rel.shape))


def test_relative_error_ignores_values_below_atol_over_rtol() -> None:
    expected = np.array([1e-9, 2.0, 0.5])
    got = np.array([2e-9, 2.0 + 2e-6, 0.5 + 4e-6], np.float32)
    check = compare("x", got, expected, F32)
    assert check.passed  # 1e-9 off a near-zero value: within atol
    assert check.max_rel_index == (
        1,
    )  # not 100% at index 0, and 0.5 < atol / rtol is judged by atol


def test_compare_shape_dtype_missing_and_nonfinite() -> None:
    e = np.zeros((2, 3))
    assert compare("x", np.zeros((3, 2), np.float32), e, F32).problems == [
        "shape: expected (2, 3), found (3, 2)"
    ]
    assert compare("x", np.zeros((2, 3), np.int32), e, F32).problems == [
        "dtype: expected a float array, found int32"
    ]
    missing = compare("x", None, e, F32)
    assert missing.status == "missing" and not missing.passed
    e2 = np.array([[1.0, np.nan, np.inf], [0.0, 1.0, -np.inf]])
    same = compare("x", e2.astype(np.float32), e2, F32)
    assert same.passed and same.nonfinite_mismatches == 0
    g2 = e2.copy()
    g2[1, 0], g2[0, 2] = np.nan, -np.inf
    bad = compare("x", g2.astype(np.float32), e2, F32)
    assert bad.nonfinite_mismatches == 2 and bad.first_nonfinite_mismatch == (0, 2)
    assert bad.problems[0].startswith(
        "NaN/Inf positions differ at 2 element(s); first at [0, 2]: expected inf, found -inf"
    )


def test_argmax_disagreement_and_near_ties() -> None:
    e = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 2.0 - 1e-6]])
    g = e.copy()
    g[0] = [1.2, 1.0, 0.5]  # a real disagreement (also out of tolerance)
    g[1] = [2.0 - 1e-6, 0.0, 2.0]  # a near-tie: not counted
    check = compare("output", g.astype(np.float32), e, F32, argmax=True)
    assert check.argmax.disagree == [(0, 1, 0)]
    assert check.argmax.ties == [(1, 0, 2)]
    assert any(
        "argmax differs for 1 of 2 image(s); first: image 0 expected class 1, found class 0" in p
        for p in check.problems
    )


def test_pairwise_compare_is_symmetric() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 5)).astype(np.float32)
    b = (a * (1 + 4e-5)).astype(np.float32)
    tol = load_tolerances().pairwise("float32", "float32")
    ab, ba = compare("x", a, b, tol, symmetric=True), compare("x", b, a, tol, symmetric=True)
    assert ab.passed == ba.passed
    assert ab.worst_ratio == pytest.approx(ba.worst_ratio)


def test_first_divergent_point_is_the_earliest_in_forward_order(tiny_case) -> None:
    out = {k: v.astype(np.float32) for k, v in tiny_case.expected.items()}
    out["blocks.1.mlp"] = out["blocks.1.mlp"] + np.float32(0.01)
    out["output"] = out["output"] + np.float32(0.01)
    result = check_outputs("fake", out, tiny_case, load_tolerances())
    assert result.first_divergent == "blocks.1.mlp"
    assert [p.name for p in result.points if not p.passed] == ["blocks.1.mlp", "output"]
    assert "first divergent capture point blocks.1.mlp" in result.summary()


def test_first_divergent_point_can_be_the_first_capture_point(tiny_case) -> None:
    out = {k: v.astype(np.float32) for k, v in tiny_case.expected.items()}
    out["patch_embed"] = out["patch_embed"] + np.float32(0.01)
    out["blocks.0.attn"] = out["blocks.0.attn"] + np.float32(0.01)
    result = check_outputs("fake", out, tiny_case, load_tolerances())
    assert result.points[0].name == "patch_embed"
    assert result.first_divergent == "patch_embed"
    assert [p.name for p in result.points if not p.passed] == ["patch_embed", "blocks.0.attn"]
    assert "first divergent capture point patch_embed" in result.summary()


def test_unknown_outputs_and_unknown_dtypes_fail(tiny_case) -> None:
    out = {k: v.astype(np.float32) for k, v in tiny_case.expected.items()}
    out["blocks.0.norm1"] = out["embed"]
    result = check_outputs("fake", out, tiny_case, load_tolerances())
    assert not result.passed and "unknown capture point(s) blocks.0.norm1" in result.problems[0]
    out = {k: v.astype(np.longdouble) for k, v in tiny_case.expected.items()}
    result = check_outputs("fake", out, tiny_case, load_tolerances())
    assert result.first_divergent == "patch_embed"
    assert "dtype: no tolerance for" in result.points[0].problems[0]


def test_a_backend_that_raises_is_an_error_not_a_crash(tiny_case) -> None:
    class Raises(NumpyBackend):
        name = "raises"

        def forward(self, model, images, capture=()):
            raise RuntimeError("kernel not implemented")

    out, error, _ = run_backend(Raises(), tiny_case)
    assert out is None and error.startswith("RuntimeError: kernel not implemented (at ")
    report = run_suite([Raises(), NumpyBackend()], [tiny_case], expectations=[])
    assert [r.status for r in report.results] == ["error", "pass", "error"]
    assert not report.ok


def test_the_returned_dtype_picks_the_tolerance_class(tiny_case) -> None:
    tols = load_tolerances()
    for dtype in (np.float64, np.float32, np.float16):
        b = NumpyBackend(dtype)
        out, error, _ = run_backend(b, tiny_case)
        result = check_outputs(str(np.dtype(dtype)), out, tiny_case, tols, error=error)
        assert result.passed, rep.point_table(result)
        assert {p.tolerance.dtype_class for p in result.points} == {np.dtype(dtype).name}
    # float32 numbers are far outside the float64 class: the class is not a formality.
    out, _, _ = run_backend(NumpyBackend(np.float32), tiny_case)
    as64 = {k: v.astype(np.float64) for k, v in out.items()}
    assert not check_outputs("float32-as-64", as64, tiny_case, tols).passed


def test_pairwise_check_names_the_backends(tiny_case) -> None:
    tols = load_tolerances()
    a, _, _ = run_backend(NumpyBackend(np.float32), tiny_case)
    b = {k: v.copy() for k, v in a.items()}
    b["embed"] = b["embed"] * np.float32(1.001)
    result = check_pair(tiny_case, "a", a, "b", b, tols)
    assert result.label == "a~b" and result.first_divergent == "embed"
    assert result.points[0].tolerance.atol == pytest.approx(
        tols.pairwise_factor * tols.classes["float32"].atol
    )


# ---- expectations -------------------------------------------------------------------------------


def _failing(case) -> vitspec.conformance.CaseCheck:
    out = {k: v.astype(np.float32) for k, v in case.expected.items()}
    out["embed"] = out["embed"] + np.float32(1)
    return check_outputs("mine", out, case, load_tolerances())


def test_known_failures_become_xfail_and_stale_entries_warn(tiny_case) -> None:
    passing = check_outputs(
        "mine",
        {k: v.astype(np.float32) for k, v in tiny_case.expected.items()},
        tiny_case,
        load_tolerances(),
    )
    failing = _failing(tiny_case)
    failing.case = "other"
    exps = [
        Expectation(
            "mine", "other", "no erf on this chip", first_divergent="embed", source="mine.json"
        ),
        Expectation("mine", "tiny", "fixed long ago", source="mine.json"),
        Expectation("mine", "no_such_case", "typo", source="mine.json"),
    ]
    warnings = apply_expectations([passing, failing], exps)
    assert failing.status == "xfail" and failing.expected_failure == "no erf on this chip"
    assert passing.status == "pass"
    assert warnings == [
        "expectation mine on tiny (mine.json) no longer matches: the check passes now; update or remove the entry",
        "expectation mine on no_such_case (mine.json) names no known case; remove or fix the entry",
    ]


def test_a_known_failure_at_another_point_stays_a_failure(tiny_case) -> None:
    failing = _failing(tiny_case)
    warnings = apply_expectations(
        [failing], [Expectation("mine", "tiny", "r", first_divergent="output", source="m.json")]
    )
    assert failing.status == "fail"
    assert (
        "expected to fail at output (m.json) but the first divergent point is embed"
        in failing.problems
    )
    assert "fails differently" in warnings[0]


def test_expectations_files_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    path.write_text(
        json.dumps(
            {
                "format": "vitspec.conformance.expectations/1",
                "backend": "x",
                "known_failures": [{"case": "a"}],
            }
        )
    )
    with pytest.raises(ExpectationsError, match=r"known_failures\[0\]: needs a 'reason'"):
        load_expectations(path)
    path.write_text(
        json.dumps(
            {
                "format": "vitspec.conformance.expectations/1",
                "backend": "x",
                "known_failures": [{"case": "a", "reason": "r", "against": "y"}],
            }
        )
    )
    assert load_expectations(path) == [Expectation("x", "a", "r", "y", None, "e.json")]


def test_shipped_expectations_files_load() -> None:
    from vitspec.conformance.suite import EXPECTATIONS_DIR

    files = sorted(EXPECTATIONS_DIR.glob("*.json"))
    assert [f.stem for f in files] == ["jax", "numpy", "tensorflow", "torch"]
    for f in files:
        for e in load_expectations(f):
            assert e.backend == f.stem and e.reason


# ---- reports ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_report(cases):
    from vitspec.conformance import broken

    picked = [cases["family_vit_paper"], cases["nan_pixel"]]
    return run_suite([NumpyBackend(), broken.tanh_gelu(NumpyBackend())], picked, expectations=[])


def test_json_report(mixed_report) -> None:
    data = json.loads(rep.to_json(mixed_report))
    assert data["format"] == "vitspec.conformance.report/1" and data["ok"] is False
    assert data["summary"] == {
        "checks": 6,
        "pass": 2,
        "fail": 4,
        "error": 0,
        "xfail": 0,
        "unsupported": 0,
        "backends_not_loaded": 0,
    }
    bad = [
        r
        for r in data["results"]
        if r["backend"] == "numpy+tanh_gelu" and r["against"] == "reference"
    ]
    assert [r["first_divergent"] for r in bad] == ["blocks.0.mlp", "blocks.0.mlp"]
    point = bad[0]["points"][5]
    assert (
        point["name"] == "blocks.0.mlp"
        and point["status"] == "fail"
        and len(point["max_abs_index"]) == 3
    )
    assert point["tolerance"]["class"] == "float32" and point["tolerance"]["reason"]


def test_junit_report(mixed_report) -> None:
    root = ET.fromstring(rep.to_junit(mixed_report))
    assert root.get("tests") == "6" and root.get("failures") == "4"
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert set(suites) == {"numpy", "numpy+tanh_gelu", "numpy~numpy+tanh_gelu"}
    failure = suites["numpy+tanh_gelu"].find("testcase/failure")
    assert "first divergent capture point blocks.0.mlp" in failure.get("message")
    assert "<< first divergence" in failure.text
    props = {p.get("name"): p.get("value") for p in suites["numpy"].iter("property")}
    assert props["numpy.version"] == np.__version__


def test_markdown_matrix(mixed_report) -> None:
    md = rep.to_markdown(mixed_report)
    assert "**❌ does not conform**" in md
    assert "| case | numpy | numpy+tanh_gelu |" in md
    assert "| family_vit_paper | ok " in md and "FAIL blocks.0.mlp |" in md
    assert "| `blocks.0.mlp` | ✅ " in md and "⬅ first" in md
    assert "| case | numpy~numpy+tanh_gelu |" in md


def test_text_report(mixed_report) -> None:
    text = rep.text_report(mixed_report)
    assert text.splitlines()[-1].startswith(
        "DOES NOT CONFORM: 6 checks, 2 passed, 4 failed, 0 errors"
    )
    assert (
        "numpy+tanh_gelu vs the reference on family_vit_paper: FAIL: first divergent capture point blocks.0.mlp"
        in text
    )
    table = next(
        line
        for line in text.splitlines()
        if line.startswith("blocks.0.mlp ") and "first divergence" in line
    )
    assert " fail " in table


def test_docs_list_every_case_and_the_tolerances() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "conformance.md").read_text()
    for case in CORPUS:
        assert (
            f"| `{case.name}` | {case.description} | {case.spec.depth} | {case.spec.n_heads} | {case.batch} |"
            in page
        ), case.name
    for name, t in load_tolerances().classes.items():
        assert f"| {name} | {t.atol:g} | {t.rtol:g} |" in page, name
    assert f"{len(CORPUS)} cases" in page


def test_two_cases_with_one_name_are_refused(tiny_case) -> None:
    with pytest.raises(CaseError, match="two cases are named 'tiny'"):
        run_suite([NumpyBackend()], [tiny_case, tiny_case], expectations=[])
