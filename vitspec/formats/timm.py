"""timm: the ``state_dict`` of ``timm.models.vision_transformer.VisionTransformer``.

=====================================  ===============================  ==========================================
timm name                              shape                            canonical
=====================================  ===============================  ==========================================
``cls_token``                          (1, 1, D)                        ``class_token`` (reshaped)
``pos_embed``                          (1, N, D)                        ``pos_embed`` (reshaped)
``patch_embed.proj.weight``            (D, C, ph, pw) (OIHW conv)       ``patch_embed.kernel`` transposed to HWIO
``patch_embed.proj.bias``              (D,)                             ``patch_embed.bias``
``blocks.{i}.norm1.weight|bias``       (D,)                             ``blocks.{i}.norm1.scale|bias``
``blocks.{i}.attn.qkv.weight``         (3D, D), rows q, k, v            ``blocks.{i}.attn.query|key|value.kernel``ᵀ
``blocks.{i}.attn.qkv.bias``           (3D,) (absent: qkv_bias false)   ``blocks.{i}.attn.query|key|value.bias``
``blocks.{i}.attn.proj.weight|bias``   (D, D), (D,)                     ``blocks.{i}.attn.out.kernel``ᵀ, ``.bias``
``blocks.{i}.norm2.weight|bias``       (D,)                             ``blocks.{i}.norm2.scale|bias``
``blocks.{i}.mlp.fc1.weight|bias``     (M, D), (M,)                     ``blocks.{i}.mlp.fc1.kernel``ᵀ, ``.bias``
``blocks.{i}.mlp.fc2.weight|bias``     (D, M), (D,)                     ``blocks.{i}.mlp.fc2.kernel``ᵀ, ``.bias``
``norm.weight|bias``                   (D,) (token pooling)             ``norm.scale|bias`` (final_norm before_pool)
``fc_norm.weight|bias``                (D,) (global_pool='avg')         ``norm.scale|bias`` (final_norm after_pool)
``head.weight|bias``                   (K, D), (K,) (absent: K = 0)     ``head.kernel``ᵀ, ``head.bias``
``reg_token``                          (1, R, D)                        ``reg_tokens`` (reshaped)
``dist_token``                         (1, 1, D) (DeiT distilled)       ``dist_token`` (reshaped)
``head_dist.weight|bias``              (K, D), (K,)                     ``head_dist.kernel``ᵀ, ``head_dist.bias``
``patch_embed.norm.weight|bias``       (D,) (embed_norm_layer)          ``patch_norm.scale|bias``
``norm_pre.weight|bias``               (D,) (pre_norm)                  ``norm_pre.scale|bias``
``blocks.{i}.attn.q_norm|k_norm.*``    (D/heads,) (qk_norm)             ``blocks.{i}.attn.q_norm|k_norm.scale|bias``
``blocks.{i}.ls1|ls2.gamma``           (D,) (init_values)               ``blocks.{i}.ls1|ls2.scale``
``blocks.{i}.mlp.fc1_g|fc1_x.*``       (M, D), (M,) (SwiGLU)            ``blocks.{i}.mlp.gate|fc1.kernel``ᵀ, ``.bias``
``blocks.{i}.mlp.norm.weight|bias``    (M,) (scale_mlp_norm)            ``blocks.{i}.mlp.norm.scale|bias``
``attn_pool.latent``                   (1, 1, D) (global_pool='map')    ``pool.probe`` (reshaped)
``attn_pool.q|proj.weight|bias``       (D, D), (D,)                     ``pool.query|out.kernel``ᵀ, ``.bias``
``attn_pool.kv.weight|bias``           (2D, D), (2D,), rows k, v        ``pool.key|value.kernel``ᵀ, ``.bias``
``attn_pool.norm.weight|bias``         (D,)                             ``pool.norm.scale|bias``
``attn_pool.mlp.fc1|fc2.weight|bias``  (M, D), (D, M)                   ``pool.mlp.fc1|fc2.kernel``ᵀ, ``.bias``
=====================================  ===============================  ==========================================

With ``norm: rms`` (timm's ``RmsNorm``) every norm has a ``weight`` only. Writing holds the variants
in ``EXPRESSES``; ``check_spec`` refuses what timm's classes cannot build. Reading files with
the variant tensors is not done yet (``UNSUPPORTED`` refuses them).

The file is safetensors (what ``safetensors.torch.save_file(model.state_dict())`` writes) or a
``torch.save`` pickle, read with ``weights_only=True`` only. timm's defaults fill what tensors
cannot tell, each reported as assumed: LayerNorm eps 1e-6, exact GELU, heads from the preset of
that width (head_dim 64), the pooling (a state_dict does not record ``global_pool``; ``max``,
``avgmax`` and ``pool_include_prefix`` have the same tensors and no vitspec equivalent), and the
patch grid (``vitspec.formats.infer.place_positions``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitspec import containers
from vitspec.errors import WeightsError
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
from vitspec.layouts.timm import TIMM
from vitspec.spec import Spec

NAME = "timm"

# Tensors of timm options a vitspec spec has no field for.
UNSUPPORTED = {
    r"^norm_pre\.": "a norm before the blocks (pre_norm=True, CLIP-style)",
    r"^reg_token$": "register tokens (reg_tokens > 0)",
    r"\.ls[12]\.": "LayerScale (init_values)",
    r"\.(q_norm|k_norm)\.": "query/key normalisation (qk_norm=True)",
    r"^attn_pool\.": "attention pooling (global_pool='map')",
    r"\.attn\.norm\.|\.mlp\.norm\.": "extra norms inside attention or the MLP (scale_attn_norm / scale_mlp_norm)",
    r"\.mlp\.fc1_[gx]\.": "a gated MLP (SwiGLU)",
    r"^patch_embed\.norm\.": "a norm after the patch embedding",
}


# The variants timm's VisionTransformer (VisionTransformerDistilled for the distillation token)
# holds, by its own switches: reg_tokens, pool_include_prefix, dynamic_img_size, pre_norm,
# embed_norm_layer, qk_norm, proj_bias, init_values, mlp_layer=SwiGLU (fc1_g/fc1_x: timm's unpacked
# SwiGLU, as its AIMv2 models), scale_mlp_norm, norm_layer=RmsNorm, global_pool max/avgmax/map,
# act_layer=QuickGELU, final_norm=False. Not held: a head without bias (timm keeps CLIP's
# projection as head.weight with a zero head.bias) and pos_embed_resample 'bicubic' (timm's dynamic
# image size always resamples with antialiasing).
EXPRESSES = frozenset(
    {
        "reg_tokens",
        "distillation_token",
        "pool_include_prefix",
        "dynamic_image_size",
        "patch_bias",
        "patch_norm",
        "pre_norm",
        "qk_norm",
        "proj_bias",
        "layer_scale",
        "mlp",
        "mlp_bias",
        "mlp_norm",
        "norm",
        "pooling",
        "gelu",
        "final_norm",
    }
)


def check_spec(spec: Spec) -> None:
    problems = []
    if spec.pre_logits_dim:
        problems.append(
            "timm's VisionTransformer has no pre-logits layer (spec has pre_logits_dim > 0)"
        )
    if spec.pos_embed == "sincos2d":
        problems.append(
            "timm's VisionTransformer has no fixed sin-cos position embedding (spec has pos_embed 'sincos2d')"
        )
    # Switches timm ties together: combinations its VisionTransformer cannot build.
    if spec.patch_bias == spec.pre_norm:
        problems.append(
            "timm's VisionTransformer has a patch projection bias exactly when it has no pre_norm "
            f"(spec has patch_bias {spec.patch_bias} and pre_norm {spec.pre_norm})"
        )
    if spec.mlp_bias != spec.proj_bias:
        problems.append(
            "timm's VisionTransformer gives the MLP layers a bias exactly when the attention output "
            f"projection has one (spec has proj_bias {spec.proj_bias} and mlp_bias {spec.mlp_bias})"
        )
    if spec.mlp == "swiglu" and spec.pooling == "map":
        problems.append(
            "timm's VisionTransformer gives the SwiGLU gate and the attention pool's MLP one "
            "act_layer (spec has mlp 'swiglu' and pooling 'map')"
        )
    if spec.distillation_token and spec.reg_tokens:
        problems.append(
            "timm's VisionTransformerDistilled has no register tokens (spec has distillation_token and reg_tokens)"
        )
    if spec.distillation_token and not spec.pos_embed_class_slot:
        problems.append(
            "timm's VisionTransformerDistilled has a learned position row for each prefix token "
            f"(spec has pos_embed {spec.pos_embed!r}, pos_embed_class_slot {spec.pos_embed_class_slot})"
        )
    refuse(problems, NAME)


# ---- reading ---------------------------------------------------------------------------------


def looks_like(names: list[str]) -> bool:
    return "patch_embed.proj.weight" in names and any(n.endswith(".attn.qkv.weight") for n in names)


def infer(source: containers.Source, given: dict[str, Any]) -> Facts:
    """What a timm state_dict says about its spec; timm's defaults for the rest."""
    shapes = source.shapes
    names = list(shapes)
    reject_features(names, UNSUPPORTED, NAME)
    facts = Facts(NAME)
    k = facts.known
    d, c, ph, pw = need(
        shapes, "patch_embed.proj.weight", 4, "the patch projection", "patch_embed.kernel"
    )
    k.update(hidden_dim=d, in_channels=c, patch_size=(ph, pw))
    depth = block_count(names, r"^blocks\.(\d+)\.", "blocks")
    if not depth:
        raise WeightsError(
            ["no blocks.{i}.* tensors found: not a timm VisionTransformer state_dict"]
        )
    k["depth"] = depth
    mlp = need(
        shapes, "blocks.0.mlp.fc1.weight", 2, "the first MLP layer", "blocks.0.mlp.fc1.kernel"
    )[0]
    k["mlp_ratio"] = mlp / d
    k["qkv_bias"] = "blocks.0.attn.qkv.bias" in shapes
    k["class_token"] = "cls_token" in shapes
    k["n_classes"] = shapes["head.weight"][0] if "head.weight" in shapes else 0
    k["pre_logits_dim"] = 0
    k["final_norm"] = "after_pool" if "fc_norm.weight" in shapes else "before_pool"
    facts.default("pooling", *_pooling(k["class_token"], "fc_norm.weight" in shapes))
    if "pos_embed" in shapes:
        k["pos_embed"] = "learned"
        rows = need(shapes, "pos_embed", 3, "the position embedding", "pos_embed")[1]
        place_positions(facts, rows, (ph, pw), k["class_token"], given)
    else:
        k["pos_embed"] = "none"
        facts.default(
            "image_size", 224, "no position embedding to read it from; timm's default img_size"
        )
    add_default_heads(facts, d)
    facts.default("norm_eps", 1e-6, "timm's VisionTransformer LayerNorm eps")
    facts.default("gelu", "exact", "timm's nn.GELU")
    return facts


