"""HF transformers: ``ViTModel`` and ``ViTForImageClassification`` checkpoints.

A ``save_pretrained`` folder (``config.json`` with ``model.safetensors``, a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin``), or one of those files with its
``config.json`` beside it. Names are the ones ``save_pretrained`` writes (transformers 4 and 5
alike); transformers 5's in-memory names (``layers.{i}.attention.q_proj`` ...) are read too.
``ViTForImageClassification`` prefixes the encoder with ``vit.``; ``ViTModel`` has no prefix.

================================================================  =====================  ===========================================
HF name (P = ``vit.`` for ViTForImageClassification, else empty)  shape                  canonical
================================================================  =====================  ===========================================
``P embeddings.cls_token``                                        (1, 1, D)              ``class_token``
``P embeddings.position_embeddings``                              (1, 1 + N, D)          ``pos_embed``
``P embeddings.patch_embeddings.projection.weight|bias``          (D, C, ph, pw), (D,)   ``patch_embed.kernel`` (OIHW→HWIO), ``.bias``
``P encoder.layer.{i}.layernorm_before.weight|bias``              (D,)                   ``blocks.{i}.norm1.scale|bias``
``P encoder.layer.{i}.attention.attention.query|key|value.*``     (D, D), (D,)           ``blocks.{i}.attn.query|key|value.kernel``ᵀ
``P encoder.layer.{i}.attention.output.dense.weight|bias``        (D, D), (D,)           ``blocks.{i}.attn.out.kernel``ᵀ, ``.bias``
``P encoder.layer.{i}.layernorm_after.weight|bias``               (D,)                   ``blocks.{i}.norm2.scale|bias``
``P encoder.layer.{i}.intermediate.dense.weight|bias``            (M, D), (M,)           ``blocks.{i}.mlp.fc1.kernel``ᵀ, ``.bias``
``P encoder.layer.{i}.output.dense.weight|bias``                  (D, M), (D,)           ``blocks.{i}.mlp.fc2.kernel``ᵀ, ``.bias``
``P layernorm.weight|bias``                                       (D,)                   ``norm.scale|bias``
``pooler.dense.weight|bias`` (ViTModel's pooler, + tanh)          (R, D), (R,)           ``pre_logits.kernel``ᵀ, ``.bias``
``classifier.weight|bias``                                        (K, D), (K,)           ``head.kernel``ᵀ, ``head.bias``
================================================================  =====================  ===========================================

``config.json`` gives the rest: ``num_attention_heads``, ``layer_norm_eps`` (1e-12 by default),
``hidden_act`` (``gelu`` = exact; ``gelu_pytorch_tanh``, ``gelu_new`` and ``gelu_fast`` = tanh).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vitspec import containers
from vitspec.errors import FileFormatError, SpecError, WeightsError
from vitspec.files import atomic_dir, atomic_file, check_destination
from vitspec.formats import streaming
from vitspec.formats.format import Format, refuse
from vitspec.formats.infer import (
    Facts,
    add_default_heads,
    block_count,
    need,
    place_positions,
    reject_features,
)
from vitspec.layouts.hf import HF
from vitspec.spec import Spec

NAME = "hf"

EXACT_ACTS = ("gelu",)
TANH_ACTS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")

UNSUPPORTED = {
    r"embeddings\.mask_token$": "a mask token (ViTForMaskedImageModeling)",
    r"^decoder\.": "the masked-image-modeling decoder",
}


def check_spec(spec: Spec) -> None:
    problems = []
    if not spec.class_token or not spec.pos_embed_class_slot or spec.pos_embed != "learned":
        problems.append(
            "HF ViT always has a class token and a learned position embedding with a class-token row"
        )
    if spec.pooling != "token":
        problems.append("HF ViT pools the class token (spec has pooling 'avg')")
    if spec.final_norm != "before_pool":
        problems.append(
            "HF ViT's layernorm comes before pooling (spec has final_norm 'after_pool')"
        )
    if spec.pre_logits_dim and spec.n_classes:
        problems.append(
            "HF ViT has either a classifier (ViTForImageClassification) or a dense+tanh pooler (ViTModel), not both"
        )
    refuse(problems, NAME)


# ---- reading ---------------------------------------------------------------------------------

# transformers 5 in-memory names -> the names save_pretrained writes
_V5 = [
    (re.compile(r"^(vit\.)?layers\.(\d+)\.attention\.([qkv])_proj\."), None),
    (
        re.compile(r"^(vit\.)?layers\.(\d+)\.attention\.o_proj\."),
        r"\1encoder.layer.\2.attention.output.dense.",
    ),
    (re.compile(r"^(vit\.)?layers\.(\d+)\.mlp\.fc1\."), r"\1encoder.layer.\2.intermediate.dense."),
    (re.compile(r"^(vit\.)?layers\.(\d+)\.mlp\.fc2\."), r"\1encoder.layer.\2.output.dense."),
    (re.compile(r"^(vit\.)?layers\.(\d+)\."), r"\1encoder.layer.\2."),
]
_QKV = {"q": "query", "k": "key", "v": "value"}


def _legacy_name(name: str) -> str:
    for rx, repl in _V5:
        m = rx.match(name)
        if not m:
            continue
        if repl is None:
            return (
                f"{m.group(1) or ''}encoder.layer.{m.group(2)}.attention.attention.{_QKV[m.group(3)]}."
                + name[m.end() :]
            )
        return rx.sub(repl, name, count=1)
    return name


def normalize_names(names: list[str]) -> dict[str, str]:
    """file name -> the name vitspec uses: save_pretrained names, ``vit.`` exactly when there is a classifier."""
    legacy = {n: _legacy_name(n) for n in names}
    classifier = any(v.startswith("classifier.") for v in legacy.values())
    out = {}
    for n, v in legacy.items():
        bare = v.removeprefix("vit.")
        top = bare.startswith(("classifier.", "pooler."))
        out[n] = bare if top or not classifier else f"vit.{bare}"
    return out


def looks_like(names: list[str]) -> bool:
    return any(n.endswith("embeddings.patch_embeddings.projection.weight") for n in names)


def find_weights(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a folder or a weights file."""
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                config = path / "config.json"
                return path / name, config if config.is_file() else None
        raise FileFormatError(
            f"{path}: folder has none of {', '.join(WEIGHT_FILES)} (not a save_pretrained folder)"
        )
    config = path.parent / "config.json"
    return path, config if config.is_file() else None


