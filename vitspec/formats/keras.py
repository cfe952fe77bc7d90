"""keras: the ``.weights.h5`` file Keras 3 writes for vitspec's Keras model (``vitspec.backends.tensorflow``).

Exactly what ``model.save_weights("x.weights.h5")`` writes, so ``model.load_weights`` reads it:
each layer's variables are datasets ``<layer path>/vars/<index>`` in creation order, every layer
has a ``vars`` group named after it, and the model's own variables (class token, position
embedding) sit in the root ``vars`` group. Where each weight lands is
``vitspec.layouts.keras.h5_layout(spec)``; the shapes are Keras's (fused ``(D, 3D)`` qkv kernel, HWIO patch kernel,
``(in, out)`` dense kernels). vitspec adds the spec as the root attribute ``vitspec.spec``
(Keras ignores it). Written with h5py, one dataset at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vitspec import containers, files
from vitspec.files import atomic_file
from vitspec.formats import streaming
from vitspec.formats.canonical import infer_from_shapes
from vitspec.formats.format import EVERY_VARIANT, Format
from vitspec.formats.infer import Facts
from vitspec.layouts.keras import KERAS, h5_group, h5_groups, h5_layout
from vitspec.spec import Spec

NAME = "keras"
MODEL_NAME = "vision_transformer"


def looks_like(names: list[str]) -> bool:
    return "layers/patch_embed/vars/0" in names


def prepare(spec: Spec, source: containers.Source) -> containers.Source:
    """Dataset paths -> native names, now that the spec says which dataset holds what."""
    return source.renamed({dataset: native for native, dataset in h5_layout(spec)})


_BLOCK = re.compile(r"^blocks_(\d+)/(.+)/vars/(\d)$")
_TOP_NORM = re.compile(r"^layers/(layer_norm|rms_norm)(_\d+)?/vars/0$")
WHY = "a .weights.h5 file has no spec of its own"


def infer(source: containers.Source, given: dict[str, Any]) -> Facts:
    """From the dataset paths and shapes; vitspec's defaults for what they cannot tell.

    The model's own variables are numbered in creation order: class and distillation tokens
    (1-D), then register tokens and the position table (2-D). What a Keras file cannot say (GELU
    kind, norm eps, where the final norm sits, the pooling of a model without a class token, the
    layer-scale init value, which model-level norms exist when there are one or two) is left to
    ``--spec`` or vitspec's defaults.
    """
    raw = source.shapes
    shapes: dict[str, tuple[int, ...]] = {}
    if "layers/patch_embed/vars/0" in raw:
        shapes["patch_embed.kernel"] = raw["layers/patch_embed/vars/0"]
    if "layers/patch_embed/vars/1" in raw:
        shapes["patch_embed.bias"] = raw["layers/patch_embed/vars/1"]
    own = [raw[f"vars/{i}"] for i in range(4) if f"vars/{i}" in raw]
    tokens, tables = [s for s in own if len(s) == 1], [s for s in own if len(s) == 2]
    if tokens:
        shapes["class_token"] = tokens[0]
    if len(tokens) > 1:
        shapes["dist_token"] = tokens[1]
    if len(tables) == 2 or (
        len(tables) == 1
        and given.get("reg_tokens")
        and given.get("pos_embed", "learned") != "learned"
    ):
        shapes["reg_tokens"] = tables.pop(0)
    if tables:
        shapes["pos_embed"] = tables[0]
    for name, shape in raw.items():
        m = _BLOCK.match(name)
        if not m:
            continue
        i, layer, index = m.groups()
        if layer == "mlp/fc1" and index == "0":
            shapes[f"blocks.{i}.mlp.fc1.kernel"] = shape
        elif layer == "mlp/weights_in" and index == "0":
            shapes[f"blocks.{i}.mlp.fc1.kernel"] = (shape[0], shape[1] // 2)
        elif layer == "attn/qkv" and index == "1":
            shapes[f"blocks.{i}.attn.query.bias"] = (shape[0] // 3,)
        else:
            shapes[f"blocks.{i}.{layer.replace('/', '.')}.{index}"] = shape
    if "layers/dense/vars/0" in raw:
        shapes["pre_logits.kernel"] = raw["layers/dense/vars/0"]
    if "head/vars/0" in raw:
        shapes["head.kernel"] = raw["head/vars/0"]
    facts = infer_from_shapes(shapes, given, NAME, WHY, NATIVE)
    k = facts.known
    k["distillation_token"] = "dist_token" in shapes
    k["reg_tokens"] = shapes["reg_tokens"][0] if "reg_tokens" in shapes else 0
    k["patch_bias"] = "patch_embed.bias" in shapes
    k["norm"] = "layer" if "blocks_0/norm1/vars/1" in raw else "rms"
    k["qk_norm"] = "blocks_0/attn/query_norm/vars/0" in raw
    k["proj_bias"] = "blocks_0/attn/out/vars/1" in raw
    k["mlp"] = "swiglu" if "blocks_0/mlp/weights_in/vars/0" in raw else "standard"
    first = "weights_in" if k["mlp"] == "swiglu" else "fc1"
    k["mlp_bias"] = f"blocks_0/mlp/{first}/vars/1" in raw
    k["mlp_norm"] = "blocks_0/mlp/norm/vars/0" in raw
    if "blocks_0/layer_scale1/vars/0" in raw:
        facts.default("layer_scale", 1e-5, f"its init value; {WHY}")
    else:
        k["layer_scale"] = None
    if "head.kernel" in shapes:
        k["head_bias"] = "head/vars/1" in raw
    pooled = "layers/attention_pool/vars/0" in raw
    if pooled:
        k["pooling"] = "map"
    elif not k["class_token"]:  # avg, max and avgmax look alike in a file
        del k["pooling"]
        facts.default("pooling", "avg", f"no class token; {WHY}")
    norms = sum(1 for name in raw if _TOP_NORM.match(name))
    if norms == 0:
        k.update(patch_norm=False, pre_norm=False, final_norm="none")
    elif norms == 3:
        k.update(patch_norm=True, pre_norm=True)
    return facts


# The datasets errors name, for the canonical names inference needs.
NATIVE = {
    "patch_embed.bias": "layers/patch_embed/vars/1",
    "blocks.0.mlp.fc1.kernel": "blocks_0/mlp/fc1/vars/0",
    "pos_embed": "vars/1 (vars/0 without a class token)",
    "blocks.{i}": "blocks_{i}/*/vars",
}


def write(
    path: Path,
    spec: Spec,
    items: Iterator[tuple[str, np.ndarray]],
    dtype: np.dtype,
    *,
    overwrite: bool,
    progress: containers.Progress | None = None,
) -> None:
    """A ``.weights.h5`` laid out as Keras writes it, filled one dataset at a time."""
    import h5py

    layout = h5_layout(spec)
    native = KERAS.native_layout(spec)
    size = files.RESERVE_BASE + sum(
        math.prod(shape) * dtype.itemsize + files.RESERVE_PER_TENSOR for _, shape in native
    )
    with atomic_file(path, overwrite=overwrite) as tmp:
        # HDF5 crashes (SIGSEGV) when the disk fills under it: the space is reserved first.
        files.reserve(tmp, size)
        with h5py.File(tmp, "w") as f:
            f.attrs["vitspec.spec"] = spec.to_json()
            _make_groups(f, spec, layout)
            where = dict(layout)
            for name, array in streaming.prepared(items, None, progress):
                dataset = f.create_dataset(where[name], data=array)
                if containers.BFLOAT16 is not None and array.dtype == containers.BFLOAT16:
                    dataset.attrs["dtype"] = "bfloat16"  # as Keras marks it
        files.release_reserve(tmp)
        containers.fsync(tmp)


def _make_groups(f: Any, spec: Spec, layout: list[tuple[str, str]]) -> None:
    """Every layer's ``vars`` group, named after the layer, as Keras creates them (empty ones too)."""
    f.create_group("vars").attrs["name"] = MODEL_NAME
    groups = h5_groups(spec)
    for native, _ in layout:
        parts = native.split("/")[:-1]
        for n in range(1, len(parts) + 1):
            vars_group = f"{h5_group(groups, '/'.join(parts[:n]))}/vars"
            if vars_group not in f:
                f.create_group(vars_group).attrs["name"] = parts[n - 1]


FORMAT = Format(
    name=NAME,
    summary="vitspec's Keras model .weights.h5 (as model.save_weights writes it)",
    containers=("h5",),
    layout=KERAS,
    expresses=EVERY_VARIANT,
    looks_like=looks_like,
    infer=infer,
    read=containers.open_h5,
    write=write,
    prepare=prepare,
)
