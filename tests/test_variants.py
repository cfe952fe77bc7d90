"""Issue 10's model variants in the core: the spec rules, the canonical table and the float64
reference, each checked by hand or against an equivalent model built without the feature."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vitspec import Spec, reference
from vitspec.errors import InputError, SpecError
from vitspec.formats import FORMATS
from vitspec.formats.resample import resample_pos_embed
from vitspec.init import init_weights
from vitspec.layout import capture_points, capture_shapes, param_shapes
from vitspec.resample import grid_matrices

BASE = {
    "image_size": [8, 12],
    "patch_size": 4,
    "hidden_dim": 8,
    "n_heads": 2,
    "depth": 2,
    "n_classes": 3,
}


def spec(**kw: object) -> Spec:
    return Spec.from_dict({**BASE, **kw})


def images(s: Spec, size: tuple[int, int] | None = None, batch: int = 2) -> np.ndarray:
    h, w = size or s.image_size
    return np.random.default_rng(1).standard_normal((batch, h, w, s.in_channels))


def run(s: Spec, w: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    return reference.forward(s, w, x, capture="all")


# ---- the spec --------------------------------------------------------------------------------


def test_defaults_keep_every_existing_spec_unchanged() -> None:
    plain = spec()
    assert plain.n_prefix_tokens == 1 and plain.n_positions == 7
    assert "embed_norm" not in capture_points(plain) and "pooled_dist" not in capture_points(plain)
    names = set(param_shapes(plain))
    assert names == {n for n in names if not n.startswith(("pool.", "norm_pre", "patch_norm"))}
    assert not any(".ls1." in n or ".gate." in n or "q_norm" in n for n in names)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"distillation_token": True, "pooling": "avg"},
            "distillation_token true needs class_token true, pooling 'token', final_norm 'before_pool' "
            "or 'none' and pre_logits_dim 0 (DeiT's distilled model), found pooling 'avg'",
        ),
        (
            {"distillation_token": True, "final_norm": "after_pool", "pre_logits_dim": 4},
            "found final_norm 'after_pool', pre_logits_dim 4",
        ),
        (
            {"pool_include_prefix": True},
            "pool_include_prefix true needs pooling 'avg', 'max', 'avgmax' or 'map', found 'token'",
        ),
        (
            {"class_token": False, "pooling": "avg", "pos_embed_class_slot": True},
            "pos_embed_class_slot true needs a prefix token (class_token, distillation_token or "
            "reg_tokens) and pos_embed 'learned', found no prefix token",
        ),
        ({"reg_tokens": -1}, "reg_tokens must be at least 0, found -1"),
        ({"layer_scale": 0.0}, "layer_scale must be greater than 0.0, found 0.0"),
        ({"norm": "batch"}, "norm must be one of 'layer' or 'rms', found 'batch'"),
        ({"mlp": "geglu"}, "mlp must be one of 'standard' or 'swiglu', found 'geglu'"),
    ],
)
def test_variant_rules_are_one_line_each(change: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as err:
        spec(**change)
    assert any(message in p for p in err.value.problems), err.value.problems


def test_prefix_tokens_are_class_distillation_then_registers() -> None:
    s = spec(distillation_token=True, reg_tokens=3)
    assert s.n_prefix_tokens == 5 and s.pos_embed_class_slot is True
    assert param_shapes(s)["pos_embed"] == (5 + 6, 8)
    assert param_shapes(s)["reg_tokens"] == (3, 8)
    no_rows = s.replace(pos_embed_class_slot=False)
    assert no_rows.n_positions == 6 and no_rows.n_position_prefix == 0
    # Registers without a class token still get their rows by default (timm no_embed_class=False).
    regs = spec(class_token=False, pooling="avg", reg_tokens=2)
    assert regs.pos_embed_class_slot is True and regs.n_positions == 8


def test_rms_norm_drops_every_bias_and_counts_follow_the_table() -> None:
    s = spec(
        norm="rms",
        qk_norm=True,
        pre_norm=True,
        patch_norm=True,
        pooling="map",
        class_token=False,
        mlp_norm=True,
    )
    shapes = param_shapes(s)
    norms = [n for n in shapes if n.endswith(".scale") and ".ls" not in n]
    assert norms and not any(n.removesuffix(".scale") + ".bias" in shapes for n in norms)
    assert shapes["blocks.0.attn.q_norm.scale"] == (4,)
    assert shapes["blocks.0.mlp.norm.scale"] == (s.mlp_dim,)
    assert s.n_params == sum(math.prod(v) for v in shapes.values())


# ---- worked by hand --------------------------------------------------------------------------


def test_quick_gelu_and_silu_by_hand() -> None:
    x = np.array([-2.0, -0.5, 0.0, 1.0, 3.0])
    np.testing.assert_allclose(
        reference.gelu(x, "quick"), x / (1.0 + np.exp(-1.702 * x)), rtol=1e-15
    )
    assert np.abs(reference.gelu(x, "quick") - reference.gelu(x)).max() > 1e-3
    np.testing.assert_allclose(reference.silu(x), x / (1.0 + np.exp(-x)), rtol=1e-15)
    # No overflow warning far out, and the right limits.
    big = reference.sigmoid(np.array([-800.0, 800.0]))
    assert big[0] == 0.0 and big[1] == 1.0


def test_rms_norm_by_hand() -> None:
    x = np.array([[3.0, -4.0]])  # mean of squares 12.5
    out = reference.rms_norm(x, np.array([2.0, 0.5]), 0.0)
    np.testing.assert_allclose(out, [[2 * 3 / math.sqrt(12.5), 0.5 * -4 / math.sqrt(12.5)]])


def test_attention_pooling_by_hand() -> None:
    s = Spec.from_dict(
        {
            "image_size": [1, 2],
            "patch_size": 1,
            "in_channels": 1,
            "hidden_dim": 2,
            "n_heads": 1,
            "depth": 1,
            "n_classes": 0,
            "class_token": False,
            "pos_embed": "none",
            "pooling": "map",
            "final_norm": "none",
            "mlp_ratio": 1.0,
        }
    )
    w = init_weights(s, 3, scheme="random").copy()
    w = {k: v.astype(np.float64) for k, v in w.items()}
    tokens = np.array([[[1.0, 2.0], [-1.0, 0.5]]])
    keep: dict[str, np.ndarray] = {}
    pooled = reference.attention_pool(s, w, tokens, lambda k, v: keep.__setitem__(k, v))
    q = w["pool.probe"] @ w["pool.query.kernel"] + w["pool.query.bias"]
    k = tokens[0] @ w["pool.key.kernel"] + w["pool.key.bias"]
    v = tokens[0] @ w["pool.value.kernel"] + w["pool.value.bias"]
    scores = np.array([q @ k[0], q @ k[1]]) / math.sqrt(2)
    p = np.exp(scores) / np.exp(scores).sum()
    attn = (p[0] * v[0] + p[1] * v[1]) @ w["pool.out.kernel"] + w["pool.out.bias"]
    h = reference.layer_norm(attn, w["pool.norm.scale"], w["pool.norm.bias"], s.norm_eps)
    mlp = (
        reference.gelu(h @ w["pool.mlp.fc1.kernel"] + w["pool.mlp.fc1.bias"])
        @ w["pool.mlp.fc2.kernel"]
        + w["pool.mlp.fc2.bias"]
    )
    np.testing.assert_allclose(keep["pool.attn_probs"][0, 0, 0], p, rtol=1e-12)
    np.testing.assert_allclose(pooled[0], attn + mlp, rtol=1e-12)


def test_swiglu_and_mlp_norm_by_hand() -> None:
    s = spec(mlp="swiglu", mlp_norm=True, mlp_ratio=0.75)
    w = {k: v.astype(np.float64) for k, v in init_weights(s, 2, scheme="random").items()}
    h = np.random.default_rng(0).standard_normal((1, 3, 8))
    p = "blocks.0.mlp"
    gate = h @ w[f"{p}.gate.kernel"] + w[f"{p}.gate.bias"]
    lin = h @ w[f"{p}.fc1.kernel"] + w[f"{p}.fc1.bias"]
    hidden = gate / (1 + np.exp(-gate)) * lin
    hidden = reference.layer_norm(hidden, w[f"{p}.norm.scale"], w[f"{p}.norm.bias"], s.norm_eps)
    want = hidden @ w[f"{p}.fc2.kernel"] + w[f"{p}.fc2.bias"]
    np.testing.assert_allclose(reference.feed_forward(s, w, p, h), want, rtol=1e-12)


# ---- a feature switched to its neutral value is the model without it ------------------------


def _equivalent(with_feature: Spec, without: Spec, w: dict[str, np.ndarray]) -> None:
    """``with_feature`` on ``w`` computes exactly what ``without`` computes on w's common tensors."""
    plain_w = {k: w[k] for k in param_shapes(without)}
    a, b = run(with_feature, w, images(without)), run(without, plain_w, images(without))
    np.testing.assert_allclose(a["output"], b["output"], rtol=1e-12, atol=1e-12)


