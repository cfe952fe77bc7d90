"""Running the suite: backends x cases against the reference, then every pair of backends.

``run_suite`` is what the CLI and the pytest plugin both call; a ``Report`` holds every result and
renders itself (``vitspec.conformance.report``). Backends are named (looked up in the entry-point
group ``vitspec.backends``) or passed as objects (the deliberately broken ones of the self-tests).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.conformance.case import (
    CASES_DIR,
    Case,
    CaseError,
    cases_corpus_version,
    shipped_case_dirs,
)
from vitspec.conformance.check import CaseCheck, check_backend, check_pair, unsupported
from vitspec.conformance.tolerances import Tolerances, load_tolerances
from vitspec.errors import BackendError, VitspecError

EXPECTATIONS_DIR = Path(__file__).parent / "expectations"
EXPECTATIONS_FORMAT = "vitspec.conformance.expectations/1"
REPORT_FORMAT = "vitspec.conformance.report/1"

# Environment variables that change numbers or threads, reported with each run: for every
# backend, and (names or prefixes ending in "_") for one framework.
COMMON_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_TF32_OVERRIDE",
)
FRAMEWORK_ENV = {
    "torch": ("TORCH_", "CUBLAS_WORKSPACE_CONFIG"),
    "tensorflow": (
        "TF_ENABLE_ONEDNN_OPTS",
        "TF_DETERMINISTIC_OPS",
        "TF_XLA_FLAGS",
        "TF_NUM_INTRAOP_THREADS",
        "TF_NUM_INTEROP_THREADS",
        "XLA_FLAGS",
        "KERAS_BACKEND",
    ),
    "jax": ("JAX_", "XLA_FLAGS"),
}


class ExpectationsError(VitspecError, ValueError):
    """An expectations file that does not follow the format."""


# ---- backends -----------------------------------------------------------------------------------


@dataclass
class BackendUnderTest:
    """A backend as the suite sees it: loaded, or the reason it could not be."""

    name: str
    backend: Any = None
    version: str = ""
    target: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    load_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "target": self.target,
            "environment": self.environment,
            "load_error": self.load_error,
        }


def expand_backend_names(names: Iterable[str]) -> list[str]:
    """``all`` becomes every installed, working backend (numpy excluded); duplicates are dropped.

    A name that is not registered at all is an error now (a typo); a registered backend that
    fails to load is reported as failing every check instead.
    """
    from vitspec.backends import registered, resolve

    known = registered()
    unknown = [n for n in names if n != "all" and n not in known]
    if unknown:
        raise BackendError(
            f"no backend named {unknown[0]!r}; registered backends: {', '.join(known) or 'none'}"
        )
    out: list[str] = []
    for name in names:
        for n in resolve(["all"]) if name == "all" else [name]:
            if n not in out:
                out.append(n)
    return out


def load_backend(spec: str | Any) -> BackendUnderTest:
    """A backend by registered name, or a backend object; a load failure is recorded, not raised."""
    if not isinstance(spec, str):
        return BackendUnderTest(
            str(spec.name),
            spec,
            str(spec.version),
            f"{type(spec).__module__}.{type(spec).__qualname__}",
            environment(spec),
        )
    from vitspec.backends import _entry_points, get_backend

    ep = _entry_points().get(spec)
    target = ep.value if ep is not None else ""
    try:
        backend = get_backend(spec)
    except BackendError as exc:
        return BackendUnderTest(
            spec, target=target, load_error=str(exc), environment=environment(None, spec)
        )
    return BackendUnderTest(spec, backend, str(backend.version), target, environment(backend))


def environment(backend: Any, name: str | None = None) -> dict[str, str]:
    """The settings that change a backend's numbers: threads, precision flags, relevant env vars.

    A backend may add its own by defining ``environment() -> dict[str, str]``.
    """
    name = name or str(getattr(backend, "name", ""))
    wanted = (*COMMON_ENV, *FRAMEWORK_ENV.get(name, ()))
    env = {
        k: v
        for k, v in sorted(os.environ.items())
        if any(k.startswith(w) if w.endswith("_") else k == w for w in wanted)
    }
    probe = _PROBES.get(name)
    if probe is not None and name in sys.modules:
        try:
            env.update(probe(sys.modules[name]))
        except Exception as exc:  # a probe is informative only
            env[f"{name}.probe_error"] = f"{type(exc).__name__}: {exc}"
    own = getattr(backend, "environment", None)
    if callable(own):
        try:
            env.update({str(k): str(v) for k, v in own().items()})
        except Exception as exc:
            env["environment_error"] = f"{type(exc).__name__}: {exc}"
    return env


def _torch_env(torch: Any) -> dict[str, str]:
    return {
        "torch.num_threads": str(torch.get_num_threads()),
        "torch.default_dtype": str(torch.get_default_dtype()).replace("torch.", ""),
        "torch.matmul_precision": torch.get_float32_matmul_precision(),
        "torch.cuda.matmul.allow_tf32": str(torch.backends.cuda.matmul.allow_tf32),
        "torch.deterministic": str(torch.are_deterministic_algorithms_enabled()),
    }


def _tf_env(tf: Any) -> dict[str, str]:
    return {
        "tf.intra_op_threads": str(tf.config.threading.get_intra_op_parallelism_threads()),
        "tf.tensor_float_32": str(tf.config.experimental.tensor_float_32_execution_enabled()),
        "tf.devices": ",".join(d.device_type for d in tf.config.list_logical_devices()),
    }


def _jax_env(jax: Any) -> dict[str, str]:
    return {
        "jax.default_backend": jax.default_backend(),
        "jax.enable_x64": str(jax.config.jax_enable_x64),
        "jax.default_matmul_precision": str(jax.config.jax_default_matmul_precision),
    }


_PROBES: dict[str, Callable[[Any], dict[str, str]]] = {
    "torch": _torch_env,
    "tensorflow": _tf_env,
    "jax": _jax_env,
}


# ---- expectations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expectation:
    """A known failure: ``backend`` fails ``case`` (against ``against``), for ``reason``.

    An entry matches only what it describes: without ``raises`` it lists a numeric divergence
    (starting at ``first_divergent`` when given) and never covers a check that raised; with
    ``raises`` it lists an exception of that type (its class name) and nothing else.
    """

    backend: str
    case: str
    reason: str
    against: str = "reference"
    first_divergent: str | None = None  # when given, the failure must start exactly here
    source: str = ""
    raises: str | None = None  # the exception type's name, for an entry that lists a raise

    def describe(self) -> str:
        vs = "" if self.against == "reference" else f" vs {self.against}"
        at = f" at {self.first_divergent}" if self.first_divergent else ""
        raising = f" raising {self.raises}" if self.raises else ""
        return f"{self.backend}{vs} on {self.case}{at}{raising} ({self.source})"

    def covers(self, result: CaseCheck) -> bool:
        """Same case and same backend(s); whether the failure is the one listed is ``mismatch``'s."""
        if result.case != self.case:
            return False
        if result.against == "reference":
            return self.against == "reference" and result.subject == self.backend
        return {result.subject, result.against} == {self.backend, self.against}

    def mismatch(self, result: CaseCheck) -> str | None:
        """Why this entry does not describe ``result``'s failure, or None when it does."""
        if result.error is not None:
            if self.raises is None:
                raised = result.error_type or "an error"
                return (
                    f"listed as a numeric divergence ({self.source}) but the check raised {raised}; "
                    f'an entry for an exception names its type: "raises": "{raised}"'
                )
            if result.error_type != self.raises:
                return f"expected to raise {self.raises} ({self.source}) but raised {result.error_type or result.error}"
            return None
        if self.raises is not None:
            where = result.first_divergent or "; ".join(result.problems) or "?"
            return f"expected to raise {self.raises} ({self.source}) but it ran and diverges at {where}"
        if self.first_divergent is not None and result.first_divergent != self.first_divergent:
            return f"expected to fail at {self.first_divergent} ({self.source}) but the first divergent point is {result.first_divergent}"
        return None


