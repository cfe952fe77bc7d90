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

    def native_layout(self, spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
        self.check_spec(spec)
        return self.layout.native_layout(spec)

    def to_native(self, spec: Spec, weights: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
        self.check_spec(spec)
        return self.layout.to_native(spec, weights)

    def canonical(self, spec: Spec, native: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        """A lazy canonical view of a file's native tensors (each computed when asked for)."""
        return self.layout.canonical(spec, native)

    def from_native(
        self, spec: Spec, native: Mapping[str, Any]
    ) -> Iterator[tuple[str, np.ndarray]]:
        return self.layout.from_native(spec, native)
