"""The Flax ``.npz`` layouts of the original ViT release (``google``) and of big_vision.

Flax module paths joined with ``/``, Flax's own shapes: HWIO patch kernel, ``(in, out)`` dense
kernels, attention kernels split per head (``(D, heads, head_dim)`` for query/key/value,
``(heads, head_dim, D)`` for the output). Every move is a reshape, so every conversion is a view.
The two differ in module numbering, in where the position embedding lives and in a prefix
(``Scheme``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vitspec.layout import param_table
from vitspec.layouts import Layout, Row, row
from vitspec.layouts.moves import SAME, Move, Reshape
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
    slot_with_cls: (
        bool  # the position table has a class-token row exactly when there is a class token
    )


GOOGLE = Scheme(
    name="google",
    prefix="",
    read_prefixes=("opt/target/",),
    pos="Transformer/posembed_input/pos_embedding",
    mha="MultiHeadDotProductAttention_1",
    ln2="LayerNorm_2",
    mlp="MlpBlock_3",
    slot_with_cls=True,
)
BIG_VISION = Scheme(
    name="big_vision",
    prefix="params/",
    read_prefixes=("params/img/", "params/", "opt/target/", ""),
    pos="pos_embedding",
    mha="MultiHeadDotProductAttention_0",
    ln2="LayerNorm_1",
    mlp="MlpBlock_0",
    slot_with_cls=False,
)

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
    # big_vision's MAPHead (pool_type='map'): its attention, LayerNorm and MlpBlock.
    "pool.probe": "MAPHead_0/probe",
    "pool.query.kernel": "MAPHead_0/MultiHeadDotProductAttention_0/query/kernel",
    "pool.query.bias": "MAPHead_0/MultiHeadDotProductAttention_0/query/bias",
    "pool.key.kernel": "MAPHead_0/MultiHeadDotProductAttention_0/key/kernel",
    "pool.key.bias": "MAPHead_0/MultiHeadDotProductAttention_0/key/bias",
    "pool.value.kernel": "MAPHead_0/MultiHeadDotProductAttention_0/value/kernel",
    "pool.value.bias": "MAPHead_0/MultiHeadDotProductAttention_0/value/bias",
    "pool.out.kernel": "MAPHead_0/MultiHeadDotProductAttention_0/out/kernel",
    "pool.out.bias": "MAPHead_0/MultiHeadDotProductAttention_0/out/bias",
    "pool.norm.scale": "MAPHead_0/LayerNorm_0/scale",
    "pool.norm.bias": "MAPHead_0/LayerNorm_0/bias",
    "pool.mlp.fc1.kernel": "MAPHead_0/MlpBlock_0/Dense_0/kernel",
    "pool.mlp.fc1.bias": "MAPHead_0/MlpBlock_0/Dense_0/bias",
    "pool.mlp.fc2.kernel": "MAPHead_0/MlpBlock_0/Dense_1/kernel",
    "pool.mlp.fc2.bias": "MAPHead_0/MlpBlock_0/Dense_1/bias",
}
_BLOCK = {
    "norm1.scale": "LayerNorm_0/scale",
    "norm1.bias": "LayerNorm_0/bias",
    "attn.query.kernel": "{mha}/query/kernel",
    "attn.query.bias": "{mha}/query/bias",
    "attn.key.kernel": "{mha}/key/kernel",
    "attn.key.bias": "{mha}/key/bias",
    "attn.value.kernel": "{mha}/value/kernel",
    "attn.value.bias": "{mha}/value/bias",
    "attn.out.kernel": "{mha}/out/kernel",
    "attn.out.bias": "{mha}/out/bias",
    "norm2.scale": "{ln2}/scale",
    "norm2.bias": "{ln2}/bias",
    "mlp.fc1.kernel": "{mlp}/Dense_0/kernel",
    "mlp.fc1.bias": "{mlp}/Dense_0/bias",
    "mlp.fc2.kernel": "{mlp}/Dense_1/kernel",
    "mlp.fc2.bias": "{mlp}/Dense_1/bias",
}


def native_name(s: Scheme, canonical: str) -> str:
    """The npz name of a canonical tensor (with the scheme's prefix)."""
    if canonical.startswith("blocks."):
        _, i, rest = canonical.split(".", 2)
        leaf = _BLOCK[rest].format(mha=s.mha, ln2=s.ln2, mlp=s.mlp)
        return f"{s.prefix}Transformer/encoderblock_{i}/{leaf}"
    return s.prefix + (s.pos if canonical == "pos_embed" else _TOP[canonical])


def _move(spec: Spec, name: str, shape: tuple[int, ...]) -> Move:
    h, hd, d = spec.n_heads, spec.head_dim, spec.hidden_dim
    if name in ("class_token", "pool.probe"):
        return Reshape((1, 1, d))
    if name == "pos_embed":
        return Reshape((1, *shape))
    if name.endswith(("query.kernel", "key.kernel", "value.kernel")):
        return Reshape((d, h, hd))
    if name.endswith(("query.bias", "key.bias", "value.bias")):
        return Reshape((h, hd))
    if name.endswith(("attn.out.kernel", "pool.out.kernel")):
        return Reshape((h, hd, d))
    return SAME


def layout(s: Scheme) -> Layout:
    def rows(spec: Spec) -> list[Row]:
        return [
            row(native_name(s, p.name), p.name, _move(spec, p.name, p.shape))
            for p in param_table(spec)
        ]

    return Layout(s.name, rows)
