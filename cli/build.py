"""`vitspec build`."""

from __future__ import annotations

import math
import time
from pathlib import Path

import click

from vitspec.cli._ui import console, human, shape_str, table


@click.command()
@click.argument("spec", required=False)
@click.option(
    "--backend",
    "backend_name",
    default="torch",
    show_default=True,
    help="Registered backend (see `vitspec backends`).",
)
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    help="Canonical weights to load (default: deterministic init).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Init seed when no --weights.",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Images in the dummy batch.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Write the model's canonical weights (safetensors).",
)
@click.option(
    "--export",
    "export_path",
    type=click.Path(path_type=Path),
    help="Write the framework's deployable artifact.",
)
@click.option(
    "--export-batch",
    type=click.IntRange(min=1),
    help="Fix the artifact's batch size (default: any batch).",
)
@click.option(
    "--check/--no-check", default=False, help="Compare the output with the float64 NumPy reference."
)
@click.option("--force", is_flag=True, help="Overwrite existing --out/--export paths.")
@click.option(
    "--ignore-memory-check",
    is_flag=True,
    help="Build even if the estimated memory exceeds what is available.",
)
def build(
    spec: str | None,
    backend_name: str,
    weights: Path | None,
    seed: int,
    batch: int,
    out: Path | None,
    export_path: Path | None,
    export_batch: int | None,
    check: bool,
    force: bool,
    ignore_memory_check: bool,
) -> None:
    """Build SPEC natively, run one forward pass on a dummy batch and print a summary.

    SPEC is a YAML/JSON file or a preset name such as B/16; with --weights it may be left out (the
    spec embedded in the file is used) and, if given, must agree with the embedded one.
    """
    import numpy as np

    import vitspec
    from vitspec.files import atomic_output, check_destination
    from vitspec.weights import read_spec

    if spec is None and weights is None:
        raise click.UsageError("give a SPEC, or --weights with a spec embedded in it")
    s = vitspec.load_spec(spec) if spec is not None else None
    if weights is not None:
        s = read_spec(weights, s)  # the metadata only: disagreements are found before any work
    assert s is not None
    for path in (out, export_path):
        if path is not None:
            check_destination(path, overwrite=force)  # before any work, not after it
    if not ignore_memory_check:
        check_build_memory(s, batch, check, what=spec or str(weights))
    if weights is not None:
        w, s = vitspec.load_weights(weights, s)
        source = str(weights)
    else:
        w = vitspec.init_weights(s, seed=seed)
        source = f"vitspec.init_weights(seed={seed})"

    ui = console()
    t0 = time.perf_counter()
    backend = vitspec.backend(backend_name)
    t_import = time.perf_counter() - t0
    save_artifact = getattr(backend, "save_artifact", None)  # optional in the protocol
    if export_path is not None and save_artifact is None:
        raise vitspec.BackendError(
            f"backend {backend_name!r} cannot write a deployable artifact (it has no save_artifact)"
        )

    t0 = time.perf_counter()
    model = backend.build(s, w)
    t_build = time.perf_counter() - t0

    images = (
        np.random.default_rng(seed)
        .standard_normal((batch, *s.image_size, s.in_channels))
        .astype(np.float32)
    )
    points = _summary_points(s)
    t0 = time.perf_counter()
    result = backend.forward(model, images, capture=points)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend.forward(model, images, capture=points)  # same call: compiled once
    t_second = time.perf_counter() - t0

    ui.print(
        f"[bold]{backend.name} {backend.version}[/]: {type(model).__module__}.{type(model).__qualname__}, weights from {source}"
    )
    ui.print(
        table(
            None,
            ["part", "output shape", "parameters"],
            _summary_rows(s, result),
            ["left", "left", "right"],
        )
    )
    ui.print(
        f"total: [bold]{s.n_params:,}[/] parameters, {human(s.flops)}FLOPs per image ({human(s.macs)} MACs), "
        f"{s.seq_len} tokens x {s.hidden_dim}"
    )
    ui.print(
        f"time: import {t_import:.2f}s, build+load {t_build:.2f}s, first forward {t_first:.3f}s (batch {batch}, "
        f"includes compilation), second forward {t_second:.3f}s"
    )
    if check:
        ref = vitspec.reference.forward(s, w, images)["output"]
        err = float(np.abs(result["output"] - ref).max() / (np.abs(ref).max() or 1.0))
        ok = err <= 1e-5
        ui.print(
            f"check: max|output - float64 reference| / max|reference| = {err:.2e} ({'ok' if ok else 'FAILED'}, limit 1e-05)"
        )
        if not ok:
            raise SystemExit(1)
    if out is not None:
        vitspec.save_weights(out, backend.export(model), s, overwrite=force)
        ui.print(f"wrote canonical weights: {out}")
    if export_path is not None and save_artifact is not None:
        with atomic_output(export_path, overwrite=force) as tmp:
            save_artifact(model, tmp, export_batch)
        ui.print(f"wrote {backend.name} artifact: {export_path} (batch: {export_batch or 'any'})")


