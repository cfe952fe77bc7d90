"""vitspec's Keras model (the TensorFlow backend): variable paths below the model, and where
``model.save_weights("x.weights.h5")`` puts each of them.

Native names are Keras variable paths (``blocks_0/attn/qkv/kernel``); query, key and value are one
fused ``(D, 3D)`` kernel, everything else is the canonical tensor under a ``/``-joined name.
"""

from __future__ import annotations

from vitspec.layouts import Layout, Row, row
from vitspec.layouts.moves import Concat
from vitspec.spec import Spec

QKV = ("query", "key", "value")
FUSED = Concat(-1)  # [query | key | value] along the output axis, heads contiguous within each


def rows(spec: Spec) -> list[Row]:
    """Every Keras variable in forward (creation) order."""
    out: list[Row] = [
        row("patch_embed/kernel", "patch_embed.kernel"),
        row("patch_embed/bias", "patch_embed.bias"),
    ]
    if spec.class_token:
        out.append(row("class_token", "class_token"))
    if spec.pos_embed == "learned":
        out.append(row("pos_embed", "pos_embed"))
    for i in range(spec.depth):
        b, n = f"blocks.{i}", f"blocks_{i}"
        out += [
            row(f"{n}/norm1/scale", f"{b}.norm1.scale"),
            row(f"{n}/norm1/bias", f"{b}.norm1.bias"),
        ]
        out.append(row(f"{n}/attn/qkv/kernel", tuple(f"{b}.attn.{p}.kernel" for p in QKV), FUSED))
        if spec.qkv_bias:
            out.append(row(f"{n}/attn/qkv/bias", tuple(f"{b}.attn.{p}.bias" for p in QKV), FUSED))
        for leaf in (
            "attn/out/kernel",
            "attn/out/bias",
            "norm2/scale",
            "norm2/bias",
            "mlp/fc1/kernel",
            "mlp/fc1/bias",
            "mlp/fc2/kernel",
            "mlp/fc2/bias",
        ):
            out.append(row(f"{n}/{leaf}", f"{b}.{leaf.replace('/', '.')}"))
    for name in (
        "norm.scale",
        "norm.bias",
        "pre_logits.kernel",
        "pre_logits.bias",
        "head.kernel",
        "head.bias",
    ):
        if (name.startswith("pre_logits") and not spec.pre_logits_dim) or (
            name.startswith("head") and not spec.n_classes
        ):
            continue
        out.append(row(name.replace(".", "/"), name))
    return out


KERAS = Layout("keras", rows)

# Where a .weights.h5 file keeps each top-level layer: blocks_{i} and head keep their attribute
# name; layers whose attribute sorts after "layers" go under layers/<class name>.
_H5_GROUPS = {
    "patch_embed": "layers/patch_embed",
    "norm": "layers/layer_norm",
    "pre_logits": "layers/dense",
}


def h5_layout(spec: Spec) -> list[tuple[str, str]]:
    """(native name, HDF5 dataset path) of every weight in ``model.save_weights("x.weights.h5")``.

    Keras 3 writes each layer's own variables as ``<group>/vars/<index in creation order>`` and
    the model's own variables (class token, position embedding) as ``vars/<index>`` at the root.
    The group is the attribute path that first reaches the layer when Keras walks the model's
    attributes in sorted order; the model's ``layers`` property is walked too (as a list whose
    items are named by class), so ``norm``, ``patch_embed`` and ``pre_logits``, which sort after
    it, are stored as ``layers/layer_norm``, ``layers/patch_embed`` and ``layers/dense``.
    A file saved after ``compile``/``fit`` also holds optimizer and metric groups; they are not
    listed. Checked against a real file by tests/test_backend_tensorflow.py.
    """
    paths: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    for r in rows(spec):
        layer = r.native.rpartition("/")[0]
        top, _, rest = layer.partition("/")
        group = "/".join(filter(None, (_H5_GROUPS.get(top, top), rest)))
        index = counts[group] = counts.get(group, -1) + 1
        paths.append((r.native, f"{group}/vars/{index}" if group else f"vars/{index}"))
    return paths