def read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path}: not a readable config.json ({exc})") from None
    except RecursionError:  # found by tests/fuzz: '[' * 100000
        raise FileFormatError(
            f"{path}: not a readable config.json (nested past the recursion limit)"
        ) from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{path}: expected a JSON object")
    if data.get("model_type", "vit") != "vit":
        raise FileFormatError(
            f"{path}: model_type is {data.get('model_type')!r}, expected 'vit' (HF ViTModel)"
        )
    for key, (ok, expected) in _CONFIG_TYPES.items():  # found by tests/fuzz: null, [], "x" values
        if key in data and not ok(data[key]):
            raise FileFormatError(
                f"{path}: {key} must be {expected}, found {json.dumps(data[key])[:80]}"
            )
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_size(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v))


# The value kinds of the config.json keys vitspec reads (others are passed by).
_CONFIG_TYPES: dict[str, tuple[Any, str]] = {
    **{
        key: (_is_int, "an integer")
        for key in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_channels",
        )
    },
    **{
        key: (_is_number, "a number")
        for key in ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob")
    },
    "image_size": (_is_size, "an integer or [height, width]"),
    "patch_size": (_is_size, "an integer or [height, width]"),
    "qkv_bias": (lambda v: isinstance(v, bool), "true or false"),
    "hidden_act": (lambda v: isinstance(v, str), "a string"),
    "pooler_act": (lambda v: isinstance(v, str), "a string"),
}


