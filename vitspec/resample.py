"""Position-embedding resampling for a new image size: the one-axis matrices and the grid resampler.

The patch rows of a learned table, viewed as a (grid_h, grid_w, D) image, are resampled
separably (rows, then columns) in float64 and cast back to the table's dtype; prefix-token rows
are kept unchanged. Two algorithms, each exactly a ``torch.nn.functional.interpolate`` call (the
tests compare them with torch and with timm to 1e-6):

``bicubic-antialias`` (the default): ``interpolate(mode="bicubic", align_corners=False,
antialias=True)``, which is what timm's ``resample_abs_pos_embed`` does by default (and what
``timm.create_model(..., img_size=...)`` uses on a pretrained checkpoint). It is Pillow's bicubic
filter: Keys' cubic with **a = -0.5**; for output index ``o`` and scale ``s = in / out`` the centre is
``c = (o + 0.5) * s``, the support is ``2 * max(s, 1)`` (stretched by the scale when
downsampling, so every input row is averaged in), the taps are the input indices ``j`` in
``[floor(c - support + 0.5), floor(c + support + 0.5))`` that lie inside the input, with weights
``W((j + 0.5 - c) / max(s, 1))`` divided by their sum (renormalised at the border, never clamped).
When upsampling the support is not stretched, but a = -0.5 and the border renormalisation still
make it differ from plain ``bicubic``.

``bicubic``: ``interpolate(mode="bicubic", align_corners=False, antialias=False)``, i.e. timm's
``resample_abs_pos_embed(..., antialias=False)``: Keys' cubic with **a = -0.75**, source coordinate
``x = (o + 0.5) * s - 0.5``; with ``i = floor(x)`` and ``t = x - i`` the taps ``i-1 .. i+2`` (clamped
to ``0 .. in-1``) get the weights ``W(t+1), W(t), W(1-t), W(2-t)``; no antialiasing. HF's
``interpolate_pos_encoding`` is this too.

In both, ``W(x) = (a+2)|x|^3 - (a+3)|x|^2 + 1`` for ``|x| <= 1``, ``a|x|^3 - 5a|x|^2 + 8a|x| - 4a``
for ``1 < |x| < 2`` and 0 beyond.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix ``M`` with ``out = M @ in`` along one axis: plain bicubic (a = -0.75)."""
    if n_in == n_out:
        return np.eye(n_in)
    matrix = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for o in range(n_out):
        x = (o + 0.5) * scale - 0.5
        i = math.floor(x)
        t = x - i
        for k, w in zip(
            range(i - 1, i + 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75), strict=True
        ):
            matrix[o, min(max(k, 0), n_in - 1)] += w
    return matrix


def antialiased_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of torch's antialiased bicubic (Pillow's filter, a = -0.5)."""
    if n_in == n_out:
        return np.eye(n_in)
    matrix = np.zeros((n_out, n_in))
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    for o in range(n_out):
        centre = scale * (o + 0.5)
        # int() truncates as torch's C++ does; the bounds are never negative where it matters
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        weights = _cubic((taps + 0.5 - centre) / stretch, -0.5)
        matrix[o, lo:hi] = weights / weights.sum()
    return matrix


# name -> (one-axis matrix, what it is); the first is the default.
ALGORITHMS: dict[str, tuple[Callable[[int, int], np.ndarray], str]] = {
    "bicubic-antialias": (
        antialiased_bicubic_matrix,
        "bicubic with antialiasing (Pillow's a=-0.5 filter, support stretched when downsampling, "
        "renormalised at the border), align_corners=False, float64: timm's resample_abs_pos_embed default",
    ),
    "bicubic": (
        bicubic_matrix,
        "bicubic (Keys a=-0.75), align_corners=False, border-clamped, no antialiasing, float64: "
        "timm's resample_abs_pos_embed with antialias=False, HF's interpolate_pos_encoding",
    ),
}
DEFAULT = "bicubic-antialias"


def describe(algorithm: str) -> str:
    """'bicubic-antialias: bicubic with antialiasing (...)' for messages."""
    return f"{algorithm}: {_algorithm(algorithm)[1]}"


def _algorithm(name: str) -> tuple[Callable[[int, int], np.ndarray], str]:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown resampling algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def resample_grid(
    table: np.ndarray, old: tuple[int, int], new: tuple[int, int], algorithm: str = DEFAULT
) -> np.ndarray:
    """(old_h * old_w, D) -> (new_h * new_w, D), in float64, rows in row-major grid order."""
    matrix = _algorithm(algorithm)[0]
    d = table.shape[-1]
    grid = np.asarray(table, np.float64).reshape(old[0], old[1], d)
    out = np.einsum("ab,bcd->acd", matrix(old[0], new[0]), grid)
    out = np.einsum("ab,cbd->cad", matrix(old[1], new[1]), out)
    return out.reshape(new[0] * new[1], d)


def grid_matrices(
    old: tuple[int, int], new: tuple[int, int], algorithm: str = DEFAULT
) -> tuple[np.ndarray, np.ndarray]:
    """The (new_h, old_h) row matrix and (new_w, old_w) column matrix taking a grid ``old`` to ``new``.

    ``resample_grid`` is ``rows @ grid @ columns.T`` on each channel; a backend resampling inside its
    forward (``Spec.dynamic_image_size``) applies the same two matrices, so every framework computes
    the same numbers as the reference.
    """
    matrix = _algorithm(algorithm)[0]
    return matrix(old[0], new[0]), matrix(old[1], new[1])
