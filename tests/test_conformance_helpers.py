"""The helpers docs/backend-authors.md promises backend authors: there, with those signatures, doing that."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import vitspec
from vitspec.backends.numpy import NumpyBackend
from vitspec.conformance import check_backend, load_tolerances, random_cases, run_suite
from vitspec.families import family
from vitspec.formats import get_format

PAGE = Path(__file__).resolve().parent.parent / "docs" / "backend-authors.md"
SPEC = family("vit_paper", hidden_dim=16, n_heads=2, depth=1, image_size=[16, 8], patch_size=4)

# name -> the parameters the page's table calls it with (positional first, then keywords)
SIGNATURES = {
    vitspec.reference.check_images: ["spec", "images"],
    vitspec.layout.check_capture: ["spec", "capture"],
    vitspec.reference.sincos2d: ["grid", "width", "temperature"],
    vitspec.reference.forward: ["spec", "weights", "images", "dtype", "capture"],
    vitspec.check_weights: ["spec", "weights"],
    get_format("timm").to_native: ["spec", "weights"],
    get_format("timm").from_native: ["spec", "native"],
    get_format("timm").check_spec: ["spec"],
    run_suite: ["backends", "cases", "tolerances", "expectations", "pairwise", "progress"],
    random_cases: ["n", "seed"],
    check_backend: ["subject", "backend", "case", "tolerances"],
}


def test_every_documented_helper_has_its_signature() -> None:
    page = PAGE.read_text()
    for fn, params in SIGNATURES.items():
        found = list(inspect.signature(fn).parameters)
        assert [p for p in found if p in params] == params, (fn.__qualname__, found)
    for call in (
        "vitspec.reference.check_images(spec, images)",
        "vitspec.layout.check_capture(spec, capture)",
        "vitspec.reference.sincos2d(spec.grid, spec.hidden_dim)",
        "run_suite(backends, cases, pairwise=False",
        'get_format("timm")',
        "random_cases(n, seed)",
        "check_backend(name, backend, case, load_tolerances())",
    ):
        assert call in page, call


def test_image_and_capture_checks_name_what_is_expected() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape("images: expected shape (batch, 16, 8, 3) NHWC, found (2, 8, 16, 3)"),
    ):
        vitspec.reference.check_images(SPEC, np.zeros((2, 8, 16, 3), np.float32))
    assert vitspec.reference.check_images(SPEC, np.zeros((1, 16, 8, 3), np.float32)).shape == (
        1,
        16,
        8,
        3,
    )
    assert vitspec.layout.check_capture(SPEC, "all") == vitspec.capture_points(SPEC)
    with pytest.raises(ValueError, match="unknown capture point.*'blocks.5'.*blocks.0..0"):
        vitspec.layout.check_capture(SPEC, ["blocks.5"])


def test_sincos_table_is_big_visions() -> None:
    table = vitspec.reference.sincos2d((4, 2), 8)
    assert table.shape == (8, 8) and table.dtype == np.float64
    # Patch (row 1, col 0): x = 0 gives sin 0 / cos 1 in the first half; y = 1 gives sin(1), cos(1) at frequency 1.
    np.testing.assert_allclose(
        table[2], [0, 0, 1, 1, np.sin(1), np.sin(1e-4), np.cos(1), np.cos(1e-4)], atol=1e-12
    )


def test_timm_mapping_in_memory_round_trips() -> None:
    timm = get_format("timm")
    weights = vitspec.init_weights(SPEC, seed=1, scheme="random")
    state = dict(timm.to_native(SPEC, weights))
    assert state["blocks.0.attn.qkv.weight"].shape == (48, 16)
    np.testing.assert_array_equal(
        state["blocks.0.attn.qkv.weight"][:16], weights["blocks.0.attn.query.kernel"].T
    )
    back = dict(timm.from_native(SPEC, state))
    assert list(back) == list(weights) and all(np.array_equal(back[k], weights[k]) for k in weights)
    with pytest.raises(vitspec.SpecError, match="no pre-logits layer"):
        timm.check_spec(family("vit_paper_pre_logits"))


def test_run_suite_pairwise_false_compares_with_the_reference_only() -> None:
    cases = random_cases(2, seed=11)
    a, b = NumpyBackend(), NumpyBackend(np.float64)
    b.name = "numpy64"
    paired = run_suite([a, b], cases, expectations=[])
    alone = run_suite([a, b], cases, expectations=[], pairwise=False)
    assert [r.against for r in paired.results].count("numpy64") == 2
    assert [r.against for r in alone.results] == ["reference"] * 4 and alone.ok
    result, outputs = check_backend("numpy", a, cases[0], load_tolerances())
    assert result.status == "pass" and set(outputs) == set(vitspec.capture_points(cases[0].spec))
