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
from vitspec.families import FAMILIES, family
from vitspec.layout import param_table
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
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
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
        class_token=spec.class_token,
        pos_embed="learn" if spec.pos_embed == "learned" else "none",
        no_embed_class=not spec.pos_embed_class_slot,
        fc_norm=spec.final_norm == "after_pool",
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=spec.norm_eps),
        act_layer="gelu_tanh" if spec.gelu == "tanh" else "gelu",
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
