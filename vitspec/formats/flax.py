"""flax: the parameters of vitspec's Flax NNX model (``vitspec.backends.jax``) as safetensors.

Tensor names are the flattened ``nnx.state(model, nnx.Param)`` paths joined with ``.``
(``blocks.0.attn.qkv.kernel``), the shapes are the model's (fused ``(D, 3D)`` qkv kernel, fused
``(D, 2D)`` key/value kernel of a MAP pool, a dense ``(patch_h * patch_w * C, D)`` patch kernel);
the spec rides in the metadata, and every spec variant has a place in it.

Why safetensors and not ``flax.serialization.to_bytes`` (msgpack): msgpack has to be built and
parsed as one blob, so writing or reading it holds the whole model in memory, where safetensors is
memory-mapped and streamed a tensor at a time; and ``to_bytes`` does not accept an ``nnx.State``
in Flax 0.12 anyway. Load it in plain Flax with::

    from safetensors.numpy import load_file
    flat = {tuple(int(p) if p.isdigit() else p for p in k.split(".")): v for k, v in load_file(path).items()}
    nnx.update(model, nnx.from_flat_state(flat))
"""

from __future__ import annotations

import math
from typing import Any

from vitspec import containers
from vitspec.formats import streaming
from vitspec.formats.canonical import infer_from_shapes
from vitspec.formats.format import EVERY_VARIANT, Format
from vitspec.formats.infer import Facts, place_positions
from vitspec.layouts.flax import FLAX

NAME = "flax"


def looks_like(names: list[str]) -> bool:
    return "patch_embed.kernel" in names and any(n.endswith(".attn.qkv.kernel") for n in names)


def infer(source: containers.Source, given: dict[str, Any]) -> Facts:
    """Canonical-like names; the flattened patch kernel hides patch size and channels."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in source.shapes.items():
        if name.endswith(".attn.qkv.kernel"):
            shapes[name.replace(".qkv.", ".query.")] = (shape[0], shape[1] // 3)
        elif name.endswith(".attn.qkv.bias"):
            shapes[name.replace(".qkv.", ".query.")] = (shape[0] // 3,)
        elif name.startswith("pool.kv."):  # the attention pool's fused key and value
            shapes[name.replace(".kv.", ".key.")] = (*shape[:-1], shape[-1] // 2)
        elif name != "patch_embed.kernel":
            shapes[name] = shape
    facts = infer_from_shapes(
        shapes, given, NAME, "the file has no embedded spec", {"blocks.{i}": "blocks.{i}"}
    )
    patch_dim = (
        source.shape("patch_embed.kernel")[0] if "patch_embed.kernel" in source.shapes else 0
    )
    channels = given.get("in_channels", 3)
    if "in_channels" not in given:
        facts.default("in_channels", 3, "the patch kernel is flattened (patch_h * patch_w * C, D)")
    side = math.isqrt(patch_dim // channels) if patch_dim % channels == 0 else 0
    if "patch_size" not in given and side * side * channels == patch_dim and side:
        facts.default(
            "patch_size",
            side,
            f"a square patch of {channels} channels from the flattened patch kernel",
        )
    patch = given.get("patch_size", facts.defaults.get("patch_size"))
    if "pos_embed" in shapes and patch:
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        place_positions(facts, shapes["pos_embed"][0], patch, facts.known["class_token"], given)
    return facts


FORMAT = Format(
    name=NAME,
    summary="vitspec's Flax NNX model state (safetensors of flattened nnx.state paths)",
    containers=("safetensors",),
    layout=FLAX,
    expresses=EVERY_VARIANT,
    looks_like=looks_like,
    infer=infer,
    read=containers.open_safetensors,
    write=streaming.safetensors_writer(FLAX, {"vitspec.format": NAME}),
)
