"""The suite tested on deliberately broken backends: each must fail, at the right capture point.

The right point is what the defect touches first (``BrokenBackend.first_touched``), worked out
from the architecture, not from the checker.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from conftest import BACKENDS

import vitspec
from vitspec.backends.numpy import NumpyBackend
from vitspec.conformance import broken
from vitspec.conformance import report as rep
from vitspec.conformance.case import shipped_cases
from vitspec.conformance.suite import run_suite


@pytest.fixture(scope="module")
def cases() -> list:
    return shipped_cases()


DEFECTS = {
    "swap_query_key": broken.swap_query_key,
    "transpose_patch_kernel": broken.transpose_patch_kernel,
    "norm_eps_1e-3": lambda b: broken.norm_eps(b, 1e-3),
    "tanh_gelu": broken.tanh_gelu,
    "scale_block_last": broken.scale_block,
    "scale_block_0": lambda b: broken.scale_block(b, block=0),
}
# Defects of one feature each (issue 10): they touch only the cases that have the feature.
FEATURE_DEFECTS = {
    "skip_layer_scale": broken.skip_layer_scale,
    "pool_registers": broken.pool_registers,
    "quick_gelu_as_exact": broken.quick_gelu_as_exact,
    "ignore_map_probe": broken.ignore_map_probe,
    "drop_distillation_head": broken.drop_distillation_head,
}
# The point each feature defect must be caught at, worked out by hand from the forward order
# (docs/layout.md), and cases that must show it there.
FEATURE_POINTS = {
    "skip_layer_scale": ("blocks.0.attn", ["layer_scale", "like_deit3", "like_dinov2_reg"]),
    "pool_registers": ("pooled", ["registers_without_positions", "pool_avgmax_register"]),
    "quick_gelu_as_exact": ("blocks.0.mlp", ["quick_gelu", "like_clip_quickgelu"]),
    "ignore_map_probe": ("pool.attn_probs", ["pool_map", "like_siglip"]),
    "drop_distillation_head": (
        "output",
        ["distillation_token", "distillation_token_no_head", "like_deit_distilled"],
    ),
}


@pytest.mark.parametrize("defect", [*DEFECTS, *FEATURE_DEFECTS])
def test_each_defect_fails_at_the_point_it_touches_first(cases, defect: str) -> None:
    bad = {**DEFECTS, **FEATURE_DEFECTS}[defect](NumpyBackend())
    report = run_suite([bad], cases, expectations=[])
    assert not report.ok
    wrong = []
    for result, case in zip(report.results, cases, strict=True):
        want = bad.first_touched(case.spec)
        got = result.first_divergent if not result.passed else None
        if got != want or (want is None and not result.passed):
            wrong.append(f"{case.name}: expected {want}, reported {got} ({result.status})")
    assert wrong == []
    failed = [r for r in report.results if not r.passed]
    if defect in DEFECTS:
        # Left alone: a spec that already has what the defect does (tanh GELU; SwiGLU has none).
        assert len(failed) >= 0.9 * len(cases), "a defect should show on nearly every case"
    else:
        point, named = FEATURE_POINTS[defect]
        by_case = {r.case: r for r in report.results}
        for name in named:
            assert by_case[name].first_divergent == point, name
        # Every case with the feature fails; the rest, which lack it, pass.
        assert len(failed) >= len(named) and len(failed) < len(cases) // 2
    # Every report format names the first divergent point.
    first = failed[0]
    data = json.loads(rep.to_json(report))
    assert data["results"][report.results.index(first)]["first_divergent"] == first.first_divergent
    junit = ET.fromstring(rep.to_junit(report))
    messages = [f.get("message") for f in junit.iter("failure")]
    assert f"first divergent capture point {first.first_divergent}:" in messages[0]
    assert f"FAIL {first.first_divergent}" in rep.text_report(report)
    assert f"FAIL {first.first_divergent}" in rep.to_markdown(report)


def test_a_dropped_distillation_head_keeps_the_captures_asked_for(cases) -> None:
    case = next(c for c in cases if c.name == "distillation_token")
    bad = broken.drop_distillation_head(NumpyBackend())
    model = bad.build(case.spec, case.weights)
    out = bad.forward(model, case.images, capture=["pooled"])
    assert sorted(out) == ["output", "pooled"]  # "head" was used, not returned
    full = NumpyBackend().forward(NumpyBackend().build(case.spec, case.weights), case.images, "all")
    np.testing.assert_array_equal(out["output"], full["head"])
    assert np.abs(full["output"] - full["head"]).max() > 1e-3


def test_pytorch_default_eps_shows_where_eps_matters(cases) -> None:
    bad = broken.norm_eps(NumpyBackend(), 1e-5)
    by_name = {c.name: c for c in cases}
    report = run_suite(
        [bad], [by_name["norm_eps_sensitive"], by_name["family_vit_paper"]], expectations=[]
    )
    sensitive, ordinary = report.results
    assert sensitive.first_divergent == "blocks.0.attn_probs"
    # On ordinary data 1e-5 vs 1e-6 is within float32 rounding at the first touched point; the
    # suite still fails the case, further down, where the difference has grown.
    assert not ordinary.passed
    assert not report.ok


def test_pairwise_check_fails_a_broken_backend_against_a_healthy_one(cases) -> None:
    healthy, bad = NumpyBackend(), broken.swap_query_key(NumpyBackend())
    report = run_suite([healthy, bad], cases[:4], expectations=[])
    pairs = [r for r in report.results if r.against != "reference"]
    assert len(pairs) == 4
    for r in pairs:
        assert r.label == "numpy~numpy+swap_query_key"
        assert r.first_divergent == "blocks.0.attn_probs"


@pytest.mark.parametrize("name", BACKENDS)
def test_wrappers_break_every_backend_alike(cases, name: str) -> None:
    backend = vitspec.backend(name)
    picked = [c for c in cases if c.name == "heads7_mlp_ratio_1"]
    report = run_suite(
        [backend, broken.transpose_patch_kernel(backend), broken.tanh_gelu(backend)],
        picked,
        expectations=[],
    )
    by = {(r.label, r.case): r for r in report.results}
    for case in picked:
        assert by[(name, case.name)].passed, rep.point_table(by[(name, case.name)])
        assert by[(f"{name}+transpose_patch_kernel", case.name)].first_divergent == "patch_embed"
        assert by[(f"{name}+tanh_gelu", case.name)].first_divergent == "blocks.0.mlp"
        assert by[(f"{name}~{name}+tanh_gelu", case.name)].first_divergent == "blocks.0.mlp"
