"""big_vision: ``.npz`` checkpoints of ``big_vision.models.vit`` (github.com/google-research/big_vision).

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
==============================================================  ===================  ===============================

big_vision adds the position embedding before it prepends the class token, so ``pos_embedding``
covers the patches only (an old-style table with a class row, N = grid + 1, is read and written as
``pos_embed_class_slot: true``; big_vision's loader folds that row into ``cls``). A scanned
encoder (``Transformer/encoderblock/...`` stacked along a leading depth axis) is read block by
block. No ``pos_embedding`` means ``posemb='sincos2d'``; ``pool_type='gap'`` is a model without
``cls``; ``pool_type='map'`` (``MAPHead_0``) has no vitspec equivalent and is refused, and
``pool_type='0'`` (first token, no ``cls``) has no arrays of its own to tell it from ``gap``.
Defaults: LayerNorm epsilon 1e-6 and tanh GELU, as Flax's ``nn.LayerNorm`` and ``nn.gelu``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.errors import WeightsError
from vitspec.formats import _flax_npz, _io
from vitspec.formats._common import refuse
from vitspec.formats.infer import Facts
from vitspec.spec import Spec

NAME = "big_vision"
SUMMARY = "big_vision ViT .npz (google-research/big_vision)"
CONTAINERS = ("npz",)  # what vitspec.formats._io.sniff_container may call a file of this format

SCHEME = _flax_npz.Scheme(
    name=NAME,
    prefix="params/",
    read_prefixes=("params/img/", "params/", "opt/target/", ""),
    pos="pos_embedding",
    mha="MultiHeadDotProductAttention_0",
    ln2="LayerNorm_1",
    mlp="MlpBlock_0",
    slot_with_cls=False,
)

UNSUPPORTED = {
    r"^MAPHead_0/": "a multihead attention pooling head (pool_type='map')",
}

_SCAN = re.compile(r"^(params/)Transformer/encoderblock/(.+)$")


def check_spec(spec: Spec) -> None:
    problems = []
    if spec.pos_embed == "none":
        problems.append("big_vision's ViT has a learned or a sincos2d position embedding (spec has pos_embed 'none')")
    if spec.pooling == "avg" and spec.class_token:
        problems.append("big_vision's 'gap' pooling has no class token (spec has pooling 'avg' with class_token true)")
    if spec.final_norm != "before_pool":
        problems.append("big_vision applies encoder_norm before pooling (spec has final_norm 'after_pool')")
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
    if any(n.startswith(("params/", "opt/target/")) for n in names) and any(n.endswith("embedding/kernel") for n in names):
        return not any("MultiHeadDotProductAttention_1/" in n for n in names)
    return any("MultiHeadDotProductAttention_0/" in n for n in names) or "pos_embedding" in names


def infer(source: _io.Source, given: dict[str, Any]) -> Facts:
    facts = _flax_npz.infer(SCHEME, source, given, UNSUPPORTED)
    if facts.known.get("pos_embed") != "learned":
        facts.known["pos_embed"] = "sincos2d"
        facts.default("image_size", 224, "a sincos2d table has no arrays to read the grid from; 224 assumed")
    if not facts.known["class_token"]:
        facts.why["pooling"] = "no cls: pool_type 'gap'"
    facts.default("norm_eps", 1e-6, "Flax LayerNorm's epsilon, which big_vision uses")
    facts.default("gelu", "tanh", "Flax's nn.gelu, which big_vision's MlpBlock uses, is the tanh approximation")
    return facts


def open(path: Path) -> _io.Source:
    source = _flax_npz.open_npz(SCHEME, path)
    stacked = {n: m for n in source.names if (m := _SCAN.match(n))}
    return _unscan(source, stacked) if stacked else source


def _unscan(source: _io.Source, stacked: dict[str, re.Match[str]]) -> _io.Source:
    """A scanned encoder (one array per parameter, stacked over depth) seen as per-block arrays."""
    depths = {source.shape(n)[0] for n in stacked}
    if len(depths) != 1:
        raise WeightsError([f"{source.path}: the scanned Transformer/encoderblock/* arrays disagree on depth: {sorted(depths)}"])
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

    return _io.Source(source.path, entries, read, metadata=source.metadata, close=source.close, container=source.container)


def write(path: Path, spec: Spec, items: Iterator[tuple[str, np.ndarray]], dtype: np.dtype, *, overwrite: bool, progress: _io.Progress | None = None) -> None:
    _flax_npz.write(path, items, overwrite=overwrite, progress=progress)
