"""torch: the ``state_dict`` of vitspec's own PyTorch model (``vitspec.backends.torch``).

The names and shapes are the backend's (``vitspec.backends.torch.native_layout``): timm's
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
from vitspec.formats._common import backend_layout, need
from vitspec.formats.infer import Facts
from vitspec.spec import Spec

NAME = "torch"
# Dense kernels are stored (out, in), as torch.nn.Linear keeps them.
DENSE = "out_in"
SUMMARY = "vitspec's PyTorch model state_dict (safetensors or .pt/.pth)"
CONTAINERS = ("safetensors", "torch-pickle")  # what vitspec.formats._io.sniff_container may call a file of this format


def check_spec(spec: Spec) -> None:
    """Every spec has a PyTorch model."""


native_layout, to_native, from_native = backend_layout("torch")
canonical = None  # a stream only: conversions read this format through from_native


def looks_like(names: list[str]) -> bool:
    return "pre_logits.fc.weight" in names and timm.looks_like(names)


def infer(source: _io.Source, given: dict[str, Any]) -> Facts:
    """As timm, plus the pre-logits layer timm has no name for."""
    shapes = source.shapes
    facts = timm.infer(source.subset(n for n in shapes if not n.startswith("pre_logits.fc.")), given)
    facts.family = NAME
    if "pre_logits.fc.weight" in shapes:
        facts.known["pre_logits_dim"] = need(shapes, "pre_logits.fc.weight", 2, "the pre-logits layer")[0]
    return facts


def open(path: Path) -> _io.Source:
    return timm.open(path)


def write(path: Path, spec: Spec, items: Iterator[tuple[str, np.ndarray]], dtype: np.dtype, *, overwrite: bool, progress: _io.Progress | None = None) -> None:
    if path.suffix.lower() in (".pt", ".pth"):
        _io.write_torch_pickle(path, items, overwrite=overwrite, progress=progress)
        return
    metadata = {"format": "pt", "vitspec.format": NAME, "vitspec.spec": spec.to_json()}
    _io.write_safetensors(path, native_layout(spec), items, dtype, metadata, overwrite=overwrite, progress=progress)
