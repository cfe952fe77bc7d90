"""vitspec: one Vision Transformer spec, built natively in PyTorch, TensorFlow and JAX/Flax.

The public API (importing it never imports a deep-learning framework)::

    spec = vitspec.load_spec("spec.yaml")         # a path, or a preset name such as "B/16"
    weights = vitspec.init_weights(spec, seed=0)  # dict[str, np.ndarray], canonical names
    vitspec.save_weights("w.safetensors", weights, spec)
    weights, spec = vitspec.load_weights("w.safetensors")
    out = vitspec.reference.forward(spec, weights, images, capture=("blocks.0",))
    backend = vitspec.backend("torch")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitspec import reference
    from vitspec.backends import Backend
    from vitspec.errors import (
        BackendError,
        FileFormatError,
        InputError,
        SpecError,
        VitspecError,
        WeightsError,
    )
    from vitspec.init import init_weights
    from vitspec.layout import Param, capture_points, capture_shapes, param_shapes, param_table
    from vitspec.memory import estimate_memory
    from vitspec.presets import load_spec, preset, preset_names
    from vitspec.spec import Spec
    from vitspec.weights import check_weights, load_weights, save_weights

# Public names are imported on first use, so `import vitspec` (and `vitspec --help`) stays cheap.
_LAZY = {
    "reference": ("vitspec.reference", None),
    "BackendError": ("vitspec.errors", "BackendError"),
    "FileFormatError": ("vitspec.errors", "FileFormatError"),
    "InputError": ("vitspec.errors", "InputError"),
    "SpecError": ("vitspec.errors", "SpecError"),
    "VitspecError": ("vitspec.errors", "VitspecError"),
    "WeightsError": ("vitspec.errors", "WeightsError"),
    "init_weights": ("vitspec.init", "init_weights"),
    "Param": ("vitspec.layout", "Param"),
    "capture_points": ("vitspec.layout", "capture_points"),
    "capture_shapes": ("vitspec.layout", "capture_shapes"),
    "param_shapes": ("vitspec.layout", "param_shapes"),
    "param_table": ("vitspec.layout", "param_table"),
    "estimate_memory": ("vitspec.memory", "estimate_memory"),
    "preset": ("vitspec.presets", "preset"),
    "preset_names": ("vitspec.presets", "preset_names"),
    "Spec": ("vitspec.spec", "Spec"),
    "load_spec": ("vitspec.presets", "load_spec"),
    "check_weights": ("vitspec.weights", "check_weights"),
    "load_weights": ("vitspec.weights", "load_weights"),
    "save_weights": ("vitspec.weights", "save_weights"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vitspec' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "FileFormatError",
    "InputError",
    "Param",
    "Spec",
    "SpecError",
    "VitspecError",
    "WeightsError",
    "__version__",
    "backend",
    "capture_points",
    "capture_shapes",
    "check_weights",
    "estimate_memory",
    "init_weights",
    "load_spec",
    "load_weights",
    "param_shapes",
    "param_table",
    "preset",
    "preset_names",
    "reference",
    "save_weights",
]


def backend(name: str) -> Backend:
    """The backend registered under ``name`` (imported only now); a clear error if it is missing."""
    from vitspec.backends import get_backend

    return get_backend(name)
