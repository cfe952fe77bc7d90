"""torchvision's ``VisionTransformer`` state_dict (``torchvision.models.vit_b_16`` ... ``vit_h_14``).

A class token ``class_token`` (1, 1, D), an OIHW patch convolution ``conv_proj``, a learned
position table ``encoder.pos_embedding`` (1, N + 1, D) with the class row first, blocks
``encoder.layers.encoder_layer_{i}`` with ``nn.MultiheadAttention``'s fused ``in_proj_weight``
(rows q, k, v) and ``out_proj``, an MLP ``mlp.0`` / ``mlp.3`` (Linear, GELU, Dropout, Linear,
Dropout), the final norm ``encoder.ln`` on every token, and ``heads.head`` after an optional
``heads.pre_logits`` (+ tanh, ``representation_size``). Linears keep (out, in) weights.
"""

from __future__ import annotations

from vitspec.layouts import Layout, Row, row
from vitspec.layouts.moves import CONV, DENSE, Concat, Reshape
from vitspec.spec import Spec

QKV = ("query", "key", "value")


def _norm(native: str, canonical: str) -> list[Row]:
    return [
        row(f"{native}.weight", f"{canonical}.scale"),
        row(f"{native}.bias", f"{canonical}.bias"),
    ]


def _linear(native: str, canonical: str) -> list[Row]:
    return [
        row(f"{native}.weight", f"{canonical}.kernel", DENSE),
        row(f"{native}.bias", f"{canonical}.bias"),
    ]


def rows(spec: Spec) -> list[Row]:
    """torchvision's names in its own state_dict order. Only what torchvision can build has rows:
    the format's ``check_spec`` refuses the rest before this is asked."""
    d = spec.hidden_dim
    out: list[Row] = [
        row("class_token", "class_token", Reshape((1, 1, d))),
        row("conv_proj.weight", "patch_embed.kernel", CONV),
        row("conv_proj.bias", "patch_embed.bias"),
        row("encoder.pos_embedding", "pos_embed", Reshape((1, spec.n_positions, d))),
    ]
    for i in range(spec.depth):
        b, c = f"encoder.layers.encoder_layer_{i}", f"blocks.{i}"
        attn = f"{b}.self_attention"
        out += _norm(f"{b}.ln_1", f"{c}.norm1")
        out.append(
            row(
                f"{attn}.in_proj_weight",
                tuple(f"{c}.attn.{p}.kernel" for p in QKV),
                Concat(0, DENSE),
            )
        )
        out.append(row(f"{attn}.in_proj_bias", tuple(f"{c}.attn.{p}.bias" for p in QKV), Concat(0)))
        out += _linear(f"{attn}.out_proj", f"{c}.attn.out")
        out += _norm(f"{b}.ln_2", f"{c}.norm2")
        out += _linear(f"{b}.mlp.0", f"{c}.mlp.fc1")
        out += _linear(f"{b}.mlp.3", f"{c}.mlp.fc2")
    out += _norm("encoder.ln", "norm")
    if spec.pre_logits_dim:
        out += _linear("heads.pre_logits", "pre_logits")
    out += _linear("heads.head", "head")
    return out


TORCHVISION = Layout("torchvision", rows, dense="out_in")
