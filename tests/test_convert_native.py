"""The torch, keras and flax formats against the frameworks' own loaders and savers.

A file vitspec writes loads into the native model with the framework's own API (not vitspec's
adapter), and a file the framework saves converts to the same canonical weights, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import vitspec
from vitspec import formats
from vitspec.families import family

SPECS = {
    "pre_logits": family("vit_paper_pre_logits"),
    "fc_norm_no_qkv_bias": family("timm_avg_fc_norm", qkv_bias=False, n_classes=0),
}
# The flax format holds every variant: the NNX model's own state, each of these families.
FLAX_SPECS = {
    **SPECS,
    "dinov2_reg": family("timm_token", reg_tokens=4, layer_scale=1e-5),
    "clip": family("timm_token", gelu="quick", pre_norm=True, patch_bias=False, head_bias=False),
    "siglip_map": family("timm_token", pooling="map", class_token=False, gelu="tanh"),
    "deit_distilled": family("timm_token", distillation_token=True),
    "aimv2": family(
        "timm_token",
        norm="rms",
        mlp="swiglu",
        patch_norm=True,
        qkv_bias=False,
        proj_bias=False,
        mlp_bias=False,
        class_token=False,
        pooling="avg",
    ),
    "qk_norm_mlp_norm_max": family(
        "timm_token", qk_norm=True, mlp_norm=True, pooling="max", final_norm="none"
    ),
}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def _canonical(tmp_path: Path, spec: vitspec.Spec) -> tuple[Path, dict[str, np.ndarray]]:
    weights = vitspec.init_weights(spec, seed=2, scheme="random")
    path = tmp_path / "c.safetensors"
    vitspec.save_weights(path, weights, spec)
    return path, weights


@pytest.mark.parametrize("name", list(SPECS))
def test_torch_format_is_the_models_state_dict(tmp_path: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    spec = SPECS[name]
    canonical, weights = _canonical(tmp_path, spec)
    backend = vitspec.backend("torch")
    out = tmp_path / "torch.safetensors"
    formats.convert(canonical, out, to_format="torch")
    model = backend.build(spec)
    model.load_state_dict(load_file(out), strict=True)
    _same(backend.export(model), weights)

    saved = tmp_path / "saved.safetensors"
    save_file(model.state_dict(), saved)
    back = tmp_path / "back.safetensors"
    formats.convert(saved, back, from_format="torch", spec=spec)
    _same(vitspec.load_weights(back)[0], weights)


@pytest.mark.parametrize("name", list(SPECS))
def test_keras_format_is_what_save_weights_writes(tmp_path: Path, name: str) -> None:
    spec = SPECS[name]
    canonical, weights = _canonical(tmp_path, spec)
    backend = vitspec.backend("tensorflow")
    out = tmp_path / "model.weights.h5"
    formats.convert(canonical, out)
    model = backend.build(spec)
    model.load_weights(str(out))
    _same(backend.export(model), weights)

    saved = tmp_path / "saved.weights.h5"
    model.save_weights(str(saved))
    assert formats.detect(saved) == "keras"
    back = tmp_path / "back.safetensors"
    formats.convert(saved, back, spec=spec)
    _same(vitspec.load_weights(back)[0], weights)


# Every variant of issue 10 the Keras model has a layer for, in two models (the keras format
# expresses every one of them).
KERAS_VARIANTS = {
    "dinov2_reg_deit_clip": vitspec.Spec(
        image_size=16,
        patch_size=4,
        hidden_dim=16,
        n_heads=2,
        depth=2,
        n_classes=5,
        reg_tokens=2,
        distillation_token=True,
        layer_scale=1e-5,
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
    "aimv2_siglip": vitspec.Spec(
        image_size=16,
        patch_size=4,
        hidden_dim=16,
        n_heads=2,
        depth=2,
        n_classes=0,
        class_token=False,
        pooling="map",
        norm="rms",
        qkv_bias=False,
        proj_bias=False,
        mlp_bias=False,
        pre_logits_dim=8,
        final_norm="none",
    ),
}


@pytest.mark.parametrize("name", list(KERAS_VARIANTS))
def test_keras_format_holds_every_variant(tmp_path: Path, name: str) -> None:
    spec = KERAS_VARIANTS[name]
    canonical, weights = _canonical(tmp_path, spec)
    backend = vitspec.backend("tensorflow")
    out = tmp_path / "model.weights.h5"
    formats.convert(canonical, out)
    model = backend.build(spec, seed=None)
    model.load_weights(str(out))
    _same(backend.export(model), weights)
    back = tmp_path / "back.safetensors"
    formats.convert(out, back)  # our file carries the spec
    got, got_spec = vitspec.load_weights(back)
    assert got_spec == spec
    _same(got, weights)

    # A file Keras saves has no spec: the tensors tell the switches, --spec the rest.
    saved = tmp_path / "saved.weights.h5"
    model.save_weights(str(saved))
    assert formats.detect(saved) == "keras"
    told = {"image_size", "n_heads", "gelu", "layer_scale", "final_norm", "pooling"}
    told |= {"dynamic_image_size", "pos_embed_resample", "patch_norm", "pre_norm"}
    given = {k: v for k, v in spec.to_dict().items() if k in told}
    with formats.open_checkpoint(saved, spec=given) as ckpt:
        assert ckpt.spec == spec
        known = ckpt.inference.known
        for field in ("reg_tokens", "distillation_token", "norm", "mlp", "qk_norm", "mlp_bias"):
            assert known[field] == getattr(spec, field), field
    again = tmp_path / "again.safetensors"
    formats.convert(saved, again, spec=given)
    _same(vitspec.load_weights(again)[0], weights)


@pytest.mark.parametrize("name", list(FLAX_SPECS))
def test_flax_format_is_the_flattened_nnx_state(tmp_path: Path, name: str) -> None:
    from flax import nnx
    from safetensors.numpy import load_file, save_file

    from vitspec.containers import read_safetensors

    spec = FLAX_SPECS[name]
    canonical, weights = _canonical(tmp_path, spec)
    backend = vitspec.backend("jax")
    out = tmp_path / "flax.safetensors"
    formats.convert(canonical, out, to_format="flax")
    model = backend.build(spec)
    # The snippet docs/convert.md gives Flax users.
    flat = {
        tuple(int(p) if p.isdigit() else p for p in k.split(".")): v
        for k, v in load_file(out).items()
    }
    nnx.update(model, nnx.from_flat_state(flat))
    _same(backend.export(model), weights)

    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    tensors = {".".join(map(str, path)): np.asarray(var.get_value()) for path, var in state}
    saved = tmp_path / "saved.safetensors"
    if name in SPECS:
        # A file Flax saved, without vitspec's metadata: the spec is inferred from the names.
        save_file(tensors, saved)
    else:
        # Spec inference from bare names knows the class token only (vitspec.formats.infer, a
        # later issue): the variants travel with the spec in the metadata, as vitspec writes them.
        save_file(tensors, saved, metadata=read_safetensors(out)[1])
    back = tmp_path / "back.safetensors"
    formats.convert(saved, back, from_format="flax", spec=spec)
    _same(vitspec.load_weights(back)[0], weights)
