"""The named presets are timm's architectures: the same parameter count as timm's own model (built
on the meta device: no weights, no download), and the switches a count cannot see (norm kind and
eps, activation, layer-scale init, pooling, where the final norm sits) read off that model."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from test_cli import run

from vitspec.cli._ui import human
from vitspec.layout import param_table
from vitspec.presets import NAMED, TIMM_NAMES, is_preset_name, preset, preset_names
from vitspec.spec import Spec, load_yaml

DOCS = Path(__file__).resolve().parent.parent / "docs"
NAMES = list(NAMED)


def _timm_model(name: str, **kwargs: Any) -> Any:
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.needs("timm", "torch")
@pytest.mark.parametrize("short", NAMES)
def test_parameter_count_equals_timms(short: str) -> None:
    spec, name = preset(short), NAMED[short].timm
    model = _timm_model(name)
    # The preset records timm's default head (its default pretrained config's num_classes).
    assert model.num_classes == spec.n_classes
    assert _count(model) == spec.n_params == sum(math.prod(p.shape) for p in param_table(spec))
    # Another head size on both sides: the head (and DeiT's distillation head) follow n_classes.
    assert _count(_timm_model(name, num_classes=10)) == preset(short, n_classes=10).n_params


def _norms(model: Any) -> list[Any]:
    from timm.layers import RmsNorm
    from torch import nn

    return [m for m in model.modules() if isinstance(m, (nn.LayerNorm, RmsNorm))]


def _activation(spec: Spec) -> tuple[str, str | None]:
    """timm's block MLP activation class name (and GELU's ``approximate``) the spec stands for."""
    if spec.mlp == "swiglu":
        return "SiLU", None
    return {"exact": ("GELU", "none"), "tanh": ("GELU", "tanh"), "quick": ("QuickGELU", None)}[
        spec.gelu
    ]


@pytest.mark.needs("timm", "torch")
@pytest.mark.parametrize("short", NAMES)
def test_switches_a_count_cannot_see_match_timms_model(short: str) -> None:
    from timm.layers import RmsNorm
    from torch import nn

    spec, model = preset(short), _timm_model(NAMED[short].timm)
    assert tuple(model.patch_embed.img_size) == spec.image_size
    assert tuple(model.patch_embed.patch_size) == spec.patch_size
    assert model.embed_dim == spec.hidden_dim and len(model.blocks) == spec.depth
    assert model.blocks[0].attn.num_heads == spec.n_heads
    assert model.num_prefix_tokens == spec.n_prefix_tokens
    assert model.num_reg_tokens == spec.reg_tokens
    assert model.no_embed_class == (spec.n_prefix_tokens > 0 and not spec.pos_embed_class_slot)
    assert model.dynamic_img_size == spec.dynamic_image_size
    assert hasattr(model, "head_dist") == spec.distillation_token
    # Norms: one kind and one eps everywhere (blocks, final, pre/patch norm, the MAP pool's).
    kinds = {"rms" if isinstance(m, RmsNorm) else "layer" for m in _norms(model)}
    assert kinds == {spec.norm}
    assert {m.eps for m in _norms(model)} == {spec.norm_eps}
    assert (not isinstance(model.norm_pre, nn.Identity)) == spec.pre_norm
    assert (not isinstance(model.patch_embed.norm, nn.Identity)) == spec.patch_norm
    # Pooling and the final norm: timm's fc_norm is our final_norm 'after_pool'.
    assert model.global_pool == spec.pooling
    assert (not isinstance(model.fc_norm, nn.Identity)) == (spec.final_norm == "after_pool")
    assert (not isinstance(model.norm, nn.Identity)) == (spec.final_norm == "before_pool")
    # Layer scale and its init value (timm's LayerScale keeps init_values).
    ls1 = model.blocks[0].ls1
    assert getattr(ls1, "init_values", None) == spec.layer_scale
    act = model.blocks[0].mlp.act
    name, approximate = _activation(spec)
    assert type(act).__name__ == name and getattr(act, "approximate", None) == approximate
    # Biases: timm names qkv/proj/fc2; the head's is checked only when there is a head.
    attn = model.blocks[0].attn
    assert (attn.qkv.bias is not None) == spec.qkv_bias
    assert (attn.proj.bias is not None) == spec.proj_bias
    assert (model.blocks[0].mlp.fc2.bias is not None) == spec.mlp_bias
    assert (model.patch_embed.proj.bias is not None) == spec.patch_bias
    if spec.n_classes:
        assert (model.head.bias is not None) == spec.head_bias


def test_named_presets_answer_to_timms_names_and_an_image_size() -> None:
    for short, named in NAMED.items():
        assert TIMM_NAMES[named.timm] == short
        assert is_preset_name(short) and is_preset_name(named.timm) and short in preset_names()
        assert preset(named.timm) == preset(short)
    assert preset("dinov2-B/14").image_size == (518, 518)
    assert preset("dinov2-B/14@224").image_size == (224, 224)
    assert preset("vit_base_patch14_dinov2@224") == preset("dinov2-B/14@224")
    assert not is_preset_name("dinov2-B/15") and not is_preset_name("vit_base_patch16_224")


def test_spec_page_lists_every_named_preset_with_its_count() -> None:
    page = (DOCS / "spec.md").read_text()
    section = page[page.index("## Modern families") :]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| ([^|]+) \| ([\d,]+) \|", section, re.M)
    assert [(short, timm, count) for short, timm, _, count in rows] == [
        (short, named.timm, f"{preset(short).n_params:,}") for short, named in NAMED.items()
    ]
    # Each `field: value` the page names as setting a family apart is the preset's value.
    for short, _, apart, _ in rows:
        spec = preset(short).to_dict()
        pairs = re.findall(r"`(\w+): ([^`]+)`", apart)
        assert pairs, short
        for name, value in pairs:
            assert spec[name] == load_yaml(value), (short, name)


def test_presets_command_shows_each_family_beside_timms_name() -> None:
    res = run("presets")
    assert res.returncode == 0, res.stderr
    for short, named in NAMED.items():
        line = next(line for line in res.stdout.splitlines() if f" {short} " in line)
        assert named.timm in line and human(preset(short).n_params) in line


def test_layout_command_lists_only_the_specs_capture_points() -> None:
    out = run("layout", "siglip-B/16").stdout
    assert "pool.attn_probs" in out and "embed_norm " not in out and "pooled_dist" not in out
    out = run("layout", "vit_base_patch16_clip_224").stdout
    assert "embed_norm " in out and "pool.attn_probs" not in out
