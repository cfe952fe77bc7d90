"""Fresh random cases (`--random N --seed S`) and the versioned corpus (`--corpus-version`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vitspec.cli.main import cli
from vitspec.conformance.case import (
    CASES_DIR,
    CaseError,
    check_corpus_version,
    corpus_fingerprint,
    load_case,
    make_case,
    shipped_case_dirs,
    shipped_cases,
    write_case,
)
from vitspec.conformance.corpus import FINGERPRINT, VERSION
from vitspec.conformance.random_specs import (
    MAX_NORM_CONDITION,
    norm_condition,
    norm_inputs,
    random_case,
    random_cases,
    random_image_size,
    random_spec,
)
from vitspec.families import family
from vitspec.reference import forward
from vitspec.spec import Spec

# ---- random specs -------------------------------------------------------------------------------


def test_random_specs_reach_every_value_of_every_field() -> None:
    rng = np.random.default_rng(0)
    specs = [random_spec(rng) for _ in range(300)]
    seen: dict[str, set] = {name: set() for name in Spec.model_fields}
    for s in specs:
        for name in Spec.model_fields:
            seen[name].add(repr(getattr(s, name)))
    for name, field in Spec.model_fields.items():
        choices = [a for a in typing.get_args(field.annotation) if isinstance(a, str)]
        if choices:  # a Literal: every value
            assert seen[name] == {repr(c) for c in choices}, name
        elif field.annotation in (bool, "bool") or "bool" in str(field.annotation):
            assert {"True", "False"} <= seen[name], name
        else:
            assert len(seen[name]) >= 2, f"{name} takes one value only: {seen[name]}"
    assert any(s.n_classes == 0 for s in specs) and any(s.pre_logits_dim for s in specs)
    assert any(s.image_size[0] != s.image_size[1] for s in specs) and any(
        s.dropout > 0 for s in specs
    )
    # Issue 10's fields, in the combinations where they change the numbers.
    assert any(s.distillation_token and s.n_classes for s in specs)
    assert any(s.distillation_token and not s.n_classes for s in specs)
    assert any(s.reg_tokens and s.pos_embed_class_slot for s in specs)
    assert any(
        s.reg_tokens and s.pos_embed == "learned" and not s.pos_embed_class_slot for s in specs
    )
    for pooling in ("avg", "max", "avgmax"):
        assert any(s.pooling == pooling and s.pool_include_prefix for s in specs), pooling
        assert any(
            s.pooling == pooling and s.reg_tokens and not s.pool_include_prefix for s in specs
        )
    assert any(s.pooling == "map" and s.n_prefix_tokens for s in specs)
    assert any(s.dynamic_image_size and s.pos_embed == "learned" for s in specs)
    assert {s.pos_embed_resample for s in specs if s.dynamic_image_size} == {
        "bicubic-antialias",
        "bicubic",
    }
    assert any(s.mlp == "swiglu" and s.mlp_norm for s in specs)
    assert any(s.mlp == "standard" and s.gelu == "quick" for s in specs)
    assert any(s.norm == "rms" and s.qk_norm for s in specs)
    assert any(s.norm == "layer" and s.qk_norm for s in specs)
    assert len({s.layer_scale for s in specs}) >= 4


def test_random_specs_stay_small() -> None:
    dynamic = 0
    for case in random_cases(40, seed=1):
        assert case.spec.n_params < 50_000 and case.batch <= 3
        assert max(case.spec.image_size) <= 12 and case.spec.depth <= 3
        assert max(case.image_size) <= 12
        if case.spec.dynamic_image_size:  # images on another grid than the spec's
            dynamic += 1
            assert case.image_size != case.spec.image_size
            assert case.expected["patch_embed"].shape[1] == (
                case.image_size[0] // case.spec.patch_size[0]
            ) * (case.image_size[1] // case.spec.patch_size[1])
        else:
            assert case.image_size == case.spec.image_size
    assert dynamic >= 5


def test_a_random_case_depends_on_seed_and_index_only() -> None:
    a, b = random_cases(3, seed=9), random_cases(5, seed=9)
    assert [c.name for c in a] == ["random-9-0", "random-9-1", "random-9-2"]
    for x, y in zip(a, b[:3], strict=True):
        assert x.spec == y.spec and np.array_equal(x.images, y.images)
        assert all(np.array_equal(x.weights[k], y.weights[k]) for k in x.weights)
    assert random_case(10, 0).spec != a[0].spec
    case = a[1]
    assert case.manifest["inputs"]["random"].items() >= {"seed": 9, "index": 1}.items()
    ref = forward(case.spec, case.weights, case.images, dtype=np.float64, capture="all")
    assert all(np.array_equal(ref[k], v, equal_nan=True) for k, v in case.expected.items())


def _float32_error(case) -> float:
    """The float32 reference's worst error at any capture point, as a share of the float32 tolerance."""
    out = forward(case.spec, case.weights, case.images, dtype=np.float32, capture="all")
    return max(
        float(np.max(np.abs(out[p] - want) / (1e-5 + 1e-5 * np.abs(want))))
        for p, want in case.expected.items()
    )


