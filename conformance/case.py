"""Golden cases: a folder that any language can read (docs/conformance.md is the format).

::

    <case>/spec.yaml            the spec (vitspec YAML)
    <case>/weights.safetensors  canonical weights (float32, spec JSON in the metadata)
    <case>/data.safetensors     "images" (B, H, W, C) and the expected value of each capture point
                                under its own name ("patch_embed", ..., "output"), float64
    <case>/manifest.json        format, name, batch, capture points, provenance, tolerance in force,
                                and the sha256 and size of the three files above

The expected values are the float64 reference's (``vitspec.reference.forward``).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.errors import VitspecError
from vitspec.files import atomic_dir
from vitspec.spec import Spec

FORMAT = "vitspec.conformance.case/1"
FILES = ("spec.yaml", "weights.safetensors", "data.safetensors")
MANIFEST = "manifest.json"
CASES_DIR = Path(__file__).parent / "cases"
# The shipped corpus: at least this many cases, each at most this many bytes on disk.
MIN_CASES = 24
MAX_CASE_BYTES = 200 * 1024
GENERATOR = "vitspec.conformance.generate"


class CaseError(VitspecError, ValueError):
    """A case folder that is incomplete, corrupt or inconsistent."""


@dataclass
class Case:
    """One golden case in memory: spec, weights, images and the expected value of each capture point."""

    name: str
    spec: Spec
    weights: dict[str, np.ndarray]
    images: np.ndarray
    expected: dict[str, np.ndarray]  # capture point -> value, in forward order, "output" last
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def points(self) -> list[str]:
        return list(self.expected)

    @property
    def batch(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the case's images: the spec's, or another for a dynamic image size."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def tolerance_entries(self) -> dict[str, Any]:
        """The manifest's tolerance entries (applied by ``Tolerances.for_case``)."""
        return dict(self.manifest.get("tolerance") or {})

    @property
    def where(self) -> str:
        return str(self.path) if self.path else f"case {self.name!r} (generated in memory)"

    @property
    def corpus_version(self) -> int | None:
        """The version of the corpus this case belongs to; None for a case made elsewhere."""
        return self.manifest.get("corpus_version")


