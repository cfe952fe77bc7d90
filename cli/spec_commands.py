"""Spec commands: validate, schema, presets, layout, inspect."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from vitspec.cli._ui import console, human, shape_str, table


@click.command()
@click.argument("specs", nargs=-1, required=True)
def validate(specs: tuple[str, ...]) -> None:
    """Check each SPEC (file or preset); print every problem found.

    Exits 1 if any spec is invalid.
    """
    from vitspec.errors import SpecError
    from vitspec.presets import load_spec

    out, failed = console(), 0
    for source in specs:
        try:
            spec = load_spec(source)
        except SpecError as exc:
            failed += 1
            for line in str(exc).splitlines():
                click.secho(
                    f"error: {line}" if line.startswith(source) else f"error: {source}: {line}",
                    err=True,
                    fg="red",
                )
            continue
        out.print(
            f"[green]ok[/] {source}: {human(spec.n_params)} parameters, {human(spec.flops)}FLOPs/image, "
            f"{spec.seq_len} tokens of width {spec.hidden_dim}"
        )
    if failed:
        raise SystemExit(1)


@click.command()
def schema() -> None:
    """Print the JSON Schema of a spec (point your editor's YAML plugin at it)."""
    from vitspec.spec import Spec

    data = Spec.model_json_schema()
    data["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    data["title"] = "vitspec Spec"
    click.echo(json.dumps(data, indent=2))


@click.command()
def presets() -> None:
    """List the presets: paper sizes (any VARIANT/PATCH[@IMAGE] works, e.g. B/16@384) and the
    modern families, each beside the timm model it equals (NAME@IMAGE sets the image size)."""
    from vitspec.presets import LISTED_PATCHES, NAMED, VARIANTS, preset

    rows = []
    for variant in VARIANTS:
        spec = preset(f"{variant}/16")
        counts = "  ".join(
            f"/{p}: {human(preset(f'{variant}/{p}').n_params)}" for p in LISTED_PATCHES
        )
        rows.append((variant, spec.hidden_dim, spec.depth, spec.mlp_dim, spec.n_heads, counts))
    console().print(
        table(
            "Presets (224x224, class token, 1000 classes; name them as VARIANT/PATCH, e.g. B/16)",
            ["variant", "hidden_dim", "depth", "mlp_dim", "n_heads", "parameters by patch size"],
            rows,
            ["left", "right", "right", "right", "right", "left"],
        )
    )
    named = []
    for short, entry in NAMED.items():
        spec = preset(short)
        named.append(
            (
                short,
                entry.timm,
                spec.image_size[0],
                spec.hidden_dim,
                spec.depth,
                spec.mlp_dim,
                spec.n_heads,
                spec.n_classes,
                human(spec.n_params),
            )
        )
    console().print(
        table(
            "Modern families (timm's architecture for the model name beside each; timm's name works too)",
            [
                "name",
                "timm model",
                "image",
                "hidden_dim",
                "depth",
                "mlp_dim",
                "n_heads",
                "classes",
                "parameters",
            ],
            named,
            ["left", "left", "right", "right", "right", "right", "right", "right", "right"],
        )
    )


@click.command()
@click.argument("spec")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "markdown", "json"]),
    default="table",
    show_default=True,
)
def layout(spec: str, fmt: str) -> None:
    """Print the canonical parameter table of SPEC: name, shape, meaning."""
    from vitspec.layout import CAPTURE_MEANINGS, capture_points, param_table
    from vitspec.presets import load_spec

    s = load_spec(spec)
    params = param_table(s)
    if fmt == "json":
        click.echo(
            json.dumps(
                [
                    {"name": p.name, "shape": list(p.shape), "meaning": p.meaning, "init": p.init}
                    for p in params
                ],
                indent=1,
            )
        )
        return
    rows = _collapse_blocks(params, s.depth)
    if fmt == "markdown":
        click.echo("| name | shape | parameters | meaning |\n|---|---|---:|---|")
        for name, shape, n, meaning in rows:
            click.echo(f"| `{name}` | `{shape}` | {n} | {meaning} |")
        click.echo(f"\nTotal: {s.n_params:,} parameters.")
        return
    out = console()
    out.print(
        table(
            f"Canonical layout of {spec}",
            ["name", "shape", "parameters", "meaning"],
            rows,
            ["left", "left", "right", "left"],
        )
    )
    out.print(f"total: [bold]{s.n_params:,}[/] parameters in {len(params)} tensors")
    present = set(capture_points(s))
    captures = [
        (n, shape, meaning)
        for n, (shape, meaning) in CAPTURE_MEANINGS.items()
        if n.replace("{i}", "0") in present
    ]
    out.print(
        table(
            "Capture points (B batch, N seq_len, D hidden_dim)",
            ["name", "shape", "meaning"],
            captures,
            ["left", "left", "left"],
        )
    )