def read(path: Path) -> containers.Source:
    weights, config_path = find_weights(path)
    container = containers.sniff_container(weights)
    if container == "safetensors-index":
        source = containers.open_sharded_safetensors(weights)
    elif container == "torch-pickle":
        source = containers.open_torch_pickle(weights)
    else:
        source = containers.open_safetensors(weights)
    source = source.renamed(normalize_names(source.names))
    if config_path is not None:
        source.config = read_config(config_path)
    return source


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def infer(source: containers.Source, given: dict[str, Any]) -> Facts:
    """What the tensors and config.json say; HF's ViTConfig defaults for the rest."""
    shapes = source.shapes
    names = list(shapes)
    reject_features(names, UNSUPPORTED, NAME)
    facts = Facts(NAME)
    k = facts.known
    classifier = "classifier.weight" in shapes
    p = "vit." if classifier else ""
    d, c, ph, pw = need(
        shapes,
        f"{p}embeddings.patch_embeddings.projection.weight",
        4,
        "the patch projection",
        "patch_embed.kernel",
    )
    k.update(
        hidden_dim=d,
        in_channels=c,
        patch_size=(ph, pw),
        class_token=True,
        pooling="token",
        pos_embed="learned",
    )
    k.update(final_norm="before_pool", drop_path=0.0)  # HF ViT has no stochastic depth
    depth = block_count(names, rf"^{re.escape(p)}encoder\.layer\.(\d+)\.", "encoder.layer")
    if not depth:
        raise WeightsError([f"no {p}encoder.layer.{{i}}.* tensors found: not an HF ViT checkpoint"])
    k["depth"] = depth
    k["mlp_ratio"] = (
        need(
            shapes,
            f"{p}encoder.layer.0.intermediate.dense.weight",
            2,
            "the first MLP layer",
            "blocks.0.mlp.fc1.kernel",
        )[0]
        / d
    )
    k["qkv_bias"] = f"{p}encoder.layer.0.attention.attention.query.bias" in shapes
    k["n_classes"] = shapes["classifier.weight"][0] if classifier else 0
    k["pre_logits_dim"] = shapes["pooler.dense.weight"][0] if "pooler.dense.weight" in shapes else 0
    if classifier and k["pre_logits_dim"]:
        raise WeightsError(
            ["found both classifier.* and pooler.*: ViTForImageClassification has no pooler"]
        )
    rows = need(
        shapes, f"{p}embeddings.position_embeddings", 3, "the position embedding", "pos_embed"
    )[1]
    config = source.config
    if config is not None:
        _from_config(facts, config, source)
        place_positions(facts, rows, (ph, pw), True, given, declared=k.get("image_size"), slot=True)
    else:
        place_positions(facts, rows, (ph, pw), True, given, slot=True)
        add_default_heads(facts, d)
        facts.default("norm_eps", 1e-12, "HF ViTConfig's layer_norm_eps; no config.json found")
        facts.default("gelu", "exact", "HF ViTConfig's hidden_act 'gelu'; no config.json found")
    return facts


def _from_config(facts: Facts, config: dict[str, Any], source: containers.Source) -> None:
    """Fields from config.json, each checked against the tensors already read."""
    k = facts.known
    where = "config.json"
    problems = []

    def agree(key: str, field: str, value: Any) -> None:
        if field in k and k[field] != value:
            problems.append(
                f"{where} has {key}={config[key]!r} but the tensors say {field} {k[field]!r}"
            )

    if "hidden_size" in config:
        agree("hidden_size", "hidden_dim", config["hidden_size"])
    if "num_channels" in config:
        agree("num_channels", "in_channels", config["num_channels"])
    if "patch_size" in config:
        agree("patch_size", "patch_size", _pair(config["patch_size"]))
    if "num_hidden_layers" in config:
        agree("num_hidden_layers", "depth", config["num_hidden_layers"])
    if "qkv_bias" in config:
        agree("qkv_bias", "qkv_bias", bool(config["qkv_bias"]))
    if (
        "intermediate_size" in config
        and round(k["mlp_ratio"] * k["hidden_dim"]) != config["intermediate_size"]
    ):
        problems.append(
            f"{where} has intermediate_size={config['intermediate_size']} but the tensors say {round(k['mlp_ratio'] * k['hidden_dim'])}"
        )
    if problems:
        raise SpecError(problems, str(source.path))
    k["n_heads"] = int(config.get("num_attention_heads", 12))
    k["norm_eps"] = float(config.get("layer_norm_eps", 1e-12))
    k["dropout"] = float(config.get("hidden_dropout_prob", 0.0))
    k["attn_dropout"] = float(config.get("attention_probs_dropout_prob", 0.0))
    act = config.get("hidden_act", "gelu")
    if act in EXACT_ACTS:
        k["gelu"] = "exact"
    elif act in TANH_ACTS:
        k["gelu"] = "tanh"
    else:
        raise SpecError(
            [
                f"{where}: hidden_act {act!r} is not a GELU vitspec knows ({', '.join(EXACT_ACTS + TANH_ACTS)})"
            ],
            str(source.path),
        )
    if k["pre_logits_dim"] and config.get("pooler_act", "tanh") != "tanh":
        raise SpecError(
            [
                f"{where}: pooler_act {config['pooler_act']!r}; vitspec's pre-logits layer is dense + tanh"
            ],
            str(source.path),
        )
    if "image_size" in config:
        k["image_size"] = _pair(config["image_size"])


