"""The checker: one capture point at a time, in forward order, naming the first that diverges.

Per capture point it checks, in this order:

1. the shape, exactly;
2. that NaN, +Inf and -Inf sit at the same positions;
3. ``|got - expected| <= atol + rtol * |expected|`` on every finite element, reporting the max
   absolute error, the max relative error (measured where ``|expected| >= atol / rtol``, that is
   where the relative term dominates) and the worst element (largest error / allowed), each with
   its index;
4. for ``output``, that each image's argmax agrees (a near-tie within tolerance is not counted).

Before any of it, a backend may decline a spec: ``backend.supports(spec)`` (optional) returns None
or True when it can build the spec, and a reason string when it cannot. Such a check is
``unsupported``: reported apart from pass, fail, error and known failure, and never a pass.
"""

from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitspec.conformance.case import Case
from vitspec.conformance.tolerances import Tolerance, Tolerances

Index = tuple[int, ...]


@dataclass
class Argmax:
    """Argmax agreement of the output, per image."""

    agree: int = 0
    disagree: list[tuple[int, int, int]] = field(
        default_factory=list
    )  # (image, expected class, found class)
    ties: list[tuple[int, int, int]] = field(default_factory=list)  # within tolerance: not counted
    skipped_nonfinite: list[int] = field(
        default_factory=list
    )  # images with NaN/Inf in the expected output

    def to_dict(self) -> dict[str, Any]:
        return {
            "agree": self.agree,
            "disagree": [list(x) for x in self.disagree],
            "ties": [list(x) for x in self.ties],
            "nonfinite_images": self.skipped_nonfinite,
        }


@dataclass
class PointCheck:
    """The verdict on one capture point."""

    name: str
    expected_shape: tuple[int, ...]
    shape: tuple[int, ...] | None = None  # None: the backend did not return this point
    dtype: str | None = None
    tolerance: Tolerance | None = None
    max_abs: float | None = None
    max_abs_index: Index | None = None
    max_rel: float | None = None
    max_rel_index: Index | None = None
    worst_ratio: float | None = None  # max over elements of error / allowed; passing needs <= 1
    worst_index: Index | None = None
    worst_expected: float | None = None
    worst_found: float | None = None
    nonfinite_mismatches: int = 0
    first_nonfinite_mismatch: Index | None = None
    argmax: Argmax | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        if self.shape is None:
            return "missing"
        return "pass" if self.passed else "fail"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "expected_shape": list(self.expected_shape),
            "shape": list(self.shape) if self.shape is not None else None,
            "dtype": self.dtype,
            "tolerance": self.tolerance.to_dict() | {"class": self.tolerance.dtype_class}
            if self.tolerance
            else None,
            "max_abs_err": _num(self.max_abs),
            "max_abs_index": _idx(self.max_abs_index),
            "max_rel_err": _num(self.max_rel),
            "max_rel_index": _idx(self.max_rel_index),
            "worst_ratio": _num(self.worst_ratio),
            "worst_index": _idx(self.worst_index),
            "worst_expected": _num(self.worst_expected),
            "worst_found": _num(self.worst_found),
            "nonfinite_mismatches": self.nonfinite_mismatches,
            "first_nonfinite_mismatch": _idx(self.first_nonfinite_mismatch),
            "argmax": self.argmax.to_dict() if self.argmax else None,
            "problems": list(self.problems),
        }


