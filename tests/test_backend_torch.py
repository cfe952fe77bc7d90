"""The PyTorch backend beyond the protocol: timm equivalence, the native model on its own
(state_dict, NCHW, torch.compile, torch.export, the .pt2 artifact), dropout and training, and the
framework-free layout functions. Protocol and numbers per family are in test_backend_contract.py.
"""

from __future__ import annotations

import functools
import io
import operator
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import rel_err

import vitspec
from vitspec import reference
from vitspec.errors import SpecError
from vitspec.families import FAMILIES, family
from vitspec.formats import convert, get_format, load
from vitspec.layout import capture_points, capture_shapes, param_table
from vitspec.layouts.timm import TORCH

torch = pytest.importorskip("torch")
tb = pytest.importorskip("vitspec.backends.torch")

TOL = 1e-5


@pytest.fixture(scope="module")
def backend() -> tb.TorchBackend:
    return vitspec.backend("torch")


def _images(spec: vitspec.Spec, batch: int, seed: int = 1) -> np.ndarray:
    return (
        np.random.default_rng(seed)
        .standard_normal((batch, *spec.image_size, spec.in_channels))
        .astype(np.float32)
    )


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _model(spec: vitspec.Spec, seed: int = 3) -> torch.nn.Module:
    return tb.VisionTransformer(spec, vitspec.init_weights(spec, seed=seed, scheme="random")).eval()


# ---- the layout functions ----------------------------------------------------------------------

_LAYOUT_SPECS = [
    *(family(n) for n in FAMILIES),
    vitspec.Spec(
        image_size=[8, 12],
        patch_size=[4, 2],
        hidden_dim=16,
        n_heads=1,
        depth=3,
        n_classes=0,
        in_channels=5,
        qkv_bias=False,
        pre_logits_dim=6,
        final_norm="after_pool",
        pooling="avg",
    ),
]


@pytest.mark.parametrize(
    "spec",
    _LAYOUT_SPECS,
    ids=lambda s: f"{s.pooling}-{s.pos_embed}-{s.final_norm}-{s.pre_logits_dim}",
)
def test_native_layout_is_the_state_dict(spec: vitspec.Spec) -> None:
    model = _model(spec)
    state = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == TORCH.native_layout(spec)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert sum(v.numel() for v in state.values()) == spec.n_params


def test_layout_names_follow_timm() -> None:
    spec = family("vit_paper", depth=1, pre_logits_dim=24)
    assert dict(TORCH.native_layout(spec)) == {
        "cls_token": (1, 1, 32),
        "pos_embed": (1, 17, 32),
        "patch_embed.proj.weight": (32, 3, 8, 8),
        "patch_embed.proj.bias": (32,),
        "blocks.0.norm1.weight": (32,),
        "blocks.0.norm1.bias": (32,),
        "blocks.0.attn.qkv.weight": (96, 32),
        "blocks.0.attn.qkv.bias": (96,),
        "blocks.0.attn.proj.weight": (32, 32),
        "blocks.0.attn.proj.bias": (32,),
        "blocks.0.norm2.weight": (32,),
        "blocks.0.norm2.bias": (32,),
        "blocks.0.mlp.fc1.weight": (128, 32),
        "blocks.0.mlp.fc1.bias": (128,),
        "blocks.0.mlp.fc2.weight": (32, 128),
        "blocks.0.mlp.fc2.bias": (32,),
        "norm.weight": (32,),
        "norm.bias": (32,),
        "pre_logits.fc.weight": (24, 32),
        "pre_logits.fc.bias": (24,),
        "head.weight": (10, 24),
        "head.bias": (10,),
    }
    no_bias = dict(TORCH.native_layout(family("timm_no_qkv_bias", depth=1)))
    assert "blocks.0.attn.qkv.bias" not in no_bias
    fc_norm = dict(TORCH.native_layout(family("timm_avg_fc_norm", depth=1)))
    assert "fc_norm.weight" in fc_norm and "norm.weight" not in fc_norm
    sincos = dict(TORCH.native_layout(family("big_vision_sincos", depth=1)))
    assert "pos_embed" not in sincos and "cls_token" not in sincos


