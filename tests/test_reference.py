"""The NumPy reference: tiny cases worked out by hand, and properties any ViT must have."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import rel_err

import vitspec
from vitspec import Spec, reference
from vitspec.families import FAMILIES, family
from vitspec.layout import capture_points, capture_shapes


def zero_weights(spec: Spec) -> dict[str, np.ndarray]:
    """Every tensor zero except norm scales (1): blocks become the identity."""
    return {
        p.name: (np.ones if p.init == "ones" else np.zeros)(p.shape)
        for p in vitspec.param_table(spec)
    }


def one_block(**kw) -> Spec:
    base = {
        "image_size": [1, 2],
        "patch_size": 1,
        "in_channels": 2,
        "hidden_dim": 2,
        "n_heads": 1,
        "depth": 1,
        "n_classes": 2,
        "class_token": False,
        "pooling": "avg",
        "pos_embed": "none",
    }
    return Spec.from_dict({**base, **kw})


def test_gelu_known_values() -> None:
    x = np.array([-1.0, 0.0, 1.0, 2.0])
    # Phi(1) = 0.841344746068543, Phi(2) = 0.977249868051821, Phi(-1) = 1 - Phi(1).
    np.testing.assert_allclose(
        reference.gelu(x),
        [-0.158655253931457, 0.0, 0.841344746068543, 1.954499736103642],
        rtol=1e-14,
    )
    # tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) at x = 1.
    np.testing.assert_allclose(
        reference.gelu(np.array([1.0]), "tanh"),
        [0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715))],
        rtol=1e-15,
    )


def test_layer_norm_of_a_pair_is_plus_minus_one() -> None:
    x = np.array([[3.0, 1.0]])
    # mean 2, biased variance 1: (x - 2) / sqrt(1 + eps).
    np.testing.assert_allclose(
        reference.layer_norm(x, np.ones(2), np.zeros(2), 1e-6),
        [[1 / math.sqrt(1 + 1e-6), -1 / math.sqrt(1 + 1e-6)]],
        rtol=1e-15,
    )


def test_patch_kernel_is_hwio_and_patches_flatten_row_col_channel() -> None:
    spec = Spec.from_dict(
        {
            "image_size": [2, 4],
            "patch_size": 2,
            "in_channels": 3,
            "hidden_dim": 4,
            "n_heads": 1,
            "depth": 1,
            "n_classes": 0,
            "class_token": False,
            "pooling": "avg",
            "pos_embed": "none",
        }
    )
    w = zero_weights(spec)
    # Output channel 0 reads pixel (row 1, col 0, channel 2) of each patch; channel 1 adds bias 5.
    w["patch_embed.kernel"][1, 0, 2, 0] = 1.0
    w["patch_embed.bias"][1] = 5.0
    images = np.arange(2 * 4 * 3, dtype=np.float64).reshape(1, 2, 4, 3)
    got = reference.forward(spec, w, images, capture=("patch_embed",))["patch_embed"]
    # Patch 0 covers columns 0-1, patch 1 columns 2-3; pixel (1, 0, 2) of patch p is images[0, 1, 2p, 2].
    np.testing.assert_array_equal(got[0, :, 0], [images[0, 1, 0, 2], images[0, 1, 2, 2]])
    np.testing.assert_array_equal(got[0, :, 1], [5.0, 5.0])


def test_zero_blocks_are_the_identity_and_the_final_norm_is_known() -> None:
    spec = one_block(depth=2)
    w = zero_weights(spec)
    w["patch_embed.kernel"][0, 0] = np.eye(2)  # token = pixel's two channels
    images = np.array([[[[3.0, 1.0], [0.0, 2.0]]]])  # (1, 1, 2, 2)
    out = reference.forward(spec, w, images, capture="all")
    np.testing.assert_array_equal(out["blocks.1"], out["embed"])
    s = 1 / math.sqrt(1 + 1e-6)
    np.testing.assert_allclose(out["encoded"][0], [[s, -s], [-s, s]], rtol=1e-14)
    np.testing.assert_allclose(out["pooled"][0], [0.0, 0.0], atol=1e-15)


def test_attention_worked_by_hand() -> None:
    """Two tokens, one head, width 2: scores and the softmax follow from the weights by hand.

    A query bias makes the probabilities asymmetric, so a softmax over the wrong axis fails.
    """
    spec = one_block()
    w = zero_weights(spec)
    w["patch_embed.kernel"][0, 0] = np.eye(2)
    a, b = 1.5, 0.7
    w["blocks.0.attn.query.kernel"] = np.array([[a, 0.0], [0.0, 0.0]])
    w["blocks.0.attn.query.bias"] = np.array([0.0, b])
    w["blocks.0.attn.key.kernel"] = np.eye(2)
    w["blocks.0.attn.value.kernel"] = np.eye(2)
    w["blocks.0.attn.out.kernel"] = np.eye(2)
    images = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])  # token 0 = [1, 0], token 1 = [0, 1]
    out = reference.forward(spec, w, images, capture="all")
    s = 1 / math.sqrt(0.25 + 1e-6) * 0.5  # LayerNorm of [1, 0] is [s, -s]
    h = np.array([[s, -s], [-s, s]])
    # q_0 = [a s, b], q_1 = [-a s, b], k = h: score(i, 0) - score(i, 1) = 2 q_i . k_0 / sqrt(2).
    p0 = 1 / (1 + math.exp(-2 * (a * s * s - b * s) / math.sqrt(2)))
    p1 = 1 / (1 + math.exp(-2 * (-a * s * s - b * s) / math.sqrt(2)))
    expected_probs = np.array([[p0, 1 - p0], [p1, 1 - p1]])
    assert abs(expected_probs[0, 1] - expected_probs[1, 0]) > 0.1  # not symmetric
    np.testing.assert_allclose(out["blocks.0.attn_probs"][0, 0], expected_probs, rtol=1e-13)
    np.testing.assert_allclose(out["blocks.0.attn_heads"][0, 0], expected_probs @ h, rtol=1e-13)
    np.testing.assert_allclose(out["blocks.0.attn"][0], expected_probs @ h, rtol=1e-13)
    np.testing.assert_allclose(out["blocks.0"][0], np.eye(2) + expected_probs @ h, rtol=1e-13)


def test_mlp_worked_by_hand() -> None:
    spec = one_block(mlp_ratio=0.5)  # mlp width 1
    w = zero_weights(spec)
    w["patch_embed.kernel"][0, 0] = np.eye(2)
    w["blocks.0.mlp.fc1.kernel"] = np.array([[1.0], [0.0]])
    w["blocks.0.mlp.fc1.bias"] = np.array([1.0])
    w["blocks.0.mlp.fc2.kernel"] = np.array([[2.0, 0.0]])
    images = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    for kind in ("exact", "tanh"):
        out = reference.forward(spec.replace(gelu=kind), w, images, capture=("blocks.0.mlp",))
        s = 1 / math.sqrt(0.25 + 1e-6) * 0.5
        expected = [
            2 * reference.gelu(np.array([s + 1.0]), kind)[0],
            2 * reference.gelu(np.array([-s + 1.0]), kind)[0],
        ]
        np.testing.assert_allclose(out["blocks.0.mlp"][0, :, 0], expected, rtol=1e-14)


def test_class_token_position_and_head_by_hand() -> None:
    spec = Spec.from_dict(
        {
            "image_size": [1, 2],
            "patch_size": 1,
            "in_channels": 1,
            "hidden_dim": 2,
            "n_heads": 1,
            "depth": 1,
            "n_classes": 3,
            "pre_logits_dim": 2,
        }
    )
    w = zero_weights(spec)
    w["class_token"] = np.array([7.0, 8.0])
    w["pos_embed"] = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]])  # class slot first
    w["pre_logits.kernel"] = np.eye(2)
    w["head.kernel"] = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    w["head.bias"] = np.array([0.0, 0.0, 10.0])
    out = reference.forward(spec, w, np.zeros((1, 1, 2, 1)), capture="all")
    np.testing.assert_array_equal(out["embed"][0], [[8.0, 9.0], [2.0, 0.0], [0.0, 3.0]])
    s = 1 / math.sqrt(0.25 + 1e-6) * 0.5
    np.testing.assert_allclose(
        out["pooled"][0], [-s, s], rtol=1e-14
    )  # LayerNorm of the class token [8, 9]
    np.testing.assert_allclose(out["pre_logits"][0], np.tanh([-s, s]), rtol=1e-14)
    t = math.tanh(s)
    np.testing.assert_allclose(out["output"][0], [-t, t, 10 + 2 * t], rtol=1e-14)


def test_sincos2d_known_values() -> None:
    pe = reference.sincos2d((2, 2), 8)
    # width 8: omega = [1, 1e-4]; layout [sin x, cos x, sin y, cos y] with x the column.
    np.testing.assert_allclose(pe[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-15)
    np.testing.assert_allclose(
        pe[1], [math.sin(1), math.sin(1e-4), math.cos(1), math.cos(1e-4), 0, 0, 1, 1], rtol=1e-15
    )
    np.testing.assert_allclose(
        pe[2], [0, 0, 1, 1, math.sin(1), math.sin(1e-4), math.cos(1), math.cos(1e-4)], rtol=1e-15
    )


def test_avg_pooling_leaves_the_class_token_out() -> None:
    spec = family("timm_avg_fc_norm")
    w = vitspec.init_weights(spec, 0, scheme="random")
    out = reference.forward(
        spec,
        w,
        np.random.default_rng(0).standard_normal((2, 32, 32, 3)),
        capture=("blocks.1", "pooled"),
    )
    expected = reference.layer_norm(
        out["blocks.1"][:, 1:].mean(1), w["norm.scale"], w["norm.bias"], spec.norm_eps
    )
    np.testing.assert_allclose(out["pooled"], expected, rtol=1e-13)


# ---- properties ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_capture_shapes_and_float32_agrees_with_float64(name: str) -> None:
    spec = family(name)
    w = vitspec.init_weights(spec, 1, scheme="random")
    images = np.random.default_rng(1).standard_normal((3, *spec.image_size, spec.in_channels))
    out64 = reference.forward(spec, w, images, capture="all")
    out32 = reference.forward(spec, w, images.astype(np.float32), dtype=np.float32, capture="all")
    shapes = capture_shapes(spec, 3)
    assert list(out64) == capture_points(spec)
    for point in capture_points(spec):
        assert out64[point].shape == shapes[point]
        assert out32[point].dtype == np.float32
        assert rel_err(out32[point], out64[point]) < 1e-5, point
    np.testing.assert_allclose(
        out64[f"blocks.{spec.depth - 1}.attn_probs"].sum(-1), 1.0, rtol=1e-12
    )


def test_permuting_the_heads_classes_permutes_the_logits() -> None:
    spec = family("vit_paper")
    w = vitspec.init_weights(spec, 2, scheme="random")
    images = np.random.default_rng(2).standard_normal((2, 32, 32, 3))
    perm = np.random.default_rng(3).permutation(spec.n_classes)
    permuted = {**w, "head.kernel": w["head.kernel"][:, perm], "head.bias": w["head.bias"][perm]}
    np.testing.assert_allclose(
        reference.forward(spec, permuted, images)["output"],
        reference.forward(spec, w, images)["output"][:, perm],
        rtol=1e-12,
    )


def test_without_position_permuting_patches_permutes_tokens() -> None:
    """With a zero position embedding, attention is permutation-equivariant over the patches."""
    spec = family("timm_token", image_size=16, patch_size=4)
    w = vitspec.init_weights(spec, 4, scheme="random")
    w["pos_embed"] = np.zeros_like(w["pos_embed"])
    images = np.random.default_rng(4).standard_normal((1, 16, 16, 3))
    perm = np.random.default_rng(5).permutation(16)
    # Move whole 4x4 patches: patch k of the new image is patch perm[k] of the old one.
    patches = images.reshape(1, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(1, 16, 4, 4, 3)
    moved = (
        patches[:, perm].reshape(1, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(1, 16, 16, 3)
    )
    a = reference.forward(spec, w, images, capture=("encoded",))
    b = reference.forward(spec, w, moved, capture=("encoded",))
    np.testing.assert_allclose(
        b["encoded"][:, 1:], a["encoded"][:, 1:][:, perm], rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(b["output"], a["output"], rtol=1e-10)  # the class token sees a set


def test_images_in_a_batch_do_not_interact() -> None:
    spec = family("big_vision_sincos")
    w = vitspec.init_weights(spec, 6, scheme="random")
    images = np.random.default_rng(6).standard_normal((3, 32, 32, 3))
    together = reference.forward(spec, w, images)["output"]
    alone = np.concatenate(
        [reference.forward(spec, w, images[i : i + 1])["output"] for i in range(3)]
    )
    np.testing.assert_allclose(together, alone, rtol=1e-12)


def test_bad_inputs_are_named() -> None:
    spec = family("vit_paper")
    w = vitspec.init_weights(spec, 0)
    with pytest.raises(
        ValueError,
        match=r"images: expected shape \(batch, 32, 32, 3\) NHWC, found \(2, 3, 32, 32\)",
    ):
        reference.forward(spec, w, np.zeros((2, 3, 32, 32)))
    with pytest.raises(ValueError, match="images: expected a float array, found uint8"):
        reference.forward(spec, w, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown capture point"):
        reference.forward(spec, w, np.zeros((1, 32, 32, 3)), capture=("blocks.9",))
    with pytest.raises(vitspec.WeightsError, match="missing 1 tensor"):
        reference.forward(
            spec, {k: v for k, v in w.items() if k != "norm.bias"}, np.zeros((1, 32, 32, 3))
        )