def _collapse_blocks(params: list, depth: int) -> list[tuple[str, str, str, str]]:
    """Show block 0's tensors once as ``blocks.{i}.…`` when every block is alike."""
    rows, seen = [], set()
    for p in params:
        name, meaning = p.name, p.meaning
        if name.startswith("blocks."):
            _, _, rest = name.split(".", 2)
            name = f"blocks.{{i}}.{rest}"
            meaning = meaning.split(": ", 1)[1] if ": " in meaning else meaning
            meaning = f"{meaning} (i = 0..{depth - 1})"
            if name in seen:
                continue
            seen.add(name)
        rows.append((name, shape_str(p.shape), f"{math.prod(p.shape):,}", meaning))
    return rows


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--from",
    "from_format",
    type=click.Choice(
        ["canonical", "torch", "keras", "flax", "timm", "torchvision", "hf", "google", "big_vision"]
    ),
    help="The file's format (default: detected).",
)
@click.option(
    "--spec",
    "spec",
    metavar="SPEC",
    help="What the file cannot tell: a (partial) spec, a preset, or field=value,... pairs.",
)
def inspect(file: Path, from_format: str | None, spec: str | None) -> None:
    """Show the spec and tensor table of a checkpoint FILE of any supported format.

    The spec is the embedded one, or inferred from the tensors (fields the file cannot tell are
    marked as assumed, with the value used). Exits 1 if the tensors do not fit that spec.
    """
    from vitspec.cli.convert import print_assumed
    from vitspec.errors import SpecError, WeightsError
    from vitspec.formats import check_layout, detect, get_format, infer_spec, open_source
    from vitspec.formats.infer import load_partial_spec
    from vitspec.weights import SPEC_KEY

    out = console()
    fmt = from_format or detect(file)
    record = get_format(fmt)
    given = load_partial_spec(spec)
    with open_source(file, fmt) as source:
        rows = [
            (n, str(d), shape_str(s), f"{math.prod(s):,}") for n, (s, d) in source.entries.items()
        ]
        total = sum(math.prod(s) for s, _ in source.entries.values())
        meta = {k: v for k, v in source.metadata.items() if k != SPEC_KEY}
        out.print(
            f"[bold]format:[/] {fmt}"
            + ("" if from_format else " (detected)")
            + f", {source.container} file"
        )
        if meta:
            out.print("[bold]metadata:[/] " + ", ".join(f"{k}={v}" for k, v in meta.items()))
        problem: Exception | None = None
        try:
            inference = infer_spec(record, source, given)
            where = (
                "embedded in the file"
                if SPEC_KEY in source.metadata
                else "inferred from the tensors"
            )
            out.print(f"[bold]spec[/] ({where}):")
            for line in inference.spec.to_yaml().rstrip().splitlines():
                key = line.split(":", 1)[0]
                mark = "  [yellow]# assumed, not in the file[/]" if key in inference.assumed else ""
                out.print(line + mark, markup=True)
            print_assumed(inference, console(stderr=True))
            if record.prepare is not None:
                source = record.prepare(inference.spec, source)
            check_layout(record, inference.spec, source)
        except (SpecError, WeightsError) as exc:
            problem = exc
        out.print(
            table(
                f"{len(rows)} tensors, {total:,} values",
                ["name", "dtype", "shape", "values"],
                rows,
                ["left", "left", "left", "right"],
            )
        )
    if problem is not None:
        raise problem