def test_to_native_rearranges_exactly() -> None:
    spec = family("vit_paper", depth=1)
    w = vitspec.init_weights(spec, seed=2, scheme="random")
    native = dict(TORCH.to_native(spec, w))
    assert list(native) == [name for name, _ in TORCH.native_layout(spec)]
    d = spec.hidden_dim
    qkv = native["blocks.0.attn.qkv.weight"]
    assert np.array_equal(qkv[d : 2 * d], w["blocks.0.attn.key.kernel"].T)
    assert np.array_equal(native["blocks.0.attn.qkv.bias"][2 * d :], w["blocks.0.attn.value.bias"])
    # conv weight (out, in, kh, kw) against the HWIO kernel
    assert native["patch_embed.proj.weight"][5, 2, 1, 7] == w["patch_embed.kernel"][1, 7, 2, 5]
    assert np.array_equal(native["head.weight"], w["head.kernel"].T)
    back = dict(TORCH.from_native(spec, native))
    assert list(back) == [p.name for p in param_table(spec)]
    for name, value in w.items():
        assert back[name].dtype == value.dtype and np.array_equal(
            back[name].view(np.uint32), value.view(np.uint32)
        ), name


def test_layout_functions_do_not_import_torch() -> None:
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import vitspec
        from vitspec.backends import torch as tb  # noqa: F401
        from vitspec.layouts.timm import TORCH
        from vitspec.families import family
        spec = family("timm_avg_fc_norm", pre_logits_dim=8)
        w = vitspec.init_weights(spec, seed=1, scheme="random")
        native = dict(TORCH.to_native(spec, w))
        assert [(k, v.shape) for k, v in native.items()] == TORCH.native_layout(spec)
        back = dict(TORCH.from_native(spec, native))
        assert all(np.array_equal(back[k], w[k]) for k in w)
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---- timm ---------------------------------------------------------------------------------------


def _timm_supports(spec: vitspec.Spec) -> bool:
    """timm's VisionTransformer has no sincos position embedding and no pre-logits layer."""
    return spec.pos_embed != "sincos2d" and not spec.pre_logits_dim


def _timm_model(spec: vitspec.Spec) -> torch.nn.Module:
    """timm's VisionTransformer (VisionTransformerDistilled with a distillation token) with the
    switches that build ``spec`` (a spec the timm format accepts, up to head_bias)."""
    import timm.layers as tl
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    norm = functools.partial(
        tl.RmsNorm if spec.norm == "rms" else torch.nn.LayerNorm, eps=spec.norm_eps
    )
    if spec.mlp == "swiglu":  # timm's SwiGLU takes its gate activation from act_layer
        act, mlp = "silu", tl.SwiGLU
    else:
        act, mlp = {"exact": "gelu", "tanh": "gelu_tanh", "quick": tl.QuickGELU}[spec.gelu], tl.Mlp
    cls = VisionTransformerDistilled if spec.distillation_token else VisionTransformer
    return cls(
        img_size=spec.image_size,
        patch_size=spec.patch_size,
        in_chans=spec.in_channels,
        num_classes=spec.n_classes,
        global_pool=spec.pooling,
        embed_dim=spec.hidden_dim,
        depth=spec.depth,
        num_heads=spec.n_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=spec.qkv_bias,
        qk_norm=spec.qk_norm,
        proj_bias=spec.proj_bias,  # timm: also the MLP's biases
        scale_mlp_norm=spec.mlp_norm,
        init_values=spec.layer_scale,
        class_token=spec.class_token,
        reg_tokens=spec.reg_tokens,
        pos_embed="learn" if spec.pos_embed == "learned" else "none",
        no_embed_class=not spec.pos_embed_class_slot,
        pre_norm=spec.pre_norm,  # timm: also no patch bias
        final_norm=spec.final_norm != "none",
        fc_norm=spec.final_norm == "after_pool",
        # timm's MAP pools the patches only unless told; vitspec's attends over every token
        pool_include_prefix=spec.pool_include_prefix,
        dynamic_img_size=spec.dynamic_image_size,
        embed_norm_layer=norm if spec.patch_norm else None,
        norm_layer=norm,
        act_layer=act,
        mlp_layer=mlp,
    ).eval()


