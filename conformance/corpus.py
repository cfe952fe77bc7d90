"""The shipped corpus: every case's spec, batch, seed and why it is there.

``python -m vitspec.conformance.generate`` turns this list into ``conformance/cases/`` with the
float64 reference. Together the cases cover every spec field's values and every family of
``vitspec.families``; tests/test_conformance.py checks that mechanically.

Weights come from ``init_weights(spec, seed, scheme="random")`` and images are standard normal
float32, except where a case's ``adjust`` says otherwise (and its manifest records it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitspec.families import family
from vitspec.spec import Spec

# The corpus version, written into every case's manifest and every report. Bump it whenever a
# change could turn a verdict: a case added, removed or regenerated with other content, or a
# tolerance changed (docs/conformance.md, "Corpus versions"). FINGERPRINT is
# ``case.corpus_fingerprint(shipped_cases())`` of the corpus this version names; tests/test_conformance_corpus_version.py
# fails when the two part ways, so no change ships under an old version.
VERSION = 2
FINGERPRINT = "222e256ee4b5d0cd26de336dcda7f3b6d5f58f0a634d7f9d092fa48f3e355cf3"


@dataclass(frozen=True)
class CaseDef:
    name: str
    description: str
    spec: Spec
    batch: int = 2
    seed: int = 0
    family: str | None = None
    adjust: str | None = None  # a key of ADJUSTMENTS
    tolerance: dict[str, Any] | None = field(default=None)
    # Images of another (height, width) than the spec's: only for a spec with dynamic_image_size.
    image_size: tuple[int, int] | None = None


def _scale_embedding(
    weights: dict[str, np.ndarray], images: np.ndarray
) -> tuple[dict, np.ndarray, dict]:
    """Tokens entering block 0 get a variance near 1e-6, where a LayerNorm's eps changes the numbers."""
    w = dict(weights)
    names = [
        n for n in ("patch_embed.kernel", "patch_embed.bias", "class_token", "pos_embed") if n in w
    ]
    for n in names:
        w[n] = (w[n] * np.float32(1e-3)).astype(np.float32)
    return w, images, {"scaled": {n: 1e-3 for n in names}}


def _nan_pixel(weights: dict[str, np.ndarray], images: np.ndarray) -> tuple[dict, np.ndarray, dict]:
    """One NaN pixel in the last image: it must poison that image only, and every position of it."""
    x = images.copy()
    where = (x.shape[0] - 1, 1, 2, 0)
    x[where] = np.nan
    return weights, x, {"nan_pixel": list(where)}


def _sharp_attention(
    weights: dict[str, np.ndarray], images: np.ndarray
) -> tuple[dict, np.ndarray, dict]:
    """Query and key kernels x6: attention logits reach 190, past float32's exp overflow (88.7)."""
    w = dict(weights)
    names = [n for n in w if n.endswith((".attn.query.kernel", ".attn.key.kernel"))]
    for n in names:
        w[n] = (w[n] * np.float32(6.0)).astype(np.float32)
    return w, images, {"scaled": {n: 6.0 for n in names}}


ADJUSTMENTS: dict[str, Callable[[dict, np.ndarray], tuple[dict, np.ndarray, dict]]] = {
    "scale_embedding": _scale_embedding,
    "nan_pixel": _nan_pixel,
    "sharp_attention": _sharp_attention,
}

_SMALL = {"hidden_dim": 16, "n_heads": 4, "depth": 2}


def _fam(name: str, description: str, batch: int = 2, seed: int = 0, **sizes: Any) -> CaseDef:
    return CaseDef(
        f"family_{name}", description, family(name, **{**_SMALL, **sizes}), batch, seed, family=name
    )


def _spec(**fields: Any) -> Spec:
    return Spec.from_dict({"image_size": 16, "patch_size": 4, "n_classes": 10, **_SMALL, **fields})


