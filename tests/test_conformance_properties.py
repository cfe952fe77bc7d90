"""Property-based tests: random valid specs agree everywhere; random invalid specs fail validation.

Every backend in conftest.BACKENDS is checked against the float64 reference by the conformance
checker, at every capture point, on specs, weights and images hypothesis draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import BACKENDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitspec
from vitspec.conformance.case import make_case
from vitspec.conformance.check import check_outputs, run_backend
from vitspec.conformance.report import point_table
from vitspec.conformance.tolerances import load_tolerances
from vitspec.errors import SpecError
from vitspec.spec import Spec

# numpy is quick; the frameworks compile each new spec, so they get fewer examples.
EXAMPLES = {"numpy": 40, "torch": 12, "tensorflow": 5, "jax": 5}


@st.composite
def spec_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Small valid specs that reach every field."""
    ph, pw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    gh, gw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    heads = draw(st.integers(1, 4))
    pos_embed = draw(st.sampled_from(["learned", "sincos2d", "none"]))
    head_dim = draw(st.sampled_from([2, 4]))
    class_token = draw(st.booleans())
    data: dict[str, Any] = {
        "image_size": [gh * ph, gw * pw],
        "patch_size": [ph, pw],
        "hidden_dim": heads * head_dim,
        "n_heads": heads,
        "depth": draw(st.integers(1, 2)),
        "mlp_ratio": draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, 4.0])),
        "in_channels": draw(st.integers(1, 3)),
        "n_classes": draw(st.integers(0, 5)),
        "class_token": class_token,
        "pooling": draw(st.sampled_from(["token", "avg"])) if class_token else "avg",
        "pos_embed": pos_embed,
        "qkv_bias": draw(st.booleans()),
        "norm_eps": draw(st.sampled_from([1e-12, 1e-6, 1e-5, 1e-3])),
        "gelu": draw(st.sampled_from(["exact", "tanh"])),
        "final_norm": draw(st.sampled_from(["before_pool", "after_pool"])),
        "pre_logits_dim": draw(st.sampled_from([0, 3])),
    }
    if pos_embed == "sincos2d" and (data["hidden_dim"] % 4 or data["hidden_dim"] < 8):
        data["hidden_dim"] = heads * 8  # sincos2d needs a width divisible by 4 and at least 8
    if class_token and pos_embed == "learned":
        data["pos_embed_class_slot"] = draw(st.booleans())
    return data


@pytest.mark.parametrize("name", BACKENDS)
def test_random_specs_agree_with_the_reference(name: str) -> None:
    backend = vitspec.backend(name)
    tolerances = load_tolerances()

    @settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(data=spec_dicts(), seed=st.integers(0, 2**16), batch=st.integers(1, 3))
    def check(data: dict[str, Any], seed: int, batch: int) -> None:
        case = make_case(Spec.from_dict(data), name="random", batch=batch, seed=seed)
        out, error, _ = run_backend(backend, case)
        result = check_outputs(name, out, case, tolerances, error=error)
        assert result.passed, f"{data}\n{point_table(result)}"
        assert [p.name for p in result.points] == vitspec.capture_points(case.spec)

    check()


def _corruptions() -> st.SearchStrategy[tuple[str, Any, str]]:
    """(field, bad value or a function of the valid spec giving one, words the error must contain)."""
    return st.sampled_from(
        [
            ("n_heads", lambda d: d["hidden_dim"] + 1, "not divisible by n_heads"),
            ("patch_size", lambda d: d["image_size"][0] + 1, "not divisible by patch_size"),
            ("patch_size", [4, 4, 4], "patch_size must be"),
            ("depth", 0, "depth must be greater than 0"),
            ("depth", -3, "depth must be greater than 0"),
            ("depth", 1.5, "depth must be an integer"),
            ("n_heads", "4", "n_heads must be an integer"),
            ("image_size", None, "image_size must be"),
            ("in_channels", True, "in_channels must be an integer"),
            ("mlp_ratio", lambda d: 1 / (2 * d["hidden_dim"]), "whole number"),
            ("mlp_ratio", float("nan"), "mlp_ratio must be a finite number"),
            ("norm_eps", 0.0, "norm_eps must be greater than 0"),
            ("norm_eps", float("inf"), "norm_eps"),
            ("dropout", 1.0, "dropout must be less than 1"),
            ("pooling", "max", "pooling must be one of"),
            ("pos_embed", "rope", "pos_embed must be one of"),
            ("gelu", "relu", "gelu must be one of"),
            ("class_token", "yes", "class_token must be true or false"),
            ("qkv_bias", 1, "qkv_bias must be true or false"),
            ("n_classes", -1, "n_classes must be at least 0"),
            ("hiden_dim", 32, "unknown field 'hiden_dim'"),
        ]
    )


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("specs")


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=spec_dicts(),
    bad=_corruptions(),
    combo=st.sampled_from(["one", "token_without_class", "sincos_width", "slot_without_learned"]),
)
def test_random_invalid_specs_fail_validation(
    spec_dir: Path, data: dict[str, Any], bad: tuple[str, Any, str], combo: str
) -> None:
    field, value, words = bad
    if combo == "token_without_class":
        data = {**data, "class_token": False, "pooling": "token"}
        field, value, words = "pooling", "token", "pooling 'token' needs class_token true"
    elif combo == "sincos_width":
        data = {**data, "pos_embed": "sincos2d", "n_heads": 1}
        field, value, words = "hidden_dim", 6, "sincos2d' needs hidden_dim divisible by 4"
    elif combo == "slot_without_learned":
        data = {**data, "pos_embed": "none"}
        field, value, words = "pos_embed_class_slot", True, "pos_embed_class_slot true needs"
    data = {
        k: v
        for k, v in data.items()
        if k != "pos_embed_class_slot" or field == "pos_embed_class_slot"
    }
    data[field] = value(data) if callable(value) else value
    with pytest.raises(SpecError) as info:
        Spec.from_dict(data)
    assert words in str(info.value)
    # The same through a YAML file, as `vitspec conformance SPEC` reads it: a SpecError, never a
    # framework's exception (no backend is reached).
    path = spec_dir / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    from vitspec.cli.conformance import _cases

    with pytest.raises(SpecError) as again:
        _cases((str(path),), None, 1, 0)
    assert words in str(again.value)