def shipped_expectations(backend: str) -> Path | None:
    path = EXPECTATIONS_DIR / f"{backend}.json"
    return path if path.is_file() else None


def load_expectations(path: str | Path) -> list[Expectation]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExpectationsError(f"{path}: no such expectations file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExpectationsError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != EXPECTATIONS_FORMAT:
        raise ExpectationsError(f"{path}: expected format {EXPECTATIONS_FORMAT!r}")
    backend = data.get("backend")
    entries = data.get("known_failures")
    if not isinstance(backend, str) or not isinstance(entries, list):
        raise ExpectationsError(f"{path}: needs 'backend' (a name) and 'known_failures' (a list)")
    out = []
    for i, entry in enumerate(entries):
        where = f"{path}: known_failures[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("case"), str):
            raise ExpectationsError(f"{where}: needs 'case' (a case name)")
        reason = entry.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise ExpectationsError(
                f"{where}: needs a 'reason' (a known failure without a reason is not allowed)"
            )
        unknown = set(entry) - {"case", "reason", "against", "first_divergent", "raises"}
        if unknown:
            raise ExpectationsError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        raises = entry.get("raises")
        if raises is not None and (not isinstance(raises, str) or not raises.isidentifier()):
            raise ExpectationsError(
                f"{where}: 'raises' must be an exception's class name such as \"NotImplementedError\", found {raises!r}"
            )
        if raises is not None and entry.get("first_divergent") is not None:
            raise ExpectationsError(
                f"{where}: an entry lists either a raise ('raises') or a numeric divergence ('first_divergent'), not both"
            )
        if raises is not None and entry.get("against", "reference") != "reference":
            raise ExpectationsError(
                f"{where}: 'raises' lists a failure against the reference; a pair never raises (a case listed as raising is left out of its pairs)"
            )
        out.append(
            Expectation(
                backend,
                entry["case"],
                reason,
                entry.get("against", "reference"),
                entry.get("first_divergent"),
                path.name,
                raises,
            )
        )
    return out


def expectation_for(result: CaseCheck, expectations: Sequence[Expectation]) -> Expectation | None:
    """The entry that lists this failing check, if any.

    An entry for this check that describes another failure (another first divergent point, a raise
    where it lists a divergence, another exception type) does not cover it: the check stays a
    failure and the disagreement is added to its problems.
    """
    if result.passed or result.unsupported is not None:
        return None
    for exp in expectations:
        if not exp.covers(result):
            continue
        why = exp.mismatch(result)
        if why is not None:
            result.problems.append(why)
            continue
        return exp
    return None


def unmatched_expectations(
    expectations: Sequence[Expectation],
    results: Sequence[CaseCheck],
    used: Iterable[Expectation],
    known_cases: Iterable[str] = (),
) -> list[str]:
    """A warning for every entry that listed no failure of this run (stale or misspelt entries)."""
    used = set(used)
    ran = {r.case for r in results}
    known = set(known_cases) | ran
    out = []
    for exp in expectations:
        if exp in used:
            continue
        covered = [r for r in results if exp.covers(r)]
        if covered and all(r.unsupported is not None for r in covered):
            out.append(
                f"expectation {exp.describe()} lists a check the backend declares unsupported; remove the entry"
            )
        elif covered:
            how = (
                "passes now"
                if all(r.passed or r.unsupported is not None for r in covered)
                else "fails differently"
            )
            out.append(
                f"expectation {exp.describe()} no longer matches: the check {how}; update or remove the entry"
            )
        elif exp.case not in known:
            out.append(f"expectation {exp.describe()} names no known case; remove or fix the entry")
    return out


def mark_expected(
    results: Iterable[CaseCheck], expectations: Sequence[Expectation]
) -> list[Expectation]:
    """Mark listed failures as expected (xfail); return the entries that matched."""
    used = []
    for r in results:
        exp = expectation_for(r, expectations)
        if exp is not None:
            r.expected_failure = exp.reason
            used.append(exp)
    return used


def apply_expectations(
    results: list[CaseCheck], expectations: Sequence[Expectation], known_cases: Iterable[str] = ()
) -> list[str]:
    """Mark listed failures as expected (xfail); return a warning for each entry that matched nothing."""
    used = mark_expected(results, expectations)
    return unmatched_expectations(expectations, results, used, known_cases)


def left_out_of_pairs(
    backend: BackendUnderTest, case: Case, expectations: Sequence[Expectation]
) -> str | None:
    """Why ``backend`` sits out the pairwise checks of ``case``, or None when it takes part.

    A case the backend declares unsupported, or lists as a known failure against the reference,
    has nothing trustworthy to compare: it is left out of every pair (and said once, not per pair).
    """
    if backend.load_error is not None:
        return None
    try:
        reason = unsupported(backend.backend, case.spec)
    except Exception:
        return None  # the reference check reports the broken hook; the pairs then say "nothing to compare"
    if reason is not None:
        return f"unsupported: {reason}"
    for exp in expectations:
        if exp.against == "reference" and exp.backend == backend.name and exp.case == case.name:
            return f"a known failure against the reference ({exp.source}: {exp.reason})"
    return None


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything one run found; ``ok`` only if every check passed (or is a listed known failure)."""

    backends: list[BackendUnderTest]
    cases: list[Case]
    results: list[CaseCheck]
    tolerances: Tolerances
    warnings: list[str] = field(default_factory=list)  # expectations that match nothing: fix them
    notes: list[str] = field(default_factory=list)  # cases that loosen a tolerance, on purpose
    seconds: float = 0.0
    left_out: dict[tuple[str, str], str] = field(
        default_factory=dict
    )  # (backend, case) -> why it sits out the pairs
    random: dict[str, int] | None = None  # {"n", "seed"} when the run drew random cases

    @property
    def counts(self) -> dict[str, int]:
        counts = {
            "checks": len(self.results),
            "pass": 0,
            "fail": 0,
            "error": 0,
            "xfail": 0,
            "unsupported": 0,
        }
        for r in self.results:
            counts[r.status] += 1
        counts["backends_not_loaded"] = sum(b.load_error is not None for b in self.backends)
        return counts

    @property
    def ok(self) -> bool:
        """Nothing failed or errored, and at least one check ran (all unsupported proves nothing)."""
        c = self.counts
        ran = c["checks"] - c["unsupported"]
        return ran > 0 and c["fail"] == 0 and c["error"] == 0 and c["backends_not_loaded"] == 0

    @property
    def corpus_version(self) -> int | None:
        """The corpus version the run's cases carry (None when none of them is from a corpus)."""
        return cases_corpus_version(self.cases)

    def failures(self) -> list[CaseCheck]:
        return [r for r in self.results if r.status in ("fail", "error")]

    def to_dict(self) -> dict[str, Any]:
        from vitspec import __version__

        return {
            "format": REPORT_FORMAT,
            "ok": self.ok,
            "summary": self.counts,
            "seconds": round(self.seconds, 3),
            "vitspec": __version__,
            "corpus_version": self.corpus_version,
            "random": self.random,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "backends": [b.to_dict() for b in self.backends],
            "cases": [
                {
                    "name": c.name,
                    "path": str(c.path) if c.path else None,
                    "batch": c.batch,
                    "capture_points": c.points,
                    "corpus_version": c.corpus_version,
                }
                for c in self.cases
            ],
            "tolerances": self.tolerances.to_dict(),
            "warnings": list(self.warnings),
            "loosened": list(self.notes),
            "left_out_of_pairs": [
                {"backend": b, "case": c, "reason": why} for (b, c), why in self.left_out.items()
            ],
            "results": [r.to_dict() for r in self.results],
        }


Progress = Callable[[str], None]


def run_suite(
    backends: Sequence[str | Any],
    cases: Sequence[Case],
    *,
    tolerances: Tolerances | None = None,
    expectations: Sequence[Expectation] | None = None,
    pairwise: bool = True,
    progress: Progress | None = None,
) -> Report:
    """Run each backend on each case, check it against the reference, then compare every pair.

    ``backends`` are registered names or backend objects. ``expectations`` defaults to the shipped
    expectations files of the named backends. ``pairwise=False`` skips the comparisons between
    backends. A case a backend declares unsupported, or lists as a known failure against the
    reference, is left out of that backend's pairs (``Report.left_out``).
    """
    start = time.perf_counter()
    check_unique_names(cases)
    tolerances = tolerances or load_tolerances()
    for case in cases:  # a manifest that loosens silently fails here, before any backend runs
        tolerances.for_case(case.name, case.tolerance_entries)
    loaded = [load_backend(b) for b in backends]
    if expectations is None:
        expectations = [
            e for b in loaded if (p := shipped_expectations(b.name)) for e in load_expectations(p)
        ]
    results: list[CaseCheck] = []
    outputs: dict[tuple[str, str], dict[str, np.ndarray] | None] = {}
    for b in loaded:
        if b.load_error is not None:
            if progress:
                progress(f"{b.name}: not loaded: {b.load_error}")
            results += [
                CaseCheck(c.name, b.name, error=f"backend not loaded: {b.load_error}")
                for c in cases
            ]
            continue
        if progress:
            progress(f"{b.name} {b.version}: {len(cases)} case(s)")
        for case in cases:
            result, outputs[(b.name, case.name)] = check_backend(
                b.name, b.backend, case, tolerances
            )
            results.append(result)
    left_out: dict[tuple[str, str], str] = {}
    if pairwise:
        ok = [b for b in loaded if b.load_error is None]
        if len(ok) > 1:
            for b in ok:
                for case in cases:
                    if (why := left_out_of_pairs(b, case, expectations)) is not None:
                        left_out[(b.name, case.name)] = why
        for a, b in itertools.combinations(ok, 2):
            for case in cases:
                if (a.name, case.name) in left_out or (b.name, case.name) in left_out:
                    continue
                results.append(
                    check_pair(
                        case,
                        a.name,
                        outputs[(a.name, case.name)],
                        b.name,
                        outputs[(b.name, case.name)],
                        tolerances,
                    )
                )
    known = [p.name for p in shipped_case_dirs(CASES_DIR)]
    warnings = apply_expectations(results, expectations, known)
    notes = [f"case {t}" for t in tolerances_loosened(cases, tolerances)]
    return Report(
        loaded,
        list(cases),
        results,
        tolerances,
        warnings,
        notes,
        time.perf_counter() - start,
        left_out,
    )


def check_unique_names(cases: Sequence[Case]) -> None:
    """Results and reports are keyed by case name: two cases with one name would mix."""
    seen: dict[str, str] = {}
    for c in cases:
        if c.name in seen:
            raise CaseError(
                f"two cases are named {c.name!r} ({seen[c.name]} and {c.where}); rename one"
            )
        seen[c.name] = c.where


def tolerances_loosened(cases: Sequence[Case], tolerances: Tolerances) -> list[str]:
    out: list[str] = []
    for c in cases:
        out += tolerances.for_case(c.name, c.tolerance_entries).loosened_by
    return out
