"""torch: the ``state_dict`` of vitspec's own PyTorch model (``vitspec.backends.torch``).

The names and shapes are the backend's (``vitspec.layouts.timm.TORCH``): timm's
``VisionTransformer`` names, plus ``pre_logits.fc.weight|bias`` for a pre-logits layer, which
timm lacks. The file is safetensors with the spec in its metadata (``vitspec.format: torch``), so
``model.load_state_dict(safetensors.torch.load_file(path))`` works on a model built from that spec;
a ``.pt``/``.pth`` file written with ``torch.save(model.state_dict())`` is read with
``weights_only=True`` and written when the output ends in ``.pt``/``.pth``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.formats import _io, timm
from vitspec.formats._common import need
from vitspec.formats.format import Format
from vitspec.formats.infer import Facts
from vitspec.layouts.timm import TORCH
from vitspec.spec import Spec

NAME = "torch"


def looks_like(names: list[str]) -> bool:
    return "pre_logits.fc.weight" in names and timm.looks_like(names)


def infer(source: _io.Source, given: dict[str, Any]) -> Facts:
    """As timm, plus the pre-logits layer timm has no name for."""
    shapes = source.shapes
    facts = timm.infer(source.subset(n for n in shapes if not n.startswith("pre_logits.fc.")), given)
    facts.family = NAME
    if "pre_logits.fc.weight" in shapes:
        facts.known["pre_logits_dim"] = need(shapes, "pre_logits.fc.weight", 2, "the pre-logits layer", "pre_logits.kernel")[0]
    return facts


def write(path: Path, spec: Spec, items: Iterator[tuple[str, np.ndarray]], dtype: np.dtype, *, overwrite: bool, progress: _io.Progress | None = None) -> None:
    if path.suffix.lower() in (".pt", ".pth"):
        _io.write_torch_pickle(path, items, overwrite=overwrite, progress=progress)
        return
    metadata = {"format": "pt", "vitspec.format": NAME, "vitspec.spec": spec.to_json()}
    _io.write_safetensors(path, TORCH.native_layout(spec), items, dtype, metadata, overwrite=overwrite, progress=progress)


FORMAT = Format(
    name=NAME,
    summary="vitspec's PyTorch model state_dict (safetensors or .pt/.pth)",
    containers=("safetensors", "torch-pickle"),
    layout=TORCH,
    looks_like=looks_like,
    infer=infer,
    read=timm.read,
    write=write,
)
