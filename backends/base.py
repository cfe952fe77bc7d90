"""The backend base: the methods every backend has, and everything that is the same in all of them.

Requirements of the design (einops' ``_backends.py`` states its own the same way):

- a backend is one small class per framework, with the same methods in the same order; the
  framework modules (``vitspec.backends.torch``, ``.tensorflow``, ``.jax``) contain framework
  code only, and read alike: docstring, imports, the native model classes (``PatchEmbed``,
  ``Attention``, ``Mlp``, ``Block``, ``VisionTransformer``, defined on first use), the backend class;
- importing this module or a backend module imports no framework: a backend imports its
  framework when it is created, and a native model class when it is first looked up;
- a framework may be missing or broken: the registry (``vitspec.backends.get_backend``) says so,
  naming the pip extra to install, and the other backends keep working;
- a third party may subclass ``Backend`` or write the public methods itself (duck typing): the
  registry and the conformance suite only call them.
"""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from vitspec.errors import InputError
from vitspec.layout import capture_points, check_capture
from vitspec.layouts import Layout
from vitspec.reference import check_images
from vitspec.spec import Spec
from vitspec.weights import check_weights

T = TypeVar("T")


class Backend:
    """A framework behind vitspec: subclass it, or write the same public methods yourself.

    The public methods, in this order, are the whole protocol (the registry, the CLI and the
    conformance suite call nothing else)::

        name: str                                    # "torch": the name users type
        version: str                                 # the framework's version
        build(spec, weights=None, seed=0) -> model   # the native model, in eval mode, carrying ``model.spec``;
                                                     #   weights None: vitspec.init_weights(spec, seed)
        load(model, weights) -> model                # canonical -> native, in place; bad weights raise one
                                                     #   WeightsError listing every mismatch, before any copy
        export(model) -> dict[str, np.ndarray]       # native -> canonical, bit for bit: export(load(m, w)) == w
        forward(model, images, capture=()) -> dict   # NHWC float NumPy images in; the requested capture points
                                                     #   in forward order, then "output", as NumPy arrays of
                                                     #   ``dtype`` (float32 in ours), in eval mode
        supports(spec) -> str | None                 # None: builds ``spec``; a string: why not (the suite then
                                                     #   reports the case as unsupported, never as a pass)
        environment() -> dict[str, str]              # what the numbers depend on (keys: ENVIRONMENT_KEYS)
        save_artifact(model, path, batch) -> Path    # optional: the framework's deployable artifact at ``path``;
                                                     #   batch a positive int, or None for any batch

    ``capture`` is ``"all"``, one capture-point name or a sequence of names
    (``vitspec.capture_points(spec)``); unknown names, images of the wrong shape or dtype and a bad
    ``batch`` raise ``InputError`` (a ``ValueError``) naming what was expected and what was found.

    A subclass sets ``name`` and ``layout`` (its native parameter table, e.g.
    ``vitspec.layouts.timm.TORCH``), imports its framework and sets ``version`` in ``__init__``,
    and writes the framework code, in this order::

        build(spec, weights=None, seed=0) -> model
        write_native(model, native)                  # (native name, array) pairs into the parameters
        read_native(model) -> Mapping[str, ndarray]  # native name -> NumPy array, read when looked up
        run(model, images, names) -> dict            # eval-mode forward of checked NHWC images: "output"
                                                     #   and ``names`` (forward order) as NumPy arrays
        save_artifact(model, path, batch) -> Path    # optional; starts with self.check_batch(batch)
        device() -> str, threads() -> int            # for environment(); by default "cpu" and the CPUs
                                                     #   this process may run on

    Everything else (normalising and ordering captures, checking images, weights and ``batch``,
    the copy through ``layout``, the environment report) is here, once.
    """

    name: ClassVar[str]
    version: str
    layout: ClassVar[Layout]
    # What forward returns (and our backends compute in), and how: the environment's "forward".
    dtype: np.dtype = np.dtype(np.float32)
    precision: ClassVar[str] = ""
    # The modules whose versions make up the environment's "framework" (the first is ``version``).
    frameworks: ClassVar[tuple[str, ...]] = ()

    # ---- the protocol ----------------------------------------------------------------------------

    def build(
        self, spec: Spec, weights: Mapping[str, np.ndarray] | None = None, seed: int = 0
    ) -> Any:
        """The native model of ``spec`` in eval mode; weights None: ``vitspec.init_weights(spec, seed)``."""
        raise NotImplementedError

    def load(self, model: Any, weights: Mapping[str, np.ndarray]) -> Any:
        """Copy canonical ``weights`` into ``model``, one tensor at a time, after checking all of them."""
        check_weights(model.spec, weights)
        self.write_native(model, self.layout.to_native(model.spec, weights))
        return model

    def export(self, model: Any) -> dict[str, np.ndarray]:
        """The canonical weights of ``model`` (fresh NumPy arrays), bit for bit."""
        return dict(self.layout.from_native(model.spec, self.read_native(model)))

    def forward(
        self, model: Any, images: np.ndarray, capture: Iterable[str] | str = ()
    ) -> dict[str, np.ndarray]:
        """NHWC float images in; ``{capture point: ..., "output": ...}`` in forward order, as NumPy."""
        names = ordered_captures(model.spec, capture)
        got = self.run(model, check_images(model.spec, images), names)
        return {
            name: np.ascontiguousarray(got[name], dtype=self.dtype) for name in (*names, "output")
        }

    def supports(self, spec: Spec) -> str | None:
        """None: this backend builds ``spec`` (ours build every valid spec); a string says why not."""
        return None

    def environment(self) -> dict[str, str]:
        """What the numbers depend on, the same keys for every backend (the conformance report prints them)."""
        versions = ", ".join(
            f"{m} {importlib.import_module(m).__version__}" for m in self.frameworks
        )
        values = (
            self.name,
            versions,
            np.__version__,
            platform.python_version(),
            platform.platform(),
            self.device(),
            str(self.threads()),
            ", ".join(filter(None, (self.dtype.name, self.precision))),
        )
        return dict(zip(ENVIRONMENT_KEYS, values, strict=True))

    # ---- the framework code a subclass writes ----------------------------------------------------

    def write_native(self, model: Any, native: Iterable[tuple[str, np.ndarray]]) -> None:
        """Assign each (native name, array) to the model's parameter of that name."""
        raise NotImplementedError

    def read_native(self, model: Any) -> Mapping[str, np.ndarray]:
        """The model's parameters by native name, as NumPy arrays (read when looked up)."""
        raise NotImplementedError

    def run(self, model: Any, images: np.ndarray, names: tuple[str, ...]) -> Mapping[str, Any]:
        """The eval-mode forward pass of checked NHWC images: ``"output"`` and ``names`` as NumPy."""
        raise NotImplementedError

    def device(self) -> str:
        """Where ``build`` puts a model and ``forward`` runs it."""
        return "cpu"

    def threads(self) -> int:
        """The CPU threads the framework computes with."""
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )

    # ---- helpers for subclasses ------------------------------------------------------------------

    @staticmethod
    def check_batch(batch: object) -> int | None:
        """``save_artifact``'s batch: a positive int, or None for any batch (``True`` is not a batch size)."""
        if batch is not None and (
            not isinstance(batch, int) or isinstance(batch, bool) or batch < 1
        ):
            raise InputError(f"batch: expected a positive integer or None, found {batch!r}")
        return batch


