"""Named sizes: "B/16" is the ViT paper's Base model with 16x16 patches.

Widths, depths, MLP sizes and heads follow Table 1 of Dosovitskiy et al. 2021 ("An Image is
Worth 16x16 Words": Base, Large, Huge), DeiT (Touvron et al. 2021: Tiny, Small) and big_vision's
``decode_variant`` (mu, M, So400m, g, G, e). Every preset is the ViT paper's model: 224x224
RGB input, class token, learned position embedding with a class-token slot, token pooling,
norm eps 1e-6, exact GELU and a 1000-class head. ``"B/16@384"`` sets the image size.

``NAMED`` holds the families people convert today (DeiT, DeiT-III, DINOv2, CLIP, SigLIP, AIMv2)
under short names such as ``"dinov2-B/14"``, each the architecture timm 1.0.31 builds for the
model name beside it (``timm.create_model(name)``: its model function's ``model_args`` and its
default pretrained config's image size and classes); tests/test_presets_timm.py checks every
parameter count against timm's. timm's own name works as a preset name too.

``load_spec`` is here, beside the preset names, as it takes either a preset name or a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitspec.errors import SpecError
from vitspec.spec import Spec, read_mapping

# variant: (hidden_dim, depth, mlp_dim, n_heads)
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}


@dataclass(frozen=True)
class Named:
    """A real family's architecture: the spec of timm's model ``timm`` as it builds by default."""

    family: str
    timm: str
    fields: dict[str, Any]
    source: str  # one line: where the facts come from


# Every named preset starts from timm's VisionTransformer defaults, which are vitspec's: class
# token, learned position embedding with prefix rows, LayerNorm eps 1e-6, exact GELU, biased
# qkv/proj/MLP/patch/head, token pooling, the final norm before pooling (fc_norm=None means
# "fc_norm iff global_pool is avg, avgmax or max"), dynamic_img_size False. A preset lists only
# where its family differs, each fact from the timm 1.0.31 source named in its note.
# DeiT-III: no_embed_class=True, init_values=1e-6.
_DEIT3 = {"pos_embed_class_slot": False, "layer_scale": 1e-6}
# DINOv2: init_values=1e-5; the default pretrained cfg (lvd142m) is 518x518 with num_classes 0.
_DINOV2 = {"image_size": 518, "n_classes": 0, "layer_scale": 1e-5}
# CLIP: pre_norm=True (which turns the patch conv's bias off), LayerNorm eps 1e-5.
_CLIP = {"pre_norm": True, "patch_bias": False, "norm_eps": 1e-5}
_QUICK = {**_CLIP, "gelu": "quick"}  # act_layer='quick_gelu'
# SigLIP: class_token=False, global_pool='map'; the default cfg (v2_webli) has num_classes 0.
_SIGLIP = {"class_token": False, "pooling": "map", "n_classes": 0}
_VT = "vision_transformer.py"

NAMED: dict[str, Named] = {
    "deit3-S/16": Named(
        "DeiT-III",
        "deit3_small_patch16_224",
        {
            "image_size": 224,
            "patch_size": 16,
            "hidden_dim": 384,
            "depth": 12,
            "n_heads": 6,
            **_DEIT3,
        },
        "deit.py deit3_small_patch16_224: embed_dim=384, depth=12, num_heads=6, no_embed_class, init_values=1e-6; cfg fb_in1k: 224, 1000 classes",
    ),
    "deit3-B/16": Named(
        "DeiT-III",
        "deit3_base_patch16_224",
        {
            "image_size": 224,
            "patch_size": 16,
            "hidden_dim": 768,
            "depth": 12,
            "n_heads": 12,
            **_DEIT3,
        },
        "deit.py deit3_base_patch16_224: embed_dim=768, depth=12, num_heads=12, no_embed_class, init_values=1e-6; cfg fb_in1k: 224, 1000 classes",
    ),
    "deit-B/16-distilled": Named(
        "DeiT",
        "deit_base_distilled_patch16_224",
        {
            "image_size": 224,
            "patch_size": 16,
            "hidden_dim": 768,
            "depth": 12,
            "n_heads": 12,
            "distillation_token": True,
        },
        "deit.py deit_base_distilled_patch16_224: VisionTransformerDistilled (dist_token, head_dist, pos_embed rows for both tokens); cfg fb_in1k: 224, 1000 classes",
    ),
    "dinov2-S/14": Named(
        "DINOv2",
        "vit_small_patch14_dinov2",
        {"patch_size": 14, "hidden_dim": 384, "depth": 12, "n_heads": 6, **_DINOV2},
        f"{_VT} vit_small_patch14_dinov2: embed_dim=384, depth=12, num_heads=6, init_values=1e-5; cfg lvd142m: 518, 0 classes",
    ),
    "dinov2-B/14": Named(
        "DINOv2",
        "vit_base_patch14_dinov2",
        {"patch_size": 14, "hidden_dim": 768, "depth": 12, "n_heads": 12, **_DINOV2},
        f"{_VT} vit_base_patch14_dinov2: embed_dim=768, depth=12, num_heads=12, init_values=1e-5; cfg lvd142m: 518, 0 classes",
    ),
    "dinov2-L/14": Named(
        "DINOv2",
        "vit_large_patch14_dinov2",
        {"patch_size": 14, "hidden_dim": 1024, "depth": 24, "n_heads": 16, **_DINOV2},
        f"{_VT} vit_large_patch14_dinov2: embed_dim=1024, depth=24, num_heads=16, init_values=1e-5; cfg lvd142m: 518, 0 classes",
    ),
    "dinov2-g/14": Named(
        "DINOv2",
        "vit_giant_patch14_dinov2",
        # SwiGLUPacked with hidden 8192 = two packed branches of 4096 (gate first, then linear).
        {
            "patch_size": 14,
            "hidden_dim": 1536,
            "depth": 40,
            "n_heads": 24,
            "mlp": "swiglu",
            "mlp_ratio": 4096 / 1536,
            **_DINOV2,
        },
        f"{_VT} vit_giant_patch14_dinov2: embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_layer=SwiGLUPacked, mlp_ratio=2.66667*2 (fc1 8192 = 2 x 4096, fc2 4096), act SiLU; cfg lvd142m: 518, 0 classes",
    ),
    "dinov2-B/14-reg4": Named(
        "DINOv2",
        "vit_base_patch14_reg4_dinov2",
        {
            "patch_size": 14,
            "hidden_dim": 768,
            "depth": 12,
            "n_heads": 12,
            "reg_tokens": 4,
            "pos_embed_class_slot": False,
            **_DINOV2,
        },
        f"{_VT} vit_base_patch14_reg4_dinov2: embed_dim=768, depth=12, num_heads=12, init_values=1e-5, reg_tokens=4, no_embed_class; cfg lvd142m: 518, 0 classes",
    ),
    "clip-B/16": Named(
        "CLIP",
        "vit_base_patch16_clip_224",
        {
            "image_size": 224,
            "patch_size": 16,
            "hidden_dim": 768,
            "depth": 12,
            "n_heads": 12,
            **_CLIP,
        },
        f"{_VT} vit_base_patch16_clip_224: embed_dim=768, depth=12, num_heads=12, pre_norm, LayerNorm eps 1e-5; cfg laion2b_ft_in12k_in1k: 224, 1000 classes",
    ),
    "clip-B/16-quickgelu": Named(
        "CLIP",
        "vit_base_patch16_clip_quickgelu_224",
        # timm's head is the visual projection, with a bias (zeros when converted from CLIP).
        {
            "image_size": 224,
            "patch_size": 16,
            "hidden_dim": 768,
            "depth": 12,
            "n_heads": 12,
            "n_classes": 512,
            **_QUICK,
        },
        f"{_VT} vit_base_patch16_clip_quickgelu_224: embed_dim=768, depth=12, num_heads=12, pre_norm, eps 1e-5, quick_gelu; cfg metaclip_2pt5b: 224, num_classes 512",
    ),
    "clip-B/32-quickgelu": Named(
        "CLIP",
        "vit_base_patch32_clip_quickgelu_224",
        {
            "image_size": 224,
            "patch_size": 32,
            "hidden_dim": 768,
            "depth": 12,
            "n_heads": 12,
            "n_classes": 512,
            **_QUICK,
        },
        f"{_VT} vit_base_patch32_clip_quickgelu_224: embed_dim=768, depth=12, num_heads=12, pre_norm, eps 1e-5, quick_gelu; cfg laion400m_e32: 224, num_classes 512",
    ),
    "clip-L/14-quickgelu": Named(
        "CLIP",
        "vit_large_patch14_clip_quickgelu_224",
        {
            "image_size": 224,
            "patch_size": 14,
            "hidden_dim": 1024,
            "depth": 24,
            "n_heads": 16,
            "n_classes": 768,
            **_QUICK,
        },
        f"{_VT} vit_large_patch14_clip_quickgelu_224: embed_dim=1024, depth=24, num_heads=16, pre_norm, eps 1e-5, quick_gelu; cfg dfn2b: 224, num_classes 768",
    ),
    "siglip-B/16": Named(
        "SigLIP",
        "vit_base_patch16_siglip_224",
        {
            "image_size": 224,
            "patch_size": 16,
            "hidden_dim": 768,
            "depth": 12,
            "n_heads": 12,
            **_SIGLIP,
        },
        f"{_VT} vit_base_patch16_siglip_224: embed_dim=768, depth=12, num_heads=12, class_token=False, global_pool='map' (exact GELU, eps 1e-6); cfg v2_webli: 224, 0 classes",
    ),
    "siglip-So400m/14": Named(
        "SigLIP",
        "vit_so400m_patch14_siglip_224",
        # mlp_ratio=3.7362: timm's Mlp takes int(1152 * 3.7362) = 4304, in the blocks and the pool.
        {
            "image_size": 224,
            "patch_size": 14,
            "hidden_dim": 1152,
            "depth": 27,
            "n_heads": 16,
            "mlp_ratio": 4304 / 1152,
            **_SIGLIP,
        },
        f"{_VT} vit_so400m_patch14_siglip_224: embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False, global_pool='map'; cfg v2_webli: 224, 0 classes",
    ),
    "aimv2-L/14": Named(
        "AIMv2",
        "aimv2_large_patch14_224",
        {
            "image_size": 224,
            "patch_size": 14,
            "hidden_dim": 1024,
            "depth": 24,
            "n_heads": 8,
            "mlp": "swiglu",  # mlp_layer=SwiGLU: fc1_g, fc1_x of 1024 * 2.75 = 2816 each
            "mlp_ratio": 2.75,
            "class_token": False,
            "pooling": "avg",
            "final_norm": "before_pool",  # fc_norm=False: the norm stays on every token
            "qkv_bias": False,
            "proj_bias": False,
            "mlp_bias": False,  # timm's Block gives the MLP bias=proj_bias
            "norm": "rms",
            "norm_eps": 1e-5,
            "patch_norm": True,  # embed_norm_layer=RmsNorm; the patch conv keeps its bias
            "n_classes": 0,
        },
        f"{_VT} aimv2_large_patch14_224: embed_dim=1024, depth=24, num_heads=8, mlp_ratio=2.75, SwiGLU, RmsNorm eps 1e-5 (also embed_norm_layer), qkv_bias/proj_bias False, class_token=False, global_pool='avg', fc_norm=False; cfg apple_pt: 224, 0 classes",
    ),
}
TIMM_NAMES = {named.timm: short for short, named in NAMED.items()}


# Patch sizes listed by `vitspec presets`; any patch that divides the image size is accepted.
LISTED_PATCHES = (32, 16, 14, 8)

_NAME = re.compile(r"^(?:ViT-)?(?P<variant>[A-Za-z0-9]+)/(?P<patch>\d+)(?:@(?P<image>\d+))?$")


_IMAGE = re.compile(r"^(?P<base>.+?)(?:@(?P<image>\d+))?$")


def _named(name: str) -> tuple[str, int | None] | None:
    """(short name, image size or None) of a named preset ("dinov2-B/14@224" or timm's name)."""
    match = _IMAGE.match(name)
    if not match:
        return None
    base = TIMM_NAMES.get(match["base"], match["base"])
    if base not in NAMED:
        return None
    return base, int(match["image"]) if match["image"] else None


def is_preset_name(name: str) -> bool:
    match = _NAME.match(name)
    return bool(match and match["variant"] in VARIANTS) or _named(name) is not None


def preset(name: str, n_classes: int | None = None) -> Spec:
    """The spec of a preset such as "B/16", "ViT-L/14", "S/16@384" or a named family such as
    "dinov2-B/14" (or timm's "vit_base_patch14_dinov2"); ``n_classes`` replaces the preset's
    head (1000 classes for the paper sizes, timm's default for a named family)."""
    named = _named(name)
    if named is not None:
        short, image = named
        fields = dict(NAMED[short].fields)
        fields.setdefault("image_size", 224)
        if image is not None:
            fields["image_size"] = image
        if n_classes is not None:
            fields["n_classes"] = n_classes
        return Spec.from_dict(fields, source=f"preset {name}")
    match = _NAME.match(name)
    if not match or match["variant"] not in VARIANTS:
        known = ", ".join(VARIANTS)
        raise SpecError(
            [
                f"unknown preset {name!r}: expected VARIANT/PATCH[@IMAGE] with VARIANT one of {known}, "
                "or a named family (`vitspec presets` lists them)"
            ]
        )
    hidden, depth, mlp, heads = VARIANTS[match["variant"]]
    image = int(match["image"] or 224)
    return Spec.from_dict(
        {
            "image_size": image,
            "patch_size": int(match["patch"]),
            "hidden_dim": hidden,
            "mlp_ratio": mlp / hidden,
            "n_heads": heads,
            "depth": depth,
            "n_classes": 1000 if n_classes is None else n_classes,
        },
        source=f"preset {name}",
    )


def preset_names() -> list[str]:
    """The presets `vitspec presets` lists: paper sizes with the usual patch sizes, then the
    named families."""
    names = []
    for variant in VARIANTS:
        for patch in LISTED_PATCHES:
            names.append(f"{variant}/{patch}")
    return names + list(NAMED)


def load_spec(source: str | Path | dict[str, Any] | Spec) -> Spec:
    """A Spec from a YAML/JSON path, a preset name such as "B/16", a mapping, or a Spec."""
    if isinstance(source, Spec):
        return source
    if isinstance(source, dict):
        return Spec.from_dict(source)
    path = Path(source)
    if path.is_file():
        return Spec.from_dict(read_mapping(path), source=str(path))
    text = str(source)
    if is_preset_name(text):
        return preset(text)
    if path.suffix.lower() in {".yaml", ".yml", ".json"}:
        raise SpecError([f"no such spec file: {text}"])
    raise SpecError(
        [
            f"{text!r} is neither a spec file nor a preset name (presets look like 'B/16'; `vitspec presets` lists them)"
        ]
    )
