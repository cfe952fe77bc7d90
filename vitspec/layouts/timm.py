"""timm's ``VisionTransformer`` state_dict, which is also vitspec's own PyTorch model's.

Fused ``qkv`` (rows q, k, v), ``(out, in)`` linears, an OIHW patch convolution; the final norm is
``norm`` when it acts on every token and ``fc_norm`` after pooling. The variants carry timm's
names: ``reg_token`` (1, R, D), ``dist_token`` and ``head_dist`` (``VisionTransformerDistilled``),
``patch_embed.norm`` (``embed_norm_layer``), ``norm_pre``, ``blocks.{i}.attn.q_norm|k_norm``,
``blocks.{i}.ls1|ls2.gamma`` (``init_values``), ``blocks.{i}.mlp.fc1_g|fc1_x`` (timm's unpacked
``SwiGLU``: the silu branch, the linear branch), ``blocks.{i}.mlp.norm`` (``scale_mlp_norm``) and
``attn_pool.*`` (``AttentionPoolLatent``, fused ``kv``). RMSNorm keeps only ``weight``.
vitspec's torch model adds ``pre_logits.fc`` (timm has no such layer), so the torch backend's
table is ``TORCH``.
"""

from __future__ import annotations

from vitspec.layouts import Layout, Row, row
from vitspec.layouts.moves import CONV, DENSE, Concat, Reshape
from vitspec.spec import Spec

QKV = ("query", "key", "value")
FUSED_WEIGHT = Concat(0, DENSE)  # (in, out) kernels -> one (parts * out, in) weight
FUSED_BIAS = Concat(0)


def final_norm_name(spec: Spec) -> str:
    return "norm" if spec.final_norm == "before_pool" else "fc_norm"


def _norm(native: str, canonical: str, spec: Spec) -> list[Row]:
    out = [row(f"{native}.weight", f"{canonical}.scale")]
    if spec.norm == "layer":
        out.append(row(f"{native}.bias", f"{canonical}.bias"))
    return out


def _linear(native: str, canonical: str, bias: bool) -> list[Row]:
    out = [row(f"{native}.weight", f"{canonical}.kernel", DENSE)]
    if bias:
        out.append(row(f"{native}.bias", f"{canonical}.bias"))
    return out


def _fused(native: str, canonical: tuple[str, ...], bias: bool) -> list[Row]:
    out = [row(f"{native}.weight", tuple(f"{c}.kernel" for c in canonical), FUSED_WEIGHT)]
    if bias:
        out.append(row(f"{native}.bias", tuple(f"{c}.bias" for c in canonical), FUSED_BIAS))
    return out


def _mlp(
    spec: Spec, native: str, canonical: str, swiglu: bool, bias: bool, norm: bool
) -> list[Row]:
    out: list[Row] = []
    if swiglu:  # timm's SwiGLU: fc1_g the gate (silu) branch, fc1_x the linear branch
        out += _linear(f"{native}.fc1_g", f"{canonical}.gate", bias)
        out += _linear(f"{native}.fc1_x", f"{canonical}.fc1", bias)
    else:
        out += _linear(f"{native}.fc1", f"{canonical}.fc1", bias)
    if norm:
        out += _norm(f"{native}.norm", f"{canonical}.norm", spec)
    return out + _linear(f"{native}.fc2", f"{canonical}.fc2", bias)


def rows(spec: Spec, pre_logits: bool = False) -> list[Row]:
    d = spec.hidden_dim
    out: list[Row] = []
    if spec.class_token:
        out.append(row("cls_token", "class_token", Reshape((1, 1, d))))
    if spec.reg_tokens:
        out.append(row("reg_token", "reg_tokens", Reshape((1, spec.reg_tokens, d))))
    if spec.pos_embed == "learned":
        out.append(row("pos_embed", "pos_embed", Reshape((1, spec.n_positions, d))))
    if spec.distillation_token:  # timm's VisionTransformerDistilled registers it after pos_embed
        out.append(row("dist_token", "dist_token", Reshape((1, 1, d))))
    out.append(row("patch_embed.proj.weight", "patch_embed.kernel", CONV))
    if spec.patch_bias:
        out.append(row("patch_embed.proj.bias", "patch_embed.bias"))
    if spec.patch_norm:
        out += _norm("patch_embed.norm", "patch_norm", spec)
    if spec.pre_norm:
        out += _norm("norm_pre", "norm_pre", spec)
    for i in range(spec.depth):
        b = f"blocks.{i}"
        out += _norm(f"{b}.norm1", f"{b}.norm1", spec)
        out += _fused(f"{b}.attn.qkv", tuple(f"{b}.attn.{p}" for p in QKV), spec.qkv_bias)
        if spec.qk_norm:
            out += _norm(f"{b}.attn.q_norm", f"{b}.attn.q_norm", spec)
            out += _norm(f"{b}.attn.k_norm", f"{b}.attn.k_norm", spec)
        out += _linear(f"{b}.attn.proj", f"{b}.attn.out", spec.proj_bias)
        if spec.layer_scale is not None:
            out.append(row(f"{b}.ls1.gamma", f"{b}.ls1.scale"))
        out += _norm(f"{b}.norm2", f"{b}.norm2", spec)
        out += _mlp(
            spec, f"{b}.mlp", f"{b}.mlp", spec.mlp == "swiglu", spec.mlp_bias, spec.mlp_norm
        )
        if spec.layer_scale is not None:
            out.append(row(f"{b}.ls2.gamma", f"{b}.ls2.scale"))
    if spec.final_norm == "before_pool":
        out += _norm("norm", "norm", spec)
    if spec.pooling == "map":
        out.append(row("attn_pool.latent", "pool.probe", Reshape((1, 1, d))))
        out += _linear("attn_pool.q", "pool.query", True)
        out += _fused("attn_pool.kv", ("pool.key", "pool.value"), True)
        out += _linear("attn_pool.proj", "pool.out", True)
        out += _norm("attn_pool.norm", "pool.norm", spec)
        out += _mlp(spec, "attn_pool.mlp", "pool.mlp", False, True, False)
    if spec.final_norm == "after_pool":
        out += _norm("fc_norm", "norm", spec)
    if pre_logits and spec.pre_logits_dim:
        out += _linear("pre_logits.fc", "pre_logits", True)
    if spec.n_classes:
        out += _linear("head", "head", spec.head_bias)
        if spec.distillation_token:
            out += _linear("head_dist", "head_dist", spec.head_bias)
    return out


TIMM = Layout("timm", rows, dense="out_in")
TORCH = Layout("torch", lambda spec: rows(spec, pre_logits=True), dense="out_in")