def make_case(
    spec: Spec,
    weights: Mapping[str, np.ndarray] | None = None,
    images: np.ndarray | None = None,
    *,
    name: str,
    batch: int = 2,
    seed: int = 0,
    description: str = "",
    provenance: Mapping[str, Any] | None = None,
    tolerance: Mapping[str, Any] | None = None,
    corpus_version: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> Case:
    """A case computed now by the float64 reference.

    Weights default to ``init_weights(spec, seed, scheme="random")`` (no zero biases, norm scales
    away from 1: zeros would hide bugs); images to standard normal float32 from ``seed + 1``.
    ``tolerance`` holds manifest entries (``{"float32": {"atol", "rtol", "reason"}}``) that replace
    the shipped tolerance file's; the manifest records the result as the tolerance in force.
    ``corpus_version`` is set for the shipped corpus's cases only (``vitspec.conformance.corpus``).
    ``image_size`` (height, width) draws images of another size than the spec's, for a spec with
    ``dynamic_image_size``.
    """
    from vitspec import __version__, reference
    from vitspec.conformance.tolerances import load_tolerances
    from vitspec.init import init_weights
    from vitspec.layout import capture_points
    from vitspec.weights import check_weights

    inputs: dict[str, Any] = {}
    if weights is None:
        weights = init_weights(spec, seed, scheme="random")
        inputs["weights"] = {"init": "vitspec.init_weights", "scheme": "random", "seed": seed}
    else:
        inputs["weights"] = {"init": "given"}
    check_weights(spec, weights, source=f"case {name!r} weights", check_values=True)
    weights = {k: np.asarray(v) for k, v in weights.items()}
    if images is None:
        rng = np.random.default_rng(seed + 1)
        size = tuple(image_size) if image_size is not None else spec.image_size
        images = rng.standard_normal((batch, *size, spec.in_channels)).astype(np.float32)
        inputs["images"] = {"distribution": "standard normal", "dtype": "float32", "seed": seed + 1}
    else:
        inputs["images"] = {"source": "given"}
    images = np.asarray(images)
    inputs.update(provenance or {})
    out = reference.forward(spec, weights, images, dtype=np.float64, capture="all")
    expected = {p: out[p] for p in capture_points(spec)}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        **({"corpus_version": corpus_version} if corpus_version is not None else {}),
        "description": description,
        "batch": int(images.shape[0]),
        "capture_points": list(expected),
        "reference": {"function": "vitspec.reference.forward", "dtype": "float64"},
        "inputs": inputs,
        "generator": {
            "name": GENERATOR,
            "vitspec": __version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        # The tolerance in force: the shipped file's entries, with the case's own entries over them.
        "tolerance": {
            **{
                k: {"atol": t.atol, "rtol": t.rtol, "reason": t.reason}
                for k, t in load_tolerances().classes.items()
            },
            **(tolerance or {}),
        },
    }
    return Case(name, spec, dict(weights), images, expected, manifest)


def write_case(case: Case, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``case`` to the folder ``path`` atomically; returns the path. The manifest gets checksums."""
    from vitspec.containers import write_safetensors
    from vitspec.layout import param_table
    from vitspec.weights import FORMAT as WEIGHTS_FORMAT
    from vitspec.weights import SPEC_KEY

    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        (tmp / "spec.yaml").write_text(case.spec.to_yaml(), encoding="utf-8")
        # No version in the metadata: the bytes depend only on the content (provenance is in the manifest).
        ordered = [
            (p.name, np.asarray(case.weights[p.name], np.float32)) for p in param_table(case.spec)
        ]
        write_safetensors(
            tmp / "weights.safetensors",
            ordered,
            {"format": WEIGHTS_FORMAT, SPEC_KEY: case.spec.to_json()},
        )
        data = [
            ("images", np.asarray(case.images)),
            *((k, np.asarray(v, np.float64)) for k, v in case.expected.items()),
        ]
        write_safetensors(tmp / "data.safetensors", data, {"format": FORMAT})
        manifest = dict(case.manifest)
        manifest["files"] = {f: _file_entry(tmp / f) for f in FILES}
        (tmp / MANIFEST).write_text(
            json.dumps(manifest, indent=1, allow_nan=False) + "\n", encoding="utf-8"
        )
    case.path, case.manifest = path, manifest
    return path


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}


def is_case_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_case(path: str | Path) -> Case:
    """Read a case folder and check it: checksums, spec, weights, shapes of inputs and expected values."""
    from vitspec.containers import open_safetensors
    from vitspec.layout import capture_points, capture_shapes
    from vitspec.presets import load_spec
    from vitspec.weights import load_weights

    path = Path(path)
    where = str(path)
    if not path.is_dir():
        raise CaseError(f"{where}: no such case folder")
    manifest = _read_manifest(path)
    name = manifest["name"]
    listed = manifest["files"]
    for fname in FILES:
        fpath = path / fname
        if not fpath.is_file():
            raise CaseError(
                f"{where}: {fname} is missing (a case holds {', '.join(FILES)} and {MANIFEST})"
            )
        want = listed.get(fname, {}).get("sha256") if isinstance(listed.get(fname), dict) else None
        if not isinstance(want, str):
            raise CaseError(f"{where}: {MANIFEST} has no sha256 for {fname}")
        found = hashlib.sha256(fpath.read_bytes()).hexdigest()
        if found != want:
            raise CaseError(
                f"{where}: {fname} does not match its checksum (manifest sha256 {want[:16]}…, file {found[:16]}…); "
                "the file was changed or corrupted; regenerate the case"
            )
    spec = load_spec(path / "spec.yaml")
    weights, _ = load_weights(path / "weights.safetensors", spec)
    with open_safetensors(path / "data.safetensors") as data:
        if "images" not in data:
            raise CaseError(f"{where}: data.safetensors has no 'images' tensor")
        images = np.array(data["images"])
        expected = {n: np.array(data[n]) for n in data.names if n != "images"}
    _check_images(where, spec, images, manifest)
    points = capture_points(spec)
    stored = list(expected)
    unknown = [n for n in stored if n not in points]
    if unknown:
        raise CaseError(
            f"{where}: data.safetensors holds {', '.join(unknown)}, which are not capture points of this spec"
        )
    if "output" not in expected:
        raise CaseError(f"{where}: data.safetensors has no expected 'output'")
    ordered = [p for p in points if p in expected]
    if manifest["capture_points"] != ordered:
        raise CaseError(
            f"{where}: manifest capture_points {manifest['capture_points']} differ from the tensors in "
            f"data.safetensors in forward order {ordered}"
        )
    shapes = capture_shapes(spec, images.shape[0], (images.shape[1], images.shape[2]))
    for p in ordered:
        value = expected[p]
        if value.shape != shapes[p]:
            raise CaseError(
                f"{where}: expected {p!r} has shape {list(value.shape)}, the spec says {list(shapes[p])}"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise CaseError(f"{where}: expected {p!r} is {value.dtype}, expected a float dtype")
    return Case(name, spec, weights, images, {p: expected[p] for p in ordered}, manifest, path)


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaseError(f"{path}: no {MANIFEST}; not a conformance case folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaseError(f"{mpath}: not readable JSON ({exc})") from None
    except RecursionError:  # found by tests/fuzz: '[' * 100000
        raise CaseError(f"{mpath}: not readable JSON (nested past the recursion limit)") from None
    if not isinstance(manifest, dict):
        raise CaseError(f"{mpath}: expected a JSON object, found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise CaseError(f"{mpath}: expected format {FORMAT!r}, found {manifest.get('format')!r}")
    for key, kind in (
        ("name", str),
        ("batch", int),
        ("capture_points", list),
        ("files", dict),
        ("generator", dict),
    ):
        if not isinstance(manifest.get(key), kind):
            raise CaseError(f"{mpath}: {key!r} is missing or not a {kind.__name__}")
    version = manifest.get("corpus_version")
    if version is not None and (
        not isinstance(version, int) or isinstance(version, bool) or version < 1
    ):
        raise CaseError(f"{mpath}: 'corpus_version' must be a positive integer, found {version!r}")
    if "tolerance" in manifest and not isinstance(manifest["tolerance"], dict):
        raise CaseError(f"{mpath}: 'tolerance' must map dtype classes to {{atol, rtol, reason}}")
    return manifest


def _check_images(where: str, spec: Spec, images: np.ndarray, manifest: Mapping[str, Any]) -> None:
    """Images of the spec's size; a spec with a dynamic image size takes any multiple of its patch."""
    (ph, pw), c = spec.patch_size, spec.in_channels
    dynamic = (
        spec.dynamic_image_size
        and images.ndim == 4
        and images.shape[0] == manifest["batch"]
        and images.shape[3] == c
        and images.shape[1] >= ph
        and images.shape[2] >= pw
        and not images.shape[1] % ph
        and not images.shape[2] % pw
    )
    want = (manifest["batch"], *spec.image_size, c)
    if images.shape != want and not dynamic:
        also = (
            f", or any height a multiple of {ph} and width a multiple of {pw} (dynamic_image_size)"
            if spec.dynamic_image_size
            else ""
        )
        raise CaseError(
            f"{where}: images have shape {list(images.shape)}, expected {list(want)} (batch, H, W, C){also}"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise CaseError(f"{where}: images are {images.dtype}, expected a float dtype")


def shipped_case_dirs(root: str | Path = CASES_DIR) -> list[Path]:
    """Case folders under ``root``, sorted by name."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if is_case_dir(p)) if root.is_dir() else []


def shipped_cases(root: str | Path = CASES_DIR) -> list[Case]:
    """Every case of the shipped corpus; fewer than MIN_CASES is an error (a thin corpus proves little)."""
    dirs = shipped_case_dirs(root)
    if len(dirs) < MIN_CASES:
        raise CaseError(
            f"{root}: the corpus holds {len(dirs)} case(s), fewer than the minimum {MIN_CASES}; "
            "regenerate it with: python -m vitspec.conformance.generate"
        )
    return [load_case(d) for d in dirs]


def cases_corpus_version(cases: Sequence[Case]) -> int | None:
    """The corpus version that ``cases`` carry (None when none does); cases of two versions are an error."""
    versions = sorted({c.corpus_version for c in cases if c.corpus_version is not None})
    if len(versions) > 1:
        named = ", ".join(
            f"{v} ({next(c.name for c in cases if c.corpus_version == v)})" for v in versions
        )
        raise CaseError(
            f"cases from corpus versions {named} in one run; run each corpus version separately"
        )
    return versions[0] if versions else None


def check_corpus_version(pinned: int | None, cases: Sequence[Case]) -> None:
    """``--corpus-version``: the cases' corpus (or, with none from a corpus, the shipped one) must be ``pinned``."""
    from vitspec import __version__
    from vitspec.conformance.corpus import VERSION

    found = cases_corpus_version(cases)
    if pinned is None or pinned == (found or VERSION):
        return
    if found is None:
        where = f"this vitspec ({__version__}) ships corpus version {VERSION}"
    else:
        where = f"the cases are from corpus version {found}"
    raise CaseError(
        f"corpus version: expected {pinned} (--corpus-version), found {found or VERSION}: {where}; install a vitspec "
        f"that ships corpus {pinned}, or review the changes (docs/conformance.md#corpus-versions) and pin {found or VERSION}"
    )


def corpus_fingerprint(cases: Sequence[Case]) -> str:
    """A sha256 over what decides a verdict: each case's spec, weights, images, expected values and
    tolerance entries, and the numbers of the shipped tolerance file.

    Expected values enter rounded to float32, so a float64 regeneration on another CPU (which may
    sum in another order) keeps the fingerprint. Reasons, descriptions and provenance are left out
    (rewording one changes no verdict), and so is the corpus version, which this fingerprint pins.
    """
    from vitspec.conformance.tolerances import DEFAULT_PATH

    digest = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c.name):
        tol = {
            k: {n: v for n, v in t.items() if n != "reason"}
            for k, t in case.tolerance_entries.items()
        }
        digest.update(
            json.dumps(
                {"name": case.name, "spec": case.spec.to_dict(), "tolerance": tol}, sort_keys=True
            ).encode()
        )
        for name, value in [*case.weights.items(), ("images", case.images), *case.expected.items()]:
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(value, np.float32).tobytes())
    shipped = json.loads(DEFAULT_PATH.read_text(encoding="utf-8"))
    numbers = {
        "classes": {k: [t["atol"], t["rtol"]] for k, t in shipped["classes"].items()},
        "pairwise": shipped["pairwise"]["factor"],
    }
    digest.update(json.dumps(numbers, sort_keys=True).encode())
    return digest.hexdigest()
