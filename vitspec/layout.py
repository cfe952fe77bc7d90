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

Init = Literal["lecun", "dense", "zeros", "ones", "tiny", "posemb"]


@dataclass(frozen=True)
class Param:
    """One canonical tensor."""

    name: str
    shape: tuple[int, ...]
    meaning: str
    init: Init


def param_table(spec: Spec) -> list[Param]:
    """Every parameter of ``spec`` in forward order."""
    d, m, ph, pw, c = spec.hidden_dim, spec.mlp_dim, *spec.patch_size, spec.in_channels
    table = [
        Param(
            "patch_embed.kernel",
            (ph, pw, c, d),
            "patch projection, HWIO: patch (row, col, channel) -> token",
            "lecun",
        ),
        Param("patch_embed.bias", (d,), "patch projection bias", "zeros"),
    ]
    if spec.class_token:
        table.append(
            Param("class_token", (d,), "learned class token, prepended to the patch tokens", "tiny")
        )
    if spec.pos_embed == "learned":
        rows = (
            "class token then patches, row-major"
            if spec.pos_embed_class_slot
            else "patches, row-major"
        )
        table.append(
            Param(
                "pos_embed", (spec.n_positions, d), f"learned position embedding ({rows})", "posemb"
            )
        )
    for i in range(spec.depth):
        b = f"blocks.{i}"
        table += [
            Param(
                f"{b}.norm1.scale", (d,), f"block {i}: LayerNorm before attention, scale", "ones"
            ),
            Param(f"{b}.norm1.bias", (d,), f"block {i}: LayerNorm before attention, bias", "zeros"),
        ]
        for part in ("query", "key", "value"):
            table.append(
                Param(
                    f"{b}.attn.{part}.kernel",
                    (d, d),
                    f"block {i}: {part} projection, heads contiguous on the output axis",
                    "dense",
                )
            )
            if spec.qkv_bias:
                table.append(
                    Param(
                        f"{b}.attn.{part}.bias", (d,), f"block {i}: {part} projection bias", "zeros"
                    )
                )
        table += [
            Param(
                f"{b}.attn.out.kernel",
                (d, d),
                f"block {i}: attention output projection, heads contiguous on the input axis",
                "dense",
            ),
            Param(
                f"{b}.attn.out.bias", (d,), f"block {i}: attention output projection bias", "zeros"
            ),
            Param(f"{b}.norm2.scale", (d,), f"block {i}: LayerNorm before the MLP, scale", "ones"),
            Param(f"{b}.norm2.bias", (d,), f"block {i}: LayerNorm before the MLP, bias", "zeros"),
            Param(f"{b}.mlp.fc1.kernel", (d, m), f"block {i}: MLP expansion", "dense"),
            Param(f"{b}.mlp.fc1.bias", (m,), f"block {i}: MLP expansion bias", "tiny"),
            Param(f"{b}.mlp.fc2.kernel", (m, d), f"block {i}: MLP projection", "dense"),
            Param(f"{b}.mlp.fc2.bias", (d,), f"block {i}: MLP projection bias", "tiny"),
        ]
    where = (
        "every token, before pooling"
        if spec.final_norm == "before_pool"
        else "the pooled vector (timm fc_norm)"
    )
    table += [
        Param("norm.scale", (d,), f"final LayerNorm on {where}, scale", "ones"),
        Param("norm.bias", (d,), f"final LayerNorm on {where}, bias", "zeros"),
    ]
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
        table += [
            Param("head.kernel", (spec.features_dim, k), "classifier head", "dense"),
            Param("head.bias", (k,), "classifier head bias", "zeros"),
        ]
    return table


def param_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """name -> shape, in forward order."""
    return {p.name: p.shape for p in param_table(spec)}


def capture_points(spec: Spec) -> list[str]:
    """Names of every capture point, in forward order (shared by the reference and all backends)."""
    names = ["patch_embed", "embed"]
    for i in range(spec.depth):
        b = f"blocks.{i}"
        names += [f"{b}.attn_probs", f"{b}.attn_heads", f"{b}.attn", f"{b}.mlp", b]
    names += ["encoded", "pooled"]
    if spec.pre_logits_dim:
        names.append("pre_logits")
    names.append("output")
    return names


def capture_shapes(spec: Spec, batch: int) -> dict[str, tuple[int, ...]]:
    """The shape of every capture point for a batch of ``batch`` images."""
    n, d, h = spec.seq_len, spec.hidden_dim, spec.n_heads
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed": (batch, spec.n_patches, d),
        "embed": (batch, n, d),
    }
    for i in range(spec.depth):
        b = f"blocks.{i}"
        shapes[f"{b}.attn_probs"] = (batch, h, n, n)
        shapes[f"{b}.attn_heads"] = (batch, h, n, spec.head_dim)
        shapes[f"{b}.attn"] = (batch, n, d)
        shapes[f"{b}.mlp"] = (batch, n, d)
        shapes[b] = (batch, n, d)
    shapes["encoded"] = (batch, n, d)
    shapes["pooled"] = (batch, d)
    if spec.pre_logits_dim:
        shapes["pre_logits"] = (batch, spec.pre_logits_dim)
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
        "tokens entering block 0: class token prepended, position embedding added",
    ),
    "blocks.{i}.attn_probs": ("(B, heads, N, N)", "softmax attention probabilities per head"),
    "blocks.{i}.attn_heads": (
        "(B, heads, N, D/heads)",
        "each head's output before the output projection",
    ),
    "blocks.{i}.attn": (
        "(B, N, D)",
        "attention output after the output projection, before the residual add",
    ),
    "blocks.{i}.mlp": ("(B, N, D)", "MLP output, before the residual add"),
    "blocks.{i}": ("(B, N, D)", "block output, after both residual adds"),
    "encoded": (
        "(B, N, D)",
        "tokens after the encoder (after the final norm when it comes before pooling)",
    ),
    "pooled": ("(B, D)", "pooled vector (after the final norm when it comes after pooling)"),
    "pre_logits": ("(B, pre_logits_dim)", "dense + tanh layer output, when the spec has one"),
    "output": ("(B, n_classes)", "logits; with `n_classes: 0`, the pooled or pre-logits vector"),
}


def check_capture(spec: Spec, capture: str | Iterable[str]) -> list[str]:
    """Validate requested capture names; ``"all"`` expands to every point, another string is one name."""
    names = capture_points(spec)
    if isinstance(capture, str):
        capture = names if capture == "all" else (capture,)
    capture = list(capture)
    unknown = [c for c in capture if c not in names]
    if unknown:
        raise InputError(
            f"unknown capture point(s) {', '.join(map(repr, unknown))}; this spec has: "
            f"patch_embed, embed, blocks.0..{spec.depth - 1}[.attn_probs|.attn_heads|.attn|.mlp], encoded, pooled"
            + (", pre_logits" if spec.pre_logits_dim else "")
            + ", output"
        )
    return list(capture)
