"""google: the original ViT release's ``.npz`` (github.com/google-research/vision_transformer).

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
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.formats import _flax_npz, _io
from vitspec.formats._common import refuse
from vitspec.formats.infer import Facts
from vitspec.spec import Spec

NAME = "google"
SUMMARY = "original ViT release .npz (google-research/vision_transformer)"
CONTAINERS = ("npz",)  # what vitspec.formats._io.sniff_container may call a file of this format

SCHEME = _flax_npz.Scheme(
    name=NAME,
    prefix="",
    read_prefixes=("opt/target/",),
    pos="Transformer/posembed_input/pos_embedding",
    mha="MultiHeadDotProductAttention_1",
    ln2="LayerNorm_2",
    mlp="MlpBlock_3",
    slot_with_cls=True,
)

UNSUPPORTED = {
    r"^conv_root/|^block\d+/unit": "a ResNet stem (R50+ViT hybrid)",
}


def check_spec(spec: Spec) -> None:
    problems = []
    if spec.pos_embed == "sincos2d":
        problems.append("the original ViT has no sin-cos position embedding (use the big_vision format)")
    if spec.class_token and not spec.pos_embed_class_slot and spec.pos_embed == "learned":
        problems.append("the original ViT's position table has a class-token row (spec has pos_embed_class_slot false; use big_vision)")
    if spec.pooling == "avg" and spec.class_token:
        problems.append("the original ViT's 'gap' classifier has no class token (spec has pooling 'avg' with class_token true)")
    if spec.final_norm != "before_pool":
        problems.append("the original ViT applies encoder_norm before pooling (spec has final_norm 'after_pool')")
    if not spec.qkv_bias:
        problems.append("Flax's MultiHeadDotProductAttention always has query/key/value biases (spec has qkv_bias false)")
    refuse(problems, NAME)


def native_layout(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    check_spec(spec)
    return _flax_npz.native_layout(SCHEME, spec)


def to_native(spec: Spec, weights: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    check_spec(spec)
    return _flax_npz.to_native(SCHEME, spec, weights)


def canonical(spec: Spec, native: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    return _flax_npz.canonical(SCHEME, spec, native)


def from_native(spec: Spec, native: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    return _flax_npz.from_native(SCHEME, spec, native)


def looks_like(names: list[str]) -> bool:
    names = [n.removeprefix("opt/target/") for n in names]
    return "embedding/kernel" in names and _flax_npz.find_names(names, r"^Transformer/encoderblock_\d+/MultiHeadDotProductAttention_1/")


def infer(source: _io.Source, given: dict[str, Any]) -> Facts:
    facts = _flax_npz.infer(SCHEME, source, given, UNSUPPORTED)
    if facts.known.get("pos_embed") != "learned":
        facts.known["pos_embed"] = "none"
        facts.default("image_size", 224, "no position embedding to read it from; the ViT paper's 224")
    facts.default("norm_eps", 1e-6, "Flax LayerNorm's epsilon, which the original ViT uses")
    facts.default("gelu", "tanh", "Flax's nn.gelu is the tanh approximation; timm and HF use exact, pass --spec gelu=exact to match them")
    return facts


def open(path: Path) -> _io.Source:
    return _flax_npz.open_npz(SCHEME, path)


def write(path: Path, spec: Spec, items: Iterator[tuple[str, np.ndarray]], dtype: np.dtype, *, overwrite: bool, progress: _io.Progress | None = None) -> None:
    _flax_npz.write(path, items, overwrite=overwrite, progress=progress)
