"""Deterministic NumPy initialisation, the same on every machine and in every framework.

Scheme ``"default"`` follows timm's ``VisionTransformer`` init (big_vision's is alike):

=========  =====================================================  ===========================
init kind  tensors                                                distribution
=========  =====================================================  ===========================
lecun      ``patch_embed.kernel``                                 truncated normal (±2σ), variance 1/fan_in
dense      attention, MLP, pre-logits and head kernels            truncated normal (±2σ), std 0.02
posemb     ``pos_embed``, ``dist_token``                          truncated normal (±2σ), std 0.02
tiny       ``class_token``, ``reg_tokens``, MLP biases            normal, std 1e-6
layer_sc.  ``blocks.*.ls1.scale``, ``ls2.scale``                  the spec's ``layer_scale``
probe      ``pool.probe`` (attention pooling)                     truncated normal (±2σ), std D^-0.5
zeros      other biases, norm biases                              0
ones       norm scales                                            1
=========  =====================================================  ===========================

Scheme ``"random"`` fills every tensor with non-trivial values (no zero biases, norm scales
away from 1, a class token of unit scale) for numerical tests, where zeros would hide bugs.

Each tensor draws from its own generator seeded by ``(seed, crc32(name))``, so adding a tensor to
a spec never changes the others.
"""

from __future__ import annotations

import math
import zlib
from typing import Literal

import numpy as np

from vitspec.errors import InputError
from vitspec.layout import Param, param_table
from vitspec.spec import Spec

Scheme = Literal["default", "random"]

# The std of a standard normal truncated to ±2 is 0.8796: divide by it to keep the wanted std.
_TRUNC2_STD = 0.87962566103423978


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Normal(0, std) truncated to ±2 std of the underlying normal, by redrawing outliers."""
    scale = std / _TRUNC2_STD
    x = rng.standard_normal(shape)
    bad = np.abs(x) > 2.0
    while bad.any():
        x[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(x) > 2.0
    return x * scale


def _fan_in(param: Param) -> int:
    return math.prod(param.shape[:-1]) if len(param.shape) > 1 else param.shape[0]


def _default(spec: Spec, param: Param, rng: np.random.Generator) -> np.ndarray:
    shape = param.shape
    if param.init == "layer_scale":
        return np.full(shape, spec.layer_scale)
    if param.init == "probe":
        return _truncated_normal(rng, shape, spec.hidden_dim**-0.5)
    if param.init == "lecun":
        return _truncated_normal(rng, shape, math.sqrt(1.0 / _fan_in(param)))
    if param.init in ("dense", "posemb"):
        return _truncated_normal(rng, shape, 0.02)
    if param.init == "tiny":
        return rng.normal(0.0, 1e-6, shape)
    if param.init == "ones":
        return np.ones(shape)
    return np.zeros(shape)


def _random(spec: Spec, param: Param, rng: np.random.Generator) -> np.ndarray:
    shape = param.shape
    if param.init == "layer_scale":  # well away from 1 and from 0: skipping the scale shows
        return rng.uniform(0.3, 0.8, shape)
    if param.init == "probe":
        return rng.normal(0.0, 1.0, shape)
    if param.init == "ones":
        return 1.0 + rng.normal(0.0, 0.2, shape)
    if len(shape) > 1 and param.name != "pos_embed":
        return rng.normal(0.0, 1.0 / math.sqrt(_fan_in(param)), shape)
    if param.name == "class_token":
        return rng.normal(0.0, 1.0, shape)
    if param.name == "pos_embed":
        return rng.normal(0.0, 0.5, shape)
    return rng.normal(0.0, 0.1, shape)


def init_weights(
    spec: Spec, seed: int = 0, scheme: Scheme = "default", dtype: np.dtype | type = np.float32
) -> dict[str, np.ndarray]:
    """Canonical weights for ``spec``: name -> array, in the parameter table's order."""
    if scheme not in ("default", "random"):
        raise InputError(f"init scheme must be 'default' or 'random', found {scheme!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, found {seed!r}")
    fill = _default if scheme == "default" else _random
    return {p.name: fill(spec, p, _rng(seed, p.name)).astype(dtype) for p in param_table(spec)}
