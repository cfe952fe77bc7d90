"""torchvision: the ``state_dict`` of ``torchvision.models.VisionTransformer`` (``vit_b_16`` ... ``vit_h_14``).

==========================================================  ===========================  ==========================================
torchvision name                                            shape                        canonical
==========================================================  ===========================  ==========================================
``class_token``                                             (1, 1, D)                    ``class_token`` (reshaped)
``conv_proj.weight|bias``                                   (D, 3, p, p) (OIHW), (D,)    ``patch_embed.kernel`` (HWIO), ``.bias``
``encoder.pos_embedding``                                   (1, N + 1, D), class row 1st ``pos_embed`` (reshaped)
``encoder.layers.encoder_layer_{i}.ln_1|ln_2.weight|bias``  (D,)                         ``blocks.{i}.norm1|norm2.scale|bias``
``...self_attention.in_proj_weight|in_proj_bias``           (3D, D), (3D,), rows q, k, v ``blocks.{i}.attn.query|key|value.*``
``...self_attention.out_proj.weight|bias``                  (D, D), (D,)                 ``blocks.{i}.attn.out.kernel``ᵀ, ``.bias``
``...mlp.0.weight|bias`` / ``...mlp.3.weight|bias``         (M, D) / (D, M)              ``blocks.{i}.mlp.fc1|fc2.kernel``ᵀ, ``.bias``
``encoder.ln.weight|bias``                                  (D,)                         ``norm.scale|bias`` (final_norm before_pool)
``heads.pre_logits.weight|bias``                            (R, D) (representation_size) ``pre_logits.kernel``ᵀ, ``.bias`` (+ tanh)
``heads.head.weight|bias``                                  (K, D or R), (K,)            ``head.kernel``ᵀ, ``head.bias``
==========================================================  ===========================  ==========================================

Files saved before torchvision 0.13 name the MLP ``mlp.linear_1|linear_2`` (torchvision renames
them on load); they are read under the new names. The model is fixed by construction: a class
token pooled by its output, a learned position table with a class row, qkv bias, LayerNorm eps
1e-6 and exact GELU, square images of 3 channels and square patches. What the tensors cannot tell
is assumed and reported: the number of heads (``nn.MultiheadAttention`` keeps none; the preset of
that width, head_dim 64) and the image size (the square grid of the position table, times the
patch; torchvision's ``image_size // patch_size`` allows up to ``patch - 1`` more pixels).

The file is what ``torch.save(model.state_dict())`` writes (read with ``weights_only=True`` only)
or safetensors; writing a ``.pt``/``.pth`` path writes a ``torch.save`` file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vitspec import containers
from vitspec.errors import WeightsError
from vitspec.formats import streaming, timm
from vitspec.formats.format import Format, refuse
from vitspec.formats.infer import Facts, add_default_heads, block_count, need, place_positions
from vitspec.layouts.torchvision import TORCHVISION
from vitspec.spec import Spec

NAME = "torchvision"
LAYER = "encoder.layers.encoder_layer_"
_LEGACY_MLP = re.compile(
    r"^(encoder\.layers\.encoder_layer_\d+\.mlp\.)linear_([12])\.(weight|bias)$"
)


def check_spec(spec: Spec) -> None:
    """What torchvision's VisionTransformer cannot build, one line each."""
    what = "torchvision's VisionTransformer"
    problems = []
    if not spec.class_token:
        problems.append(f"{what} always has a class token (spec has class_token false)")
    if spec.pooling != "token":
        problems.append(
            f"{what} always pools the class token's output (spec has pooling {spec.pooling!r})"
        )
    if spec.pos_embed != "learned":
        problems.append(
            f"{what} always has a learned position embedding (spec has pos_embed {spec.pos_embed!r})"
        )
    elif not spec.pos_embed_class_slot:
        problems.append(
            f"{what}'s position embedding always has a class-token row (spec has pos_embed_class_slot false)"
        )
    if spec.final_norm != "before_pool":
        problems.append(
            f"{what} normalises every token before pooling (encoder.ln; spec has final_norm {spec.final_norm!r})"
        )
    if spec.gelu != "exact":
        problems.append(f"{what} uses exact GELU (nn.GELU; spec has gelu {spec.gelu!r})")
    if not spec.qkv_bias:
        problems.append(
            f"{what}'s attention always has a qkv bias (nn.MultiheadAttention; spec has qkv_bias false)"
        )
    if spec.norm_eps != 1e-6:
        problems.append(f"{what}'s LayerNorm eps is 1e-6 (spec has norm_eps {spec.norm_eps})")
    if spec.image_size[0] != spec.image_size[1]:
        problems.append(
            f"{what} takes square images only (spec has image_size {spec.image_size[0]}x{spec.image_size[1]})"
        )
    if spec.patch_size[0] != spec.patch_size[1]:
        problems.append(
            f"{what} has square patches only (spec has patch_size {spec.patch_size[0]}x{spec.patch_size[1]})"
        )
    if spec.in_channels != 3:
        problems.append(f"{what} takes 3-channel images (spec has in_channels {spec.in_channels})")
    if spec.n_classes == 0:
        problems.append(f"{what} always has a classification head (spec has n_classes 0)")
    refuse(problems, NAME)


