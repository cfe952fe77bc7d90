"""Generate the shipped corpus with the float64 reference, or check that it has not drifted.

::

    python -m vitspec.conformance.generate            # rewrite conformance/cases/ from corpus.py
    python -m vitspec.conformance.generate --check    # regenerate in memory, compare, exit 1 on drift
    python -m vitspec.conformance.generate --out DIR  # write the corpus somewhere else

Drift is judged on content, not bytes: spec text, weights and images must be identical bit for bit;
expected values within 1e-10 relative (float64 BLAS builds may sum in another order); manifests equal
apart from the generator's versions and the checksums.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from vitspec.conformance.case import (
    CASES_DIR,
    MAX_CASE_BYTES,
    Case,
    CaseError,
    is_case_dir,
    load_case,
    make_case,
    write_case,
)
from vitspec.conformance.corpus import ADJUSTMENTS, CORPUS, VERSION, CaseDef

# Expected values may differ this much between two float64 generations (summation order only).
DRIFT_RTOL, DRIFT_ATOL = 1e-10, 1e-12
# The top two outputs of every image differ by this many times the pairwise float32 tolerance.
NEAR_TIE_MARGIN = 10


def build(case: CaseDef) -> Case:
    """The case of one corpus entry, computed now."""
    from vitspec.init import init_weights

    weights = init_weights(case.spec, case.seed, scheme="random")
    images = (
        np.random.default_rng(case.seed + 1)
        .standard_normal(
            (case.batch, *(case.image_size or case.spec.image_size), case.spec.in_channels)
        )
        .astype(np.float32)
    )
    provenance: dict[str, object] = {
        "weights": {"init": "vitspec.init_weights", "scheme": "random", "seed": case.seed},
        "images": {"distribution": "standard normal", "dtype": "float32", "seed": case.seed + 1},
    }
    if case.adjust:
        weights, images, note = ADJUSTMENTS[case.adjust](weights, images)
        provenance["adjust"] = {
            "name": case.adjust,
            "why": ADJUSTMENTS[case.adjust].__doc__,
            **note,
        }
    if case.family:
        provenance["family"] = case.family
    made = make_case(
        case.spec,
        weights,
        images,
        name=case.name,
        description=case.description,
        provenance=provenance,
        tolerance=case.tolerance,
        corpus_version=VERSION,
    )
    _check_no_near_ties(made)
    return made


def _check_no_near_ties(case: Case) -> None:
    """Argmax agreement is checked on every image only if no two top logits are nearly equal."""
    out = case.expected["output"]
    tol = case.manifest["tolerance"]["float32"]
    for row, values in enumerate(out):
        if out.shape[1] < 2 or not np.isfinite(values).all():
            continue
        top2 = np.sort(values)[-2:]
        need = NEAR_TIE_MARGIN * 2 * (tol["atol"] + tol["rtol"] * abs(top2[1]))
        if top2[1] - top2[0] <= need:
            raise CaseError(
                f"case {case.name!r}: image {row}'s top two outputs differ by {top2[1] - top2[0]:.3g}, "
                f"less than {need:.3g}; pick another seed"
            )


def case_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def generate(out: Path = CASES_DIR, log=print) -> list[Path]:
    """Write every corpus case under ``out`` (replacing old ones) and remove cases no longer listed."""
    out.mkdir(parents=True, exist_ok=True)
    names = {c.name for c in CORPUS}
    for stale in (p for p in out.iterdir() if is_case_dir(p) and p.name not in names):
        shutil.rmtree(stale)
        log(f"removed {stale.name} (no longer in the corpus)")
    paths = []
    for entry in CORPUS:
        path = write_case(build(entry), out / entry.name, overwrite=True)
        size = case_bytes(path)
        if size > MAX_CASE_BYTES:
            raise CaseError(
                f"{path}: {size} bytes, more than the {MAX_CASE_BYTES} a corpus case may take; make it smaller"
            )
        log(f"wrote {entry.name:32s} {size / 1024:6.1f} KB")
        paths.append(path)
    return paths


def drift(frozen_dir: Path = CASES_DIR) -> list[str]:
    """Every difference between the frozen corpus and a fresh generation; empty when none."""
    problems: list[str] = []
    frozen = (
        {p.name: p for p in frozen_dir.iterdir() if is_case_dir(p)} if frozen_dir.is_dir() else {}
    )
    listed = {c.name: c for c in CORPUS}
    for name in sorted(set(listed) - set(frozen)):
        problems.append(f"{name}: in corpus.py but not in {frozen_dir}")
    for name in sorted(set(frozen) - set(listed)):
        problems.append(f"{name}: in {frozen_dir} but not in corpus.py")
    for name in sorted(set(listed) & set(frozen)):
        try:
            old = load_case(frozen[name])
        except Exception as exc:
            problems.append(f"{name}: the frozen case does not load: {exc}")
            continue
        problems += [f"{name}: {p}" for p in compare_cases(old, build(listed[name]))]
        size = case_bytes(frozen[name])
        if size > MAX_CASE_BYTES:
            problems.append(f"{name}: {size} bytes on disk, more than {MAX_CASE_BYTES}")
    return problems


def compare_cases(old: Case, new: Case) -> list[str]:
    """How ``new`` differs from ``old`` in content (see the module docstring for the rules)."""
    problems = []
    if old.spec.to_yaml() != new.spec.to_yaml():
        problems.append("spec.yaml differs")
    if list(old.weights) != list(new.weights):
        problems.append("weights: tensor names differ")
    for k in old.weights.keys() & new.weights.keys():
        a, b = old.weights[k], np.asarray(new.weights[k], np.float32)
        if a.shape != b.shape or a.tobytes() != b.tobytes():
            problems.append(f"weights: {k} differs")
    if old.images.shape != new.images.shape or old.images.tobytes() != new.images.tobytes():
        problems.append("images differ")
    if list(old.expected) != list(new.expected):
        problems.append(f"capture points differ: {list(old.expected)} vs {list(new.expected)}")
    for k in old.expected.keys() & new.expected.keys():
        a, b = old.expected[k], new.expected[k]
        if a.shape != b.shape:
            problems.append(f"expected {k}: shape {a.shape} vs {b.shape}")
        elif not np.array_equal(np.isfinite(a), np.isfinite(b)) or not np.allclose(
            a, b, rtol=DRIFT_RTOL, atol=DRIFT_ATOL, equal_nan=True
        ):
            err = float(np.nanmax(np.abs(a - b))) if np.isfinite(a).any() else float("nan")
            problems.append(
                f"expected {k}: differs by up to {err:.3g} (allowed {DRIFT_ATOL:g} + {DRIFT_RTOL:g}|x|)"
            )
    ignore = {"generator", "files"}
    a_man = {k: v for k, v in old.manifest.items() if k not in ignore}
    b_man = {k: v for k, v in new.manifest.items() if k not in ignore}
    for key in sorted(a_man.keys() | b_man.keys()):
        if a_man.get(key) != b_man.get(key):
            problems.append(
                f"manifest {key!r}: frozen {a_man.get(key)!r}, fresh {b_man.get(key)!r}"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitspec.conformance.generate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="compare a fresh generation with the frozen corpus"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=CASES_DIR,
        help=f"where to write the cases (default {CASES_DIR})",
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = drift(args.out)
        for p in problems:
            print(f"drift: {p}", file=sys.stderr)
        print(
            f"{len(CORPUS)} cases checked against {args.out}: "
            + (f"{len(problems)} difference(s)" if problems else "no drift")
        )
        return 1 if problems else 0
    paths = generate(args.out)
    print(f"{len(paths)} cases, {sum(case_bytes(p) for p in paths) / 1024:.0f} KB, in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
