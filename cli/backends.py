"""`vitspec backends`: the registered backends, from package metadata; `--check` loads and tries each."""

from __future__ import annotations

import time

import click

from vitspec.cli._ui import console, table

STATUS = {
    "installed": "[green]installed[/]",
    "ok": "[green]ok[/]",
    "missing": "[yellow]not installed[/]",
    "broken": "[red]broken[/]",
    "wrong": "[red]wrong[/]",
}


def try_backend(name: str) -> tuple[str, str, str]:
    """Load ``name``, build a tiny spec and run one image: (status, the backend's own version, detail)."""
    import numpy as np

    from vitspec import reference
    from vitspec.backends import describe, get_backend
    from vitspec.conformance.check import unsupported
    from vitspec.init import init_weights
    from vitspec.spec import Spec

    start = time.perf_counter()
    info = describe(name)
    if info.status != "ok":
        return info.status, "", info.detail
    backend = get_backend(name)
    spec = Spec(image_size=(4, 4), patch_size=(2, 2), hidden_dim=8, n_heads=2, depth=1, n_classes=3)
    try:
        declined = unsupported(backend, spec)
        if declined is not None:
            return "ok", info.version, f"loaded; declines the trial spec ({declined})"
        weights = init_weights(spec, 0, scheme="random")
        images = np.random.default_rng(0).standard_normal((1, 4, 4, 3)).astype(np.float32)
        out = np.asarray(backend.forward(backend.build(spec, weights), images)["output"])
    except Exception as exc:
        return (
            "broken",
            info.version,
            f"backend {name!r} loads but a one-image forward pass raised {type(exc).__name__}: {exc}",
        )
    want = reference.forward(spec, weights, images, dtype=np.float64)["output"]
    if out.shape != want.shape:
        return (
            "wrong",
            info.version,
            f"backend {name!r}: output shape expected {want.shape}, found {out.shape}",
        )
    err = float(np.max(np.abs(out.astype(np.float64) - want)))
    if not err <= 1e-3:  # a smoke test, not conformance: `vitspec conformance` holds the tolerance
        return (
            "wrong",
            info.version,
            f"backend {name!r}: output differs from the float64 reference by {err:.3g} (expected under 1e-3); run vitspec conformance --backend {name}",
        )
    return (
        "ok",
        info.version,
        f"forward pass in {time.perf_counter() - start:.2f}s (import included), max error {err:.1e}",
    )


@click.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option(
    "--check",
    is_flag=True,
    help="Import each backend and run one tiny forward pass (slow: imports its framework).",
)
def backends(names: tuple[str, ...], check: bool) -> None:
    """List registered backends (entry-point group vitspec.backends), their versions and status.

    Without --check nothing is imported: names, versions and status come from package metadata.
    NAMEs restrict the list. Exits 1 if a NAME is not registered; with --check, if a backend is
    broken (fails to load or to run) or a NAME is not installed.
    """
    from rich.markup import escape

    from vitspec.backends import listing, registered
    from vitspec.errors import BackendError

    known = registered()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BackendError(
            f"no backend named {unknown[0]!r}; registered backends: {', '.join(known) or 'none'}"
        )
    rows, notes, bad = [], [], []
    for name in names or known:
        info = listing(name)
        status, version, detail = info.status, info.version, info.detail
        if check and status == "installed":
            status, reported, detail = try_backend(name)
            version = reported or version
        if check and (status in ("broken", "wrong") or (names and status != "ok")):
            bad.append(name)
        rows.append(
            (name, STATUS.get(status, status), version or "-", info.target, info.distribution)
        )
        if detail:
            notes.append(f"{name}: {detail}")
    ui = console()
    title = "Backends (entry-point group vitspec.backends)" + (
        "" if check else "; from package metadata, nothing imported"
    )
    ui.print(table(title, ["name", "status", "version", "entry point", "from"], rows))
    for note in notes:
        ui.print(escape(note))
    if bad:
        raise SystemExit(1)
