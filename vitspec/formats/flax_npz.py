"""The Flax ``.npz`` checkpoints: the original ViT release (``google``) and big_vision (``big_vision``).

Both keep Flax module paths joined with ``/`` and Flax's own shapes (``vitspec.layouts.flax_npz``);
they differ in module numbering, in where the position embedding lives and in a prefix.

google
------
google: the original ViT release's ``.npz`` (github.com/google-research/vision_transformer).

Flax module paths joined with ``/``; timm reads these files (``VisionTransformer.load_pretrained``).

====================================================================  ===================  ==============================
npz name                                                              shape                canonical
====================================================================  ===================  ==============================
``embedding/kernel``, ``embedding/bias``                              (ph, pw, C, D), (D,) ``patch_embed.kernel|bias``
``cls``                                                               (1, 1, D)            ``class_token``
``Transformer/posembed_input/pos_embedding``                          (1, 1 + N, D)        ``pos_embed``
``Transformer/encoderblock_{i}/LayerNorm_0/scale|bias``               (D,)                 ``blocks.{i}.norm1.scale|bias``
``Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/``
    ``query|key|value/kernel``                                        (D, heads, hd)       ``blocks.{i}.attn.query|key|value.kernel`` (reshaped)
    ``query|key|value/bias``                                          (heads, hd)          ``blocks.{i}.attn.query|key|value.bias``
    ``out/kernel``, ``out/bias``                                      (heads, hd, D), (D,) ``blocks.{i}.attn.out.kernel|bias``
``Transformer/encoderblock_{i}/LayerNorm_2/scale|bias``               (D,)                 ``blocks.{i}.norm2.scale|bias``
``Transformer/encoderblock_{i}/MlpBlock_3/Dense_0|Dense_1/kernel|bias``  (D, M) / (M, D)   ``blocks.{i}.mlp.fc1|fc2.kernel|bias``
``Transformer/encoder_norm/scale|bias``                               (D,)                 ``norm.scale|bias``
``pre_logits/kernel|bias``                                            (D, R), (R,)         ``pre_logits.kernel|bias``
``head/kernel|bias``                                                  (R or D, K), (K,)    ``head.kernel|bias``
====================================================================  ===================  ==============================

The class token is concatenated before the position embedding is added, so the table has a row
for it; ``classifier='gap'`` models have no ``cls`` and average every token after
``encoder_norm``. Defaults for what arrays cannot tell: Flax's LayerNorm epsilon 1e-6 and Flax's
``nn.gelu``, which is the tanh approximation (timm and HF run these weights with exact GELU;
pass ``--spec gelu=exact`` to match them).

big_vision
----------
big_vision: ``.npz`` checkpoints of ``big_vision.models.vit`` (github.com/google-research/big_vision).

Names are the Flax parameter paths joined with ``/`` under ``params/`` (``opt/target/``,
``params/img/`` for a two-tower image encoder, and no prefix are read too). Shapes are Flax's, as in
the ``google`` format; the differences:

==============================================================  ===================  ===============================
npz name (after ``params/``)                                    shape                canonical
==============================================================  ===================  ===============================
``embedding/kernel|bias``                                       (ph, pw, C, D), (D,) ``patch_embed.kernel|bias``
``pos_embedding``                                               (1, N, D)            ``pos_embed`` (no class-token row)
``cls``                                                         (1, 1, D)            ``class_token`` (``pool_type='tok'``)
``Transformer/encoderblock_{i}/LayerNorm_0/scale|bias``         (D,)                 ``blocks.{i}.norm1.scale|bias``
``Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/``
    ``query|key|value/kernel|bias``                             (D, heads, hd)       ``blocks.{i}.attn.query|key|value.*``
    ``out/kernel|bias``                                         (heads, hd, D)       ``blocks.{i}.attn.out.*``
``Transformer/encoderblock_{i}/LayerNorm_1/scale|bias``         (D,)                 ``blocks.{i}.norm2.scale|bias``
``Transformer/encoderblock_{i}/MlpBlock_0/Dense_0|1/kernel|bias``  (D, M) / (M, D)   ``blocks.{i}.mlp.fc1|fc2.*``
``Transformer/encoder_norm/scale|bias``                         (D,)                 ``norm.scale|bias``
``pre_logits/kernel|bias``                                      (D, R), (R,)         ``pre_logits.kernel|bias``
``head/kernel|bias``                                            (R or D, K), (K,)    ``head.kernel|bias``
``MAPHead_0/probe``                                             (1, 1, D)            ``pool.probe`` (``pool_type='map'``)
``MAPHead_0/MultiHeadDotProductAttention_0/``
    ``query|key|value/kernel|bias``                             (D, heads, hd)       ``pool.query|key|value.*``
    ``out/kernel|bias``                                         (heads, hd, D)       ``pool.out.*``
``MAPHead_0/LayerNorm_0/scale|bias``                            (D,)                 ``pool.norm.scale|bias``
``MAPHead_0/MlpBlock_0/Dense_0|1/kernel|bias``                  (D, M) / (M, D)      ``pool.mlp.fc1|fc2.*``
==============================================================  ===================  ===============================

big_vision adds the position embedding before it prepends the class token, so ``pos_embedding``
covers the patches only (an old-style table with a class row, N = grid + 1, is read and written as
``pos_embed_class_slot: true``; big_vision's loader folds that row into ``cls``). A scanned
encoder (``Transformer/encoderblock/...`` stacked along a leading depth axis) is read block by
block. No ``pos_embedding`` means ``posemb='sincos2d'``; ``pool_type='gap'`` is a model without
``cls``; ``pool_type='map'`` (SigLIP) is ``pooling: map`` (``MAPHead_0``, below), and
``pool_type='0'`` (first token, no ``cls``) has no arrays of its own to tell it from ``gap``.
Defaults: LayerNorm epsilon 1e-6 and tanh GELU, as Flax's ``nn.LayerNorm`` and ``nn.gelu``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from vitspec import containers
from vitspec.errors import WeightsError
from vitspec.formats import streaming
from vitspec.formats.format import Format, refuse
from vitspec.formats.infer import Facts, block_count, need, place_positions, reject_features
from vitspec.layouts.flax_npz import BIG_VISION, GOOGLE, Scheme, layout, native_name
from vitspec.spec import Spec

# Arrays of features a vitspec spec cannot express, per scheme.
UNSUPPORTED = {
    "google": {r"^conv_root/|^block\d+/unit": "a ResNet stem (R50+ViT hybrid)"},
    "big_vision": {},
}
_SCAN = re.compile(r"^(params/)Transformer/encoderblock/(.+)$")


def _open(s: Scheme, path: Path) -> containers.Source:
    """The npz with its checkpoint prefix (``params/``, ``opt/target/`` ...) replaced by ``s.prefix``."""
    source = containers.open_npz(path)
    names = source.names
    strip = next(
        (p for p in s.read_prefixes if p and names and all(n.startswith(p) for n in names)), ""
    )
    if strip != s.prefix:
        source = source.renamed({n: s.prefix + n[len(strip) :] for n in names})
    return source


def _infer(s: Scheme, source: containers.Source, given: dict[str, Any]) -> Facts:
    """What a Flax ViT npz says about its spec (heads included: the kernels are split per head)."""
    p = s.prefix
    shapes = {n.removeprefix(p): v for n, v in source.shapes.items()}
    names = list(shapes)
    reject_features(names, UNSUPPORTED[s.name], s.name)
    facts = Facts(s.name)
    k = facts.known
    ph, pw, c, d = need(
        shapes,
        "embedding/kernel",
        4,
        "the patch embedding",
        "patch_embed.kernel",
        p + "embedding/kernel",
    )
    k.update(hidden_dim=d, in_channels=c, patch_size=(ph, pw), final_norm="before_pool")
    depth = block_count(names, r"^Transformer/encoderblock_(\d+)/", "Transformer/encoderblock")
    if not depth:
        raise WeightsError(
            [f"no {p}Transformer/encoderblock_{{i}}/* arrays found: not a {s.name} ViT checkpoint"]
        )
    k["depth"] = depth

    query = native_name(s, "blocks.0.attn.query.kernel")
    _, heads, _ = need(
        shapes,
        query.removeprefix(p),
        3,
        "the first query kernel (D, heads, head_dim)",
        "blocks.0.attn.query.kernel",
        query,
    )
    k["n_heads"] = heads
    fc1 = native_name(s, "blocks.0.mlp.fc1.kernel")
    k["mlp_ratio"] = (
        need(shapes, fc1.removeprefix(p), 2, "the first MLP layer", "blocks.0.mlp.fc1.kernel", fc1)[
            1
        ]
        / d
    )
    k["qkv_bias"] = native_name(s, "blocks.0.attn.query.bias").removeprefix(p) in shapes
    k["class_token"] = "cls" in shapes
    k["pooling"] = "token" if k["class_token"] else "avg"
    if "MAPHead_0/probe" in shapes:  # big_vision pool_type='map'
        k["pooling"] = "map"
    k["pre_logits_dim"] = shapes["pre_logits/kernel"][1] if "pre_logits/kernel" in shapes else 0
    k["n_classes"] = shapes["head/kernel"][1] if "head/kernel" in shapes else 0
    if s.pos in shapes:
        k["pos_embed"] = "learned"
        rows = need(shapes, s.pos, 3, "the position embedding", "pos_embed", p + s.pos)[1]
        slot = k["class_token"] if s.slot_with_cls else None
        place_positions(
            facts, rows, (ph, pw), k["class_token"], given, slot=slot, usual_slot=s.slot_with_cls
        )
    return facts


def find_names(names: list[str], pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(n) for n in names)


def _flax_vit_limits(spec: Spec, who: str) -> list[str]:
    """What both Flax ViTs lack: token-free 'gap' only, the norm before pooling, qkv biases."""
    problems = []
    if spec.pooling == "avg" and spec.class_token:
        problems.append(
            f"{who}'s 'gap' pooling has no class token (spec has pooling 'avg' with class_token true)"
        )
    if spec.final_norm != "before_pool":
        problems.append(
            f"{who} applies encoder_norm before pooling (spec has final_norm 'after_pool')"
        )
    if not spec.qkv_bias:
        problems.append(
            "Flax's MultiHeadDotProductAttention always has query/key/value biases (spec has qkv_bias false)"
        )
    return problems


# ---- google ----------------------------------------------------------------------------------


def google_check_spec(spec: Spec) -> None:
    problems = []
    if spec.pos_embed == "sincos2d":
        problems.append(
            "the original ViT has no sin-cos position embedding (use the big_vision format)"
        )
    if spec.class_token and not spec.pos_embed_class_slot and spec.pos_embed == "learned":
        problems.append(
            "the original ViT's position table has a class-token row (spec has pos_embed_class_slot false; use big_vision)"
        )
    refuse(problems + _flax_vit_limits(spec, "the original ViT"), "google")


def google_looks_like(names: list[str]) -> bool:
    names = [n.removeprefix("opt/target/") for n in names]
    return "embedding/kernel" in names and find_names(
        names, r"^Transformer/encoderblock_\d+/MultiHeadDotProductAttention_1/"
    )


def google_infer(source: containers.Source, given: dict[str, Any]) -> Facts:
    facts = _infer(GOOGLE, source, given)
    if facts.known.get("pos_embed") != "learned":
        facts.known["pos_embed"] = "none"
        facts.default(
            "image_size", 224, "no position embedding to read it from; the ViT paper's 224"
        )
    facts.default("norm_eps", 1e-6, "Flax LayerNorm's epsilon, which the original ViT uses")
    facts.default(
        "gelu",
        "tanh",
        "Flax's nn.gelu is the tanh approximation; timm and HF use exact, pass --spec gelu=exact to match them",
    )
    return facts


# ---- big_vision ------------------------------------------------------------------------------


def big_vision_check_spec(spec: Spec) -> None:
    problems = []
    if spec.pooling in ("max", "avgmax"):
        problems.append(
            f"big_vision pools by 'tok', 'gap' or 'map' (spec has pooling {spec.pooling!r})"
        )
    if spec.pooling == "map" and spec.class_token:
        problems.append(
            "big_vision's MAP head (pool_type='map') is for a model without cls (spec has class_token true)"
        )
    if spec.pos_embed == "none":
        problems.append(
            "big_vision's ViT has a learned or a sincos2d position embedding (spec has pos_embed 'none')"
        )
    refuse(problems + _flax_vit_limits(spec, "big_vision"), "big_vision")


def big_vision_looks_like(names: list[str]) -> bool:
    if any(n.startswith(("params/", "opt/target/")) for n in names) and any(
        n.endswith("embedding/kernel") for n in names
    ):
        return not any("MultiHeadDotProductAttention_1/" in n for n in names)
    return any("MultiHeadDotProductAttention_0/" in n for n in names) or "pos_embedding" in names


def big_vision_infer(source: containers.Source, given: dict[str, Any]) -> Facts:
    facts = _infer(BIG_VISION, source, given)
    if facts.known.get("pos_embed") != "learned":
        facts.known["pos_embed"] = "sincos2d"
        facts.default(
            "image_size", 224, "a sincos2d table has no arrays to read the grid from; 224 assumed"
        )
    if facts.known["pooling"] == "avg":
        del facts.known["pooling"]
        facts.default(
            "pooling",
            "avg",
            "no cls: big_vision's pool_type='gap'; pool_type='0' (the first token) has the same arrays and no vitspec equivalent",
        )
    facts.default("norm_eps", 1e-6, "Flax LayerNorm's epsilon, which big_vision uses")
    facts.default(
        "gelu",
        "tanh",
        "Flax's nn.gelu, which big_vision's MlpBlock uses, is the tanh approximation",
    )
    return facts


def big_vision_read(path: Path) -> containers.Source:
    source = _open(BIG_VISION, path)
    stacked = {n: m for n in source.names if (m := _SCAN.match(n))}
    return _unscan(source, stacked) if stacked else source


def _unscan(source: containers.Source, stacked: dict[str, re.Match[str]]) -> containers.Source:
    """A scanned encoder (one array per parameter, stacked over depth) seen as per-block arrays."""
    depths = {source.shape(n)[0] for n in stacked}
    if len(depths) != 1:
        raise WeightsError(
            [
                f"{source.path}: the scanned Transformer/encoderblock/* arrays disagree on depth: {sorted(depths)}"
            ]
        )
    depth = depths.pop()
    entries: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    where: dict[str, tuple[str, int | None]] = {}
    for name in source.names:
        m = stacked.get(name)
        if m is None:
            entries[name], where[name] = source.entries[name], (name, None)
            continue
        shape, dtype = source.entries[name]
        for i in range(depth):
            virtual = f"{m.group(1)}Transformer/encoderblock_{i}/{m.group(2)}"
            entries[virtual], where[virtual] = (shape[1:], dtype), (name, i)

    def read(name: str) -> np.ndarray:
        real, i = where[name]
        array = source._read(real)
        return array if i is None else array[i]

    return containers.Source(
        source.path,
        entries,
        read,
        metadata=source.metadata,
        close=source.close,
        container=source.container,
    )


def write(
    path: Path,
    spec: Spec,
    items: Any,
    dtype: np.dtype,
    *,
    overwrite: bool,
    progress: containers.Progress | None = None,
) -> None:
    streaming.write_npz(path, items, overwrite=overwrite, progress=progress)


GOOGLE_FORMAT = Format(
    name="google",
    summary="original ViT release .npz (google-research/vision_transformer)",
    containers=("npz",),
    layout=layout(GOOGLE),
    looks_like=google_looks_like,
    infer=google_infer,
    read=lambda path: _open(GOOGLE, path),
    write=write,
    check_spec=google_check_spec,
)
BIG_VISION_FORMAT = Format(
    name="big_vision",
    summary="big_vision ViT .npz (google-research/big_vision)",
    containers=("npz",),
    layout=layout(BIG_VISION),
    looks_like=big_vision_looks_like,
    infer=big_vision_infer,
    read=big_vision_read,
    write=write,
    check_spec=big_vision_check_spec,
    expresses=frozenset({"pooling"}),  # 'map' (MAPHead_0); check_spec refuses 'max', 'avgmax'
)
