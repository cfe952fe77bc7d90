"""The pytest plugin (entry point ``pytest11``): the conformance suite as pytest tests.

::

    pytest --pyargs vitspec.conformance --vitspec-backend torch        # or all, or several
    pytest --pyargs vitspec.conformance --vitspec-backend mine --vitspec-case my_cases/ \\
           --vitspec-expectations mine.json --vitspec-report out.json --junitxml out.xml

It loads in every pytest session of an environment that has vitspec, so without
``--vitspec-backend`` it only adds its options: no import of vitspec's internals, no framework.
One test per (backend, case) against the reference, and one per (pair of backends, case). Skips
never count as passes: a skipped conformance test, a backend that does not load, or a run that
collects zero cases fails the session. A case the backend declares unsupported (its ``supports``
hook) is reported as pytest's skip with the reason ``vitspec unsupported: ...``, counted apart as
unsupported, and does not fail the session; it and a listed known failure are left out of pairs.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


class ConformanceWarning(UserWarning):
    """A known-failures entry that no longer matches anything."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "vitspec", "vitspec conformance suite (pytest --pyargs vitspec.conformance)"
    )
    group.addoption(
        "--vitspec-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="backend to test: a registered name, or 'all' (repeatable); turns the suite on",
    )
    group.addoption(
        "--vitspec-case",
        action="append",
        default=[],
        metavar="PATH",
        help="a case folder, or a folder of case folders, instead of the shipped corpus (repeatable)",
    )
    group.addoption(
        "--vitspec-expectations",
        action="append",
        default=[],
        metavar="FILE",
        help="known-failures file (repeatable; default: the shipped file of each backend)",
    )
    group.addoption(
        "--vitspec-tolerances", metavar="FILE", help="a tolerance file instead of the shipped one"
    )
    group.addoption(
        "--vitspec-no-pairwise", action="store_true", help="do not compare backends with each other"
    )
    group.addoption("--vitspec-report", metavar="FILE", help="write the JSON report here")
    group.addoption(
        "--vitspec-markdown", metavar="FILE", help="write the Markdown conformance matrix here"
    )
    group.addoption(
        "--vitspec-random",
        type=int,
        default=0,
        metavar="N",
        help="also check N random specs drawn now (instead of the shipped corpus unless --vitspec-case is given)",
    )
    group.addoption(
        "--vitspec-seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the --vitspec-random cases (default 0)",
    )
    group.addoption(
        "--vitspec-save-case",
        metavar="DIR",
        help="write each --vitspec-random case that fails as a case folder under DIR",
    )
    group.addoption(
        "--vitspec-corpus-version",
        type=int,
        metavar="V",
        help="fail at once unless the corpus is version V",
    )


UNSUPPORTED = (
    "vitspec unsupported: "  # the skip reason of an unsupported check (counted apart, never a pass)
)


@dataclass(frozen=True)
class Check:
    """One test: ``backend`` on ``case`` against the reference, or against another backend."""

    backend: str
    case: str
    against: str = "reference"

    @property
    def id(self) -> str:
        who = self.backend if self.against == "reference" else f"{self.backend}~{self.against}"
        return f"{who}-{self.case}"


