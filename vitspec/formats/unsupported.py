"""Checkpoint families vitspec recognises but cannot read yet.

Until a family has a format of its own (a layout table and a record in ``FORMATS``), a file of it
is answered with what it is and that it is not supported, rather than "cannot tell which format"
or a missing tensor of a format it never was. Each family is recognised by names its library
always writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    what: str
    looks_like: Callable[[list[str]], bool]


def _keras_hub(names: list[str]) -> bool:
    return any("vi_t_patching_and_embedding/" in n for n in names)


FAMILIES = (
    Family(
        "keras-hub",
        "a keras-hub ViT .weights.h5 (keras_hub.models.ViTBackbone or ViTImageClassifier: vi_t_patching_and_embedding, vi_t_encoder)",
        _keras_hub,
    ),
)


def recognise(names: list[str]) -> Family | None:
    """The unsupported family whose names these are, if any."""
    return next((f for f in FAMILIES if f.looks_like(names)), None)


def not_supported(family: Family) -> str:
    return f"it looks like {family.what}, which vitspec does not support yet"