# timm pooling modes whose state_dict is the same as an expressible one: they must be named
# wherever pooling is assumed, because a model trained with them converts with wrong outputs.
INEXPRESSIBLE_POOLING = "timm's global_pool='max' and 'avgmax' and pool_include_prefix=True leave the same tensors and have no vitspec equivalent"


def _pooling(class_token: bool, fc_norm: bool) -> tuple[str, str]:
    """(pooling, why): a state_dict does not record global_pool; the tensors narrow it down."""
    if not class_token:
        value, usual = "avg", "without a class token timm pools with global_pool='avg'"
    elif fc_norm:
        value, usual = (
            "avg",
            "fc_norm comes with timm's global_pool='avg'; --spec pooling=token for global_pool='token' with fc_norm=True",
        )
    else:
        value, usual = (
            "token",
            "no fc_norm: timm's default global_pool='token'; --spec pooling=avg for global_pool='avg' with fc_norm=False",
        )
    return value, f"a timm state_dict does not record global_pool; {usual}. {INEXPRESSIBLE_POOLING}"


def read(path: Path) -> containers.Source:
    container = containers.sniff_container(path)
    if container == "torch-pickle":
        return containers.open_torch_pickle(path)
    return containers.open_safetensors(path)


FORMAT = Format(
    name=NAME,
    summary="timm VisionTransformer state_dict (safetensors or .pt/.pth)",
    containers=("safetensors", "torch-pickle"),
    layout=TIMM,
    looks_like=looks_like,
    infer=infer,
    read=read,
    write=streaming.safetensors_writer(
        TIMM, {"format": "pt", "vitspec.format": NAME}, torch_save=True
    ),
    check_spec=check_spec,
    expresses=EXPRESSES,
    # Reading the variants from a timm state_dict is not done yet: UNSUPPORTED refuses their
    # tensors, and the rest (pooling, activation) are read as off, as before.
    reads=frozenset(),
)