@dataclass
class CaseCheck:
    """A backend (``subject``) checked on one case against the reference or another backend."""

    case: str
    subject: str
    against: str = "reference"
    points: list[PointCheck] = field(default_factory=list)
    error: str | None = None  # the backend raised: type, message and where
    problems: list[str] = field(default_factory=list)  # case-level: unexpected outputs
    seconds: float = 0.0
    expected_failure: str | None = None  # the reason from an expectations file
    loosened: str | None = None  # the case loosens a tolerance: why
    unsupported: str | None = None  # the backend declined the spec (its supports() said why)
    error_type: str | None = None  # the exception's type name, when the backend raised

    def __post_init__(self) -> None:
        if self.error is not None and self.error_type is None:
            self.error_type = exception_type(self.error)

    @property
    def first_divergent(self) -> str | None:
        return next((p.name for p in self.points if not p.passed), None)

    @property
    def passed(self) -> bool:
        return (
            self.unsupported is None
            and self.error is None
            and not self.problems
            and all(p.passed for p in self.points)
        )

    @property
    def status(self) -> str:
        """pass, fail, error (the backend raised), xfail (a failure listed in an expectations file)
        or unsupported (the backend declined the spec: not a pass, not a failure)."""
        if self.unsupported is not None:
            return "unsupported"
        if self.passed:
            return "pass"
        if self.expected_failure is not None:
            return "xfail"
        return "error" if self.error is not None else "fail"

    @property
    def label(self) -> str:
        return self.subject if self.against == "reference" else f"{self.subject}~{self.against}"

    @property
    def worst_ratio(self) -> float | None:
        ratios = [p.worst_ratio for p in self.points if p.worst_ratio is not None]
        return max(ratios) if ratios else None

    def summary(self) -> str:
        """One line: the verdict and, on failure, the first divergent capture point and why."""
        vs = "the reference" if self.against == "reference" else self.against
        head = f"{self.subject} vs {vs} on {self.case}"
        if self.unsupported is not None:
            return f"{head}: UNSUPPORTED: {self.unsupported}"
        if self.error is not None:
            return f"{head}: ERROR: {self.error.splitlines()[0]}"
        if self.passed:
            ratio = self.worst_ratio
            used = f"; worst element uses {ratio:.0%} of its tolerance" if ratio is not None else ""
            return f"{head}: pass{used}"
        first = self.first_divergent
        if first is None:
            return f"{head}: FAIL: {'; '.join(self.problems)}"
        point = next(p for p in self.points if p.name == first)
        return f"{head}: FAIL: first divergent capture point {first}: {point.problems[0]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "backend": self.subject,
            "against": self.against,
            "status": self.status,
            "first_divergent": self.first_divergent,
            "summary": self.summary(),
            "error": self.error,
            "error_type": self.error_type,
            "unsupported": self.unsupported,
            "problems": list(self.problems),
            "expected_failure": self.expected_failure,
            "loosened": self.loosened,
            "seconds": round(self.seconds, 4),
            "worst_ratio": _num(self.worst_ratio),
            "points": [p.to_dict() for p in self.points],
        }


def _num(x: float | None) -> float | str | None:
    """JSON has no NaN or Inf: write them as strings."""
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else str(x)


def _idx(i: Index | None) -> list[int] | None:
    return list(i) if i is not None else None


def _fmt_idx(i: Index | None) -> str:
    return "[" + ", ".join(str(k) for k in i) + "]" if i is not None else "-"


def _unravel(flat: int, shape: tuple[int, ...]) -> Index:
    return tuple(int(k) for k in np.unravel_index(flat, shape))


def compare(
    name: str,
    got: Any,
    expected: np.ndarray,
    tolerance: Tolerance,
    *,
    symmetric: bool = False,
    argmax: bool = False,
) -> PointCheck:
    """Check one array against the expected one.

    ``symmetric`` (pairwise checks) scales the relative term by ``max(|got|, |expected|)`` so
    that comparing A with B gives the same verdict as B with A.
    """
    expected = np.asarray(expected)
    check = PointCheck(name, tuple(expected.shape), tolerance=tolerance)
    if got is None:
        check.problems.append("missing: the backend did not return this capture point")
        return check
    arr = np.asarray(got)
    check.shape, check.dtype = tuple(arr.shape), str(arr.dtype)
    if arr.shape != expected.shape:
        check.problems.append(
            f"shape: expected {_fmt_shape(expected.shape)}, found {_fmt_shape(arr.shape)}"
        )
        return check
    if not np.issubdtype(arr.dtype, np.floating):
        check.problems.append(f"dtype: expected a float array, found {arr.dtype}")
        return check
    g, e = arr.astype(np.float64), expected.astype(np.float64)

    mismatch = (
        (np.isnan(g) != np.isnan(e))
        | (np.isposinf(g) != np.isposinf(e))
        | (np.isneginf(g) != np.isneginf(e))
    )
    check.nonfinite_mismatches = int(mismatch.sum())
    if check.nonfinite_mismatches:
        first = _unravel(int(np.flatnonzero(mismatch)[0]), e.shape)
        check.first_nonfinite_mismatch = first
        check.problems.append(
            f"NaN/Inf positions differ at {check.nonfinite_mismatches} element(s); first at {_fmt_idx(first)}: "
            f"expected {e[first]:.6g}, found {g[first]:.6g}"
        )

    finite = np.isfinite(g) & np.isfinite(e)
    if not finite.any():
        return check
    diff = np.abs(np.subtract(g, e, out=np.zeros_like(e), where=finite))
    scale = np.where(finite, np.maximum(np.abs(g), np.abs(e)) if symmetric else np.abs(e), 0.0)
    allowed = tolerance.allowed(scale)
    ratio = np.divide(diff, allowed, out=np.where(diff > 0, np.inf, 0.0), where=allowed > 0)

    i = int(np.argmax(diff))
    check.max_abs, check.max_abs_index = float(diff.flat[i]), _unravel(i, e.shape)
    floor = tolerance.atol / tolerance.rtol if tolerance.rtol > 0 else 0.0
    rel_mask = finite & (scale > 0) & (scale >= floor)
    if rel_mask.any():
        rel = np.divide(diff, scale, out=np.zeros_like(diff), where=rel_mask)
        j = int(np.argmax(rel))
        check.max_rel, check.max_rel_index = float(rel.flat[j]), _unravel(j, e.shape)
    k = int(np.argmax(ratio))
    check.worst_ratio, check.worst_index = float(ratio.flat[k]), _unravel(k, e.shape)
    check.worst_expected, check.worst_found = float(e.flat[k]), float(g.flat[k])
    if check.worst_ratio > 1.0:
        n_bad = int((ratio > 1.0).sum())
        check.problems.append(
            f"{n_bad} of {e.size} element(s) outside tolerance; worst at {_fmt_idx(check.worst_index)}: "
            f"expected {check.worst_expected:.6g}, found {check.worst_found:.6g}, error {diff.flat[k]:.3g} > allowed "
            f"{allowed.flat[k]:.3g} (atol {tolerance.atol:g} + rtol {tolerance.rtol:g} x {scale.flat[k]:.3g}); "
            f"max abs error {check.max_abs:.3g} at {_fmt_idx(check.max_abs_index)}"
        )
    if argmax and e.ndim >= 1 and e.shape[-1] > 1:
        check.argmax = _argmax(g, e, tolerance, symmetric)
        if check.argmax.disagree:
            n = e.reshape(-1, e.shape[-1]).shape[0]
            img, want, found = check.argmax.disagree[0]
            check.problems.append(
                f"argmax differs for {len(check.argmax.disagree)} of {n} image(s); "
                f"first: image {img} expected class {want}, found class {found}"
            )
    return check