# ---- writing ---------------------------------------------------------------------------------


def config_for(spec: Spec) -> dict[str, Any]:
    """The config.json that makes transformers build exactly ``spec``."""
    check_spec(spec)
    config: dict[str, Any] = {
        "architectures": ["ViTForImageClassification" if spec.n_classes else "ViTModel"],
        "model_type": "vit",
        "hidden_size": spec.hidden_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.n_heads,
        "intermediate_size": spec.mlp_dim,
        "hidden_act": "gelu" if spec.gelu == "exact" else "gelu_pytorch_tanh",
        "hidden_dropout_prob": spec.dropout,
        "attention_probs_dropout_prob": spec.attn_dropout,
        "layer_norm_eps": spec.norm_eps,
        "image_size": list(spec.image_size)
        if spec.image_size[0] != spec.image_size[1]
        else spec.image_size[0],
        "patch_size": list(spec.patch_size)
        if spec.patch_size[0] != spec.patch_size[1]
        else spec.patch_size[0],
        "num_channels": spec.in_channels,
        "qkv_bias": spec.qkv_bias,
        "pooler_output_size": spec.pre_logits_dim or spec.hidden_dim,
        "pooler_act": "tanh",
    }
    if spec.n_classes:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(spec.n_classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(spec.n_classes)}
    return config


# What write() puts in a folder; nothing else there is touched.
WRITTEN = ("config.json", "model.safetensors")


def stale_files(folder: Path) -> list[Path]:
    """An earlier sharded output in ``folder``: its index and the shards the index names.

    Only what that index names goes, as the folder may hold the user's own files; the index must
    go because readers prefer it to ``model.safetensors``.
    """
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise FileFormatError(
            f"{index}: an earlier output's index that cannot be read, so its shards cannot be told apart "
            "from other files; remove it (and its shards) or write to another folder"
        ) from None
    named = [
        folder / s
        for s in sorted(shards)
        if isinstance(s, str) and Path(s).name == s and s != WRITTEN[1]
    ]
    return [index, *(p for p in named if p.is_file())]


def outputs(path: Path) -> list[Path]:
    """Every file a write to ``path`` replaces or removes."""
    if not path.is_dir():
        return [path]
    return [path / name for name in WRITTEN] + stale_files(path)


def write(
    path: Path,
    spec: Spec,
    items: Iterator[tuple[str, np.ndarray]],
    dtype: np.dtype,
    *,
    overwrite: bool,
    progress: containers.Progress | None = None,
) -> None:
    """A save_pretrained folder: config.json and model.safetensors.

    A new folder is made next to ``path`` and moved into place when complete. Into an existing
    folder (with ``overwrite``) only those two files are written, each atomically, as
    ``save_pretrained`` does; the index and shards of an earlier sharded output go, nothing else.
    """
    config = config_for(spec)
    config["torch_dtype"] = str(dtype) if str(dtype) != "bfloat16" else "bfloat16"
    metadata = {"format": "pt", "vitspec.format": NAME, "vitspec.spec": spec.to_json()}
    text = json.dumps(config, indent=2) + "\n"
    layout = HF.native_layout(spec)
    if not path.is_dir():
        with atomic_dir(path, overwrite=overwrite) as tmp:
            (tmp / "config.json").write_text(text)
            streaming.write_safetensors(
                tmp / "model.safetensors",
                layout,
                items,
                dtype,
                metadata,
                overwrite=True,
                progress=progress,
            )
        return
    check_destination(path, overwrite)
    stale = stale_files(path)
    # config.json is moved into place right after the weights, so the two never disagree for long
    with atomic_file(path / "config.json", overwrite=True) as tmp:
        tmp.write_text(text)
        streaming.write_safetensors(
            path / "model.safetensors",
            layout,
            items,
            dtype,
            metadata,
            overwrite=True,
            progress=progress,
        )
    for old in stale:
        old.unlink(missing_ok=True)


FORMAT = Format(
    name=NAME,
    summary="HF transformers ViTModel / ViTForImageClassification (save_pretrained folder)",
    containers=("folder", "safetensors", "safetensors-index", "torch-pickle"),
    layout=HF,
    looks_like=looks_like,
    infer=infer,
    read=read,
    write=write,
    check_spec=check_spec,
    outputs=outputs,
)