def test_layer_scale_of_one_is_no_layer_scale() -> None:
    s = spec(layer_scale=1e-5)
    w = init_weights(s, 0, scheme="random")
    w = {k: (np.ones_like(v) if ".ls" in k else v) for k, v in w.items()}
    _equivalent(s, spec(), w)
    # And the scale is really applied: the attention branch capture is the scaled one.
    w2 = {k: (np.full_like(v, 0.5) if ".ls" in k else v) for k, v in w.items()}
    a, b = run(s, w2, images(s)), run(spec(), {k: w[k] for k in param_shapes(spec())}, images(s))
    np.testing.assert_allclose(a["blocks.0.attn"], 0.5 * b["blocks.0.attn"], rtol=1e-12)


@pytest.mark.parametrize(
    ("field", "bias"),
    [
        ("patch_bias", "patch_embed.bias"),
        ("proj_bias", "blocks.1.attn.out.bias"),
        ("mlp_bias", "blocks.0.mlp.fc2.bias"),
        ("head_bias", "head.bias"),
        ("qkv_bias", "blocks.0.attn.key.bias"),
    ],
)
def test_a_missing_bias_is_a_zero_bias(field: str, bias: str) -> None:
    without = spec(**{field: False})
    assert bias not in param_shapes(without)
    w = init_weights(spec(), 0, scheme="random")
    gone = set(param_shapes(spec())) - set(param_shapes(without))
    assert all(name.endswith(".bias") for name in gone)
    w = {k: (np.zeros_like(v) if k in gone else v) for k, v in w.items()}
    _equivalent(spec(), without, w)


