"""Named sizes: "B/16" is the ViT paper's Base model with 16x16 patches.

Widths, depths, MLP sizes and heads follow Table 1 of Dosovitskiy et al. 2021 ("An Image is
Worth 16x16 Words": Base, Large, Huge), DeiT (Touvron et al. 2021: Tiny, Small) and big_vision's
``decode_variant`` (mu, M, So400m, g, G, e). Every preset is the ViT paper's model: 224x224
RGB input, class token, learned position embedding with a class-token slot, token pooling,
norm eps 1e-6, exact GELU and a 1000-class head. ``"B/16@384"`` sets the image size.

``load_spec`` is here, beside the preset names, as it takes either a preset name or a file.
"""

from __future__ import annotations

import re
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

# Patch sizes listed by `vitspec presets`; any patch that divides the image size is accepted.
LISTED_PATCHES = (32, 16, 14, 8)

_NAME = re.compile(r"^(?:ViT-)?(?P<variant>[A-Za-z0-9]+)/(?P<patch>\d+)(?:@(?P<image>\d+))?$")


def is_preset_name(name: str) -> bool:
    match = _NAME.match(name)
    return bool(match and match["variant"] in VARIANTS)


def preset(name: str, n_classes: int = 1000) -> Spec:
    """The spec of a named preset such as "B/16", "ViT-L/14" or "S/16@384"."""
    match = _NAME.match(name)
    if not match or match["variant"] not in VARIANTS:
        known = ", ".join(VARIANTS)
        raise SpecError(
            [f"unknown preset {name!r}: expected VARIANT/PATCH[@IMAGE] with VARIANT one of {known}"]
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
            "n_classes": n_classes,
        },
        source=f"preset {name}",
    )


def preset_names() -> list[str]:
    """The presets `vitspec presets` lists (paper sizes and the usual patch sizes)."""
    names = []
    for variant in VARIANTS:
        for patch in LISTED_PATCHES:
            names.append(f"{variant}/{patch}")
    return names


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
