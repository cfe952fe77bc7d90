"""vitspec's Flax NNX model (the JAX backend): flattened ``nnx.state(model, nnx.Param)`` paths.

Native names are the canonical ones, except that query, key and value are one fused
``attn.qkv`` kernel ``(D, 3D)`` (and bias ``(3D,)``), the attention pool's key and value one fused
``pool.kv`` kernel ``(D, 2D)`` (and bias), and the patch embedding is a dense layer on flattened
patches, ``(patch_h * patch_w * C, D)``.
"""

from __future__ import annotations

from vitspec.layout import param_table
from vitspec.layouts import Layout, Row, row
from vitspec.layouts.moves import Concat, Reshape
from vitspec.spec import Spec

QKV = ("query", "key", "value")
KV = ("key", "value")
FUSED = Concat(-1)


def rows(spec: Spec) -> list[Row]:
    out: list[Row] = []
    for p in param_table(spec):
        module, _, leaf = p.name.rpartition(".")
        owner, _, part = module.rpartition(".")
        if owner.endswith(".attn") and part == "query":  # blocks.{i}.attn.qkv
            out.append(row(f"{owner}.qkv.{leaf}", tuple(f"{owner}.{q}.{leaf}" for q in QKV), FUSED))
        elif owner == "pool" and part == "key":  # pool.kv
            out.append(row(f"pool.kv.{leaf}", tuple(f"pool.{q}.{leaf}" for q in KV), FUSED))
        elif (owner.endswith(".attn") and part in KV) or (owner == "pool" and part == "value"):
            continue
        elif p.name == "patch_embed.kernel":
            out.append(row(p.name, p.name, Reshape((spec.patch_dim, spec.hidden_dim))))
        else:
            out.append(row(p.name, p.name))
    return out


FLAX = Layout("flax", rows)