class Session:
    """The state of one conformance session: backends, cases, cached outputs, results."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.requested: list[str] = config.getoption("vitspec_backend")
        self._backends: dict[str, Any] | None = None
        self._cases: dict[str, Any] | None = None
        self._outputs: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._expectations: list[Any] | None = None
        self._tolerances: Any = None
        self.results: list[Any] = []
        self.used: list[Any] = []
        self.outcome: dict[
            str, str
        ] = {}  # nodeid -> passed, failed, skipped, xfailed or unsupported
        self.warnings: list[str] = []
        self.random: set[str] = set()  # names of the --vitspec-random cases
        self._left_out: dict[tuple[str, str], str] | None = None
        self.properties_recorded = False
        self.start = time.perf_counter()

    # ---- what is under test -------------------------------------------------------------------

    @property
    def backends(self) -> dict[str, Any]:
        if self._backends is None:
            from vitspec.conformance.suite import expand_backend_names, load_backend
            from vitspec.errors import BackendError

            try:
                names = expand_backend_names(self.requested)
            except BackendError as exc:
                raise pytest.UsageError(f"--vitspec-backend: {exc}") from None
            self._backends = {n: load_backend(n) for n in names}
        return self._backends

    @property
    def cases(self) -> dict[str, Any]:
        if self._cases is None:
            from vitspec.conformance.case import (
                check_corpus_version,
                is_case_dir,
                load_case,
                shipped_case_dirs,
                shipped_cases,
            )
            from vitspec.conformance.random_specs import random_cases
            from vitspec.errors import VitspecError

            n_random, seed = (
                self.config.getoption("vitspec_random"),
                self.config.getoption("vitspec_seed"),
            )
            if n_random < 0 or seed < 0:
                raise pytest.UsageError(
                    f"--vitspec-random and --vitspec-seed take integers >= 0, found {n_random} and {seed}"
                )
            try:
                paths = self.config.getoption("vitspec_case")
                drawn = random_cases(n_random, seed)
                if not paths:
                    cases = drawn or shipped_cases()
                else:
                    cases = []
                    for p in paths:
                        found = [Path(p)] if is_case_dir(p) else shipped_case_dirs(p)
                        cases += [load_case(d) for d in found]
                    cases += drawn
                self.random = {c.name for c in drawn}
                check_corpus_version(self.config.getoption("vitspec_corpus_version"), cases)
            except VitspecError as exc:
                raise pytest.UsageError(f"vitspec conformance: {exc}") from None
            from vitspec.conformance.suite import check_unique_names

            try:
                check_unique_names(cases)
            except VitspecError as exc:
                raise pytest.UsageError(f"--vitspec-case: {exc}") from None
            self._cases = {c.name: c for c in cases}
        return self._cases

    @property
    def tolerances(self) -> Any:
        if self._tolerances is None:
            from vitspec.conformance.tolerances import load_tolerances
            from vitspec.errors import VitspecError

            try:
                self._tolerances = load_tolerances(self.config.getoption("vitspec_tolerances"))
                for case in self.cases.values():
                    self._tolerances.for_case(case.name, case.tolerance_entries)
            except VitspecError as exc:
                raise pytest.UsageError(f"vitspec conformance: {exc}") from None
        return self._tolerances

    @property
    def expectations(self) -> list[Any]:
        if self._expectations is None:
            from vitspec.conformance.suite import load_expectations, shipped_expectations
            from vitspec.errors import VitspecError

            paths = self.config.getoption("vitspec_expectations") or [
                p for n in self.backends if (p := shipped_expectations(n)) is not None
            ]
            try:
                self._expectations = [e for p in paths for e in load_expectations(p)]
            except VitspecError as exc:
                raise pytest.UsageError(f"--vitspec-expectations: {exc}") from None
        return self._expectations

    @property
    def pairwise(self) -> bool:
        return (
            not self.config.getoption("vitspec_no_pairwise")
            and sum(b.load_error is None for b in self.backends.values()) > 1
        )

    @property
    def left_out(self) -> dict[tuple[str, str], str]:
        """(backend, case) -> why it sits out the pairs: unsupported, or a listed known failure."""
        if self._left_out is None:
            from vitspec.conformance.suite import left_out_of_pairs

            self._left_out = {}
            if self.pairwise:
                for b in self.backends.values():
                    for case in self.cases.values():
                        if (why := left_out_of_pairs(b, case, self.expectations)) is not None:
                            self._left_out[(b.name, case.name)] = why
        return self._left_out

    def checks(self) -> list[Check]:
        names = list(self.backends)
        checks = [Check(b, c) for b in names for c in self.cases]
        if not self.config.getoption("vitspec_no_pairwise"):
            out = self.left_out
            checks += [
                Check(a, c, b)
                for i, a in enumerate(names)
                for b in names[i + 1 :]
                for c in self.cases
                if (a, c) not in out and (b, c) not in out
            ]
        return checks

    def header(self) -> list[str]:
        from vitspec.conformance.report import header_lines

        lines = header_lines(self.report())
        lines[0] += "; " + "; ".join(
            f"{k} atol {t.atol:g} rtol {t.rtol:g}" for k, t in self.tolerances.classes.items()
        )
        return lines

    # ---- running ------------------------------------------------------------------------------

    def _outputs_of(self, backend: str, case: str) -> tuple[Any, Any]:
        """The backend's outputs on the case (None if it raised or declined) and its reference check."""
        key = (backend, case)
        if key not in self._outputs:
            from vitspec.conformance.check import check_backend

            result, out = check_backend(
                backend, self.backends[backend].backend, self.cases[case], self.tolerances
            )
            self._outputs[key] = (out, result)
        return self._outputs[key]

    def _save_random(self, case: Any) -> None:
        """--vitspec-save-case: a failing random case is written out (once) to be rerun as a case folder."""
        where = self.config.getoption("vitspec_save_case")
        if not where or case.name not in self.random or case.path is not None:
            return
        from vitspec.conformance.case import write_case

        Path(where).mkdir(parents=True, exist_ok=True)
        write_case(case, Path(where) / case.name, overwrite=True)

    def verify(self, check: Check) -> None:
        """Run one check; fail with the capture-point table, xfail if it is a listed failure."""
        from vitspec.conformance.check import check_pair
        from vitspec.conformance.report import point_table
        from vitspec.conformance.suite import expectation_for

        case = self.cases[check.case]
        for name in (check.backend, check.against):
            b = self.backends.get(name)
            if b is not None and b.load_error:
                pytest.fail(f"backend {name} could not be loaded: {b.load_error}", pytrace=False)
        if check.against == "reference":
            _, result = self._outputs_of(check.backend, check.case)
        else:
            out, _ = self._outputs_of(check.backend, check.case)
            other, _ = self._outputs_of(check.against, check.case)
            result = check_pair(case, check.backend, out, check.against, other, self.tolerances)
        self.results.append(result)
        if result.unsupported is not None:
            pytest.skip(f"{UNSUPPORTED}{result.unsupported}")
        exp = expectation_for(result, self.expectations)
        if exp is not None:
            result.expected_failure = exp.reason
            self.used.append(exp)
            pytest.xfail(f"{exp.reason} [{result.summary()}]")
        if not result.passed:
            self._save_random(case)
            pytest.fail(point_table(result), pytrace=False)
        stale = [e for e in self.expectations if e.covers(result)]
        for e in stale:
            warnings.warn(
                ConformanceWarning(
                    f"expectation {e.describe()} no longer matches: the check passes; remove the entry"
                ),
                stacklevel=2,
            )

    def report(self) -> Any:
        from vitspec.conformance.suite import Report, tolerances_loosened

        cases = list(self.cases.values())
        notes = [f"case {t}" for t in tolerances_loosened(cases, self.tolerances)]
        n_random = self.config.getoption("vitspec_random")
        random = (
            {"n": n_random, "seed": self.config.getoption("vitspec_seed")} if n_random else None
        )
        return Report(
            list(self.backends.values()),
            cases,
            self.results,
            self.tolerances,
            self.final_warnings(),
            notes,
            seconds=time.perf_counter() - self.start,
            left_out=self.left_out,
            random=random,
        )

    def record_properties(self, record: Any) -> None:
        """pytest --junitxml: vitspec's and the corpus's versions, each backend's version and environment."""
        if self.properties_recorded:
            return
        from vitspec.conformance.report import junit_properties

        for name, value in junit_properties(self.report(), list(self.backends.values())):
            record(name, value)
        self.properties_recorded = True

    def final_warnings(self) -> list[str]:
        from vitspec.conformance.case import shipped_case_dirs
        from vitspec.conformance.suite import unmatched_expectations

        known = [p.name for p in shipped_case_dirs()] + list(self.cases)
        return unmatched_expectations(self.expectations, self.results, self.used, known)

    # ---- hooks (this object is registered as a plugin while the suite is on) -------------------

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        return self.header()

    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        if not config.pluginmanager.hasplugin("xdist"):
            return
        # With pytest-xdist (--dist loadgroup), all checks of a case share a worker: each backend
        # compiles each case once, and pairwise checks reuse the outputs.
        for item in items:
            check = getattr(getattr(item, "callspec", None), "params", {}).get("vitspec_check")
            if isinstance(check, Check):
                item.add_marker(pytest.mark.xdist_group(check.case))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # By node id, not by collected item: under xdist the reports reach a process that did not collect.
        if TEST_ID not in report.nodeid:
            return
        if hasattr(report, "wasxfail"):
            now = "xfailed"
        elif (
            report.skipped
            and isinstance(report.longrepr, tuple)
            and UNSUPPORTED in str(report.longrepr[2])
        ):
            now = "unsupported"
        elif report.skipped:
            now = "skipped"
        elif report.failed:
            now = "failed"
        elif report.when == "call":
            now = "passed"
        else:
            return
        rank = ("passed", "unsupported", "xfailed", "skipped", "failed")
        old = self.outcome.get(report.nodeid)
        if old is None or rank.index(now) > rank.index(old):
            self.outcome[report.nodeid] = now

    @property
    def outcomes(self) -> dict[str, int]:
        counts = dict.fromkeys(("passed", "failed", "skipped", "xfailed", "unsupported"), 0)
        for o in self.outcome.values():
            counts[o] += 1
        return counts

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if hasattr(self.config, "workerinput"):
            return  # an xdist worker: the controller judges the session
        o = self.outcomes
        if sum(o.values()) == o["unsupported"] or o["skipped"]:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self._backends is None or self._cases is None:
            return  # nothing was collected here (a usage error, another test path, or xdist)
        from vitspec.conformance.report import write_json, write_markdown

        self.warnings = self.final_warnings()
        report = self.report()
        if self.config.getoption("vitspec_report"):
            write_json(report, self.config.getoption("vitspec_report"))
        if self.config.getoption("vitspec_markdown"):
            write_markdown(report, self.config.getoption("vitspec_markdown"))

    def pytest_terminal_summary(
        self, terminalreporter: Any, exitstatus: int, config: pytest.Config
    ) -> None:
        o, tr = self.outcomes, terminalreporter
        tr.write_sep("=", "vitspec conformance")
        tr.write_line(
            f"{o['passed']} passed, {o['failed']} failed, {o['xfailed']} known failures (not passes), "
            f"{o['unsupported']} unsupported (not passes), {o['skipped']} skipped (not passes)"
        )
        if sum(o.values()) == 0:
            tr.write_line(
                "FAILED: no conformance check ran (zero cases collected, or all deselected)",
                red=True,
            )
        elif sum(o.values()) == o["unsupported"]:
            tr.write_line(
                "FAILED: every conformance check is unsupported; a run that checks nothing proves nothing",
                red=True,
            )
        if self._left_out:
            from vitspec.conformance.report import left_out_lines

            tr.write_line("left out of the pairwise checks:")
            for line in left_out_lines(self.report()):
                tr.write_line(f"  {line}")
        if o["skipped"]:
            tr.write_line(
                f"FAILED: {o['skipped']} conformance check(s) skipped; a skip is not a pass",
                red=True,
            )
        for w in self.warnings:
            tr.write_line(f"warning: {w}", yellow=True)
        for opt in ("vitspec_report", "vitspec_markdown"):
            if config.getoption(opt):
                tr.write_line(f"wrote {config.getoption(opt)}")