@pytest.mark.parametrize("name", [n for n in FAMILIES if _timm_supports(family(n))])
def test_state_dict_is_timms(name: str) -> None:
    pytest.importorskip("timm")
    spec = family(name)
    ours, theirs = _model(spec), _timm_model(spec)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }
    x = _nchw(_images(spec, 2))
    with torch.inference_mode():
        # timm's own (randomly initialised) weights run the same in our model ...
        ours.load_state_dict(theirs.state_dict(), strict=True)
        assert rel_err(ours(x).numpy(), theirs(x).numpy()) <= TOL
        # ... and ours in timm's.
        ours.load_state_dict(_model(spec, seed=4).state_dict())
        theirs.load_state_dict(ours.state_dict(), strict=True)
        assert rel_err(ours(x).numpy(), theirs(x).numpy()) <= TOL


def test_timm_families_are_covered() -> None:
    unsupported = [n for n in FAMILIES if not _timm_supports(family(n))]
    assert sorted(unsupported) == ["big_vision_sincos", "vit_paper_pre_logits"]


# ---- the native model on its own ---------------------------------------------------------------


def test_state_dict_alone_round_trips_through_torch_save(backend) -> None:
    spec = family("timm_no_embed_class")
    trained = _model(spec, seed=7)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    fresh = tb.VisionTransformer(spec).eval()  # vitspec default init, seed 0
    x = _nchw(_images(spec, 2))
    assert not torch.equal(fresh(x), trained(x))
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert torch.equal(fresh(x), trained(x))
    w = backend.export(fresh)
    expected = vitspec.init_weights(spec, seed=7, scheme="random")
    assert all(np.array_equal(w[k], expected[k]) for k in expected)


def test_sincos_table_is_a_buffer_outside_the_state_dict() -> None:
    spec = family("big_vision_sincos")
    model = _model(spec)
    assert "pos_embed" not in model.state_dict()
    buffers = dict(model.named_buffers())
    assert buffers["pos_embed"].shape == (1, spec.n_patches, spec.hidden_dim)
    np.testing.assert_array_equal(
        buffers["pos_embed"][0].numpy(),
        reference.sincos2d(spec.grid, spec.hidden_dim).astype(np.float32),
    )


def test_nchw_model_equals_nhwc_adapter(backend) -> None:
    spec = family("non_square")
    model = _model(spec)
    images = _images(spec, 3)
    with torch.inference_mode():
        direct = model(_nchw(images)).numpy()
    assert direct.shape == (3, 10)
    np.testing.assert_array_equal(direct, backend.forward(model, images)["output"])
    with pytest.raises(
        ValueError,
        match=r"images: expected shape \(batch, 3, 24, 40\) NCHW, found \(3, 24, 40, 3\)",
    ):
        model(torch.from_numpy(images))


def test_forward_captures_on_the_native_model() -> None:
    spec = family("vit_paper")
    model = _model(spec)
    images = _images(spec, 2)
    w = vitspec.init_weights(spec, seed=3, scheme="random")
    ref = reference.forward(spec, w, images, capture=("blocks.1.attn_probs", "pooled"))
    with torch.inference_mode():
        got = model.forward_captures(_nchw(images), ("blocks.1.attn_probs", "pooled"))
    assert set(got) == {"blocks.1.attn_probs", "pooled", "output"}
    for k in got:
        assert rel_err(got[k].numpy(), ref[k]) <= TOL, k
    with pytest.raises(ValueError, match="unknown capture point"):
        model.forward_captures(_nchw(images), ("blocks.9",))


def test_torch_compile_gives_the_same_numbers() -> None:
    spec = family("vit_paper", depth=1, hidden_dim=16, n_heads=2, image_size=16)
    model = _model(spec)
    x = _nchw(_images(spec, 2))
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert compiled.shape == (2, 10)
    assert rel_err(compiled.numpy(), eager.numpy()) <= 1e-6


