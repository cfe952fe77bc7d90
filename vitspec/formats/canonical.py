"""canonical: vitspec's own weights file (safetensors, canonical names, the spec in the metadata).

``vitspec layout SPEC`` prints the table; docs/layout.md explains it. A canonical file without an
embedded spec (written by another tool) is read too: its spec is inferred from the shapes, with
vitspec's own defaults for heads, norm eps and GELU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vitspec import __version__, containers
from vitspec.errors import WeightsError
from vitspec.formats import streaming
from vitspec.formats.format import EVERY_VARIANT, Format
from vitspec.formats.infer import Facts, add_default_heads, block_count, need, place_positions
from vitspec.layouts import CANONICAL
from vitspec.spec import Spec
from vitspec.weights import FORMAT as FORMAT_TAG

NAME = "canonical"


def looks_like(names: list[str]) -> bool:
    return "patch_embed.kernel" in names


def infer(source: containers.Source, given: dict[str, Any]) -> Facts:
    """A canonical file without an embedded spec: the shapes, then vitspec's defaults."""
    return infer_from_shapes(source.shapes, given, NAME, "the file has no embedded spec")


def infer_from_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    given: dict[str, Any],
    family: str,
    why: str,
    native: Mapping[str, str] | None = None,
) -> Facts:
    """Facts from canonical names and shapes (only those present); vitspec's defaults for the rest.

    Native formats whose names map onto canonical ones (keras, flax) reuse this; ``native`` maps a
    canonical name (and ``blocks.{i}``) to the format's own, which errors name.
    """
    native = native or {}
    names = list(shapes)

    def need_(name: str, ndim: int, what: str) -> tuple[int, ...]:
        return need(shapes, name, ndim, what, name, native.get(name))

    facts = Facts(family)
    k = facts.known
    if "patch_embed.kernel" in shapes and len(shapes["patch_embed.kernel"]) == 4:
        ph, pw, c, d = shapes["patch_embed.kernel"]
        k.update(in_channels=c, patch_size=(ph, pw))
    else:
        d = need_("patch_embed.bias", 1, "the patch embedding bias")[0]
    k["hidden_dim"] = d
    depth = block_count(names, r"^blocks\.(\d+)\.", "blocks")
    if not depth:
        raise WeightsError([f"no {native.get('blocks.{i}', 'blocks.{i}')}.* tensors found"])
    k["depth"] = depth
    k["mlp_ratio"] = need_("blocks.0.mlp.fc1.kernel", 2, "the first MLP layer")[1] / d
    k["qkv_bias"] = "blocks.0.attn.query.bias" in shapes
    k["class_token"] = "class_token" in shapes
    k["pre_logits_dim"] = shapes["pre_logits.kernel"][1] if "pre_logits.kernel" in shapes else 0
    k["n_classes"] = shapes["head.kernel"][1] if "head.kernel" in shapes else 0
    if not k["class_token"]:
        k["pooling"] = "avg"
    if "pos_embed" in shapes:
        k["pos_embed"] = "learned"
        rows = need_("pos_embed", 2, "the position embedding")[0]
        if "patch_size" in k:
            prefix = int(k["class_token"]) + int("dist_token" in shapes)
            prefix += shapes["reg_tokens"][0] if "reg_tokens" in shapes else 0
            place_positions(facts, rows, k["patch_size"], prefix, given)
    else:
        facts.default(
            "pos_embed",
            "none",
            "no pos_embed tensor; pass --spec pos_embed=sincos2d for a fixed table",
        )
        facts.default("image_size", 224, "no position embedding to read it from")
    add_default_heads(facts, d)
    for name in ("pooling", "final_norm", "norm_eps", "gelu"):
        if name not in k:
            facts.default(name, Spec.model_fields[name].default, f"vitspec's default; {why}")
    return facts


FORMAT = Format(
    name=NAME,
    summary="vitspec canonical safetensors (spec in the metadata)",
    containers=("safetensors",),
    layout=CANONICAL,
    expresses=EVERY_VARIANT,
    looks_like=looks_like,
    infer=infer,
    read=containers.open_safetensors,
    write=streaming.safetensors_writer(
        CANONICAL, {"format": FORMAT_TAG, "vitspec.version": __version__}
    ),
)