def check_build_memory(spec, batch: int, check: bool, what: str) -> None:
    """Refuse, before anything is allocated, a build the machine has no memory for."""
    from vitspec.memory import check_memory, estimate_memory

    need = estimate_memory(spec, batch, captures=_summary_points(spec))
    if check:  # the float64 reference runs too, with its own copy of the weights
        need = need + estimate_memory(
            spec, batch, itemsize=8, weight_copies=1, captures=("output",)
        )
    check_memory(
        need,
        f"{what} with a batch of {batch}",
        hint="use a smaller spec or --batch, or pass --ignore-memory-check to try anyway",
    )


def _blocks_label(spec) -> str:
    """Every block has the same shapes and parameters: one row stands for all of them."""
    last = spec.depth - 1
    return f"blocks.0–{last} × {spec.depth}" if last else "blocks.0"


def _summary_points(spec) -> list[str]:
    # Block 0's attention too: the shapes every ViT tutorial checks (one head, all heads, block).
    points = [
        "patch_embed",
        "embed",
        "blocks.0.attn_heads",
        "blocks.0.attn",
        f"blocks.{spec.depth - 1}",
    ]
    points += ["encoded", "pooled"]
    if spec.pre_logits_dim:
        points.append("pre_logits")
    return points


def _summary_rows(spec, result) -> list[tuple[str, str, str]]:
    from vitspec.layout import param_table

    counts: dict[str, int] = {}
    last_block = f"blocks.{spec.depth - 1}"
    for p in param_table(spec):
        part = p.name.rsplit(".", 1)[0]
        if p.name.startswith("blocks."):
            part = last_block  # the folded row counts every block's parameters
        elif p.name in ("class_token", "pos_embed"):
            part = "embed"
        elif p.name.startswith("norm."):
            part = "encoded" if spec.final_norm == "before_pool" else "pooled"
        elif p.name.startswith("head."):
            part = "output"
        counts[part] = counts.get(part, 0) + math.prod(p.shape)
    labels = {
        "embed": "embed (class token, position)",
        "encoded": "encoded (final norm)" if spec.final_norm == "before_pool" else "encoded",
        "pooled": f"pooled ({spec.pooling}{', final norm' if spec.final_norm == 'after_pool' else ''})",
        "output": "output (head)" if spec.n_classes else "output (features)",
        "blocks.0.attn_heads": "  blocks.0 attention, one head",
        "blocks.0.attn": "  blocks.0 multi-head attention",
        last_block: _blocks_label(spec),
    }
    shapes = {name: tuple(value.shape) for name, value in result.items()}
    b, _, n, dh = shapes["blocks.0.attn_heads"]
    shapes["blocks.0.attn_heads"] = (b, n, dh)  # head 0 of (B, heads, N, D/heads)
    rows = []
    for name in [*_summary_points(spec), "output"]:
        # Block 0's inner rows show shapes only: their parameters are counted in the blocks' row.
        params = "" if name.startswith("blocks.0.") else f"{counts.get(name, 0):,}"
        rows.append((labels.get(name, name), shape_str(shapes[name]), params))
    return rows
