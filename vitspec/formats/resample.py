"""Position-embedding resampling of a checkpoint for a new image size (``vitspec convert --image-size``).

The algorithms and their matrices are ``vitspec.resample``'s (the models' dynamic image size uses
the same ones); this module applies them to a canonical ``pos_embed`` lazily.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vitspec.formats.streaming import LazyView
from vitspec.resample import ALGORITHMS, DEFAULT, _algorithm, describe, resample_grid
from vitspec.spec import Spec

__all__ = ["ALGORITHMS", "DEFAULT", "describe", "resample_grid", "resample_pos_embed", "resampled"]


def resample_pos_embed(
    spec: Spec, table: np.ndarray, new_grid: tuple[int, int], algorithm: str = DEFAULT
) -> np.ndarray:
    """A canonical ``pos_embed`` of ``spec`` for ``new_grid``; prefix-token rows stay as they are."""
    lead = spec.n_position_prefix
    patches = resample_grid(table[lead:], spec.grid, new_grid, algorithm).astype(table.dtype)
    return np.concatenate([table[:lead], patches], axis=0) if lead else patches


def resampled(
    spec: Spec, new_spec: Spec, weights: Mapping[str, np.ndarray], algorithm: str = DEFAULT
) -> Mapping[str, np.ndarray]:
    """``weights`` of ``spec`` seen as weights of ``new_spec`` (same model, another image size)."""
    _algorithm(algorithm)

    def compute(name: str) -> np.ndarray:
        if name == "pos_embed":
            return resample_pos_embed(spec, np.asarray(weights[name]), new_spec.grid, algorithm)
        return weights[name]

    return LazyView(new_spec, compute)
