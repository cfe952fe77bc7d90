"""The canonical parameter table: the single source of truth for names, shapes and meanings.

Conventions (docs/layout.md explains them):
- dense kernels are ``(in, out)`` and ``y = x @ kernel + bias``;
- the patch kernel is ``(patch_h, patch_w, in_channels, hidden_dim)`` (HWIO), so a patch
  flattens in (row, column, channel) order;
- query, key and value are separate ``(hidden_dim, hidden_dim)`` kernels with the heads
  contiguous along the output axis (head h owns columns h*head_dim ... (h+1)*head_dim);
- norms have ``scale`` and ``bias``; the class token is ``(hidden_dim,)``; a learned position
  embedding is ``(positions, hidden_dim)``, the class-token row first when it has one.

Init weights, backends, converters and docs all read this table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from vitspec.errors import InputError

if TYPE_CHECKING:  # layout reads a spec's properties; only spec.py builds one
    from vitspec.spec import Spec

Init = Literal["lecun", "dense", "zeros", "ones", "tiny", "posemb", "layer_scale", "probe"]


@dataclass(frozen=True)
class Param:
    """One canonical tensor."""

    name: str
    shape: tuple[int, ...]
    meaning: str
    init: Init


def _norm(name: str, width: int, what: str, spec: Spec) -> list[Param]:
    """A norm's tensors: scale (and bias for LayerNorm; RMSNorm has none)."""
    kind = "LayerNorm" if spec.norm == "layer" else "RMSNorm"
    out = [Param(f"{name}.scale", (width,), f"{what}: {kind} scale", "ones")]
    if spec.norm == "layer":
        out.append(Param(f"{name}.bias", (width,), f"{what}: {kind} bias", "zeros"))
    return out


def _dense(
    name: str, shape: tuple[int, int], what: str, bias: bool, bias_init: Init = "zeros"
) -> list[Param]:
    out = [Param(f"{name}.kernel", shape, what, "dense")]
    if bias:  # "query projection bias", without the kernel's note on where the heads lie
        what = what.split(", heads ")[0]
        out.append(Param(f"{name}.bias", (shape[1],), f"{what} bias", bias_init))
    return out


def _mlp(spec: Spec, name: str, what: str, swiglu: bool, bias: bool, norm: bool) -> list[Param]:
    d, m = spec.hidden_dim, spec.mlp_dim
    out: list[Param] = []
    if swiglu:
        out += _dense(
            f"{name}.gate", (d, m), f"{what}: SwiGLU gate (the silu branch)", bias, "tiny"
        )
    out += _dense(f"{name}.fc1", (d, m), f"{what}: MLP expansion", bias, "tiny")
    if norm:
        out += _norm(f"{name}.norm", m, f"{what}: norm on the MLP hidden layer", spec)
    out += _dense(f"{name}.fc2", (m, d), f"{what}: MLP projection", bias, "tiny")
    return out


