"""The NumPy backend: the reference forward pass behind the backend protocol.

It is the smallest complete backend (a template for backend authors) and lets the conformance
suite test itself without a deep-learning framework. It computes in float32 unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from vitspec import reference
from vitspec.init import init_weights
from vitspec.layout import param_table
from vitspec.spec import Spec
from vitspec.weights import check_weights


@dataclass
class NumpyModel:
    """A spec, its canonical weights and the dtype to compute in."""

    spec: Spec
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))


class NumpyBackend:
    name = "numpy"
    version = np.__version__

    def __init__(self, dtype: type | np.dtype = np.float32) -> None:
        self.dtype = np.dtype(dtype)

    def build(self, spec: Spec, weights: Mapping[str, np.ndarray] | None = None, seed: int = 0) -> NumpyModel:
        model = NumpyModel(spec, dtype=self.dtype)
        return self.load(model, weights if weights is not None else init_weights(spec, seed))

    def load(self, model: NumpyModel, weights: Mapping[str, np.ndarray]) -> NumpyModel:
        check_weights(model.spec, weights)
        model.weights = {p.name: np.array(weights[p.name]) for p in param_table(model.spec)}
        return model

    def export(self, model: NumpyModel) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in model.weights.items()}

    def forward(self, model: NumpyModel, images: np.ndarray, capture: Iterable[str] | str = ()) -> dict[str, np.ndarray]:
        return reference.forward(model.spec, model.weights, images, dtype=model.dtype, capture=capture)