def test_torch_export_program_runs_and_matches() -> None:
    spec = family("timm_avg_fc_norm")
    model = _model(spec)
    x = _nchw(_images(spec, 2))
    # The batch is dynamic when exported from an example of 2 or more (1 would be specialised).
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    x3 = _nchw(_images(spec, 3, seed=4))
    with torch.inference_mode():
        assert rel_err(program.module()(x).numpy(), model(x).numpy()) <= 1e-6
        assert rel_err(program.module()(x3).numpy(), model(x3).numpy()) <= 1e-6


def test_save_artifact_loads_with_torch_export_load(backend, tmp_path: Path) -> None:
    spec = family("mnist")
    model = backend.build(spec, vitspec.init_weights(spec, seed=5, scheme="random"))
    assert isinstance(model, tb.VisionTransformer) and model.spec == spec and not model.training
    path = backend.save_artifact(model, tmp_path / "vit.pt2", batch=2)
    assert path == tmp_path / "vit.pt2" and path.stat().st_size > 0
    images = _images(spec, 2)
    expected = backend.forward(model, images)["output"]
    del model
    program = torch.export.load(path)
    with torch.inference_mode():
        out = program.module()(_nchw(images)).numpy()
    assert out.shape == (2, 10)
    assert rel_err(out, expected) <= 1e-6
    # The program holds no vitspec code: its graph is aten operators (and tuple indexing) only.
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert all(t is operator.getitem or isinstance(t, torch._ops.OpOverload) for t in targets)
    assert torch.ops.aten.scaled_dot_product_attention.default in targets


def test_save_artifact_rejects_a_bad_batch(backend, tmp_path: Path) -> None:
    model = backend.build(family("mnist"))
    with pytest.raises(ValueError, match="batch: expected a positive integer or None, found 0"):
        backend.save_artifact(model, tmp_path / "bad.pt2", batch=0)


# ---- dropout and training ----------------------------------------------------------------------

_DROPPY = {"dropout": 0.3, "attn_dropout": 0.2, "drop_path": 0.25}


def test_eval_is_deterministic_and_matches_the_reference(backend) -> None:
    spec = family("vit_paper", depth=3, **_DROPPY)
    w = vitspec.init_weights(spec, seed=1, scheme="random")
    model = tb.VisionTransformer(spec, w).eval()
    images = _images(spec, 2)
    x = _nchw(images)
    with torch.inference_mode():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    assert rel_err(a.numpy(), reference.forward(spec, w, images)["output"]) <= TOL
    assert [blk.drop_path for blk in model.blocks] == [0.0, 0.125, 0.25]


@pytest.mark.parametrize(
    "rates",
    [_DROPPY, {"dropout": 0.2}, {"attn_dropout": 0.2}, {"drop_path": 0.5}],
    ids=lambda r: "+".join(r),
)
def test_train_mode_drops(rates: dict[str, float]) -> None:
    spec = family("vit_paper", depth=2, **rates)
    model = _model(spec).train()
    x = _nchw(_images(spec, 4))
    torch.manual_seed(0)
    a, b = model(x), model(x)
    assert not torch.equal(a, b)
    # The explicit attention path (taken when attention captures are asked for) drops too.
    c = model.forward_captures(x, ("blocks.0.attn_probs",))["output"]
    d = model.forward_captures(x, ("blocks.0.attn_probs",))["output"]
    assert not torch.equal(c, d)
    with torch.inference_mode():
        assert torch.equal(model.eval()(x), model(x))


def test_train_mode_without_rates_equals_eval(backend) -> None:
    spec = family("timm_avg_fc_norm", depth=2)
    model = _model(spec)
    images = _images(spec, 2)
    x = _nchw(images)
    evaluated = model.eval()(x)
    trained = model.train()(x)
    assert torch.equal(trained, evaluated)
    assert trained.requires_grad  # training mode keeps autograd
    # The adapter always computes in eval mode and leaves the model's mode as it found it.
    droppy = _model(family("timm_avg_fc_norm", depth=2, dropout=0.5)).train()
    first, second = (
        backend.forward(droppy, images)["output"],
        backend.forward(droppy, images)["output"],
    )
    np.testing.assert_array_equal(first, second)
    assert droppy.training