def param_table(spec: Spec) -> list[Param]:
    """Every parameter of ``spec`` in forward order."""
    d, ph, pw, c = spec.hidden_dim, *spec.patch_size, spec.in_channels
    table = [
        Param(
            "patch_embed.kernel",
            (ph, pw, c, d),
            "patch projection, HWIO: patch (row, col, channel) -> token",
            "lecun",
        )
    ]
    if spec.patch_bias:
        table.append(Param("patch_embed.bias", (d,), "patch projection bias", "zeros"))
    if spec.patch_norm:
        table += _norm(
            "patch_norm", d, "norm on the patch tokens, before the position embedding", spec
        )
    if spec.class_token:
        table.append(
            Param("class_token", (d,), "learned class token, prepended to the patch tokens", "tiny")
        )
    if spec.distillation_token:
        table.append(
            Param("dist_token", (d,), "learned distillation token, after the class token", "posemb")
        )
    if spec.reg_tokens:
        table.append(
            Param(
                "reg_tokens",
                (spec.reg_tokens, d),
                "learned register tokens, after the class (and distillation) token",
                "tiny",
            )
        )
    if spec.pos_embed == "learned":
        rows = (
            "prefix tokens then patches, row-major"
            if spec.pos_embed_class_slot
            else "patches, row-major"
        )
        table.append(
            Param(
                "pos_embed", (spec.n_positions, d), f"learned position embedding ({rows})", "posemb"
            )
        )
    if spec.pre_norm:
        table += _norm("norm_pre", d, "norm on the tokens entering block 0", spec)
    hd = spec.head_dim
    for i in range(spec.depth):
        b = f"blocks.{i}"
        table += _norm(f"{b}.norm1", d, f"block {i}: norm before attention", spec)
        for part in ("query", "key", "value"):
            table += _dense(
                f"{b}.attn.{part}",
                (d, d),
                f"block {i}: {part} projection, heads contiguous on the output axis",
                spec.qkv_bias,
            )
        if spec.qk_norm:
            table += _norm(f"{b}.attn.q_norm", hd, f"block {i}: norm on each head's queries", spec)
            table += _norm(f"{b}.attn.k_norm", hd, f"block {i}: norm on each head's keys", spec)
        table += _dense(
            f"{b}.attn.out",
            (d, d),
            f"block {i}: attention output projection, heads contiguous on the input axis",
            spec.proj_bias,
        )
        if spec.layer_scale is not None:
            table.append(
                Param(
                    f"{b}.ls1.scale",
                    (d,),
                    f"block {i}: layer scale on the attention branch",
                    "layer_scale",
                )
            )
        table += _norm(f"{b}.norm2", d, f"block {i}: norm before the MLP", spec)
        table += _mlp(
            spec, f"{b}.mlp", f"block {i}", spec.mlp == "swiglu", spec.mlp_bias, spec.mlp_norm
        )
        if spec.layer_scale is not None:
            table.append(
                Param(
                    f"{b}.ls2.scale",
                    (d,),
                    f"block {i}: layer scale on the MLP branch",
                    "layer_scale",
                )
            )
    if spec.final_norm != "none":
        where = (
            "every token, before pooling"
            if spec.final_norm == "before_pool"
            else "the pooled vector (timm fc_norm)"
        )
        table += _norm("norm", d, f"final norm on {where}", spec)
    if spec.pooling == "map":
        table.append(
            Param("pool.probe", (d,), "attention pooling: the learned probe (query token)", "probe")
        )
        for part in ("query", "key", "value"):
            table += _dense(f"pool.{part}", (d, d), f"attention pooling: {part} projection", True)
        table += _dense("pool.out", (d, d), "attention pooling: output projection", True)
        table += _norm("pool.norm", d, "attention pooling: norm before its MLP", spec)
        table += _mlp(spec, "pool.mlp", "attention pooling", False, True, False)
    if spec.pre_logits_dim:
        r = spec.pre_logits_dim
        table += [
            Param(
                "pre_logits.kernel", (d, r), "pre-logits dense layer (followed by tanh)", "dense"
            ),
            Param("pre_logits.bias", (r,), "pre-logits bias", "zeros"),
        ]
    if spec.n_classes:
        k = spec.n_classes
        what = "classifier head" if spec.head_bias else "projection head (no bias)"
        table += _dense("head", (spec.features_dim, k), what, spec.head_bias)
        if spec.distillation_token:
            table += _dense(
                "head_dist", (spec.features_dim, k), "distillation head", spec.head_bias
            )
    return table


def param_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """name -> shape, in forward order."""
    return {p.name: p.shape for p in param_table(spec)}


def capture_points(spec: Spec) -> list[str]:
    """Names of every capture point, in forward order (shared by the reference and all backends)."""
    names = ["patch_embed", "embed"]
    if spec.pre_norm:
        names.append("embed_norm")
    for i in range(spec.depth):
        b = f"blocks.{i}"
        names += [f"{b}.attn_probs", f"{b}.attn_heads", f"{b}.attn", f"{b}.mlp", b]
    names.append("encoded")
    if spec.pooling == "map":
        names += ["pool.attn_probs", "pool.attn", "pool.mlp"]
    names.append("pooled")
    if spec.distillation_token:
        names.append("pooled_dist")
    if spec.pre_logits_dim:
        names.append("pre_logits")
    if spec.distillation_token and spec.n_classes:
        names += ["head", "head_dist"]
    names.append("output")
    return names