def test_registers_take_part_in_attention_but_never_in_pooling() -> None:
    s = spec(reg_tokens=2, pooling="avg")
    w = init_weights(s, 0, scheme="random")
    out = run(s, w, images(s))
    enc = out["encoded"]
    np.testing.assert_allclose(out["pooled"], enc[:, 3:].mean(axis=1), rtol=1e-14)
    assert out["embed"].shape[1] == 3 + 6
    # The register rows of embed are the registers plus their position rows.
    np.testing.assert_allclose(
        out["embed"][0, 1:3], w["reg_tokens"] + w["pos_embed"][1:3], rtol=1e-7
    )
    # (a random change: a constant added to every channel would vanish in the LayerNorms)
    moved = dict(w, reg_tokens=w["reg_tokens"] + np.random.default_rng(5).standard_normal((2, 8)))
    assert np.abs(run(s, moved, images(s))["pooled"] - out["pooled"]).max() > 1e-6
    incl = s.replace(pool_include_prefix=True)
    np.testing.assert_allclose(run(incl, w, images(s))["pooled"], enc.mean(axis=1), rtol=1e-14)


@pytest.mark.parametrize("kind", ["max", "avgmax"])
def test_max_pooling_kinds(kind: str) -> None:
    s = spec(pooling=kind)
    out = run(s, init_weights(s, 0, scheme="random"), images(s))
    patches = out["encoded"][:, 1:]
    want = (
        patches.max(axis=1) if kind == "max" else (patches.max(axis=1) + patches.mean(axis=1)) / 2
    )
    np.testing.assert_allclose(out["pooled"], want, rtol=1e-14)


