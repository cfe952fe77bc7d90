"""Backends: the same few methods in every framework, found through entry points.

Requirements of the design:

- a backend's framework is imported only when the backend is first used, never by
  ``import vitspec`` or ``vitspec --help``;
- a framework may be missing (the error names the pip extra that installs it) or broken (the
  error says so and keeps the framework's own message); other backends keep working;
- our backends register exactly as a third party's would: an entry point in the group
  ``vitspec.backends`` naming a zero-argument callable that returns the backend object.

A backend is a ``vitspec.backends.Backend`` (backends/base.py, whose docstring is the protocol),
or any object with the same public methods (``supports``, ``environment`` and
``save_artifact`` are optional for those).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from vitspec.backends.base import Backend
from vitspec.errors import BackendError

GROUP = "vitspec.backends"

# What to install for each of our backends when its framework is missing.
EXTRAS = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}
# The distributions each of our backends imports; the first one's version is the backend's version.
FRAMEWORKS = {
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "keras"),
    "jax": ("jax", "flax"),
    "numpy": ("numpy",),
}


@dataclass(frozen=True)
class BackendInfo:
    """What `vitspec backends` shows: a registered backend and whether it loads."""

    name: str
    target: str
    distribution: str
    status: str  # listing: "installed", "missing"; after loading: "ok", "missing", "broken"
    version: str
    detail: str


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


def registered() -> list[str]:
    """Names of every registered backend (loaded or not)."""
    return sorted(_entry_points())


_CACHE: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """Load the backend registered as ``name``."""
    if name in _CACHE:
        return _CACHE[name]
    eps = _entry_points()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise BackendError(f"no backend named {name!r}; registered backends: {known}")
    ep = eps[name]
    try:
        factory = ep.load()
        backend = factory()
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        extra = EXTRAS.get(name)
        hint = f"; install it with: pip install 'vitspec[{extra}]'" if extra else ""
        raise BackendError(
            f"backend {name!r} needs {missing}, which is not installed{hint}"
        ) from exc
    except Exception as exc:
        raise BackendError(
            f"backend {name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    for attr in ("name", "version", "build", "load", "export", "forward"):
        if not hasattr(backend, attr):
            raise BackendError(
                f"backend {name!r} ({ep.value}) has no {attr!r}; see docs/backend-authors.md"
            )
    _CACHE[name] = backend
    return backend


def describe(name: str) -> BackendInfo:
    """Try to load one backend and say how it went."""
    ep = _entry_points()[name]
    dist = ep.dist.name if ep.dist else "?"
    try:
        b = get_backend(name)
    except BackendError as exc:
        status = "missing" if isinstance(exc.__cause__, ImportError) else "broken"
        return BackendInfo(name, ep.value, dist, status, "", str(exc))
    return BackendInfo(name, ep.value, dist, "ok", str(b.version), "")


def listing(name: str) -> BackendInfo:
    """A registered backend as the package metadata describes it, without importing it or its framework.

    The version is the framework's (from its distribution's metadata) for vitspec's own backends,
    and the registering distribution's for any other; the status is "installed" when the entry
    point's module and the framework's distributions are found, "missing" otherwise.
    ``describe(name)`` imports and loads it instead.
    """
    import importlib.util

    ep = _entry_points()[name]
    dist = ep.dist.name if ep.dist else "?"
    ours = dist == "vitspec" and name in FRAMEWORKS
    needs = FRAMEWORKS[name] if ours else ()
    missing = [d for d in needs if not _dist_version(d)]
    if missing:
        extra = EXTRAS.get(name)
        hint = f"; install it with: pip install 'vitspec[{extra}]'" if extra else ""
        return BackendInfo(
            name,
            ep.value,
            dist,
            "missing",
            "",
            f"backend {name!r} needs {', '.join(missing)}, which is not installed{hint}",
        )
    version = _dist_version(needs[0]) if needs else (ep.dist.version if ep.dist else "")
    module = ep.value.split(":")[0].strip()
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing or broken
        found = False
    if not found:
        return BackendInfo(
            name,
            ep.value,
            dist,
            "missing",
            version,
            f"backend {name!r}: module {module!r} of entry point {ep.value!r} is not installed",
        )
    return BackendInfo(name, ep.value, dist, "installed", version, "")


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def resolve(names: list[str] | tuple[str, ...]) -> list[str]:
    """Expand ``all`` to the installed, working backends (the reference-only ``numpy`` excluded)."""
    if list(names) == ["all"]:
        found = [n for n in registered() if n != "numpy" and describe(n).status == "ok"]
        if not found:
            raise BackendError("no working backend is installed; pip install 'vitspec[all]'")
        return found
    return list(names)
