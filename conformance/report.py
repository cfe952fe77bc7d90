"""Reports of a run: a terminal table, JSON, JUnit XML and a Markdown conformance matrix.

Every renderer reads the same ``Report``; the point table (one row per capture point in forward
order, the first divergent one marked) is shared by the terminal, JUnit failure texts and pytest.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from vitspec.conformance.check import CaseCheck, PointCheck
from vitspec.conformance.suite import BackendUnderTest, Report
from vitspec.files import atomic_file

FIRST = "<< first divergence"


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _idx(i: Sequence[int] | None) -> str:
    return "-" if i is None else "[" + ",".join(str(k) for k in i) + "]"


def _shape(s: Sequence[int] | None) -> str:
    return "missing" if s is None else "(" + ", ".join(str(k) for k in s) + ")"


def _pct(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0%}" if x < 10 else f"{x:.3g}x"


# ---- plain text ---------------------------------------------------------------------------------


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> str:
    """Columns padded to their widest cell; ``right`` lists right-aligned columns."""
    cols = list(zip(header, *rows, strict=True)) if rows else [(h,) for h in header]
    widths = [max(len(str(c)) for c in col) for col in cols]

    def line(cells: Sequence[str]) -> str:
        out = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


POINT_HEADER = (
    "capture point",
    "shape",
    "status",
    "max abs err",
    "at",
    "max rel err",
    "at",
    "worst/allowed",
    "tolerance",
)


def point_rows(result: CaseCheck) -> list[tuple[str, ...]]:
    first = result.first_divergent
    rows: list[tuple[str, ...]] = []
    for p in result.points:
        status = p.status + (f" {FIRST}" if p.name == first else "")
        tol = (
            f"{p.tolerance.dtype_class} {p.tolerance.atol:g}+{p.tolerance.rtol:g}|x|"
            if p.tolerance
            else "-"
        )
        rows.append(
            (
                p.name,
                _shape(p.shape),
                status,
                _e(p.max_abs),
                _idx(p.max_abs_index),
                _e(p.max_rel),
                _idx(p.max_rel_index),
                _pct(p.worst_ratio),
                tol,
            )
        )
    return rows


def point_table(result: CaseCheck) -> str:
    """The whole story of one check: a headline, every capture point, then what went wrong."""
    lines = [result.summary()]
    if result.unsupported:
        return "\n".join(lines)
    if result.expected_failure:
        lines.append(f"known failure (expectations file): {result.expected_failure}")
    if result.loosened:
        lines.append(f"this case loosens a tolerance: {result.loosened}")
    if result.error:
        lines.append(f"error: {result.error}")
    if result.points:
        lines.append(format_table(POINT_HEADER, point_rows(result), right=(3, 5, 7)))
    for problem in result.problems:
        lines.append(f"problem: {problem}")
    failed = [p for p in result.points if not p.passed]
    for p in failed[:3]:
        lines += [f"{p.name}: {msg}" for msg in p.problems]
    if len(failed) > 3:
        lines.append(f"... and {len(failed) - 3} more capture point(s) after it fail")
    return "\n".join(lines)


LEFT_OUT = "left out"


def cell(result: CaseCheck | None) -> str:
    """A matrix cell: ``ok 9%`` (worst element's share of its tolerance), ``FAIL point``, ``ERROR``,
    ``xfail point``, ``unsupported``."""
    if result is None:
        return ""
    mark = "*" if result.loosened else ""
    status = result.status
    if status == "unsupported":
        return "unsupported"
    if status == "pass":
        return f"ok {_pct(result.worst_ratio)}{mark}"
    where = result.first_divergent or ("raised" if result.error else "problems")
    if status == "xfail":
        return f"xfail {where}{mark}"
    if status == "error":
        return "ERROR" + mark
    return f"FAIL {where}{mark}"


def matrix(report: Report, pairwise: bool = False) -> tuple[list[str], list[list[str]]]:
    """case x backend (against the reference), or case x pair of backends."""
    results = [r for r in report.results if (r.against != "reference") == pairwise]
    labels: list[str] = []
    for r in results:
        if r.label not in labels:
            labels.append(r.label)
    if pairwise:  # pairs whose every case was left out still get a column
        names = [b.name for b in report.backends if b.load_error is None]
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if f"{a}~{b}" not in labels and any(k[0] in (a, b) for k in report.left_out):
                    labels.append(f"{a}~{b}")
    by = {(r.case, r.label): r for r in results}

    def at(case: str, label: str) -> str:
        ran = {r.label for r in results if r.case == case}
        if (
            pairwise
            and label not in ran
            and any((name, case) in report.left_out for name in label.split("~"))
        ):
            return LEFT_OUT
        return cell(by.get((case, label)))

    rows = [[c.name, *(at(c.name, label) for label in labels)] for c in report.cases]
    return ["case", *labels], rows


def counts_line(report: Report) -> str:
    c = report.counts
    parts = [
        f"{c['checks']} checks",
        f"{c['pass']} passed",
        f"{c['fail']} failed",
        f"{c['error']} errors",
    ]
    if c["xfail"]:
        parts.append(f"{c['xfail']} known failures (not passes)")
    if c["unsupported"]:
        parts.append(f"{c['unsupported']} unsupported (not passes)")
    if c["backends_not_loaded"]:
        parts.append(f"{c['backends_not_loaded']} backend(s) not loaded")
    verdict = "CONFORMS" if report.ok else "DOES NOT CONFORM"
    return f"{verdict}: " + ", ".join(parts) + f" in {report.seconds:.1f}s"


def header_lines(report: Report) -> list[str]:
    """What ran: cases (corpus version, random seed), tolerances, and each backend with its environment."""
    what = f"{len(report.cases)} case(s)"
    if report.corpus_version is not None:
        what += f" (corpus version {report.corpus_version})"
    if report.random:
        what += f", {report.random['n']} random (--random {report.random['n']} --seed {report.random['seed']})"
    out = [f"vitspec conformance: {what}; tolerances {report.tolerances.path}"]
    for b in report.backends:
        if b.load_error:
            out.append(f"  backend {b.name}: NOT LOADED: {b.load_error}")
            continue
        env = ", ".join(f"{k}={v}" for k, v in b.environment.items()) or "no flags set"
        target = f" [{b.target}]" if b.target else ""
        out.append(f"  backend {b.name} {b.version}{target}: {env}")
    return out


def left_out_lines(report: Report) -> list[str]:
    """One line per (backend, case) left out of its pairs."""
    return [
        f"{case}: {backend} left out of its pairs: {why}"
        for (backend, case), why in report.left_out.items()
    ]


def text_report(report: Report) -> str:
    """The terminal report in plain text: matrices, details of each failure, warnings, the verdict."""
    out = header_lines(report)
    header, rows = matrix(report)
    out += [
        "",
        "against the float64 reference (ok N% = the worst element used N% of its tolerance):",
        format_table(header, rows),
    ]
    header, rows = matrix(report, pairwise=True)
    if len(header) > 1:
        out += ["", "pairwise:", format_table(header, rows)]
    for r in report.failures():
        out += ["", point_table(r)]
    unsupported = [r for r in report.results if r.status == "unsupported"]
    if unsupported:
        out += ["", "unsupported (declared by the backend's supports(); not passes):"]
        out += [f"  {r.subject} on {r.case}: {r.unsupported}" for r in unsupported]
    known = [r for r in report.results if r.status == "xfail"]
    if known:
        out += ["", "known failures (listed in an expectations file; not passes):"]
        out += [
            f"  {r.label} on {r.case}: {r.expected_failure} [{r.first_divergent or r.error_type or 'raised'}]"
            for r in known
        ]
    if report.left_out:
        out += [
            "",
            "left out of the pairwise checks:",
            *(f"  {line}" for line in left_out_lines(report)),
        ]
    out += [f"note: loosened tolerance: {n}" for n in report.notes]
    out += [f"warning: {w}" for w in report.warnings]
    out += ["", counts_line(report)]
    return "\n".join(out)


# ---- files --------------------------------------------------------------------------------------


def _write(path: str | os.PathLike[str], text: str) -> None:
    with atomic_file(path, overwrite=True) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def to_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n"


def write_json(report: Report, path: str | os.PathLike[str]) -> None:
    _write(path, to_json(report))


def to_junit(report: Report) -> str:
    """One <testsuite> per backend (and per pair), one <testcase> per case.

    A known failure is written as <skipped> with its reason (it is not a pass).
    """
    root = ET.Element("testsuites", name="vitspec conformance")
    labels: dict[str, list[CaseCheck]] = {}
    for r in report.results:
        labels.setdefault(r.label, []).append(r)
    info = {b.name: b for b in report.backends}
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for label, results in labels.items():
        counts = {
            "tests": len(results),
            "failures": sum(r.status == "fail" for r in results),
            "errors": sum(r.status == "error" for r in results),
            "skipped": sum(r.status in ("xfail", "unsupported") for r in results),
        }
        for k in totals:
            totals[k] += counts[k]
        attrs = {
            "name": label,
            "time": f"{sum(r.seconds for r in results):.3f}",
            **{k: str(v) for k, v in counts.items()},
        }
        suite = ET.SubElement(root, "testsuite", attrs)
        props = ET.SubElement(suite, "properties")
        backends = [info[name] for name in label.split("~") if name in info]
        for name, value in junit_properties(report, backends):
            ET.SubElement(props, "property", name=name, value=value)
        ET.SubElement(
            props,
            "property",
            name="vitspec.known_failures",
            value=str(sum(r.status == "xfail" for r in results)),
        )
        ET.SubElement(
            props,
            "property",
            name="vitspec.unsupported",
            value=str(sum(r.status == "unsupported" for r in results)),
        )
        for r in results:
            tc = ET.SubElement(
                suite,
                "testcase",
                classname=f"vitspec.conformance.{label}",
                name=r.case,
                time=f"{r.seconds:.3f}",
            )
            if r.status == "pass":
                continue
            if r.status == "unsupported":
                ET.SubElement(
                    tc, "skipped", type="unsupported", message=f"unsupported: {r.unsupported}"
                )
            elif r.status == "xfail":
                ET.SubElement(
                    tc,
                    "skipped",
                    type="known failure",
                    message=f"known failure: {r.expected_failure}",
                ).text = point_table(r)
            elif r.status == "error":
                ET.SubElement(
                    tc, "error", message=r.summary(), type="backend error"
                ).text = point_table(r)
            else:
                ET.SubElement(
                    tc, "failure", message=r.summary(), type="divergence"
                ).text = point_table(r)
    for k, v in totals.items():
        root.set(k, str(v))
    root.set("time", f"{report.seconds:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def junit_properties(report: Report, backends: Sequence[BackendUnderTest]) -> list[tuple[str, str]]:
    """The JUnit properties of a run: vitspec's and the corpus's versions, each backend's version,
    entry point and environment. ``vitspec conformance --junit`` and pytest's ``--junitxml`` share them."""
    from vitspec import __version__

    version = report.corpus_version
    out = [
        ("vitspec.version", __version__),
        ("vitspec.corpus_version", "-" if version is None else str(version)),
    ]
    for b in backends:
        out.append((f"{b.name}.version", b.version or f"not loaded: {b.load_error}"))
        if b.target:
            out.append((f"{b.name}.target", b.target))
        out += [(f"{b.name}.env.{k}", v) for k, v in b.environment.items()]
    return out


def write_junit(report: Report, path: str | os.PathLike[str]) -> None:
    _write(path, to_junit(report))


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(_md(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(_md(c) for c in row) + " |" for row in rows),
    ]


def _md_cell(p: PointCheck | None) -> str:
    if p is None:
        return ""
    if p.passed:
        return f"✅ {_pct(p.worst_ratio)}"
    return f"❌ {_pct(p.worst_ratio)}" if p.worst_ratio is not None else f"❌ {p.status}"


def to_markdown(report: Report) -> str:
    """The conformance matrix: case x backend, then per case capture point x backend."""
    from vitspec import __version__

    c = report.counts
    verdict = "✅ conforms" if report.ok else "❌ does not conform"
    out = [
        "# vitspec conformance",
        "",
        f"**{verdict}**: {counts_line(report).split(': ', 1)[1]}.",
        "",
        f"vitspec {__version__}"
        + (f"; corpus version {report.corpus_version}" if report.corpus_version is not None else "")
        + (
            f"; {report.random['n']} random case(s), seed {report.random['seed']}"
            if report.random
            else ""
        )
        + f"; tolerances from `{Path(report.tolerances.path).name}`: "
        + "; ".join(
            f"{k} atol {t.atol:g} rtol {t.rtol:g}" for k, t in report.tolerances.classes.items()
        )
        + f"; pairwise x{report.tolerances.pairwise_factor:g}.",
        "",
        "| backend | version | environment |",
        "|---|---|---|",
    ]
    for b in report.backends:
        env = ", ".join(f"`{k}={v}`" for k, v in b.environment.items()) or "-"
        out.append(
            f"| {b.name} | {b.version or 'not loaded: ' + _md(b.load_error or '')} | {env} |"
        )
    out += [
        "",
        "## Matrix",
        "",
        "`ok N%`: the worst element used N% of its tolerance. `FAIL p`: p is the first divergent capture point. "
        "`xfail p`: a known failure (not a pass). `unsupported`: the backend declares it cannot build the spec (not a pass). "
        "`left out`: not compared pairwise (said below). `*`: the case loosens a tolerance.",
        "",
    ]
    header, rows = matrix(report)
    out += _md_table(header, rows)
    header, rows = matrix(report, pairwise=True)
    if len(header) > 1:
        out += ["", "### Pairwise", "", *_md_table(header, rows)]
    out += ["", "## Capture points", ""]
    for case in report.cases:
        results = [r for r in report.results if r.case == case.name]
        labels = [r.label for r in results]
        failing = any(r.status not in ("pass", "unsupported") for r in results)
        out += [
            f"<details{' open' if failing else ''}><summary><code>{case.name}</code>: "
            + ", ".join(f"{r.label} {r.status}" for r in results)
            + "</summary>",
            "",
        ]
        rows = []
        for point in case.points:
            cells = []
            for r in results:
                p = next((q for q in r.points if q.name == point), None)
                mark = " ⬅ first" if r.first_divergent == point else ""
                cells.append(_md_cell(p) + mark)
            rows.append([f"`{point}`", *cells])
        out += _md_table(["capture point", *labels], rows)
        for r in results:
            if r.error:
                out.append(f"\n{r.label}: error: `{_md(r.error)}`")
            if r.unsupported:
                out.append(f"\n{r.label}: unsupported: {_md(r.unsupported)}")
        out += ["", "</details>", ""]
    for n in report.notes:
        out.append(f"- note: loosened tolerance: {_md(n)}")
    for w in report.warnings:
        out.append(f"- ⚠️ {_md(w)}")
    if c["xfail"] or c["unsupported"] or report.left_out:
        out.append("")
    out += [
        f"- known failure: {r.label} on {r.case}: {_md(r.expected_failure or '')}"
        for r in report.results
        if r.status == "xfail"
    ]
    out += [
        f"- unsupported: {r.label} on {r.case}: {_md(r.unsupported or '')}"
        for r in report.results
        if r.status == "unsupported"
    ]
    out += [f"- left out of pairs: {_md(line)}" for line in left_out_lines(report)]
    return "\n".join(out).rstrip() + "\n"


def write_markdown(report: Report, path: str | os.PathLike[str]) -> None:
    _write(path, to_markdown(report))
