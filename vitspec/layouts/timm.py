"""timm's ``VisionTransformer`` state_dict, which is also vitspec's own PyTorch model's.

Fused ``qkv`` (rows q, k, v), ``(out, in)`` linears, an OIHW patch convolution; the final norm is
``norm`` when it acts on every token and ``fc_norm`` after pooling. vitspec's torch model adds
``pre_logits.fc`` (timm has no such layer), so the torch backend's table is ``TORCH``.
"""

from __future__ import annotations

from vitspec.layouts import Layout, Row, row
from vitspec.layouts.moves import CONV, DENSE, Concat, Reshape
from vitspec.spec import Spec

QKV = ("query", "key", "value")
FUSED_WEIGHT = Concat(0, DENSE)  # three (in, out) kernels -> one (3 * out, in) weight
FUSED_BIAS = Concat(0)


def final_norm_name(spec: Spec) -> str:
    return "norm" if spec.final_norm == "before_pool" else "fc_norm"


def rows(spec: Spec, pre_logits: bool = False) -> list[Row]:
    d = spec.hidden_dim
    out: list[Row] = []
    if spec.class_token:
        out.append(row("cls_token", "class_token", Reshape((1, 1, d))))
    if spec.pos_embed == "learned":
        out.append(row("pos_embed", "pos_embed", Reshape((1, spec.n_positions, d))))
    out += [
        row("patch_embed.proj.weight", "patch_embed.kernel", CONV),
        row("patch_embed.proj.bias", "patch_embed.bias"),
    ]
    for i in range(spec.depth):
        b = f"blocks.{i}"
        out += [
            row(f"{b}.norm1.weight", f"{b}.norm1.scale"),
            row(f"{b}.norm1.bias", f"{b}.norm1.bias"),
            row(f"{b}.attn.qkv.weight", tuple(f"{b}.attn.{p}.kernel" for p in QKV), FUSED_WEIGHT),
        ]
        if spec.qkv_bias:
            out.append(
                row(f"{b}.attn.qkv.bias", tuple(f"{b}.attn.{p}.bias" for p in QKV), FUSED_BIAS)
            )
        out += [
            row(f"{b}.attn.proj.weight", f"{b}.attn.out.kernel", DENSE),
            row(f"{b}.attn.proj.bias", f"{b}.attn.out.bias"),
            row(f"{b}.norm2.weight", f"{b}.norm2.scale"),
            row(f"{b}.norm2.bias", f"{b}.norm2.bias"),
            row(f"{b}.mlp.fc1.weight", f"{b}.mlp.fc1.kernel", DENSE),
            row(f"{b}.mlp.fc1.bias", f"{b}.mlp.fc1.bias"),
            row(f"{b}.mlp.fc2.weight", f"{b}.mlp.fc2.kernel", DENSE),
            row(f"{b}.mlp.fc2.bias", f"{b}.mlp.fc2.bias"),
        ]
    norm = final_norm_name(spec)
    out += [row(f"{norm}.weight", "norm.scale"), row(f"{norm}.bias", "norm.bias")]
    if pre_logits and spec.pre_logits_dim:
        out += [
            row("pre_logits.fc.weight", "pre_logits.kernel", DENSE),
            row("pre_logits.fc.bias", "pre_logits.bias"),
        ]
    if spec.n_classes:
        out += [row("head.weight", "head.kernel", DENSE), row("head.bias", "head.bias")]
    return out


TIMM = Layout("timm", rows, dense="out_in")
TORCH = Layout("torch", lambda spec: rows(spec, pre_logits=True), dense="out_in")
