"""Position-embedding resampling for a new image size.

The algorithm, named and exact: **bicubic convolution (Keys, a = -0.75) with half-pixel centres
(align_corners=False), indices clamped at the border, no antialiasing**, applied separably (rows,
then columns) in float64 to the patch rows of the table viewed as a (grid_h, grid_w, D) image; a
class-token row is kept unchanged. It is ``torch.nn.functional.interpolate(mode="bicubic",
align_corners=False, antialias=False)``, i.e. timm's ``resample_abs_pos_embed(...,
interpolation="bicubic", antialias=False)``, computed in float64 instead of float32. (timm's
default ``antialias=True`` renormalises the kernel at the border, so its rows and columns at the
edge differ slightly; HF's ``interpolate_pos_encoding`` is bicubic with align_corners=False too.)

For an output index ``o`` and scale ``s = in / out``, the source coordinate is
``x = (o + 0.5) * s - 0.5``; with ``i = floor(x)`` and ``t = x - i`` the taps ``i-1 .. i+2``
(clamped to ``0 .. in-1``) get the weights ``W(t+1), W(t), W(1-t), W(2-t)`` where
``W(x) = (a+2)|x|^3 - (a+3)|x|^2 + 1`` for ``|x| <= 1`` and ``a|x|^3 - 5a|x|^2 + 8a|x| - 4a``
for ``1 < |x| < 2``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vitspec.formats.streaming import LazyView
from vitspec.spec import Spec

A = -0.75
ALGORITHM = "bicubic (Keys a=-0.75), align_corners=False, border-clamped, no antialiasing, float64"


def _cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((A + 2) * x - (A + 3)) * x * x + 1
    far = ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix ``M`` with ``out = M @ in`` along one axis."""
    matrix = np.zeros((n_out, n_in))
    if n_in == n_out:
        return np.eye(n_in)
    scale = n_in / n_out
    for o in range(n_out):
        x = (o + 0.5) * scale - 0.5
        i = int(np.floor(x))
        t = x - i
        for k, w in zip(range(i - 1, i + 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t])), strict=True):
            matrix[o, min(max(k, 0), n_in - 1)] += w
    return matrix


def resample_grid(table: np.ndarray, old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
    """(old_h * old_w, D) -> (new_h * new_w, D), in float64, rows in row-major grid order."""
    d = table.shape[-1]
    grid = np.asarray(table, np.float64).reshape(old[0], old[1], d)
    rows = bicubic_matrix(old[0], new[0])
    cols = bicubic_matrix(old[1], new[1])
    out = np.einsum("ab,bcd->acd", rows, grid)
    out = np.einsum("ab,cbd->cad", cols, out)
    return out.reshape(new[0] * new[1], d)


def resample_pos_embed(spec: Spec, table: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
    """A canonical ``pos_embed`` of ``spec`` for ``new_grid``; a class-token row stays as it is."""
    lead = int(bool(spec.pos_embed_class_slot))
    patches = resample_grid(table[lead:], spec.grid, new_grid).astype(table.dtype)
    return np.concatenate([table[:lead], patches], axis=0) if lead else patches


def resampled(spec: Spec, new_spec: Spec, weights: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """``weights`` of ``spec`` seen as weights of ``new_spec`` (same model, another image size)."""

    def compute(name: str) -> np.ndarray:
        if name == "pos_embed":
            return resample_pos_embed(spec, np.asarray(weights[name]), new_spec.grid)
        return weights[name]

    return LazyView(new_spec, compute)
