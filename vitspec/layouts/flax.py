"""vitspec's Flax NNX model (the JAX backend): flattened ``nnx.state(model, nnx.Param)`` paths.

Native names are the canonical ones, except that query, key and value are one fused
``attn.qkv`` kernel ``(D, 3D)`` (and bias ``(3D,)``), and the patch embedding is a dense layer on
flattened patches, ``(patch_h * patch_w * C, D)``.
"""

from __future__ import annotations

from vitspec.layout import param_table
from vitspec.layouts import Layout, Row, row
from vitspec.layouts.moves import Concat, Reshape
from vitspec.spec import Spec

QKV = ("query", "key", "value")
FUSED = Concat(-1)


def rows(spec: Spec) -> list[Row]:
    out: list[Row] = []
    for p in param_table(spec):
        block, _, rest = p.name.partition(".attn.")
        part, _, leaf = rest.partition(".")
        if part == "query":
            out.append(
                row(
                    f"{block}.attn.qkv.{leaf}",
                    tuple(f"{block}.attn.{q}.{leaf}" for q in QKV),
                    FUSED,
                )
            )
        elif part in ("key", "value"):
            continue
        elif p.name == "patch_embed.kernel":
            out.append(row(p.name, p.name, Reshape((spec.patch_dim, spec.hidden_dim))))
        else:
            out.append(row(p.name, p.name))
    return out


FLAX = Layout("flax", rows)