_KEY = pytest.StashKey[Session]()
TEST_ID = "test_conformance.py::test_conformance["


def _session(config: pytest.Config) -> Session | None:
    return config.stash.get(_KEY, None)


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("vitspec_backend", None):
        parallel = config.pluginmanager.hasplugin("xdist") and config.getoption(
            "numprocesses", None
        )
        if parallel and (
            config.getoption("vitspec_report") or config.getoption("vitspec_markdown")
        ):
            raise pytest.UsageError(
                "--vitspec-report and --vitspec-markdown need one process (results live in xdist's workers); "
                "drop -n, or use --junitxml, or `vitspec conformance --report`"
            )
        session = Session(config)
        config.stash[_KEY] = session
        config.pluginmanager.register(session, "vitspec-conformance-session")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "vitspec_check" not in metafunc.fixturenames:
        return
    s = _session(metafunc.config)
    if s is None:
        raise pytest.UsageError(
            "the vitspec conformance suite needs a backend: "
            "pytest --pyargs vitspec.conformance --vitspec-backend NAME (or all)"
        )
    checks = s.checks()
    if not checks:
        raise pytest.UsageError(
            "vitspec conformance collected zero cases; a run that checks nothing proves nothing"
        )
    from vitspec.conformance.case import shipped_case_dirs

    known = set(s.cases) | {p.name for p in shipped_case_dirs()}
    for e in s.expectations:
        if e.case not in known:
            warnings.warn(
                ConformanceWarning(
                    f"expectation {e.describe()} names no known case; remove or fix the entry"
                ),
                stacklevel=1,
            )
    metafunc.parametrize("vitspec_check", checks, ids=[c.id for c in checks])


@pytest.fixture
def vitspec_session(request: pytest.FixtureRequest, record_testsuite_property: Any) -> Session:
    """The conformance session (only with --vitspec-backend); records the JUnit properties once."""
    s = _session(request.config)
    if s is None:
        raise pytest.UsageError("pass --vitspec-backend NAME to run the vitspec conformance suite")
    s.record_properties(record_testsuite_property)
    return s
