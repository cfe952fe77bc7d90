"""The Flax ``.npz`` layouts shared by the original ViT release and big_vision.

Both name parameters by Flax module paths joined with ``/`` and keep Flax's own shapes: HWIO patch
kernel, ``(in, out)`` dense kernels, attention kernels split per head (``(D, heads, head_dim)``
for query/key/value, ``(heads, head_dim, D)`` for the output). Canonical tensors are reshapes of
these, never transposes, so every conversion here is a view. The two differ in module numbering,
where the position embedding lives and whether the class token has a row in it (``Scheme``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.errors import WeightsError
from vitspec.formats import _io
from vitspec.formats._common import LazyView, block_count, in_table_order, need, reject_features
from vitspec.formats.infer import Facts, place_positions
from vitspec.spec import Spec


@dataclass(frozen=True)
class Scheme:
    name: str
    prefix: str  # written before every name
    read_prefixes: tuple[str, ...]  # stripped when every name starts with one
    pos: str
    mha: str
    ln2: str
    mlp: str
    slot_with_cls: bool  # the position table has a class-token row exactly when there is a class token


def block_names(s: Scheme, i: int) -> dict[str, str]:
    """canonical block suffix -> npz name (without the prefix) for block ``i``."""
    b = f"Transformer/encoderblock_{i}"
    names = {
        "norm1.scale": f"{b}/LayerNorm_0/scale",
        "norm1.bias": f"{b}/LayerNorm_0/bias",
        "attn.out.kernel": f"{b}/{s.mha}/out/kernel",
        "attn.out.bias": f"{b}/{s.mha}/out/bias",
        "norm2.scale": f"{b}/{s.ln2}/scale",
        "norm2.bias": f"{b}/{s.ln2}/bias",
        "mlp.fc1.kernel": f"{b}/{s.mlp}/Dense_0/kernel",
        "mlp.fc1.bias": f"{b}/{s.mlp}/Dense_0/bias",
        "mlp.fc2.kernel": f"{b}/{s.mlp}/Dense_1/kernel",
        "mlp.fc2.bias": f"{b}/{s.mlp}/Dense_1/bias",
    }
    for part in ("query", "key", "value"):
        names[f"attn.{part}.kernel"] = f"{b}/{s.mha}/{part}/kernel"
        names[f"attn.{part}.bias"] = f"{b}/{s.mha}/{part}/bias"
    return names


_TOP = {
    "patch_embed.kernel": "embedding/kernel",
    "patch_embed.bias": "embedding/bias",
    "class_token": "cls",
    "norm.scale": "Transformer/encoder_norm/scale",
    "norm.bias": "Transformer/encoder_norm/bias",
    "pre_logits.kernel": "pre_logits/kernel",
    "pre_logits.bias": "pre_logits/bias",
    "head.kernel": "head/kernel",
    "head.bias": "head/bias",
}


def native_name(s: Scheme, canonical_name: str) -> str:
    if canonical_name.startswith("blocks."):
        _, i, rest = canonical_name.split(".", 2)
        return s.prefix + block_names(s, int(i))[rest]
    if canonical_name == "pos_embed":
        return s.prefix + s.pos
    return s.prefix + _TOP[canonical_name]


def native_shape(spec: Spec, canonical_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Flax shape of a canonical tensor."""
    h, hd, d = spec.n_heads, spec.head_dim, spec.hidden_dim
    if canonical_name == "class_token":
        return (1, 1, d)
    if canonical_name == "pos_embed":
        return (1, *shape)
    if canonical_name.endswith(("query.kernel", "key.kernel", "value.kernel")):
        return (d, h, hd)
    if canonical_name.endswith(("query.bias", "key.bias", "value.bias")):
        return (h, hd)
    if canonical_name.endswith("attn.out.kernel"):
        return (h, hd, d)
    return shape


def native_layout(s: Scheme, spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    from vitspec.layout import param_table

    return [(native_name(s, p.name), native_shape(spec, p.name, p.shape)) for p in param_table(spec)]


def to_native(s: Scheme, spec: Spec, weights: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    from vitspec.layout import param_table

    for p in param_table(spec):
        yield native_name(s, p.name), weights[p.name].reshape(native_shape(spec, p.name, p.shape))


def canonical(s: Scheme, spec: Spec, native: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    from vitspec.layout import param_shapes

    shapes = param_shapes(spec)
    return LazyView(spec, lambda name: native[native_name(s, name)].reshape(shapes[name]))


def from_native(s: Scheme, spec: Spec, native: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    return in_table_order(spec, canonical(s, spec, native))


# ---- reading ---------------------------------------------------------------------------------


def open_npz(s: Scheme, path: Path) -> _io.Source:
    """The npz with its checkpoint prefix (``params/``, ``opt/target/`` ...) replaced by ``s.prefix``."""
    source = _io.open_npz(path)
    names = source.names
    strip = next((p for p in s.read_prefixes if p and names and all(n.startswith(p) for n in names)), "")
    if strip != s.prefix:
        source = source.renamed({n: s.prefix + n[len(strip):] for n in names})
    return source


def infer(s: Scheme, source: _io.Source, given: dict[str, Any], unsupported: Mapping[str, str]) -> Facts:
    """What a Flax ViT npz says about its spec (heads included: the kernels are split per head)."""
    p = s.prefix
    shapes = {n.removeprefix(p): v for n, v in source.shapes.items()}
    names = list(shapes)
    reject_features(names, unsupported, s.name)
    facts = Facts(s.name)
    k = facts.known
    ph, pw, c, d = need(shapes, "embedding/kernel", 4, "the patch embedding")
    k.update(hidden_dim=d, in_channels=c, patch_size=(ph, pw), final_norm="before_pool")
    depth = block_count(names, r"^Transformer/encoderblock_(\d+)/", "Transformer/encoderblock")
    if not depth:
        raise WeightsError([f"no {p}Transformer/encoderblock_{{i}}/* arrays found: not a {s.name} ViT checkpoint"])
    k["depth"] = depth
    first = block_names(s, 0)
    _, heads, _ = need(shapes, first["attn.query.kernel"], 3, "the first query kernel (D, heads, head_dim)")
    k["n_heads"] = heads
    k["mlp_ratio"] = need(shapes, first["mlp.fc1.kernel"], 2, "the first MLP layer")[1] / d
    k["qkv_bias"] = first["attn.query.bias"] in shapes
    k["class_token"] = "cls" in shapes
    k["pooling"] = "token" if k["class_token"] else "avg"
    k["pre_logits_dim"] = shapes["pre_logits/kernel"][1] if "pre_logits/kernel" in shapes else 0
    k["n_classes"] = shapes["head/kernel"][1] if "head/kernel" in shapes else 0
    if s.pos in shapes:
        k["pos_embed"] = "learned"
        rows = need(shapes, s.pos, 3, "the position embedding")[1]
        slot = k["class_token"] if s.slot_with_cls else None
        place_positions(facts, rows, (ph, pw), k["class_token"], given.get("image_size"), slot=slot)
    return facts


def find_names(names: list[str], pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(n) for n in names)


def write(path: Path, items: Iterator[tuple[str, np.ndarray]], *, overwrite: bool, progress: _io.Progress | None) -> None:
    _io.write_npz(path, items, overwrite=overwrite, progress=progress)
