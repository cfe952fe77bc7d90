"""vitspec's Keras model (the TensorFlow backend): variable paths below the model, and where
``model.save_weights("x.weights.h5")`` puts each of them.

Native names are Keras variable paths (``blocks_0/attn/qkv/kernel``); query, key and value are one
fused ``(D, 3D)`` kernel, a SwiGLU MLP's gate and linear branch one fused ``(D, 2M)`` kernel
(keras-hub's DINOv2 ``weights_in``), everything else is the canonical tensor under a ``/``-joined
name. New layers take keras-hub's names where keras-hub has the concept (``register_tokens`` and
``layer_scale1/lambda1`` from DINOv2, ``distillation_token`` from DeiT, ``pre_layer_norm`` from
CLIP, the attention pool's ``probe``, ``attention/{query,key,value,attention_output}``,
``layernorm`` and ``mlp/fc1``, ``fc2`` from SigLIP, ``query_norm``/``key_norm`` from Gemma 3).
"""

from __future__ import annotations

from vitspec.layouts import Layout, Row, row
from vitspec.layouts.moves import Concat
from vitspec.spec import Spec

QKV = ("query", "key", "value")
FUSED = Concat(-1)  # [query | key | value] along the output axis, heads contiguous within each


def _norm(native: str, canonical: str, spec: Spec) -> list[Row]:
    out = [row(f"{native}/scale", f"{canonical}.scale")]
    if spec.norm == "layer":
        out.append(row(f"{native}/bias", f"{canonical}.bias"))
    return out


def _dense(native: str, canonical: str, bias: bool) -> list[Row]:
    out = [row(f"{native}/kernel", f"{canonical}.kernel")]
    if bias:
        out.append(row(f"{native}/bias", f"{canonical}.bias"))
    return out


def _mlp(
    spec: Spec, native: str, canonical: str, swiglu: bool, bias: bool, norm: bool
) -> list[Row]:
    """An MLP's variables in creation order: standard fc1, fc2; SwiGLU weights_in = [gate | fc1], weights_out."""
    out: list[Row] = []
    if swiglu:
        gate_fc1 = (f"{canonical}.gate", f"{canonical}.fc1")
        out.append(
            row(f"{native}/weights_in/kernel", tuple(f"{p}.kernel" for p in gate_fc1), FUSED)
        )
        if bias:
            out.append(
                row(f"{native}/weights_in/bias", tuple(f"{p}.bias" for p in gate_fc1), FUSED)
            )
    else:
        out += _dense(f"{native}/fc1", f"{canonical}.fc1", bias)
    if norm:
        out += _norm(f"{native}/norm", f"{canonical}.norm", spec)
    out += _dense(f"{native}/{'weights_out' if swiglu else 'fc2'}", f"{canonical}.fc2", bias)
    return out


def rows(spec: Spec) -> list[Row]:
    """Every Keras variable in forward (creation) order."""
    out: list[Row] = _dense("patch_embed", "patch_embed", spec.patch_bias)
    if spec.patch_norm:
        out += _norm("patch_norm", "patch_norm", spec)
    if spec.class_token:
        out.append(row("class_token", "class_token"))
    if spec.distillation_token:
        out.append(row("distillation_token", "dist_token"))
    if spec.reg_tokens:
        out.append(row("register_tokens", "reg_tokens"))
    if spec.pos_embed == "learned":
        out.append(row("pos_embed", "pos_embed"))
    if spec.pre_norm:
        out += _norm("pre_layer_norm", "norm_pre", spec)
    for i in range(spec.depth):
        b, n = f"blocks.{i}", f"blocks_{i}"
        out += _norm(f"{n}/norm1", f"{b}.norm1", spec)
        out.append(row(f"{n}/attn/qkv/kernel", tuple(f"{b}.attn.{p}.kernel" for p in QKV), FUSED))
        if spec.qkv_bias:
            out.append(row(f"{n}/attn/qkv/bias", tuple(f"{b}.attn.{p}.bias" for p in QKV), FUSED))
        if spec.qk_norm:
            out += _norm(f"{n}/attn/query_norm", f"{b}.attn.q_norm", spec)
            out += _norm(f"{n}/attn/key_norm", f"{b}.attn.k_norm", spec)
        out += _dense(f"{n}/attn/out", f"{b}.attn.out", spec.proj_bias)
        if spec.layer_scale is not None:
            out.append(row(f"{n}/layer_scale1/lambda1", f"{b}.ls1.scale"))
        out += _norm(f"{n}/norm2", f"{b}.norm2", spec)
        out += _mlp(
            spec, f"{n}/mlp", f"{b}.mlp", spec.mlp == "swiglu", spec.mlp_bias, spec.mlp_norm
        )
        if spec.layer_scale is not None:
            out.append(row(f"{n}/layer_scale2/lambda1", f"{b}.ls2.scale"))
    if spec.final_norm != "none":
        out += _norm("norm", "norm", spec)
    if spec.pooling == "map":
        out.append(row("pool/probe", "pool.probe"))
        for native, canonical in (*((p, p) for p in QKV), ("attention_output", "out")):
            out += _dense(f"pool/attention/{native}", f"pool.{canonical}", True)
        out += _norm("pool/layernorm", "pool.norm", spec)
        out += _mlp(spec, "pool/mlp", "pool.mlp", False, True, False)
    if spec.pre_logits_dim:
        out += _dense("pre_logits", "pre_logits", True)
    if spec.n_classes:
        out += _dense("head", "head", spec.head_bias)
        if spec.distillation_token:
            out += _dense("distillation_head", "head_dist", spec.head_bias)
    return out