def _tiny(**fields: Any) -> Spec:
    """One block on a 3x3 grid: a feature case that costs a few tens of KB."""
    return _spec(**{"image_size": 12, "depth": 1, **fields})


def _like(name: str, description: str, batch: int = 2, seed: int = 0, **fields: Any) -> CaseDef:
    """A small instance of a family of real checkpoints (its timm preset named in the description)."""
    return CaseDef(f"like_{name}", description, _spec(**fields), batch, seed, family=name)


CORPUS: list[CaseDef] = [
    # ---- one case per family of vitspec.families ----
    _fam(
        "vit_paper",
        "ViT paper: class token, learned position embedding with a class slot, token pooling",
        n_heads=2,
        seed=1,
    ),
    _fam(
        "vit_paper_pre_logits",
        "ViT paper with the representation layer (dense + tanh) before the head",
        batch=3,
        depth=1,
        seed=2,
    ),
    _fam(
        "big_vision_gap",
        "big_vision: no class token, global average pooling, norm before pooling",
        seed=3,
    ),
    _fam(
        "big_vision_sincos",
        "big_vision sincos2d on a non-square 4x2 grid (catches swapped x and y)",
        n_heads=2,
        seed=4,
        image_size=[32, 16],
    ),
    _fam("timm_token", "timm defaults (token pooling), batch 4", batch=4, depth=1, seed=5),
    _fam(
        "timm_avg_fc_norm",
        "timm global_pool=avg: the final norm after pooling (fc_norm), class token not pooled",
        seed=6,
    ),
    _fam(
        "timm_no_embed_class",
        "timm no_embed_class: the position embedding covers the patches only",
        n_heads=2,
        seed=7,
    ),
    _fam("timm_no_qkv_bias", "query, key and value without bias", seed=8),
    _fam("hf_vit", "HF transformers ViT: LayerNorm eps 1e-12", seed=9),
    _fam("gelu_tanh", "GELU tanh approximation, batch 1", batch=1, seed=10),
    _fam("no_pos_embed", "no position embedding, no class token, average pooling", seed=11),
    _fam("no_head", "no head: the output is the pooled features", seed=12),
    _fam("mnist", "MNIST-sized: 28x28, one input channel, 7x7 patches", seed=13),
    _fam("non_square", "non-square image 24x40 and non-square patch 6x8", depth=1, seed=14),
    # ---- depth and heads ----
    CaseDef(
        "depth1_heads1_batch1",
        "one block, one head, one image",
        _spec(depth=1, n_heads=1),
        batch=1,
        seed=20,
    ),
    CaseDef(
        "depth3_heads3_batch3",
        "three blocks, three heads, mlp_ratio 2",
        _spec(image_size=12, hidden_dim=24, n_heads=3, depth=3, mlp_ratio=2.0),
        batch=3,
        seed=21,
    ),
    CaseDef(
        "depth4_heads8",
        "four blocks, eight heads of width 2",
        _spec(image_size=12, depth=4, n_heads=8),
        seed=22,
    ),
    CaseDef(
        "heads5_avg_with_class_token",
        "five heads, mlp_ratio 1.5; average pooling that must skip the class token",
        _spec(image_size=12, patch_size=3, hidden_dim=20, n_heads=5, mlp_ratio=1.5, pooling="avg"),
        seed=23,
    ),
    CaseDef(
        "heads6_mlp_ratio_2_5",
        "six heads, mlp_ratio 2.5 (MLP width 60), 2x2 patches",
        _spec(image_size=8, patch_size=2, hidden_dim=24, n_heads=6, mlp_ratio=2.5),
        seed=24,
    ),
    CaseDef(
        "heads7_mlp_ratio_1",
        "seven heads, mlp_ratio 1, a 2x3 grid of 3x3 patches",
        _spec(image_size=[6, 9], patch_size=3, hidden_dim=28, n_heads=7, depth=1, mlp_ratio=1.0),
        seed=25,
    ),
    # ---- norm eps ----
    CaseDef(
        "norm_eps_1e-5",
        "LayerNorm eps 1e-5 (PyTorch's default)",
        _spec(norm_eps=1e-5, n_heads=2),
        seed=30,
    ),
    CaseDef(
        "norm_eps_1e-3_four_channels",
        "LayerNorm eps 1e-3 (Keras' default), four input channels",
        _spec(norm_eps=1e-3, n_heads=2, in_channels=4),
        seed=31,
    ),
    CaseDef(
        "norm_eps_sensitive",
        "eps 1e-6 where it matters: embedding weights x1e-3 so block 0's first norm sees variance near eps",
        _spec(depth=1),
        seed=32,
        adjust="scale_embedding",
    ),
    # ---- head, pooling and norm placement ----
    CaseDef(
        "one_channel_no_head",
        "one input channel, no head, non-square 3x4 patches, average pooling with the norm after it",
        _spec(
            image_size=[12, 16],
            patch_size=[3, 4],
            in_channels=1,
            n_classes=0,
            class_token=False,
            pooling="avg",
            final_norm="after_pool",
            depth=1,
            n_heads=2,
        ),
        seed=40,
    ),
    CaseDef(
        "pre_logits_no_head",
        "pre-logits layer and no head: the output is tanh(dense(pooled))",
        _spec(pre_logits_dim=12, n_classes=0, depth=1),
        seed=41,
    ),
    CaseDef(
        "token_pool_norm_after",
        "token pooling with the final norm after pooling",
        _spec(final_norm="after_pool", depth=1),
        seed=42,
    ),
    CaseDef(
        "sincos_with_class_token",
        "sincos2d on the patches plus a class token without a position",
        _spec(pos_embed="sincos2d", image_size=[8, 16]),
        seed=43,
    ),
    CaseDef(
        "learned_no_class_slot_avg",
        "learned position embedding without a class slot, class token, average pooling",
        _spec(pos_embed_class_slot=False, pooling="avg", n_heads=2),
        seed=44,
    ),
    # ---- shapes at the edges ----
    CaseDef(
        "single_patch",
        "one patch per image (two tokens with the class token)",
        _spec(image_size=8, patch_size=8, n_heads=2),
        batch=3,
        seed=50,
    ),
    CaseDef(
        "pixel_patches",
        "1x1 patches: every pixel is a token",
        _spec(image_size=4, patch_size=1, depth=1),
        seed=51,
    ),
    CaseDef(
        "tall_image_wide_patch",
        "a 32x8 image cut into 8x4 patches: a 4x2 grid with learned positions",
        _spec(image_size=[32, 8], patch_size=[8, 4], n_heads=2, depth=1),
        seed=52,
    ),
    CaseDef(
        "batch8",
        "eight images, one block: batch items must not mix",
        _spec(image_size=8, depth=1, n_heads=2),
        batch=8,
        seed=53,
    ),
    # ---- numerics ----
    CaseDef(
        "dropout_inference",
        "non-zero dropout, attention dropout and drop path: inference must ignore them",
        _spec(dropout=0.1, attn_dropout=0.1, drop_path=0.2),
        seed=60,
    ),
    CaseDef(
        "nan_pixel",
        "a NaN pixel in the last image poisons that image only",
        _spec(depth=1, n_heads=2),
        seed=61,
        adjust="nan_pixel",
    ),
    CaseDef(
        "sharp_attention",
        "attention logits up to 190: softmax must subtract the max before exp",
        _spec(depth=1, n_heads=2),
        seed=62,
        adjust="sharp_attention",
        tolerance={
            "float32": {
                "atol": 1e-4,
                "rtol": 1e-4,
                "loosens": True,
                "reason": "logits of 190 carry float32 rounding of about 1e-5 into the probabilities (the float32 "
                "reference itself is 1.7e-05 off at blocks.0.attn_heads); 1e-4 still fails tanh GELU and weight swaps",
            }
        },
    ),
    # ---- corpus version 2: the features of issue 10, one case each ----
    CaseDef(
        "registers_with_positions",
        "two register tokens after the class token, each prefix token with its own position row",
        _spec(image_size=12, reg_tokens=2, n_heads=2),
        seed=70,
    ),
    CaseDef(
        "registers_without_positions",
        "three registers and no class token, positions on the patches only; average pooling must skip the registers",
        _tiny(reg_tokens=3, class_token=False, pooling="avg", pos_embed_class_slot=False),
        seed=71,
    ),
    CaseDef(
        "distillation_token",
        "DeiT distillation token with its own head: output = (head + head_dist) / 2",
        _tiny(distillation_token=True),
        seed=72,
    ),
    CaseDef(
        "distillation_token_no_head",
        "distillation token without heads: output = (pooled + pooled_dist) / 2",
        _tiny(distillation_token=True, n_classes=0, n_heads=2),
        seed=73,
    ),
    CaseDef(
        "layer_scale",
        "layer scale on both residual branches of two blocks (captured after the scale)",
        _spec(image_size=12, layer_scale=1e-5),
        seed=74,
    ),
    CaseDef(
        "pre_norm",
        "a norm on the tokens entering block 0 (CLIP's ln_pre), captured as embed_norm",
        _tiny(pre_norm=True),
        seed=75,
    ),
    CaseDef(
        "patch_norm",
        "a norm on the patch tokens before the position embedding",
        _tiny(patch_norm=True, n_heads=2),
        seed=76,
    ),
    CaseDef(
        "final_norm_none",
        "no final norm, no class token, average pooling",
        _tiny(final_norm="none", class_token=False, pooling="avg"),
        seed=77,
    ),
    CaseDef(
        "pool_max",
        "max pooling over the patch tokens (the class token left out)",
        _tiny(pooling="max"),
        seed=78,
    ),
    CaseDef(
        "pool_avgmax_register",
        "avgmax pooling (mean of average and max) over the patches, a class token and a register left out",
        _tiny(pooling="avgmax", reg_tokens=1, n_heads=2),
        seed=79,
    ),
    CaseDef(
        "pool_map",
        "attention pooling with a learned probe, its norm and MLP (SigLIP's MAP head)",
        _tiny(pooling="map", class_token=False),
        seed=80,
    ),
    CaseDef(
        "pool_include_prefix",
        "average pooling over every token, the class token and a register included",
        _tiny(pooling="avg", pool_include_prefix=True, reg_tokens=1),
        seed=81,
    ),
    CaseDef(
        "qk_norm",
        "a norm on each head's queries and keys (width head_dim 8) before the scores",
        _spec(image_size=12, qk_norm=True, n_heads=2),
        seed=82,
    ),
    CaseDef(
        "no_patch_bias",
        "a patch projection without bias (CLIP)",
        _tiny(patch_bias=False),
        seed=83,
    ),
    CaseDef(
        "no_proj_bias",
        "an attention output projection without bias",
        _tiny(proj_bias=False),
        seed=84,
    ),
    CaseDef(
        "no_mlp_bias",
        "MLP layers without biases",
        _tiny(mlp_bias=False, n_heads=2),
        seed=85,
    ),
    CaseDef(
        "no_head_bias",
        "a head without bias (a projection, as CLIP's visual projection)",
        _tiny(head_bias=False),
        seed=86,
    ),
    CaseDef(
        "quick_gelu",
        "QuickGELU x * sigmoid(1.702 x) (OpenAI CLIP)",
        _spec(image_size=12, gelu="quick"),
        seed=87,
    ),
    CaseDef(
        "mlp_norm",
        "a norm on the standard MLP's hidden layer (width 64)",
        _tiny(mlp_norm=True),
        seed=88,
    ),
    CaseDef(
        "swiglu_mlp_norm",
        "SwiGLU MLP silu(gate(x)) * fc1(x) with a norm on its hidden layer",
        _tiny(mlp="swiglu", mlp_norm=True, mlp_ratio=2.5),
        seed=89,
    ),
    CaseDef(
        "rms_norm",
        "RMSNorm everywhere (scale only, no centring), with q/k, pre and MLP norms",
        _spec(image_size=12, norm="rms", qk_norm=True, pre_norm=True, mlp_norm=True, n_heads=2),
        seed=90,
    ),
    CaseDef(
        "dynamic_image_size_up",
        "dynamic image size: a spec for 8x8 run on 12x16 images, the learned table resampled 2x2 -> 3x4 (bicubic-antialias)",
        _spec(image_size=8, dynamic_image_size=True, n_heads=2),
        seed=91,
        image_size=(12, 16),
    ),
    CaseDef(
        "dynamic_image_size_down_bicubic",
        "dynamic image size: a spec for 16x16 run on 12x8 images, the learned table resampled 4x4 -> 3x2 (plain bicubic)",
        _spec(dynamic_image_size=True, pos_embed_resample="bicubic", depth=1),
        seed=92,
        image_size=(12, 8),
    ),
    CaseDef(
        "dynamic_image_size_sincos",
        "dynamic image size with sincos2d: the table computed for the images' 2x4 grid, not the spec's 3x3",
        _tiny(dynamic_image_size=True, pos_embed="sincos2d", class_token=False, pooling="avg"),
        seed=93,
        image_size=(8, 16),
    ),
    # ---- small instances of the families of issue 10 (timm presets named) ----
    _like(
        "deit3",
        "DeiT-III (deit3_small_patch16_224): layer scale, positions on the patches only",
        seed=100,
        image_size=12,
        layer_scale=1e-6,
        pos_embed_class_slot=False,
    ),
    _like(
        "deit_distilled",
        "DeiT distilled (deit_base_distilled_patch16_224): class and distillation tokens, two heads",
        seed=101,
        image_size=12,
        distillation_token=True,
    ),
    _like(
        "dinov2",
        "DINOv2 (vit_small_patch14_dinov2): layer scale 1e-5, a position row for the class token",
        seed=102,
        image_size=12,
        patch_size=3,
        layer_scale=1e-5,
        n_classes=0,
    ),
    _like(
        "dinov2_reg",
        "DINOv2 with registers (vit_base_patch14_reg4_dinov2): four registers, positions on the patches only, layer scale",
        seed=103,
        image_size=12,
        reg_tokens=4,
        pos_embed_class_slot=False,
        layer_scale=1e-5,
        n_classes=0,
    ),
    _like(
        "dinov2_giant",
        "DINOv2 giant (vit_giant_patch14_dinov2): SwiGLU MLP, layer scale",
        seed=104,
        image_size=12,
        hidden_dim=12,
        n_heads=3,
        mlp="swiglu",
        mlp_ratio=8 / 3,
        layer_scale=1e-5,
        n_classes=0,
    ),
    _like(
        "clip_quickgelu",
        "CLIP (vit_base_patch16_clip_quickgelu_224): no patch bias, ln_pre, QuickGELU, eps 1e-5, projection head",
        seed=105,
        image_size=12,
        patch_bias=False,
        pre_norm=True,
        gelu="quick",
        norm_eps=1e-5,
        head_bias=False,
        n_classes=8,
    ),
    _like(
        "siglip",
        "SigLIP (vit_base_patch16_siglip_224): no class token, MAP pooling, no head",
        seed=106,
        image_size=12,
        class_token=False,
        pooling="map",
        n_classes=0,
    ),
    _like(
        "aimv2",
        "AIMv2 (aimv2_large_patch14_224): RMSNorm, patch norm, SwiGLU, no attention or MLP biases, average pooling",
        seed=107,
        image_size=12,
        class_token=False,
        pooling="avg",
        norm="rms",
        norm_eps=1e-5,
        patch_norm=True,
        mlp="swiglu",
        mlp_ratio=2.75,
        qkv_bias=False,
        proj_bias=False,
        mlp_bias=False,
        n_classes=0,
    ),
]