# ---- reading ---------------------------------------------------------------------------------


def looks_like(names: list[str]) -> bool:
    return "conv_proj.weight" in names and any(n.startswith(LAYER) for n in names)


def infer(source: containers.Source, given: dict[str, Any]) -> Facts:
    """What a torchvision state_dict says about its spec; torchvision's fixed choices for the rest."""
    shapes = source.shapes
    names = list(shapes)
    facts = Facts(NAME)
    k = facts.known
    d, c, ph, pw = need(shapes, "conv_proj.weight", 4, "the patch projection", "patch_embed.kernel")
    k.update(hidden_dim=d, in_channels=c, patch_size=(ph, pw))
    depth = block_count(names, r"^encoder\.layers\.encoder_layer_(\d+)\.", "encoder.layers")
    if not depth:
        raise WeightsError(
            [f"no {LAYER}{{i}}.* tensors found: not a torchvision VisionTransformer state_dict"]
        )
    k["depth"] = depth
    mlp = need(
        shapes, f"{LAYER}0.mlp.0.weight", 2, "the first MLP layer", "blocks.0.mlp.fc1.kernel"
    )[0]
    k["mlp_ratio"] = mlp / d
    head = need(shapes, "heads.head.weight", 2, "the classification head", "head.kernel")
    k["n_classes"] = head[0]
    k["pre_logits_dim"] = (
        need(shapes, "heads.pre_logits.weight", 2, "the pre-logits layer", "pre_logits.kernel")[0]
        if "heads.pre_logits.weight" in shapes
        else 0
    )
    # Fixed by torchvision's VisionTransformer: nothing to assume.
    k.update(
        class_token=True,
        pooling="token",
        pos_embed="learned",
        qkv_bias=True,
        final_norm="before_pool",
        norm_eps=1e-6,
        gelu="exact",
    )
    rows = need(shapes, "encoder.pos_embedding", 3, "the position embedding", "pos_embed")[1]
    place_positions(facts, rows, (ph, pw), True, given, slot=True)
    add_default_heads(facts, d)
    return facts


def read(path: Path) -> containers.Source:
    source = timm.read(path)  # a state_dict in safetensors or a torch.save file, as timm's
    legacy = {
        n: f"{m.group(1)}{0 if m.group(2) == '1' else 3}.{m.group(3)}"
        for n in source.names
        if (m := _LEGACY_MLP.match(n))
    }
    return source.renamed(legacy) if legacy else source


FORMAT = Format(
    name=NAME,
    summary="torchvision VisionTransformer state_dict (safetensors or .pt/.pth)",
    containers=("safetensors", "torch-pickle"),
    layout=TORCHVISION,
    looks_like=looks_like,
    infer=infer,
    read=read,
    write=streaming.safetensors_writer(
        TORCHVISION, {"format": "pt", "vitspec.format": NAME}, torch_save=True
    ),
    check_spec=check_spec,
)
