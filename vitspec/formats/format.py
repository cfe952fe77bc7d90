"""What a checkpoint format is: one record, listed in the registry (``vitspec.formats.FORMATS``).

A format is a layout table (``vitspec.layouts``) plus what the table cannot say: which containers
hold it, how to recognise it from tensor names, how to infer a spec from a file, how to read and
write the file, and which specs it cannot express.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vitspec.containers import Progress, Source
from vitspec.errors import SpecError
from vitspec.formats.infer import Facts
from vitspec.layouts import Layout
from vitspec.spec import Spec


class Writer(Protocol):
    def __call__(
        self,
        path: Path,
        spec: Spec,
        items: Iterator[tuple[str, np.ndarray]],
        dtype: np.dtype,
        *,
        overwrite: bool,
        progress: Progress | None = None,
    ) -> None: ...


def refuse(problems: list[str], fmt: str) -> None:
    """One SpecError for every feature of a spec that format ``fmt`` cannot hold."""
    if problems:
        raise SpecError([f"cannot write the {fmt} format: {p}" for p in problems])


def no_limits(spec: Spec) -> None:
    """For formats that can express every spec."""


# Spec fields beyond the 2020 ViT family, and how a refusal names each one. A format lists those it
# can hold in ``Format.expresses``; a spec that sets any other one away from its default is refused.
VARIANTS: dict[str, str] = {
    "reg_tokens": "register tokens",
    "distillation_token": "a distillation token and head",
    "pool_include_prefix": "pooling over the prefix tokens",
    "dynamic_image_size": "a dynamic image size",
    "pos_embed_resample": "a position-embedding resampling choice",
    "patch_bias": "a patch projection without bias",
    "patch_norm": "a norm on the patch tokens",
    "pre_norm": "a norm before block 0 (pre_norm)",
    "qk_norm": "a norm on queries and keys (qk_norm)",
    "proj_bias": "an attention output projection without bias",
    "layer_scale": "layer scale",
    "mlp": "a SwiGLU MLP",
    "mlp_bias": "MLP layers without bias",
    "mlp_norm": "a norm inside the MLP",
    "norm": "RMSNorm",
    "head_bias": "a head without bias (a projection)",
}
# Values of older fields that came with the variants.
NEW_VALUES: dict[str, tuple[Any, ...]] = {
    "pooling": ("max", "avgmax", "map"),
    "gelu": ("quick",),
    "final_norm": ("none",),
}
EVERY_VARIANT = frozenset(VARIANTS) | frozenset(NEW_VALUES)


def variant_problems(spec: Spec, expresses: frozenset[str]) -> list[str]:
    """What ``spec`` sets that a format holding only ``expresses`` of the variants cannot hold."""
    problems = []
    for field, what in VARIANTS.items():
        value = getattr(spec, field)
        if field not in expresses and value != Spec.model_fields[field].default:
            problems.append(f"it has no way to hold {what} (spec has {field} {value!r})")
    for field, values in NEW_VALUES.items():
        value = getattr(spec, field)
        if field not in expresses and value in values:
            problems.append(f"it cannot hold {field} {value!r}")
    return problems


@dataclass(frozen=True)
class Format:
    name: str
    summary: str
    # What vitspec.formats.containers.sniff_container may call a file of this format.
    containers: tuple[str, ...]
    layout: Layout
    looks_like: Callable[[list[str]], bool]
    infer: Callable[[Source, dict[str, Any]], Facts]
    read: Callable[[Path], Source]
    write: Writer
    # Raises SpecError naming every feature of a spec the format cannot hold.
    check_spec: Callable[[Spec], None] = no_limits
    # The VARIANTS (and NEW_VALUES fields) the format can hold; the rest are refused by ``check``.
    expresses: frozenset[str] = frozenset()
    # The VARIANTS its reader can tell from a file without an embedded spec (None: ``expresses``);
    # any other is read as off, at its default.
    reads: frozenset[str] | None = None
    # Renames a source's tensors to native names once the spec is known (keras .h5 datasets).
    prepare: Callable[[Spec, Source], Source] | None = None
    # Every file a write to a path replaces or removes (a folder format writes several); None: the path.
    outputs: Callable[[Path], list[Path]] | None = None

    @property
    def writes_folder(self) -> bool:
        return "folder" in self.containers

    def touches(self, path: Path) -> list[Path]:
        """The files writing ``path`` would replace or remove."""
        return self.outputs(path) if self.outputs is not None else [path]

    def check(self, spec: Spec) -> None:
        """Raise one SpecError naming everything in ``spec`` this format cannot hold."""
        try:
            self.check_spec(spec)
            problems: list[str] = []
        except SpecError as exc:
            problems = list(exc.problems)
        problems += [
            f"cannot write the {self.name} format: {p}"
            for p in variant_problems(spec, self.expresses)
        ]
        if problems:
            raise SpecError(problems)

    def native_layout(self, spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
        self.check(spec)
        return self.layout.native_layout(spec)

    def to_native(self, spec: Spec, weights: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
        self.check(spec)
        return self.layout.to_native(spec, weights)

    def canonical(self, spec: Spec, native: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        """A lazy canonical view of a file's native tensors (each computed when asked for)."""
        return self.layout.canonical(spec, native)

    def from_native(
        self, spec: Spec, native: Mapping[str, Any]
    ) -> Iterator[tuple[str, np.ndarray]]:
        return self.layout.from_native(spec, native)
