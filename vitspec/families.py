"""The checkpoint families the spec expresses, as the field values that set them apart.

``family("big_vision_gap", **sizes)`` is a spec of that family; the sizes default to a tiny model
(handy for tests). docs/spec.md has the same table in prose.
"""

from __future__ import annotations

from typing import Any

from vitspec.spec import Spec

FAMILIES: dict[str, dict[str, Any]] = {
    # Dosovitskiy et al. 2021; Google's npz checkpoints; the presets.
    "vit_paper": {
        "class_token": True,
        "pooling": "token",
        "pos_embed": "learned",
        "pos_embed_class_slot": True,
    },
    # ViT paper with the ImageNet-21k representation layer (dense + tanh before the head).
    "vit_paper_pre_logits": {"class_token": True, "pooling": "token", "pre_logits_dim": 24},
    # big_vision: global average pooling, no class token, norm before pooling.
    "big_vision_gap": {
        "class_token": False,
        "pooling": "avg",
        "pos_embed": "learned",
        "final_norm": "before_pool",
    },
    "big_vision_sincos": {
        "class_token": False,
        "pooling": "avg",
        "pos_embed": "sincos2d",
        "final_norm": "before_pool",
    },
    # timm VisionTransformer defaults (global_pool="token").
    "timm_token": {"class_token": True, "pooling": "token", "final_norm": "before_pool"},
    # timm global_pool="avg": fc_norm, i.e. the norm comes after pooling; the class token is not pooled.
    "timm_avg_fc_norm": {"class_token": True, "pooling": "avg", "final_norm": "after_pool"},
    # timm no_embed_class=True: the position embedding covers the patches only.
    "timm_no_embed_class": {"class_token": True, "pooling": "token", "pos_embed_class_slot": False},
    "timm_no_qkv_bias": {"qkv_bias": False},
    # HF transformers ViTModel / ViTForImageClassification.
    "hf_vit": {"norm_eps": 1e-12, "class_token": True, "pooling": "token"},
    "gelu_tanh": {"gelu": "tanh"},
    "no_pos_embed": {"pos_embed": "none", "class_token": False, "pooling": "avg"},
    "no_head": {"n_classes": 0},
    # Small educational ViTs: MNIST-sized, one channel, patch 7.
    "mnist": {"image_size": 28, "patch_size": 7, "in_channels": 1, "n_classes": 10},
    "non_square": {"image_size": [24, 40], "patch_size": [6, 8]},
}

_TINY = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_dim": 32,
    "n_heads": 4,
    "depth": 2,
    "n_classes": 10,
}


def family(name: str, **overrides: Any) -> Spec:
    """A spec of family ``name``; ``overrides`` change sizes or anything else."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return Spec.from_dict({**_TINY, **FAMILIES[name], **overrides})
