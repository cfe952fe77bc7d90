"""Shared test set-up: quiet frameworks, deterministic threads, the backends under test."""

from __future__ import annotations

import os

# Before any framework is imported: quiet logs, Keras on TensorFlow, JAX on the CPU in float32.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util

# triton's native library segfaults while loading if TensorFlow's was loaded first (torch.compile,
# torch.export and torchvision import triton); loaded first, both work. See docs/backends/tensorflow.md.
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401

import numpy as np
import pytest

# Backends that implement the protocol (the contract tests run on each of these).
BACKENDS = ["numpy", "torch", "tensorflow", "jax"]


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref| (the figure every numerical tolerance here is stated in)."""
    a64, r64 = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    scale = float(np.abs(r64).max()) or 1.0
    return float(np.abs(a64 - r64).max()) / scale


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