def test_distillation_output_is_the_mean_of_the_two_heads() -> None:
    s = spec(distillation_token=True)
    w = init_weights(s, 0, scheme="random")
    out = run(s, w, images(s))
    enc = out["encoded"]
    np.testing.assert_allclose(
        out["head"], enc[:, 0] @ w["head.kernel"] + w["head.bias"], rtol=1e-7
    )
    np.testing.assert_allclose(
        out["head_dist"], enc[:, 1] @ w["head_dist.kernel"] + w["head_dist.bias"], rtol=1e-7
    )
    np.testing.assert_allclose(out["output"], (out["head"] + out["head_dist"]) / 2, rtol=1e-14)
    features = run(
        s.replace(n_classes=0), {k: w[k] for k in param_shapes(s.replace(n_classes=0))}, images(s)
    )
    np.testing.assert_allclose(features["output"], (enc[:, 0] + enc[:, 1]) / 2, rtol=1e-14)


def test_pre_norm_and_no_final_norm() -> None:
    s = spec(pre_norm=True, final_norm="none")
    w = init_weights(s, 0, scheme="random")
    out = run(s, w, images(s))
    want = reference.layer_norm(out["embed"], w["norm_pre.scale"], w["norm_pre.bias"], s.norm_eps)
    np.testing.assert_allclose(out["embed_norm"], want, rtol=1e-14)
    np.testing.assert_allclose(out["encoded"], out["blocks.1"], rtol=0, atol=0)


def test_qk_norm_normalises_each_heads_queries_and_keys() -> None:
    s = spec(qk_norm=True, qkv_bias=False)
    w = init_weights(s, 0, scheme="random")
    for part in ("q_norm", "k_norm"):
        w[f"blocks.0.attn.{part}.scale"] = np.ones(4)
        w[f"blocks.0.attn.{part}.bias"] = np.zeros(4)
    out = run(s, w, images(s))
    h = reference.layer_norm(
        out["embed"], w["blocks.0.norm1.scale"], w["blocks.0.norm1.bias"], s.norm_eps
    )
    q = (h @ w["blocks.0.attn.query.kernel"]).reshape(2, 7, 2, 4).transpose(0, 2, 1, 3)
    k = (h @ w["blocks.0.attn.key.kernel"]).reshape(2, 7, 2, 4).transpose(0, 2, 1, 3)
    q = (q - q.mean(-1, keepdims=True)) / np.sqrt(q.var(-1, keepdims=True) + s.norm_eps)
    k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + s.norm_eps)
    np.testing.assert_allclose(
        out["blocks.0.attn_probs"], reference.softmax(q @ k.transpose(0, 1, 3, 2) / 2.0), rtol=1e-12
    )


# ---- another image size at run time ---------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["bicubic-antialias", "bicubic"])
@pytest.mark.parametrize("size", [(12, 20), (4, 8)])
def test_dynamic_size_equals_a_converted_checkpoint(algorithm: str, size: tuple[int, int]) -> None:
    """A dynamic model on another size computes what `vitspec convert --image-size` + a static model do."""
    s = spec(dynamic_image_size=True, pos_embed_resample=algorithm, reg_tokens=1)
    w = init_weights(s, 0, scheme="random")
    x = images(s, size)
    out = run(s, w, x)
    static = s.replace(image_size=list(size), dynamic_image_size=False)
    moved = dict(
        w,
        pos_embed=resample_pos_embed(s, w["pos_embed"].astype(np.float64), static.grid, algorithm),
    )
    want = run(static, moved, x)
    assert {k: v.shape for k, v in out.items()} == {
        k: v for k, v in capture_shapes(s, 2, size).items()
    } | {"output": (2, 3)}
    for point in want:
        np.testing.assert_allclose(out[point], want[point], rtol=1e-12, atol=1e-12, err_msg=point)