def test_train_step_updates_weights(backend) -> None:
    spec = family("vit_paper", depth=1, **_DROPPY)
    model = _model(spec).train()
    before = backend.export(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(
        model(_nchw(_images(spec, 4))), torch.tensor([0, 1, 2, 3])
    )
    loss.backward()
    optimizer.step()
    after = backend.export(model)
    assert not np.array_equal(
        after["blocks.0.attn.query.kernel"], before["blocks.0.attn.query.kernel"]
    )
    assert not np.array_equal(after["head.kernel"], before["head.kernel"])


# ---- numbers at full size ----------------------------------------------------------------------


@pytest.mark.slow
def test_b16_matches_the_float64_reference(backend) -> None:
    """About 5 s on an idle 2-core machine, most of it the float64 reference; batch 1 to keep it so."""
    spec = vitspec.load_spec("B/16")
    w = vitspec.init_weights(spec, seed=0, scheme="random")
    images = _images(spec, 1)
    points = ("patch_embed", "embed", "blocks.0.attn_probs", "blocks.11", "encoded", "pooled")
    got = backend.forward(backend.build(spec, w), images, capture=points)
    ref = reference.forward(spec, w, images, capture=points)
    for point in (*points, "output"):
        assert rel_err(got[point], ref[point]) <= TOL, point


def test_forward_runs_without_tf32_and_restores_the_flags(backend) -> None:
    spec = family("vit_paper", depth=1)
    model = backend.build(spec)
    seen: list[tuple[bool, bool]] = []
    model.patch_embed.register_forward_hook(
        lambda *_: seen.append(
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        )
    )
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        backend.forward(model, _images(spec, 1))
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (
            True,
            True,
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---- the issue-10 variants ---------------------------------------------------------------------

_TINY = {"image_size": 16, "patch_size": 4, "hidden_dim": 32, "n_heads": 4, "depth": 2}


def _variant(**fields) -> vitspec.Spec:
    return vitspec.Spec.from_dict({**_TINY, "n_classes": 5, **fields})


# One spec per feature, then the families that combine them (small instances).
VARIANTS = {
    "reg_tokens": _variant(reg_tokens=3),
    "reg_tokens_no_embed_class": _variant(reg_tokens=2, pos_embed_class_slot=False),
    "distilled": _variant(distillation_token=True),
    "distilled_no_head": _variant(distillation_token=True, n_classes=0),
    "layer_scale": _variant(layer_scale=0.3),
    "patch_norm": _variant(patch_norm=True),
    "no_patch_bias_pre_norm": _variant(patch_bias=False, pre_norm=True),
    "no_final_norm": _variant(final_norm="none"),
    "qk_norm": _variant(qk_norm=True),
    "qk_norm_rms": _variant(qk_norm=True, norm="rms"),
    "no_attn_mlp_bias": _variant(proj_bias=False, mlp_bias=False, qkv_bias=False),
    "quick_gelu": _variant(gelu="quick"),
    "swiglu": _variant(mlp="swiglu", mlp_ratio=2.5),
    "mlp_norm": _variant(mlp_norm=True),
    "swiglu_mlp_norm": _variant(mlp="swiglu", mlp_norm=True),
    "rms": _variant(norm="rms", final_norm="after_pool", pooling="avg"),
    "head_no_bias": _variant(head_bias=False),
    "max": _variant(pooling="max", reg_tokens=1),
    "max_with_prefix": _variant(pooling="max", reg_tokens=1, pool_include_prefix=True),
    "avg_with_prefix": _variant(pooling="avg", reg_tokens=2, pool_include_prefix=True),
    "avgmax": _variant(pooling="avgmax", class_token=False),
    "avgmax_with_prefix": _variant(pooling="avgmax", pool_include_prefix=True),
    "map": _variant(pooling="map", class_token=False),
    "map_with_prefix": _variant(pooling="map", reg_tokens=1),
    "map_including_prefix": _variant(pooling="map", reg_tokens=1, pool_include_prefix=True),
    "dynamic": _variant(dynamic_image_size=True),
    "dynamic_no_embed_class": _variant(dynamic_image_size=True, pos_embed_class_slot=False),
    "dynamic_bicubic": _variant(dynamic_image_size=True, pos_embed_resample="bicubic"),
    "dynamic_sincos": _variant(
        dynamic_image_size=True, pos_embed="sincos2d", class_token=False, pooling="avg"
    ),
    # DINOv2 with registers: layer scale, registers, patch-only positions (timm no_embed_class).
    "dinov2_reg": _variant(
        reg_tokens=4, layer_scale=1e-5, pos_embed_class_slot=False, dynamic_image_size=True
    ),
    # OpenAI CLIP: QuickGELU, ln_pre, no patch bias, a projection head, eps 1e-5.
    "clip": _variant(gelu="quick", pre_norm=True, patch_bias=False, head_bias=False, norm_eps=1e-5),
    # SigLIP: MAP pooling, no class token, tanh GELU.
    "siglip": _variant(pooling="map", class_token=False, gelu="tanh", n_classes=0),
    "deit_distilled": _variant(distillation_token=True, n_classes=7),
    # AIMv2: RMSNorm everywhere, SwiGLU, a norm on the patches, no attention/MLP biases.
    "aimv2": _variant(
        norm="rms",
        mlp="swiglu",
        mlp_ratio=2.75,
        patch_norm=True,
        qkv_bias=False,
        proj_bias=False,
        mlp_bias=False,
        class_token=False,
        pooling="avg",
        norm_eps=1e-5,
    ),
}

# The image sizes a dynamic spec is run at besides its own: larger (and not square), smaller.
OTHER_SIZES = [(24, 20), (8, 12)]


def _sizes(spec: vitspec.Spec) -> list[tuple[int, int]]:
    return [spec.image_size, *(OTHER_SIZES if spec.dynamic_image_size else [])]


def _images_of(spec: vitspec.Spec, size: tuple[int, int], batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.standard_normal((batch, *size, spec.in_channels)).astype(np.float32)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_the_reference_at_every_capture_point(backend, name: str) -> None:
    spec = VARIANTS[name]
    w = vitspec.init_weights(spec, seed=3, scheme="random")
    model = backend.build(spec, w)
    for size in _sizes(spec):
        images = _images_of(spec, size)
        ref = reference.forward(spec, w, images, capture="all")
        got = backend.forward(model, images, capture="all")
        shapes = capture_shapes(spec, 2, size)
        assert list(got) == capture_points(spec)
        for point in got:
            assert got[point].shape == shapes[point], (size, point)
            assert rel_err(got[point], ref[point]) <= TOL, (size, point)
        # The fast path (fused attention, no captures) gives the same numbers.
        only = backend.forward(model, images)["output"]
        assert rel_err(only, ref["output"]) <= TOL, size


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_export_of_load_is_bit_exact_and_the_layout_is_the_state_dict(
    backend, name: str
) -> None:
    spec = VARIANTS[name]
    w = vitspec.init_weights(spec, seed=11, scheme="random")
    model = backend.build(spec, w)
    state = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == TORCH.native_layout(spec)
    assert sum(v.numel() for v in state.values()) == spec.n_params
    exported = backend.export(model)
    assert list(exported) == list(w)
    for k, v in w.items():
        assert exported[k].shape == v.shape, k
        assert np.array_equal(exported[k].view(np.uint32), v.view(np.uint32)), k


def _timm_accepts(spec: vitspec.Spec) -> bool:
    """What the timm format writes: timm's classes hold a projection head as a zero bias."""
    try:
        get_format("timm").check(spec.replace(head_bias=True))
    except SpecError:
        return False
    return True


TIMM_VARIANTS = [n for n in VARIANTS if _timm_accepts(VARIANTS[n])]


def test_timm_holds_every_variant_but_the_ones_it_cannot_build() -> None:
    # timm has no sin-cos table, and its dynamic image size always resamples with antialiasing.
    assert sorted(set(VARIANTS) - set(TIMM_VARIANTS)) == ["dynamic_bicubic", "dynamic_sincos"]
    timm = get_format("timm")
    refused = {
        "pos_embed_resample 'bicubic'": _variant(pos_embed_resample="bicubic"),
        "a head without bias": _variant(head_bias=False),
        "patch projection bias exactly when it has no pre_norm": _variant(patch_bias=False),
        "bias exactly when the attention output": _variant(mlp_bias=False),
        "SwiGLU gate and the attention pool's MLP": _variant(mlp="swiglu", pooling="map"),
        "VisionTransformerDistilled has no register": _variant(
            distillation_token=True, reg_tokens=1
        ),
        "VisionTransformerDistilled has a learned position row": _variant(
            distillation_token=True, pos_embed_class_slot=False
        ),
    }
    for words, spec in refused.items():
        with pytest.raises(SpecError) as info:
            timm.check(spec)
        assert len(info.value.problems) == 1, info.value.problems
        assert words in info.value.problems[0] and "cannot write the timm format" in str(info.value)
    # vitspec's own torch format holds every variant.
    for spec in (*VARIANTS.values(), *refused.values()):
        get_format("torch").check(spec)


def test_a_variant_round_trips_through_a_torch_file(backend, tmp_path: Path) -> None:
    spec = VARIANTS["aimv2"].replace(reg_tokens=2, layer_scale=0.5, qk_norm=True)
    w = vitspec.init_weights(spec, seed=5, scheme="random")
    vitspec.save_weights(tmp_path / "w.safetensors", w, spec)
    convert(tmp_path / "w.safetensors", tmp_path / "torch.safetensors", to_format="torch")
    from safetensors.torch import load_file

    model = tb.VisionTransformer(spec, seed=None)
    model.load_state_dict(load_file(tmp_path / "torch.safetensors"), strict=True)
    exported = backend.export(model)
    assert all(np.array_equal(exported[k], w[k]) for k in w)
    got, got_spec = load(tmp_path / "torch.safetensors")
    assert got_spec == spec and all(np.array_equal(got[k], w[k]) for k in w)


def test_dynamic_image_size_checks_the_nchw_shape() -> None:
    spec = VARIANTS["dynamic"]
    model = _model(spec)
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 4, 28)).shape == (1, 5)
    with pytest.raises(
        ValueError,
        match=r"^images: expected shape \(batch, 3, height, width\) NCHW with height a multiple of 4 "
        r"and width a multiple of 4 \(dynamic_image_size\), found \(1, 3, 10, 16\)$",
    ):
        model(torch.zeros(1, 3, 10, 16))


def test_dynamic_resampling_matrices_are_made_once_per_grid() -> None:
    spec = VARIANTS["dynamic"]
    model = _model(spec)
    with torch.inference_mode():
        for size in (*OTHER_SIZES, *OTHER_SIZES, spec.image_size):
            model(torch.zeros(1, 3, *size))
    assert sorted(key[0] for key in model._grids) == [(2, 3), (6, 5)]


@pytest.mark.parametrize("name", TIMM_VARIANTS)
def test_variant_state_dict_runs_in_timm(name: str) -> None:
    """Our state_dict loads (strict) into timm's own class built with the matching switches, and
    timm, our model and the float64 reference agree, at every image size."""
    pytest.importorskip("timm")
    spec = VARIANTS[name]
    w = vitspec.init_weights(spec, seed=3, scheme="random")
    ours, theirs = tb.VisionTransformer(spec, w).eval(), _timm_model(spec)
    state = dict(ours.state_dict())
    if not spec.head_bias:  # timm holds CLIP's projection as a Linear with a zero bias
        state["head.bias"] = torch.zeros(spec.n_classes)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }
    theirs.load_state_dict(state, strict=True)
    for size in _sizes(spec):
        images = _images_of(spec, size)
        ref = reference.forward(spec, w, images)["output"]
        with torch.inference_mode():
            got, peer = ours(_nchw(images)).numpy(), theirs(_nchw(images)).numpy()
        assert rel_err(got, peer) <= TOL, size
        assert rel_err(peer, ref) <= TOL, size
