"""Statuses apart from pass and fail: unsupported (the backend's ``supports``), known failures that
match only what they describe, and cases left out of their pairs. In-process, on the NumPy backend.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vitspec.backends.numpy import NumpyBackend
from vitspec.conformance import broken
from vitspec.conformance import report as rep
from vitspec.conformance.case import make_case
from vitspec.conformance.check import CaseCheck, check_backend
from vitspec.conformance.suite import (
    Expectation,
    ExpectationsError,
    apply_expectations,
    load_expectations,
    run_suite,
)
from vitspec.conformance.tolerances import load_tolerances
from vitspec.families import family
from vitspec.spec import Spec

NO_PRE_LOGITS = "no pre-logits layer"


class Declines(NumpyBackend):
    """The reference, but it declines specs with a pre-logits layer."""

    name = "declines"

    def supports(self, spec: Spec) -> str | None:
        return NO_PRE_LOGITS if spec.pre_logits_dim else None


class Raises(NumpyBackend):
    """The reference, but ``build`` raises on specs with a pre-logits layer (what authors did before supports)."""

    name = "raises"

    def build(self, spec: Spec, weights: Any = None, seed: int = 0) -> Any:
        if spec.pre_logits_dim:
            raise NotImplementedError("pre-logits layer")
        return super().build(spec, weights, seed)


class Answers(NumpyBackend):
    name = "answers"

    def __init__(self, answer: Any) -> None:
        super().__init__()
        self.answer = answer

    def supports(self, spec: Spec) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture(scope="module")
def cases() -> list:
    sizes = {"hidden_dim": 16, "n_heads": 2, "depth": 1, "image_size": 16, "patch_size": 8}
    return [
        make_case(family("vit_paper", **sizes), name="plain", seed=1),
        make_case(
            family("vit_paper_pre_logits", **sizes, pre_logits_dim=6), name="pre_logits", seed=2
        ),
    ]


# ---- unsupported --------------------------------------------------------------------------------


def test_unsupported_is_its_own_status_and_never_a_pass(cases) -> None:
    report = run_suite([Declines()], cases, expectations=[])
    by = {r.case: r for r in report.results}
    assert by["plain"].status == "pass"
    assert (
        by["pre_logits"].status == "unsupported" and by["pre_logits"].unsupported == NO_PRE_LOGITS
    )
    assert not by["pre_logits"].passed and by["pre_logits"].points == []
    assert report.counts == {
        "checks": 2,
        "pass": 1,
        "fail": 0,
        "error": 0,
        "xfail": 0,
        "unsupported": 1,
        "backends_not_loaded": 0,
    }
    assert report.ok
    assert (
        by["pre_logits"].summary()
        == f"declines vs the reference on pre_logits: UNSUPPORTED: {NO_PRE_LOGITS}"
    )


def test_a_run_where_everything_is_unsupported_does_not_conform(cases) -> None:
    report = run_suite([Declines()], cases[1:], expectations=[])
    assert report.counts["unsupported"] == 1 and report.counts["pass"] == 0
    assert not report.ok
    assert rep.counts_line(report).startswith(
        "DOES NOT CONFORM: 1 checks, 0 passed, 0 failed, 0 errors, 1 unsupported (not passes)"
    )


@pytest.mark.parametrize("answer", [None, True])
def test_none_or_true_means_supported(cases, answer: Any) -> None:
    result, out = check_backend("answers", Answers(answer), cases[0], load_tolerances())
    assert result.status == "pass" and out is not None


@pytest.mark.parametrize(
    ("answer", "found"), [(False, "False"), ("", "''"), (3, "3"), (ValueError("boom"), None)]
)
def test_a_bad_supports_hook_is_an_error_naming_what_was_expected(
    cases, answer: Any, found: str | None
) -> None:
    result, out = check_backend("answers", Answers(answer), cases[0], load_tolerances())
    assert result.status == "error" and out is None
    if found is None:
        assert (
            result.error.startswith("supports() failed: ValueError: boom")
            and result.error_type == "ValueError"
        )
    else:
        assert (
            f"answers.supports(spec) returned {found}; expected None or True (supported) or a non-empty reason string"
            in result.error
        )


def test_broken_wrappers_keep_the_inner_backends_supports(cases) -> None:
    bad = broken.tanh_gelu(Declines())
    report = run_suite([bad], cases, expectations=[])
    assert [r.status for r in report.results] == ["fail", "unsupported"]


def test_every_report_counts_unsupported(cases) -> None:
    report = run_suite([Declines(), NumpyBackend()], cases, expectations=[])
    text = rep.text_report(report)
    assert f"  declines on pre_logits: {NO_PRE_LOGITS}" in text
    assert "1 unsupported (not passes)" in text.splitlines()[-1]
    data = json.loads(rep.to_json(report))
    assert data["summary"]["unsupported"] == 1
    assert [r["status"] for r in data["results"] if r["case"] == "pre_logits"] == [
        "unsupported",
        "pass",
    ]
    root = ET.fromstring(rep.to_junit(report))
    suite = next(s for s in root.iter("testsuite") if s.get("name") == "declines")
    skipped = suite.find("testcase[@name='pre_logits']/skipped")
    assert (
        skipped.get("type") == "unsupported"
        and skipped.get("message") == f"unsupported: {NO_PRE_LOGITS}"
    )
    assert suite.get("skipped") == "1" and suite.get("failures") == "0"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["vitspec.unsupported"] == "1" and props["declines.version"] == np.__version__
    md = rep.to_markdown(report)
    assert (
        "| pre_logits | unsupported | ok " in md
        and f"- unsupported: declines on pre_logits: {NO_PRE_LOGITS}" in md
    )
    assert "1 unsupported (not passes)" in md


def test_unsupported_case_is_left_out_of_its_pairs_said_once(cases) -> None:
    report = run_suite([Declines(), NumpyBackend()], cases, expectations=[])
    pairs = [r for r in report.results if r.against != "reference"]
    assert [(r.case, r.status) for r in pairs] == [("plain", "pass")]
    assert report.left_out == {("declines", "pre_logits"): f"unsupported: {NO_PRE_LOGITS}"}
    text = rep.text_report(report)
    assert text.count("pre_logits: declines left out of its pairs") == 1
    assert "nothing to compare" not in text and report.ok
    header, rows = rep.matrix(report, pairwise=True)
    assert header == ["case", "declines~numpy"] and rows == [
        ["plain", rows[0][1]],
        ["pre_logits", "left out"],
    ]
    assert json.loads(rep.to_json(report))["left_out_of_pairs"] == [
        {"backend": "declines", "case": "pre_logits", "reason": f"unsupported: {NO_PRE_LOGITS}"}
    ]


# ---- expectations match only what they describe ------------------------------------------------


def test_a_numeric_entry_never_covers_a_raise(cases) -> None:
    entry = Expectation(
        "raises", "pre_logits", "not yet", first_divergent="output", source="r.json"
    )
    report = run_suite([Raises()], cases, expectations=[entry])
    result = next(r for r in report.results if r.case == "pre_logits")
    assert result.status == "error" and result.error_type == "NotImplementedError"
    assert (
        "listed as a numeric divergence (r.json) but the check raised NotImplementedError; "
        'an entry for an exception names its type: "raises": "NotImplementedError"'
    ) in result.problems
    assert not report.ok
    # Also without first_divergent: a bare numeric entry is no blanket.
    bare = Expectation("raises", "pre_logits", "not yet", source="r.json")
    assert not run_suite([Raises()], cases, expectations=[bare]).ok


def test_an_entry_for_an_exception_covers_that_type_only(cases) -> None:
    right = Expectation(
        "raises", "pre_logits", "no pre-logits yet", source="r.json", raises="NotImplementedError"
    )
    report = run_suite([Raises()], cases, expectations=[right])
    assert (
        [r.status for r in report.results] == ["pass", "xfail"]
        and report.ok
        and report.warnings == []
    )
    wrong = Expectation(
        "raises", "pre_logits", "no pre-logits yet", source="r.json", raises="ValueError"
    )
    report = run_suite([Raises()], cases, expectations=[wrong])
    result = report.results[1]
    assert (
        result.status == "error"
        and "expected to raise ValueError (r.json) but raised NotImplementedError"
        in result.problems
    )
    assert any("fails differently" in w for w in report.warnings)


def test_an_entry_for_an_exception_does_not_cover_a_divergence(cases) -> None:
    entry = Expectation(
        "numpy+tanh_gelu", "plain", "r", source="r.json", raises="NotImplementedError"
    )
    report = run_suite([broken.tanh_gelu(NumpyBackend())], cases[:1], expectations=[entry])
    result = report.results[0]
    assert result.status == "fail"
    assert (
        "expected to raise NotImplementedError (r.json) but it ran and diverges at blocks.0.mlp"
        in result.problems
    )


def test_a_known_failure_against_the_reference_is_left_out_of_its_pairs(cases) -> None:
    entry = Expectation(
        "numpy+tanh_gelu",
        "plain",
        "tanh GELU on purpose",
        first_divergent="blocks.0.mlp",
        source="t.json",
    )
    report = run_suite(
        [broken.tanh_gelu(NumpyBackend()), NumpyBackend()], cases[:1], expectations=[entry]
    )
    assert [(r.label, r.status) for r in report.results] == [
        ("numpy+tanh_gelu", "xfail"),
        ("numpy", "pass"),
    ]
    assert report.left_out == {
        (
            "numpy+tanh_gelu",
            "plain",
        ): "a known failure against the reference (t.json: tanh GELU on purpose)"
    }
    assert report.ok


def test_an_entry_for_an_unsupported_case_warns(cases) -> None:
    entry = Expectation("declines", "pre_logits", "r", source="d.json")
    report = run_suite([Declines()], cases, expectations=[entry])
    assert report.results[1].status == "unsupported"
    assert report.warnings == [
        "expectation declines on pre_logits (d.json) lists a check the backend declares unsupported; remove the entry"
    ]


def test_expectations_file_rules_for_raises(tmp_path: Path) -> None:
    def load(entry: dict) -> list:
        path = tmp_path / "e.json"
        path.write_text(
            json.dumps(
                {
                    "format": "vitspec.conformance.expectations/1",
                    "backend": "x",
                    "known_failures": [entry],
                }
            )
        )
        return load_expectations(path)

    assert load({"case": "a", "reason": "r", "raises": "NotImplementedError"}) == [
        Expectation("x", "a", "r", "reference", None, "e.json", "NotImplementedError")
    ]
    with pytest.raises(
        ExpectationsError,
        match=r"known_failures\[0\]: an entry lists either a raise \('raises'\) or a numeric divergence",
    ):
        load({"case": "a", "reason": "r", "raises": "ValueError", "first_divergent": "embed"})
    with pytest.raises(ExpectationsError, match="'raises' must be an exception's class name"):
        load({"case": "a", "reason": "r", "raises": "not a name"})
    with pytest.raises(ExpectationsError, match="'raises' lists a failure against the reference"):
        load({"case": "a", "reason": "r", "raises": "ValueError", "against": "torch"})


def test_the_not_loaded_error_has_no_exception_type() -> None:
    assert CaseCheck("c", "b", error="backend not loaded: no module").error_type is None
    assert CaseCheck("c", "b", error="KeyError: 'x' (at f.py:3)").error_type == "KeyError"
    assert (
        apply_expectations(
            [CaseCheck("c", "b", error="backend not loaded: x")],
            [Expectation("b", "c", "r", raises="KeyError")],
        )
        != []
    )
