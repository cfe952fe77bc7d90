"""`vitspec conformance` and `vitspec diff`: run the suite, or show where two backends part ways."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

BACKEND_HELP = "A registered backend name, or 'all' (every installed one but numpy). Repeatable."


MEMORY_HELP = "Generate a case from a SPEC even if the estimated memory exceeds what is available."


def _cases(
    targets: tuple[str, ...],
    weights: Path | None,
    batch: int,
    seed: int,
    n_random: int = 0,
    ignore_memory_check: bool = False,
) -> list[Any]:
    """Case folders, shipped case names, specs (generated now) and random cases; the shipped corpus
    when none of these is asked for."""
    from vitspec.conformance.case import CASES_DIR, is_case_dir, load_case, make_case, shipped_cases
    from vitspec.conformance.random_specs import random_cases
    from vitspec.errors import SpecError
    from vitspec.memory import check_memory, estimate_memory
    from vitspec.presets import load_spec
    from vitspec.weights import load_weights, read_spec

    drawn = random_cases(n_random, seed)
    if not targets and weights is None:
        return drawn or shipped_cases()
    specs = [t for t in targets if not is_case_dir(t) and not is_case_dir(CASES_DIR / t)]
    if weights is not None and len(specs) > 1:
        raise click.UsageError(
            f"--weights goes with one SPEC, found {len(specs)}: {', '.join(specs)}"
        )
    if weights is not None and len(targets) > len(specs):
        raise click.UsageError(
            "--weights goes with a SPEC, not with a case folder (a case has its own weights)"
        )
    cases = []
    for target in targets or (None,):
        if target is not None and is_case_dir(target):
            cases.append(load_case(target))
            continue
        if target is not None and is_case_dir(CASES_DIR / target):
            cases.append(load_case(CASES_DIR / target))
            continue
        try:
            spec = load_spec(target) if target is not None else None
        except SpecError as exc:
            if target is not None and not Path(target).exists() and "/" not in target:
                exc.problems.append(
                    f"{target!r} is not a case folder or a shipped case name either"
                )
                raise SpecError(exc.problems) from None
            raise
        w = None
        if weights is not None:
            spec = read_spec(
                weights, spec
            )  # the metadata only: check the memory before the tensors
        assert spec is not None
        if not ignore_memory_check:
            # Expected values from the float64 reference, then each backend in float32: every point kept.
            need = estimate_memory(spec, batch, itemsize=8, weight_copies=1, captures="all")
            need = need + estimate_memory(spec, batch, itemsize=4, weight_copies=2, captures="all")
            check_memory(
                need,
                f"a case from {target or weights} with a batch of {batch}",
                hint="use a smaller spec or --batch, or pass --ignore-memory-check to try anyway",
            )
        if weights is not None:
            w, spec = load_weights(weights, spec)
        name = _case_name(target if target is not None else weights.stem if weights else "spec")
        cases.append(
            make_case(
                spec,
                w,
                name=name,
                batch=batch,
                seed=seed,
                description=f"generated from {target or weights}",
            )
        )
    return cases + drawn


def _case_name(source: str) -> str:
    stem = Path(source).stem if Path(source).suffix in {".yaml", ".yml", ".json"} else source
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "case"


def _progress(message: str) -> None:
    click.echo(f"running {message}", err=True)


@click.command()
@click.argument("targets", nargs=-1, metavar="[CASE_DIR | CASE_NAME | SPEC]...")
@click.option(
    "--backend",
    "-b",
    "backends",
    multiple=True,
    default=("all",),
    show_default=True,
    help=BACKEND_HELP,
)
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    help="Weights for the SPEC (its embedded spec is used when no SPEC is given).",
)
@click.option(
    "--batch",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Images in a case generated from a SPEC.",
)
@click.option(
    "--seed",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Seed of generated weights and images, and of --random cases.",
)
@click.option(
    "--random",
    "n_random",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    metavar="N",
    help="Also check N random specs drawn now (weights, images and expected values by the float64 reference).",
)
@click.option(
    "--corpus-version",
    type=click.IntRange(1),
    metavar="V",
    help="Fail at once unless the corpus is version V (pin it in CI).",
)
@click.option(
    "--report", "json_path", type=click.Path(path_type=Path), help="Write the JSON report here."
)
@click.option(
    "--junit", "junit_path", type=click.Path(path_type=Path), help="Write a JUnit XML report here."
)
@click.option(
    "--markdown",
    "md_path",
    type=click.Path(path_type=Path),
    help="Write the Markdown conformance matrix here.",
)
@click.option(
    "--expectations",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Known-failures file(s) (default: the shipped ones of each backend).",
)
@click.option(
    "--tolerances",
    type=click.Path(path_type=Path),
    help="A tolerance file instead of the shipped one.",
)
@click.option(
    "--no-pairwise",
    is_flag=True,
    help="Compare each backend with the reference only, not with each other.",
)
@click.option(
    "--save-case",
    type=click.Path(path_type=Path),
    help="Write each case generated from a SPEC, and each --random case that fails, under this folder.",
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Print the capture-point table of every check, not only of failures.",
)
@click.option("--ignore-memory-check", is_flag=True, help=MEMORY_HELP)
def conformance(
    targets: tuple[str, ...],
    backends: tuple[str, ...],
    weights: Path | None,
    batch: int,
    seed: int,
    n_random: int,
    corpus_version: int | None,
    json_path: Path | None,
    junit_path: Path | None,
    md_path: Path | None,
    expectations: tuple[Path, ...],
    tolerances: Path | None,
    no_pairwise: bool,
    save_case: Path | None,
    verbose: bool,
    ignore_memory_check: bool,
) -> None:
    """Run backends on golden cases and check every capture point against the float64 reference.

    With no CASE_DIR, SPEC or --random, runs the shipped corpus. A SPEC (file or preset, with
    optional --weights) becomes a case on the spot; --random N draws N random specs. Backends are
    also compared with each other. Exits 0 only if every check passed (a failure listed in an
    expectations file, or a case the backend declares unsupported, is not a pass, but does not
    fail the run).
    """
    from vitspec.conformance.case import check_corpus_version, write_case
    from vitspec.conformance.report import (
        point_table,
        text_report,
        write_json,
        write_junit,
        write_markdown,
    )
    from vitspec.conformance.suite import expand_backend_names, load_expectations, run_suite
    from vitspec.conformance.tolerances import load_tolerances

    tols = load_tolerances(tolerances)
    names = expand_backend_names(backends)
    cases = _cases(targets, weights, batch, seed, n_random, ignore_memory_check)
    check_corpus_version(corpus_version, cases)
    random_names = {c.name for c in cases[len(cases) - n_random :]} if n_random else set()
    if save_case is not None:
        save_case.mkdir(parents=True, exist_ok=True)
        for case in cases:
            if case.path is None and case.name not in random_names:
                write_case(case, save_case / case.name, overwrite=True)
                click.echo(f"wrote case {save_case / case.name}", err=True)
    exp = [e for p in expectations for e in load_expectations(p)] if expectations else None
    report = run_suite(
        names,
        cases,
        tolerances=tols,
        expectations=exp,
        pairwise=not no_pairwise,
        progress=_progress,
    )
    if n_random:
        report.random = {"n": n_random, "seed": seed}
    if save_case is not None and random_names:
        failing = {r.case for r in report.failures() if r.case in random_names}
        for case in (c for c in cases if c.name in failing):
            write_case(case, save_case / case.name, overwrite=True)
            click.echo(f"wrote failing random case {save_case / case.name}", err=True)
    text = text_report(report)
    if verbose:
        passed = [point_table(r) for r in report.results if r.status == "pass"]
        text = "\n\n".join([*passed, text])
    *body, verdict = text.splitlines()
    click.echo("\n".join(body))
    click.secho(verdict, fg="green" if report.ok else "red", bold=True)
    for path, write in (
        (json_path, write_json),
        (junit_path, write_junit),
        (md_path, write_markdown),
    ):
        if path is not None:
            write(report, path)
            click.echo(f"wrote {path}", err=True)
    if not report.ok:
        raise SystemExit(1)


@click.command()
@click.argument("target", metavar="[SPEC | CASE_DIR | CASE_NAME]", required=False)
@click.option(
    "--backend",
    "-b",
    "backends",
    multiple=True,
    required=True,
    help="Two backends, or one (compared with the float64 reference). 'reference' names the reference.",
)
@click.option("--weights", type=click.Path(path_type=Path), help="Weights for the SPEC.")
@click.option("--batch", type=click.IntRange(1), default=2, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option(
    "--tolerances",
    type=click.Path(path_type=Path),
    help="A tolerance file instead of the shipped one.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    help="Also write the comparison as JSON.",
)
@click.option("--ignore-memory-check", is_flag=True, help=MEMORY_HELP)
def diff(
    target: str | None,
    backends: tuple[str, ...],
    weights: Path | None,
    batch: int,
    seed: int,
    tolerances: Path | None,
    json_path: Path | None,
    ignore_memory_check: bool,
) -> None:
    """Layer-by-layer divergence between two backends (or a backend and the reference).

    Prints every capture point in forward order with the max absolute and relative error and
    where it occurs, and marks the first point outside tolerance. Exits 1 if they diverge. With
    --weights, SPEC may be left out: the spec embedded in the file is used.
    """
    import json

    from vitspec.conformance.check import check_outputs, check_pair, run_backend
    from vitspec.conformance.report import point_table
    from vitspec.conformance.suite import load_backend
    from vitspec.conformance.tolerances import load_tolerances
    from vitspec.errors import BackendError
    from vitspec.files import atomic_file

    if len(backends) > 2:
        raise click.UsageError(
            f"diff compares two backends, found {len(backends)}: {', '.join(backends)}"
        )
    a, b = backends[0], backends[1] if len(backends) == 2 else "reference"
    if a == "reference":
        a, b = b, a
    if a == "reference":
        raise click.UsageError("name at least one backend besides 'reference'")
    if target is None and weights is None:
        raise click.UsageError(
            "give a SPEC, CASE_DIR or CASE_NAME, or --weights with a spec embedded in it"
        )
    (case,) = _cases(
        (target,) if target is not None else (),
        weights,
        batch,
        seed,
        ignore_memory_check=ignore_memory_check,
    )
    tols = load_tolerances(tolerances)
    runs = {}
    for name in (a, b):
        if name == "reference":
            continue
        loaded = load_backend(name)
        if loaded.load_error:
            raise BackendError(loaded.load_error)
        out, error, _ = run_backend(loaded.backend, case)
        if error:
            raise BackendError(f"backend {name!r} failed on {case.name}: {error}")
        runs[name] = out
    if b == "reference":
        result = check_outputs(a, runs[a], case, tols)
    else:
        result = check_pair(case, a, runs[a], b, runs[b], tols)
    click.echo(point_table(result))
    if json_path is not None:
        with atomic_file(json_path, overwrite=True) as tmp:
            Path(tmp).write_text(
                json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n", encoding="utf-8"
            )
    if not result.passed:
        raise SystemExit(1)