def test_an_ill_conditioned_draw_is_drawn_again() -> None:
    # random-37-3's first draw feeds block 0's MLP norm (a LayerNorm on the hidden layer) a token
    # whose values are 347 times their spread: the float32 reference itself misses the float32
    # tolerance there. The draw is replaced by one that is well conditioned.
    rng = np.random.default_rng([37, 3])
    spec = random_spec(rng)
    batch = int(rng.integers(1, 4))
    size = random_image_size(rng, spec)
    first = make_case(
        spec, name="first", batch=batch, seed=int(rng.integers(0, 2**31 - 1)), image_size=size
    )
    assert spec.mlp_norm and spec.norm == "layer"
    worst = max(norm_inputs(first), key=lambda named: _condition(spec, named[1]))
    assert worst[0] == "blocks.0.mlp.norm" and norm_condition(first) > 300
    assert _float32_error(first) > 1
    kept = random_case(37, 3)
    assert kept.spec == spec and kept.manifest["inputs"]["random"]["draw"] >= 1
    assert norm_condition(kept) <= MAX_NORM_CONDITION and _float32_error(kept) < 0.5


def _condition(spec: Spec, x: np.ndarray) -> float:
    centred = x - x.mean(axis=-1, keepdims=True) if spec.norm == "layer" else x
    spread = np.sqrt(np.square(centred).mean(axis=-1) + spec.norm_eps)
    return float((np.abs(x).max(axis=-1) / spread).max())


def test_norm_inputs_are_every_norms_input() -> None:
    # Each named input, normalised by the reference's norm with its own weights, gives the value
    # the reference computes next: checked where the next value is a capture point.
    from vitspec import reference

    spec = Spec.from_dict(
        {
            "image_size": 8,
            "patch_size": 4,
            "hidden_dim": 16,
            "n_heads": 2,
            "depth": 2,
            "n_classes": 3,
            "patch_norm": True,
            "pre_norm": True,
            "qk_norm": True,
            "mlp_norm": True,
            "pooling": "map",
            "class_token": False,
            "final_norm": "after_pool",
        }
    )
    case = make_case(spec, name="all norms", seed=5)
    named = dict(norm_inputs(case))
    assert list(named) == [
        "patch_norm",
        "norm_pre",
        *(
            f"blocks.{i}.{n}"
            for i in range(2)
            for n in ("norm1", "attn.q_norm", "attn.k_norm", "norm2", "mlp.norm")
        ),
        "pool.norm",
        "norm",
    ]
    w = case.weights
    np.testing.assert_allclose(
        reference.norm(spec, w, "patch_norm", named["patch_norm"]), case.expected["patch_embed"]
    )
    np.testing.assert_allclose(
        reference.norm(spec, w, "norm_pre", named["norm_pre"]), case.expected["embed_norm"]
    )
    np.testing.assert_allclose(
        reference.norm(spec, w, "norm", named["norm"]), case.expected["pooled"]
    )
    np.testing.assert_allclose(named["blocks.1.norm1"], case.expected["blocks.0"])
    # q/k norm inputs are per head: the scores from their norms are the captured probabilities.
    q = reference.norm(spec, w, "blocks.0.attn.q_norm", named["blocks.0.attn.q_norm"])
    k = reference.norm(spec, w, "blocks.0.attn.k_norm", named["blocks.0.attn.k_norm"])
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(spec.head_dim)
    np.testing.assert_allclose(reference.softmax(scores), case.expected["blocks.0.attn_probs"])
    # The MLP norm's input, normed and projected, is the MLP branch.
    hidden = reference.norm(spec, w, "blocks.1.mlp.norm", named["blocks.1.mlp.norm"])
    np.testing.assert_allclose(
        reference.dense(w, "blocks.1.mlp.fc2", hidden), case.expected["blocks.1.mlp"]
    )
    np.testing.assert_allclose(named["pool.norm"], case.expected["pool.attn"])