KERAS = Layout("keras", rows)


def top_layers(spec: Spec) -> list[tuple[str, str]]:
    """(attribute, class name in snake case) of each layer of the model itself, in creation order."""
    norm = "layer_norm" if spec.norm == "layer" else "rms_norm"
    out = [("patch_embed", "patch_embed")]
    if spec.patch_norm:
        out.append(("patch_norm", norm))
    if spec.pre_norm:
        out.append(("pre_layer_norm", norm))
    out += [(f"blocks_{i}", "block") for i in range(spec.depth)]
    if spec.final_norm != "none":
        out.append(("norm", norm))
    if spec.pooling == "map":
        out.append(("pool", "attention_pool"))
    if spec.pre_logits_dim:
        out.append(("pre_logits", "dense"))
    if spec.n_classes:
        out.append(("head", "dense"))
        if spec.distillation_token:
            out.append(("distillation_head", "dense"))
    return out


def h5_groups(spec: Spec) -> dict[str, str]:
    """Attribute of each layer of the model itself -> its group in a ``.weights.h5`` file.

    Keras walks the model's attributes in sorted order; its ``layers`` property is one of them, a
    list whose items are named by class in snake case, numbered per class in creation order
    (``layer_norm``, ``layer_norm_1``…; a layer already saved through an earlier attribute still
    takes its number). So a layer whose attribute sorts before ``layers`` keeps its attribute
    name, and one after it is stored as ``layers/<class name>[_<n>]``.
    """
    groups: dict[str, str] = {}
    used: dict[str, int] = {}
    for attribute, cls in top_layers(spec):
        n = used[cls] = used.get(cls, -1) + 1
        listed = f"layers/{cls}" if n == 0 else f"layers/{cls}_{n}"
        groups[attribute] = attribute if attribute < "layers" else listed
    return groups


def h5_group(groups: dict[str, str], layer: str) -> str:
    """The group of the layer at attribute path ``layer`` (``pool/mlp/fc1``); "" is the model."""
    top, _, rest = layer.partition("/")
    return "/".join(filter(None, (groups.get(top, top), rest)))


def h5_layout(spec: Spec) -> list[tuple[str, str]]:
    """(native name, HDF5 dataset path) of every weight in ``model.save_weights("x.weights.h5")``.

    Keras 3 writes each layer's own variables as ``<group>/vars/<index in creation order>`` and
    the model's own variables (class, distillation and register tokens, position embedding) as
    ``vars/<index>`` at the root. The group is the attribute path that first reaches the layer
    when Keras walks the model's attributes in sorted order (``h5_groups``): ``norm``,
    ``patch_embed``, ``pool``, ``pre_logits`` and the other layers whose attribute sorts after
    ``layers`` are stored as ``layers/layer_norm``, ``layers/patch_embed``,
    ``layers/attention_pool``, ``layers/dense``…
    A file saved after ``compile``/``fit`` also holds optimizer and metric groups; they are not
    listed. Checked against a real file by tests/test_backend_tensorflow.py.
    """
    groups = h5_groups(spec)
    paths: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    for r in rows(spec):
        group = h5_group(groups, r.native.rpartition("/")[0])
        index = counts[group] = counts.get(group, -1) + 1
        paths.append((r.native, f"{group}/vars/{index}" if group else f"vars/{index}"))
    return paths
