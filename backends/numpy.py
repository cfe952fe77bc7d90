"""The NumPy backend: the reference forward pass behind ``vitspec.backends.Backend``.

It is the smallest complete backend (a template for backend authors: its native layout is the
canonical one) and lets the conformance suite test itself without a deep-learning framework. It
computes, and returns, float32 unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from vitspec import reference
from vitspec.backends.base import Backend, NativeArrays
from vitspec.init import init_weights
from vitspec.layouts import CANONICAL
from vitspec.spec import Spec


@dataclass
class NumpyModel:
    """A spec, its canonical weights and the dtype to compute in."""

    spec: Spec
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))


class NumpyBackend(Backend):
    name = "numpy"
    version = np.__version__
    layout = CANONICAL
    frameworks = ("numpy",)

    def __init__(self, dtype: type | np.dtype = np.float32) -> None:
        self.dtype = np.dtype(dtype)

    def build(
        self, spec: Spec, weights: Mapping[str, np.ndarray] | None = None, seed: int = 0
    ) -> NumpyModel:
        model = NumpyModel(spec, dtype=self.dtype)
        return self.load(model, weights if weights is not None else init_weights(spec, seed))

    def write_native(self, model: NumpyModel, native: Iterable[tuple[str, np.ndarray]]) -> None:
        model.weights = {name: np.array(value) for name, value in native}

    def read_native(self, model: NumpyModel) -> Mapping[str, np.ndarray]:
        return NativeArrays(model.weights, np.array)  # copies: exported weights are the caller's

    def run(
        self, model: NumpyModel, images: np.ndarray, names: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        return reference.forward(
            model.spec, model.weights, images, dtype=model.dtype, capture=names
        )