def _argmax(g: np.ndarray, e: np.ndarray, tol: Tolerance, symmetric: bool) -> Argmax:
    result = Argmax()
    g2, e2 = g.reshape(-1, g.shape[-1]), e.reshape(-1, e.shape[-1])
    for row, (gr, er) in enumerate(zip(g2, e2, strict=True)):
        if not (np.isfinite(er).all() and np.isfinite(gr).all()):
            result.skipped_nonfinite.append(row)
            continue
        want, found = int(np.argmax(er)), int(np.argmax(gr))
        if want == found:
            result.agree += 1
            continue
        # A near-tie: the class the backend chose is within tolerance of the top class in both arrays.
        s_w = max(abs(er[want]), abs(gr[want])) if symmetric else abs(er[want])
        s_f = max(abs(er[found]), abs(gr[found])) if symmetric else abs(er[found])
        slack = float(tol.allowed(np.asarray(s_w)) + tol.allowed(np.asarray(s_f)))
        if er[want] - er[found] <= slack and gr[found] - gr[want] <= slack:
            result.ties.append((row, want, found))
        else:
            result.disagree.append((row, want, found))
    return result


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


# ---- running a backend --------------------------------------------------------------------------

# run_backend writes an exception as "TypeName: message (at file:line)".
_ERROR_TYPE = re.compile(r"^([A-Za-z_][\w.]*): ")


def exception_type(error: str) -> str | None:
    """The exception type named at the start of an error written by ``run_backend``, if any."""
    m = _ERROR_TYPE.match(error)
    return m.group(1) if m else None


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def unsupported(backend: Any, spec: Any) -> str | None:
    """Why ``backend`` cannot build ``spec``, or None when it can (or has no ``supports`` hook).

    ``supports(spec)`` returns None or True when the spec is supported and a reason string when
    not; any other answer is the backend's bug, raised as a TypeError naming what was expected.
    """
    hook = getattr(backend, "supports", None)
    if hook is None:
        return None
    answer = hook(spec)
    if answer is None or answer is True:
        return None
    if isinstance(answer, str) and answer.strip():
        return answer.strip()
    raise TypeError(
        f"{getattr(backend, 'name', type(backend).__name__)}.supports(spec) returned {answer!r}; "
        "expected None or True (supported) or a non-empty reason string (unsupported)"
    )


def check_backend(
    subject: str, backend: Any, case: Case, tolerances: Tolerances
) -> tuple[CaseCheck, dict[str, np.ndarray] | None]:
    """Ask the backend whether it supports the case's spec; if so run it and check it.

    Returns the check and the outputs (None when unsupported or when the backend raised). A
    ``supports`` hook that raises is an error of the check, like a raise in ``forward``.
    """
    tols = tolerances.for_case(case.name, case.tolerance_entries)
    try:
        reason = unsupported(backend, case.spec)
    except Exception as exc:
        result = CaseCheck(
            case.name,
            subject,
            error=f"supports() failed: {_describe(exc)}",
            error_type=type(exc).__name__,
        )
        result.loosened = _loosened(tols, case.name)
        return result, None
    if reason is not None:
        result = CaseCheck(case.name, subject, unsupported=reason)
        result.loosened = _loosened(tols, case.name)
        return result, None
    out, error, seconds = run_backend(backend, case)
    return check_outputs(subject, out, case, tolerances, error=error, seconds=seconds), out


