"""Shared test set-up: quiet frameworks, deterministic threads, the backends under test."""

from __future__ import annotations

import os

# Before any framework is imported: quiet logs, Keras on TensorFlow, JAX on the CPU in float32.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util
import subprocess

# Children are started by fork, not vfork: CI once saw exec fail with EFAULT ("Bad address") while
# other threads of this large process ran (a vfork child borrows the parent's memory until exec).
if hasattr(subprocess, "_USE_VFORK"):
    subprocess._USE_VFORK = False

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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With VITSPEC_REQUIRE_ALL=1 (``make test``, CI), a skipped test fails the run: every
    framework and peer library is installed there, so a skip can only hide a missing one."""
    if os.environ.get("VITSPEC_REQUIRE_ALL") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.write_line(
            f"VITSPEC_REQUIRE_ALL=1: {len(skipped)} test(s) skipped; a full install skips none",
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Optional dependencies and the extra that installs each. With only the core installed
# (pip install -e '.[test-core]'), a test that needs one of these is skipped, saying which;
# a full install (make test) has them all, and VITSPEC_REQUIRE_ALL=1 turns any skip into a failure.
OPTIONAL = {
    "torch": "torch",
    "tensorflow": "tensorflow",
    "keras": "tensorflow",
    "h5py": "tensorflow",
    "jax": "jax",
    "jaxlib": "jax",
    "flax": "jax",
    "ml_dtypes": "jax",
    "timm": "test",
    "torchvision": "test",
    "transformers": "test",
    "keras_hub": "test",
    "setuptools": "test-core",
    "build": "test-core",
    "wheel": "test-core",
}


def _missing_module(exc: BaseException | None) -> str | None:
    """The optional top-level module whose absence raised ``exc`` (or caused it), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            top = exc.name.split(".")[0]
            if top in OPTIONAL and importlib.util.find_spec(top) is None:
                return top
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or report.outcome != "failed":
        return
    missing = _missing_module(call.excinfo.value)
    if missing is not None:
        report.outcome = "skipped"
        reason = (
            f"needs {missing}, which is not installed (pip install -e '.[{OPTIONAL[missing]}]')"
        )
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {reason}")


# A test parametrized with one of these backend names needs that framework.
BACKEND_FRAMEWORK = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, saying which, a test whose optional modules are missing: those named by its
    ``needs`` markers, and the framework of a backend it is parametrized with."""
    for item in items:
        wanted = {m for marker in item.iter_markers("needs") for m in marker.args}
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            wanted |= {
                BACKEND_FRAMEWORK[v]
                for v in callspec.params.values()
                if isinstance(v, str) and v in BACKEND_FRAMEWORK
            }
        missing = sorted(m for m in wanted if importlib.util.find_spec(m) is None)
        if missing:
            extras = sorted({OPTIONAL.get(m, m) for m in missing})
            item.add_marker(
                pytest.mark.skip(
                    reason=f"needs {', '.join(missing)}, not installed (pip install -e '.[{','.join(extras)}]')"
                )
            )