def test_random_cases_are_well_conditioned_for_float32() -> None:
    cases = random_cases(25, 7)
    assert all(norm_condition(c) <= MAX_NORM_CONDITION for c in cases)
    assert [c.manifest["inputs"]["random"]["draw"] >= 1 for c in cases].count(True) >= 1
    for case in cases:
        out = forward(case.spec, case.weights, case.images, dtype=np.float32, capture="all")
        for point, want in case.expected.items():
            assert np.abs(out[point] - want).max() <= 0.5 * (1e-5 + 1e-5 * np.abs(want).max()), (
                point
            )


def test_a_random_case_writes_as_a_case_folder(tmp_path: Path) -> None:
    case = random_case(3, 4)
    back = load_case(write_case(case, tmp_path / case.name))
    assert back.spec == case.spec and back.name == "random-3-4" and back.corpus_version is None


def test_cli_random_runs_only_random_cases_unless_targets_are_given(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "conformance",
            "-b",
            "numpy",
            "--random",
            "4",
            "--seed",
            "12",
            "--report",
            str(tmp_path / "r.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert [c["name"] for c in data["cases"]] == [f"random-12-{i}" for i in range(4)]
    assert data["random"] == {"n": 4, "seed": 12} and data["summary"]["pass"] == 4
    assert "4 case(s), 4 random (--random 4 --seed 12)" in res.output
    res = runner.invoke(
        cli,
        [
            "conformance",
            "-b",
            "numpy",
            "family_mnist",
            "--random",
            "2",
            "--seed",
            "12",
            "--report",
            str(tmp_path / "r.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert [c["name"] for c in json.loads((tmp_path / "r.json").read_text())["cases"]] == [
        "family_mnist",
        "random-12-0",
        "random-12-1",
    ]


def test_plugin_takes_the_same_random_options(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "vitspec.conformance",
            "--vitspec-backend",
            "numpy",
            "--vitspec-random",
            "3",
            "--vitspec-seed",
            "12",
            "--junitxml",
            str(tmp_path / "j.xml"),
            "--vitspec-report",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout
    assert "3 passed, 0 failed" in res.stdout and "3 random (--random 3 --seed 12)" in res.stdout
    assert "backend numpy " in res.stdout
    tests = [tc.get("name") for tc in ET.parse(tmp_path / "j.xml").getroot().iter("testcase")]
    assert tests == [f"test_conformance[numpy-random-12-{i}]" for i in range(3)]
    props = {
        p.get("name"): p.get("value")
        for p in ET.parse(tmp_path / "j.xml").getroot().iter("property")
    }
    assert (
        props["numpy.version"] == np.__version__
        and props["numpy.target"] == "vitspec.backends.numpy:NumpyBackend"
    )
    assert props["vitspec.corpus_version"] == "-"  # random cases belong to no corpus
    assert json.loads((tmp_path / "r.json").read_text())["random"] == {"n": 3, "seed": 12}


# ---- the corpus version -------------------------------------------------------------------------


def test_every_shipped_manifest_carries_the_corpus_version() -> None:
    versions = {
        json.loads((d / "manifest.json").read_text())["corpus_version"] for d in shipped_case_dirs()
    }
    assert versions == {VERSION}


def test_the_corpus_is_the_one_its_version_names() -> None:
    found = corpus_fingerprint(shipped_cases())
    assert found == FINGERPRINT, (
        f"the corpus changed (fingerprint {found}): bump VERSION in conformance/corpus.py, set FINGERPRINT to it, "
        "regenerate (python -m vitspec.conformance.generate) and say what changed (docs/conformance.md, corpus versions)"
    )


def test_the_fingerprint_sees_what_changes_a_verdict() -> None:
    cases = shipped_cases()[:3]
    base = corpus_fingerprint(cases)
    moved = [
        *cases[:2],
        make_case(
            cases[2].spec,
            cases[2].weights,
            cases[2].images,
            name=cases[2].name,
            tolerance={"float32": {"atol": 1e-6, "rtol": 1e-6, "reason": "tighter"}},
        ),
    ]
    assert corpus_fingerprint(moved) != base
    fewer = cases[:2]
    assert corpus_fingerprint(fewer) != base
    reworded = [
        *cases[:2],
        make_case(
            cases[2].spec,
            cases[2].weights,
            cases[2].images,
            name=cases[2].name,
            description="another description",
            tolerance=cases[2].tolerance_entries,
        ),
    ]
    assert corpus_fingerprint(reworded) == base


def test_pinning_another_version_is_a_one_line_error() -> None:
    cases = [load_case(CASES_DIR / "family_mnist")]
    check_corpus_version(VERSION, cases)
    check_corpus_version(None, cases)
    with pytest.raises(
        CaseError,
        match=rf"^corpus version: expected {VERSION + 1} \(--corpus-version\), found {VERSION}: ",
    ) as err:
        check_corpus_version(VERSION + 1, cases)
    assert "\n" not in str(err.value)
    # Cases from no corpus: the pin is held against the corpus this vitspec ships.
    with pytest.raises(CaseError, match=f"this vitspec .* ships corpus version {VERSION}"):
        check_corpus_version(VERSION + 1, random_cases(1, 0))
    check_corpus_version(VERSION, random_cases(1, 0))


def test_cases_of_two_corpus_versions_do_not_mix() -> None:
    spec = family("mnist", hidden_dim=8, n_heads=2, depth=1)
    old = make_case(spec, name="old", corpus_version=VERSION + 1)
    with pytest.raises(
        CaseError,
        match=rf"cases from corpus versions {VERSION} \(family_mnist\), {VERSION + 1} \(old\) in one run",
    ):
        check_corpus_version(None, [load_case(CASES_DIR / "family_mnist"), old])


def test_a_bad_corpus_version_in_a_manifest_is_named(tmp_path: Path) -> None:
    path = write_case(random_case(0, 0), tmp_path / "c")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["corpus_version"] = "one"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CaseError, match="'corpus_version' must be a positive integer, found 'one'"):
        load_case(path)


def test_reports_carry_the_corpus_version(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "conformance",
            "-b",
            "numpy",
            "family_mnist",
            "--corpus-version",
            str(VERSION),
            "--report",
            str(tmp_path / "r.json"),
            "--junit",
            str(tmp_path / "r.xml"),
            "--markdown",
            str(tmp_path / "r.md"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert f"1 case(s) (corpus version {VERSION})" in res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["corpus_version"] == VERSION and data["cases"][0]["corpus_version"] == VERSION
    props = {
        p.get("name"): p.get("value")
        for p in ET.parse(tmp_path / "r.xml").getroot().iter("property")
    }
    assert props["vitspec.corpus_version"] == str(VERSION)
    assert f"; corpus version {VERSION};" in (tmp_path / "r.md").read_text()


def test_docs_quote_the_real_pin_error() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "conformance.md").read_text()
    quoted = next(line for line in page.splitlines() if line.startswith("error: corpus version:"))
    with pytest.raises(CaseError) as err:
        check_corpus_version(1, [load_case(CASES_DIR / "family_mnist")])
    assert VERSION == 2 and quoted == f"error: {err.value}"
