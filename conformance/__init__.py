"""The conformance suite: golden cases, the checker, reports, deliberately broken backends.

Run it::

    vitspec conformance --backend torch                       # the shipped corpus
    pytest --pyargs vitspec.conformance --vitspec-backend all  # the same, as pytest tests

or from Python::

    from vitspec.conformance import run_suite, shipped_cases, text_report
    report = run_suite(["torch"], shipped_cases())
    print(text_report(report)); assert report.ok

docs/conformance.md describes the case format and the rules; docs/backend-authors.md how a new
backend gets checked. Importing this package is cheap: names load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitspec.conformance.case import (
        Case,
        CaseError,
        load_case,
        make_case,
        shipped_cases,
        write_case,
    )
    from vitspec.conformance.check import (
        CaseCheck,
        PointCheck,
        check_backend,
        check_outputs,
        check_pair,
        compare,
        run_backend,
        unsupported,
    )
    from vitspec.conformance.random_specs import random_cases
    from vitspec.conformance.report import point_table, text_report, to_json, to_junit, to_markdown
    from vitspec.conformance.suite import Expectation, Report, load_expectations, run_suite
    from vitspec.conformance.tolerances import Tolerance, Tolerances, load_tolerances

_LAZY = {
    "Case": "case",
    "CaseError": "case",
    "load_case": "case",
    "make_case": "case",
    "shipped_cases": "case",
    "write_case": "case",
    "CaseCheck": "check",
    "PointCheck": "check",
    "check_backend": "check",
    "unsupported": "check",
    "check_outputs": "check",
    "check_pair": "check",
    "compare": "check",
    "run_backend": "check",
    "point_table": "report",
    "text_report": "report",
    "to_json": "report",
    "to_junit": "report",
    "to_markdown": "report",
    "random_cases": "random_specs",
    "Expectation": "suite",
    "Report": "suite",
    "load_expectations": "suite",
    "run_suite": "suite",
    "Tolerance": "tolerances",
    "Tolerances": "tolerances",
    "load_tolerances": "tolerances",
}

__all__ = [
    "Case",
    "CaseCheck",
    "CaseError",
    "Expectation",
    "PointCheck",
    "Report",
    "Tolerance",
    "Tolerances",
    "check_backend",
    "check_outputs",
    "check_pair",
    "compare",
    "load_case",
    "load_expectations",
    "load_tolerances",
    "make_case",
    "point_table",
    "random_cases",
    "run_backend",
    "run_suite",
    "shipped_cases",
    "text_report",
    "to_json",
    "to_junit",
    "to_markdown",
    "unsupported",
    "write_case",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vitspec.conformance' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vitspec.conformance.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