def test_dynamic_size_on_the_spec_grid_changes_nothing_and_sincos_follows_the_grid() -> None:
    s = spec(dynamic_image_size=True)
    w = init_weights(s, 0, scheme="random")
    np.testing.assert_array_equal(
        run(s, w, images(s))["output"], run(spec(), w, images(s))["output"]
    )
    sc = spec(dynamic_image_size=True, pos_embed="sincos2d", class_token=False, pooling="avg")
    out = run(sc, init_weights(sc, 0, scheme="random"), images(sc, (12, 4)))
    table = reference.sincos2d((3, 1), 8)
    np.testing.assert_allclose(
        out["embed"] - out["patch_embed"], np.broadcast_to(table, (2, 3, 8)), atol=1e-12
    )
    rows, cols = grid_matrices((2, 3), (3, 1), "bicubic")
    assert rows.shape == (3, 2) and cols.shape == (1, 3)


def test_a_wrong_image_size_is_one_line() -> None:
    dyn = spec(dynamic_image_size=True)
    w = init_weights(dyn, 0)
    with pytest.raises(
        InputError,
        match=r"height a multiple of 4 and width a multiple of 4 \(dynamic_image_size\), found \(2, 10, 12, 3\)",
    ):
        reference.forward(dyn, w, images(dyn, (10, 12)))
    with pytest.raises(
        InputError, match=r"expected shape \(batch, 8, 12, 3\) NHWC, found \(2, 12, 12, 3\)"
    ):
        reference.forward(spec(), init_weights(spec(), 0), images(spec(), (12, 12)))


# ---- formats that cannot hold a variant say so ---------------------------------------------


def test_a_format_without_a_variant_refuses_it_by_name() -> None:
    hf = FORMATS["hf"]
    with pytest.raises(SpecError) as err:
        hf.check(spec(reg_tokens=4, norm="rms", gelu="quick"))
    text = "\n".join(err.value.problems)
    assert (
        "cannot write the hf format: it has no way to hold register tokens (spec has reg_tokens 4)"
        in text
    )
    assert "it has no way to hold RMSNorm (spec has norm 'rms')" in text
    assert "it cannot hold gelu 'quick'" in text
    FORMATS["canonical"].check(spec(reg_tokens=4, norm="rms", gelu="quick"))


def test_a_square_reading_counts_every_prefix_row() -> None:
    from vitspec.formats.infer import Facts, place_positions

    facts = Facts("canonical")
    place_positions(facts, 20, (4, 4), 4, {}, slot=True)
    assert facts.defaults["image_size"] == (16, 16)
    assert "20 position rows read as 16 patches" in facts.why["image_size"]


def test_attention_pooling_leaves_the_prefix_tokens_out_unless_asked() -> None:
    """timm's pool(): the MAP head sees the patch tokens only, unless pool_include_prefix."""
    s = spec(pooling="map", reg_tokens=2)
    w = init_weights(s, 0, scheme="random")
    out = run(s, w, images(s))
    assert out["pool.attn_probs"].shape == capture_shapes(s, 2)["pool.attn_probs"] == (2, 2, 1, 6)
    keep: dict[str, np.ndarray] = {}
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    patches_only = reference.attention_pool(s, w64, out["encoded"][:, 3:], keep.__setitem__)
    np.testing.assert_allclose(out["pooled"], patches_only, rtol=1e-14)
    every = s.replace(pool_include_prefix=True)
    out2 = run(every, w, images(s))
    assert out2["pool.attn_probs"].shape == (2, 2, 1, 9)
    assert np.abs(out2["pooled"] - out["pooled"]).max() > 1e-3
