"""`vitspec convert IN OUT`: move weights between frameworks and checkpoint layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vitspec.cli._ui import console, human

FORMAT_NAMES = [
    "canonical",
    "torch",
    "keras",
    "flax",
    "timm",
    "torchvision",
    "hf",
    "google",
    "big_vision",
]


def parse_image_size(value: str | None) -> int | tuple[int, int] | None:
    """'384' -> 384, '384x512' -> (384, 512)."""
    if value is None:
        return None
    text = value.lower().replace(" ", "")
    try:
        if "x" in text:
            h, w = text.split("x", 1)
            size: int | tuple[int, int] = (int(h), int(w))
        else:
            size = int(text)
    except ValueError:
        raise click.BadParameter(
            f"expected N or HxW (for example 384 or 384x512), found {value!r}"
        ) from None
    if min(size if isinstance(size, tuple) else (size,)) <= 0:
        raise click.BadParameter(f"image size must be positive, found {value!r}")
    return size


def print_assumed(inference: Any, err: Any) -> None:
    """Every field the file does not tell, with the value assumed and why."""
    notes = inference.notes()
    if notes:
        err.print(
            f"[yellow]assumed, not read from the file ({inference.family}; set them with --spec FIELD=VALUE):[/]",
            soft_wrap=True,
        )
        for note in notes:
            err.print(f"  {note}", soft_wrap=True)


@click.command()
@click.argument("src", metavar="IN", type=click.Path(path_type=Path))
@click.argument("dst", metavar="OUT", type=click.Path(path_type=Path))
@click.option(
    "--from",
    "from_format",
    type=click.Choice(FORMAT_NAMES),
    help="Input format (default: detected from the file).",
)
@click.option(
    "--to",
    "to_format",
    type=click.Choice(FORMAT_NAMES),
    help="Output format (default: from OUT's name: .safetensors canonical, .weights.h5 keras, a folder hf).",
)
@click.option(
    "--spec",
    "spec",
    metavar="SPEC",
    help="What the file cannot tell: a (partial) YAML/JSON spec, a preset, or field=value,... pairs.",
)
@click.option(
    "--image-size", metavar="N|HxW", help="Resample the position embedding for this input size."
)
@click.option(
    "--resample",
    type=click.Choice(["bicubic-antialias", "bicubic"]),
    default=None,
    help="How --image-size resamples: bicubic-antialias (default; timm's resample_abs_pos_embed) or bicubic (no antialiasing; HF).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT if it exists; into an existing folder, write only the files the format writes.",
)
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def convert(
    src: Path,
    dst: Path,
    from_format: str | None,
    to_format: str | None,
    spec: str | None,
    image_size: str | None,
    resample: str | None,
    force: bool,
    quiet: bool,
) -> None:
    """Convert the checkpoint IN to OUT, losslessly and one tensor at a time.

    Formats: canonical, torch, keras, flax, timm, hf, google, big_vision (docs/convert.md).
    OUT is written atomically; an existing OUT is replaced only with --force. Every spec field the
    file does not tell is printed as assumed; a file that reads two ways asks for --spec.
    """
    from vitspec.formats import PROGRESS_BYTES
    from vitspec.formats import convert as run_convert

    err = console(stderr=True)
    size = parse_image_size(image_size)
    if resample is not None and size is None:
        raise click.UsageError(
            "--resample chooses how --image-size resamples; it needs --image-size"
        )
    bar: dict[str, Any] = {}

    def on_open(ckpt: Any) -> None:
        if not quiet:
            err.print(f"reading {ckpt.path} as [bold]{ckpt.format}[/]", soft_wrap=True)
            print_assumed(ckpt.inference, err)

    def progress(done: int, total: int) -> None:
        if quiet or total < PROGRESS_BYTES:
            return
        if "progress" not in bar:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            bar["progress"] = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=True,
            )
            bar["progress"].start()
            bar["task"] = bar["progress"].add_task(f"writing {dst.name}", total=total)
        bar["progress"].update(bar["task"], completed=done)

    try:
        result = run_convert(
            src,
            dst,
            from_format=from_format,
            to_format=to_format,
            spec=spec,
            image_size=size,
            resample=resample or "bicubic-antialias",
            overwrite=force,
            progress=progress,
            on_open=on_open,
        )
    finally:
        if "progress" in bar:
            bar["progress"].stop()
    if quiet:
        return
    if result.resampled:
        err.print(f"resampled: {result.resampled}", soft_wrap=True)
    console().print(
        f"[green]wrote[/] {result.destination} ({result.to_format}): {result.n_tensors} tensors, "
        f"{human(result.nbytes, 'B')} {result.dtype}, {human(result.spec.n_params)} parameters "
        f"in {result.seconds:.2f} s",
        soft_wrap=True,
    )