def grid_of(spec: Spec, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The patch grid of an image of ``image_size`` (default: the spec's own)."""
    if image_size is None:
        return spec.grid
    return image_size[0] // spec.patch_size[0], image_size[1] // spec.patch_size[1]


def capture_shapes(
    spec: Spec, batch: int, image_size: tuple[int, int] | None = None
) -> dict[str, tuple[int, ...]]:
    """The shape of every capture point for a batch of ``batch`` images (of ``image_size``, for a
    spec with a dynamic image size; default the spec's own)."""
    gh, gw = grid_of(spec, image_size)
    patches = gh * gw
    n, d, h = patches + spec.n_prefix_tokens, spec.hidden_dim, spec.n_heads
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed": (batch, patches, d),
        "embed": (batch, n, d),
    }
    if spec.pre_norm:
        shapes["embed_norm"] = (batch, n, d)
    for i in range(spec.depth):
        b = f"blocks.{i}"
        shapes[f"{b}.attn_probs"] = (batch, h, n, n)
        shapes[f"{b}.attn_heads"] = (batch, h, n, spec.head_dim)
        shapes[f"{b}.attn"] = (batch, n, d)
        shapes[f"{b}.mlp"] = (batch, n, d)
        shapes[b] = (batch, n, d)
    shapes["encoded"] = (batch, n, d)
    if spec.pooling == "map":
        shapes["pool.attn_probs"] = (batch, h, 1, n if spec.pool_include_prefix else patches)
        shapes["pool.attn"] = (batch, d)
        shapes["pool.mlp"] = (batch, d)
    shapes["pooled"] = (batch, d)
    if spec.distillation_token:
        shapes["pooled_dist"] = (batch, d)
    if spec.pre_logits_dim:
        shapes["pre_logits"] = (batch, spec.pre_logits_dim)
    if spec.distillation_token and spec.n_classes:
        shapes["head"] = (batch, spec.n_classes)
        shapes["head_dist"] = (batch, spec.n_classes)
    shapes["output"] = (batch, spec.output_dim)
    return shapes


def drop_path_rates(spec: Spec) -> list[float]:
    """Stochastic-depth rate of each block: ``drop_path * i / (depth - 1)``, so block 0 never drops
    and a one-block model uses 0 (timm's ``linspace(0, drop_path, depth)``)."""
    if spec.depth == 1:
        return [0.0]
    return [spec.drop_path * i / (spec.depth - 1) for i in range(spec.depth)]


# Every capture point's shape and meaning, as docs/layout.md tables them (tests/test_docs.py checks
# the page against this) and `vitspec layout` prints them. B batch, N seq_len, D hidden_dim.
CAPTURE_MEANINGS: dict[str, tuple[str, str]] = {
    "patch_embed": (
        "(B, patches, D)",
        "patch tokens after the patch projection, before class token and position",
    ),
    "embed": (
        "(B, N, D)",
        "prefix tokens (class, distillation, registers) prepended, position embedding added",
    ),
    "embed_norm": ("(B, N, D)", "tokens entering block 0 after the norm on them (pre_norm)"),
    "blocks.{i}.attn_probs": ("(B, heads, N, N)", "softmax attention probabilities per head"),
    "blocks.{i}.attn_heads": (
        "(B, heads, N, D/heads)",
        "each head's output before the output projection",
    ),
    "blocks.{i}.attn": (
        "(B, N, D)",
        "attention output after the output projection (and layer scale), before the residual add",
    ),
    "blocks.{i}.mlp": ("(B, N, D)", "MLP output (after layer scale), before the residual add"),
    "blocks.{i}": ("(B, N, D)", "block output, after both residual adds"),
    "encoded": (
        "(B, N, D)",
        "tokens after the encoder (after the final norm when it comes before pooling)",
    ),
    "pool.attn_probs": (
        "(B, heads, 1, N)",
        "attention pooling: the probe's attention over the tokens",
    ),
    "pool.attn": (
        "(B, D)",
        "attention pooling: the probe's attention output, after the output projection",
    ),
    "pool.mlp": ("(B, D)", "attention pooling: its MLP's output, before the residual add"),
    "pooled": ("(B, D)", "pooled vector (after the final norm when it comes after pooling)"),
    "pooled_dist": ("(B, D)", "the distillation token's output (distillation_token)"),
    "pre_logits": ("(B, pre_logits_dim)", "dense + tanh layer output, when the spec has one"),
    "head": ("(B, n_classes)", "the class token head's logits (distillation_token)"),
    "head_dist": ("(B, n_classes)", "the distillation head's logits (distillation_token)"),
    "output": (
        "(B, n_classes)",
        "logits (the mean of both heads' with a distillation token); with `n_classes: 0`, the pooled or pre-logits vector",
    ),
}


def check_capture(spec: Spec, capture: str | Iterable[str]) -> list[str]:
    """Validate requested capture names; ``"all"`` expands to every point, another string is one name."""
    names = capture_points(spec)
    if isinstance(capture, str):
        capture = names if capture == "all" else (capture,)
    capture = list(capture)
    unknown = [c for c in capture if c not in names]
    if unknown:
        tail = [
            n
            for n in names
            if not n.startswith("blocks.") and n not in ("patch_embed", "embed", "embed_norm")
        ]
        head = ", ".join(n for n in ("patch_embed", "embed", "embed_norm") if n in names)
        raise InputError(
            f"unknown capture point(s) {', '.join(map(repr, unknown))}; this spec has: "
            f"{head}, blocks.0..{spec.depth - 1}[.attn_probs|.attn_heads|.attn|.mlp], {', '.join(tail)}"
        )
    return list(capture)