ENVIRONMENT_KEYS = (
    "backend",
    "framework",
    "numpy",
    "python",
    "platform",
    "device",
    "threads",
    "forward",
)


def ordered_captures(spec: Spec, capture: Iterable[str] | str) -> tuple[str, ...]:
    """Requested capture points, checked (``"all"``: every one), in forward order, without ``output``."""
    wanted = set(check_capture(spec, capture if isinstance(capture, str) else tuple(capture)))
    return tuple(name for name in capture_points(spec) if name in wanted and name != "output")


class Captures:
    """The capture points a forward pass was asked for (forward order) and the values kept so far.

    Model code calls ``keep(name, value)`` at every capture point (it stores only what was asked
    for) and ``wants(name)`` before computing anything only a capture needs. Values are whatever
    the framework computes; nothing here imports one.
    """

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self.names = names
        self._wanted = frozenset(names)
        self.values: dict[str, Any] = {}

    def wants(self, name: str) -> bool:
        return name in self._wanted

    def keep(self, name: str, value: T) -> T:
        if name in self._wanted:
            self.values[name] = value
        return value

    def result(self, output: T) -> dict[str, T]:
        """The kept values in forward order, then ``output``."""
        return {**{name: self.values[name] for name in self.names}, "output": output}


# Shared by plain forward calls: it keeps nothing, so it never holds a value.
NO_CAPTURES = Captures()


class NativeArrays(Mapping[str, np.ndarray], Generic[T]):
    """A model's parameters by native name, each converted to NumPy only when looked up."""

    def __init__(self, tensors: Mapping[str, T], to_numpy: Callable[[T], np.ndarray]) -> None:
        self._tensors = tensors
        self._to_numpy = to_numpy

    def __getitem__(self, name: str) -> np.ndarray:
        return self._to_numpy(self._tensors[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


__all__ = [
    "ENVIRONMENT_KEYS",
    "NO_CAPTURES",
    "Backend",
    "Captures",
    "NativeArrays",
    "ordered_captures",
]
