"""docs/backends/torch.md's "timm arguments for a spec" snippet, run as written, against timm.

The snippet once mapped ``pos_embed: sincos2d`` to timm's ``pos_embed="none"``: strict loading
accepted it and the timm model silently had no position embedding. Run verbatim here on every
family it claims, it must give our torch model's outputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import vitspec
from vitspec.families import FAMILIES, family

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

PAGE = Path(__file__).resolve().parent.parent / "docs" / "backends" / "torch.md"


def _snippet() -> str:
    text = PAGE.read_text()
    after = text.split("The timm arguments for a spec:", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.DOTALL).group(1)


def _run_snippet(spec: vitspec.Spec, model: torch.nn.Module) -> torch.nn.Module:
    scope = {"spec": spec, "model": model}
    exec(compile(_snippet(), str(PAGE), "exec"), scope)
    return scope["timm_model"].eval()


SIZES = {"hidden_dim": 16, "n_heads": 2, "depth": 2}


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "vit_paper_pre_logits"])
def test_snippet_builds_the_same_model_in_timm(name: str) -> None:
    spec = family(name, **SIZES)
    model = vitspec.backend("torch").build(
        spec, vitspec.init_weights(spec, seed=3, scheme="random")
    )
    timm_model = _run_snippet(spec, model)
    if (
        spec.pos_embed != "none"
    ):  # the bug: a sincos spec built a timm model without any position embedding
        assert timm_model.pos_embed is not None and tuple(timm_model.pos_embed.shape) == (
            1,
            spec.n_positions or spec.n_patches,
            spec.hidden_dim,
        )
    x = torch.from_numpy(
        np.random.default_rng(0)
        .standard_normal((2, spec.in_channels, *spec.image_size))
        .astype(np.float32)
    )
    with torch.inference_mode():
        ours, theirs = model.eval()(x).numpy(), timm_model(x).numpy()
    assert ours.shape == theirs.shape == (2, spec.output_dim)
    assert float(np.abs(ours - theirs).max()) <= 1e-5 * max(1.0, float(np.abs(ours).max()))


@pytest.mark.parametrize(
    "name", ["dinov2_reg", "clip", "siglip", "deit_distilled", "aimv2", "qk_norm", "mlp_norm"]
)
def test_snippet_builds_the_variants_in_timm(name: str) -> None:
    from test_backend_torch import VARIANTS

    spec = VARIANTS[name]
    model = vitspec.backend("torch").build(
        spec, vitspec.init_weights(spec, seed=3, scheme="random")
    )
    timm_model = _run_snippet(spec, model)  # loads with strict=True
    x = torch.from_numpy(
        np.random.default_rng(0)
        .standard_normal((2, spec.in_channels, *spec.image_size))
        .astype(np.float32)
    )
    with torch.inference_mode():
        ours, theirs = model.eval()(x).numpy(), timm_model(x).numpy()
    assert ours.shape == theirs.shape == (2, spec.output_dim)
    assert float(np.abs(ours - theirs).max()) <= 1e-5 * max(1.0, float(np.abs(ours).max()))


def test_snippet_refuses_what_timm_cannot_express() -> None:
    spec = family("vit_paper_pre_logits", **SIZES)
    model = vitspec.backend("torch").build(spec)
    with pytest.raises(ValueError, match="no pre-logits layer"):
        _run_snippet(spec, model)


def test_the_sincos_table_is_the_one_ours_computes() -> None:
    spec = family("big_vision_sincos", **SIZES, image_size=[32, 16])
    model = vitspec.backend("torch").build(spec)
    timm_model = _run_snippet(spec, model)
    table = vitspec.reference.sincos2d(spec.grid, spec.hidden_dim)
    assert table.shape == (spec.n_patches, spec.hidden_dim)
    np.testing.assert_array_equal(
        timm_model.pos_embed.detach().numpy()[0], table.astype(np.float32)
    )
    np.testing.assert_array_equal(model.pos_embed.numpy()[0], table.astype(np.float32))
