"""torch: the ``state_dict`` of vitspec's own PyTorch model (``vitspec.backends.torch``).

The names and shapes are the backend's (``vitspec.layouts.timm.TORCH``): timm's
``VisionTransformer`` names, plus ``pre_logits.fc.weight|bias`` for a pre-logits layer, which
timm lacks. The file is safetensors with the spec in its metadata (``vitspec.format: torch``), so
``model.load_state_dict(safetensors.torch.load_file(path))`` works on a model built from that spec;
a ``.pt``/``.pth`` file written with ``torch.save(model.state_dict())`` is read with
``weights_only=True`` and written when the output ends in ``.pt``/``.pth``.
"""

from __future__ import annotations

from typing import Any

from vitspec import containers
from vitspec.formats import streaming, timm
from vitspec.formats.format import EVERY_VARIANT, Format
from vitspec.formats.infer import Facts, need
from vitspec.layouts.timm import TORCH

NAME = "torch"


def looks_like(names: list[str]) -> bool:
    return "pre_logits.fc.weight" in names and timm.looks_like(names)


def infer(source: containers.Source, given: dict[str, Any]) -> Facts:
    """As timm, plus the pre-logits layer timm has no name for."""
    shapes = source.shapes
    facts = timm.infer(
        source.subset(n for n in shapes if not n.startswith("pre_logits.fc.")), given
    )
    facts.family = NAME
    if "pre_logits.fc.weight" in shapes:
        facts.known["pre_logits_dim"] = need(
            shapes, "pre_logits.fc.weight", 2, "the pre-logits layer", "pre_logits.kernel"
        )[0]
    return facts


FORMAT = Format(
    name=NAME,
    summary="vitspec's PyTorch model state_dict (safetensors or .pt/.pth)",
    containers=("safetensors", "torch-pickle"),
    layout=TORCH,
    looks_like=looks_like,
    infer=infer,
    read=timm.read,
    write=streaming.safetensors_writer(
        TORCH, {"format": "pt", "vitspec.format": NAME}, torch_save=True
    ),
    expresses=EVERY_VARIANT,
    # Reading the variants from a timm state_dict is not done yet: UNSUPPORTED refuses their
    # tensors, and the rest (pooling, activation) are read as off, as before.
    reads=frozenset(),
)
