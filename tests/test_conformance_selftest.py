"""The suite tested on deliberately broken backends: each must fail, at the right capture point.

The right point is what the defect touches first (``BrokenBackend.first_touched``), worked out
from the architecture, not from the checker.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

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


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_fails_at_the_point_it_touches_first(cases, defect: str) -> None:
    bad = DEFECTS[defect](NumpyBackend())
    report = run_suite([bad], cases, expectations=[])
    assert not report.ok
    wrong = []
    for result, case in zip(report.results, cases, strict=True):
        want = bad.first_touched(case.spec)
        got = result.first_divergent if not result.passed else None
        if got != want:
            wrong.append(f"{case.name}: expected {want}, reported {got}")
    assert wrong == []
    failed = [r for r in report.results if not r.passed]
    assert len(failed) >= len(cases) - 3, "a defect should show on nearly every case"
    # Every report format names the first divergent point.
    first = failed[0]
    data = json.loads(rep.to_json(report))
    assert data["results"][report.results.index(first)]["first_divergent"] == first.first_divergent
    junit = ET.fromstring(rep.to_junit(report))
    messages = [f.get("message") for f in junit.iter("failure")]
    assert f"first divergent capture point {first.first_divergent}:" in messages[0]
    assert f"FAIL {first.first_divergent}" in rep.text_report(report)
    assert f"FAIL {first.first_divergent}" in rep.to_markdown(report)


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