def run_backend(backend: Any, case: Case) -> tuple[dict[str, np.ndarray] | None, str | None, float]:
    """Build ``backend`` with the case's weights and run it, capturing every point.

    Returns ``(outputs, error, seconds)``; ``error`` (type, message and the innermost frame) is set
    when the backend raised, so that one broken case never stops the run.
    """
    start = time.perf_counter()
    try:
        # Copies: a backend that writes into its inputs must not change the case for the next one.
        model = backend.build(case.spec, {k: v.copy() for k, v in case.weights.items()})
        outputs = backend.forward(model, case.images.copy(), capture="all")
        if not isinstance(outputs, dict):
            raise TypeError(f"forward returned {type(outputs).__name__}, expected a dict of arrays")
        result = {str(k): np.asarray(v) for k, v in outputs.items()}
    except Exception as exc:
        return None, _describe(exc), time.perf_counter() - start
    return result, None, time.perf_counter() - start


def check_outputs(
    subject: str,
    outputs: dict[str, np.ndarray] | None,
    case: Case,
    tolerances: Tolerances,
    *,
    error: str | None = None,
    seconds: float = 0.0,
) -> CaseCheck:
    """Check a backend's outputs on ``case`` against the case's expected values."""
    tols = tolerances.for_case(case.name, case.tolerance_entries)
    result = CaseCheck(case.name, subject, "reference", error=error, seconds=seconds)
    result.loosened = _loosened(tols, case.name)
    if outputs is None:
        return result
    from vitspec.layout import capture_points

    known = set(capture_points(case.spec))
    extra = sorted(k for k in outputs if k not in known)
    if extra:
        result.problems.append(
            f"returned unknown capture point(s) {', '.join(extra)}; the spec has {', '.join(capture_points(case.spec))}"
        )
    for point, expected in case.expected.items():
        got = outputs.get(point)
        tol, problem = tolerance_for(tols, got)
        check = compare(point, got, expected, tol, argmax=point == "output")
        if problem and check.passed:
            check.problems.append(problem)
        result.points.append(check)
    return result


def check_pair(
    case: Case,
    a: str,
    a_out: dict[str, np.ndarray] | None,
    b: str,
    b_out: dict[str, np.ndarray] | None,
    tolerances: Tolerances,
) -> CaseCheck:
    """Compare two backends' outputs on ``case`` point by point (pairwise tolerance)."""
    tols = tolerances.for_case(case.name, case.tolerance_entries)
    result = CaseCheck(case.name, a, b)
    result.loosened = _loosened(tols, case.name)
    if a_out is None or b_out is None:
        failed = a if a_out is None else b
        result.error = f"{failed} raised on this case, so there is nothing to compare"
        return result
    for point in case.expected:
        x, y = a_out.get(point), b_out.get(point)
        if y is None:
            result.points.append(
                PointCheck(
                    point,
                    case.expected[point].shape,
                    problems=[f"missing: {b} did not return this capture point"],
                )
            )
            continue
        if (
            x is not None
            and np.asarray(x).shape == np.asarray(y).shape
            and _is_float(x)
            and _is_float(y)
        ):
            tol = tols.pairwise(np.asarray(x).dtype, np.asarray(y).dtype)
        else:
            tol, _ = tolerance_for(tols, y)
        result.points.append(
            compare(point, x, np.asarray(y), tol, symmetric=True, argmax=point == "output")
        )
    return result


def _is_float(x: Any) -> bool:
    return np.issubdtype(np.asarray(x).dtype, np.floating)


def tolerance_for(tols: Tolerances, got: Any) -> tuple[Tolerance, str | None]:
    """The tolerance for a returned array's dtype class, and a problem if that class has none.

    Without a usable dtype (missing, not float) the float32 entry stands in for the report; the
    point fails for its own reason.
    """
    if got is not None and _is_float(got):
        dtype = str(np.asarray(got).dtype)
        if dtype in tols.classes:
            return tols.for_dtype(dtype), None
        return tols.for_dtype("float32"), (
            f"dtype: no tolerance for {dtype} in {tols.path} (it has {', '.join(tols.classes)})"
        )
    return tols.for_dtype("float32"), None


def _loosened(tols: Tolerances, case: str) -> str | None:
    mine = [x for x in tols.loosened_by if x.startswith(f"{case} (")]
    return "; ".join(mine) or None
