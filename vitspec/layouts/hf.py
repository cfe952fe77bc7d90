"""HF transformers ``ViTModel`` / ``ViTForImageClassification``: the names ``save_pretrained`` writes.

``ViTForImageClassification`` prefixes the encoder with ``vit.``; ``ViTModel`` has none and keeps
its pooler (dense + tanh, our pre-logits layer). Linears are ``(out, in)``; the patch projection
is an OIHW convolution; query, key and value are separate.
"""

from __future__ import annotations

from vitspec.layouts import Layout, Row, row
from vitspec.layouts.moves import CONV, DENSE, SAME, Reshape
from vitspec.spec import Spec

# canonical block suffix -> HF layer suffix
BLOCK = {
    "norm1.scale": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "attn.query.kernel": "attention.attention.query.weight",
    "attn.query.bias": "attention.attention.query.bias",
    "attn.key.kernel": "attention.attention.key.weight",
    "attn.key.bias": "attention.attention.key.bias",
    "attn.value.kernel": "attention.attention.value.weight",
    "attn.value.bias": "attention.attention.value.bias",
    "attn.out.kernel": "attention.output.dense.weight",
    "attn.out.bias": "attention.output.dense.bias",
    "norm2.scale": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.kernel": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.kernel": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
}


def prefix(spec: Spec) -> str:
    return "vit." if spec.n_classes else ""


def rows(spec: Spec) -> list[Row]:
    d, p = spec.hidden_dim, prefix(spec)
    out = [
        row(f"{p}embeddings.cls_token", "class_token", Reshape((1, 1, d))),
        row(f"{p}embeddings.position_embeddings", "pos_embed", Reshape((1, spec.n_positions, d))),
        row(f"{p}embeddings.patch_embeddings.projection.weight", "patch_embed.kernel", CONV),
        row(f"{p}embeddings.patch_embeddings.projection.bias", "patch_embed.bias"),
    ]
    for i in range(spec.depth):
        for suffix, native in BLOCK.items():
            if (
                suffix.startswith("attn.")
                and suffix.endswith(".bias")
                and "out" not in suffix
                and not spec.qkv_bias
            ):
                continue
            out.append(
                row(
                    f"{p}encoder.layer.{i}.{native}",
                    f"blocks.{i}.{suffix}",
                    DENSE if suffix.endswith("kernel") else SAME,
                )
            )
    out += [row(f"{p}layernorm.weight", "norm.scale"), row(f"{p}layernorm.bias", "norm.bias")]
    if spec.pre_logits_dim:
        out += [
            row("pooler.dense.weight", "pre_logits.kernel", DENSE),
            row("pooler.dense.bias", "pre_logits.bias"),
        ]
    if spec.n_classes:
        out += [row("classifier.weight", "head.kernel", DENSE), row("classifier.bias", "head.bias")]
    return out


HF = Layout("hf", rows, dense="out_in")
