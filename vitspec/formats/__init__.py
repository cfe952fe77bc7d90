"""Checkpoint formats and lossless, streaming conversion between them (``vitspec convert``).

Every format is one record (``vitspec.formats.format.Format``) in ``FORMATS``: a layout table
(``vitspec.layouts``) plus the containers that hold it, how to recognise it, how to infer a spec
from a file, a reader and a writer:

===============  ===========================================================================
``canonical``    vitspec's own safetensors file: canonical names, spec in the metadata
``torch``        vitspec's PyTorch model ``state_dict`` (safetensors or .pt/.pth)
``keras``        vitspec's Keras model ``.weights.h5``, as ``model.save_weights`` writes it
``flax``         vitspec's Flax NNX model state, as safetensors of flattened ``nnx.state`` paths
``timm``         timm ``VisionTransformer`` ``state_dict`` (safetensors or .pt/.pth)
``torchvision``  torchvision ``VisionTransformer`` ``state_dict`` (safetensors or .pt/.pth)
``hf``           HF transformers ``ViTModel`` / ``ViTForImageClassification`` (save_pretrained folder)
``google``       the original ViT release's ``.npz``
``big_vision``   big_vision's ViT ``.npz``
===============  ===========================================================================

A conversion never holds the model twice: the source is opened lazily (memory-mapped where the
container allows), each canonical tensor is computed from the source tensor(s) when the writer asks
for it, and the writer writes it at once (docs/convert.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitspec import containers, files
from vitspec.errors import FileFormatError, SpecError, VitspecError, WeightsError
from vitspec.files import OutputExistsError, check_destination, check_free_space
from vitspec.formats import (
    canonical,
    flax,
    flax_npz,
    hf,
    keras,
    timm,
    torch,
    torchvision,
    unsupported,
)
from vitspec.formats.format import VARIANTS, Format
from vitspec.formats.infer import Facts, Inference, load_partial_spec, resolve
from vitspec.formats.streaming import Materialized
from vitspec.layout import param_table
from vitspec.spec import Spec
from vitspec.weights import name_problems

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        canonical.FORMAT,
        torch.FORMAT,
        keras.FORMAT,
        flax.FORMAT,
        timm.FORMAT,
        torchvision.FORMAT,
        hf.FORMAT,
        flax_npz.GOOGLE_FORMAT,
        flax_npz.BIG_VISION_FORMAT,
    )
}
# Files over this size get a progress bar in the CLI.
PROGRESS_BYTES = 100 * 1024 * 1024

# Which formats a container may hold, in the order their names are tried.
_CANDIDATES = {
    "safetensors": ("hf", "torch", "timm", "torchvision", "flax", "canonical"),
    "safetensors-index": ("hf", "torch", "timm", "torchvision", "flax", "canonical"),
    "torch-pickle": ("hf", "torch", "timm", "torchvision"),
    "npz": ("google", "big_vision"),
    "h5": ("keras",),
}


_KINDS = {
    "folder": "a folder",
    "safetensors": "a safetensors file",
    "safetensors-index": "a safetensors index",
    "npz": "an .npz file",
    "torch-pickle": "a torch.save file",
    "h5": "an HDF5 file",
    "msgpack": "a msgpack file",
}


def get_format(name: str) -> Format:
    """The record of format ``name``."""
    if name not in FORMATS:
        raise FileFormatError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


# ---- detection -------------------------------------------------------------------------------


def detect(path: str | os.PathLike[str]) -> str:
    """The format of an existing checkpoint, from its contents (metadata first, then tensor names)."""
    path = Path(path)
    container = containers.sniff_container(path)
    if container == "folder":
        hf.find_weights(path)
        return "hf"
    if container == "msgpack":
        raise FileFormatError(
            f"{path}: msgpack checkpoints are not read (Flax's to_bytes needs the whole model in memory); "
            "the flax format is safetensors of the flattened nnx.state (docs/convert.md)"
        )
    with _open_container(path, container) as source:
        names, metadata = source.names, source.metadata
    tagged = metadata.get("vitspec.format")
    if tagged in FORMATS:
        return tagged
    if metadata.get("format") == "vitspec":
        return "canonical"
    for name in _CANDIDATES[container]:
        if get_format(name).looks_like(names):
            return name
    family = unsupported.recognise(names)
    if family is not None:
        raise FileFormatError(
            f"{path}: {unsupported.not_supported(family)}; the formats vitspec reads: {', '.join(FORMATS)}"
        )
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise FileFormatError(
        f"{path}: cannot tell which checkpoint format this {container} file is (tensors: {shown}); "
        f"pass --from with one of {', '.join(FORMATS)}"
    )


def _open_container(path: Path, container: str) -> containers.Source:
    if container == "safetensors-index":
        return containers.open_sharded_safetensors(path)
    if container == "torch-pickle":
        return containers.open_torch_pickle(path)
    if container == "npz":
        return containers.open_npz(path)
    if container == "h5":
        return containers.open_h5(path)
    return containers.open_safetensors(path)


def destination_format(path: str | os.PathLike[str]) -> str:
    """The format an output path implies when ``--to`` is not given."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".h5"):
        return "keras"
    if name.endswith(".safetensors"):
        return "canonical"
    if name.endswith(".npz"):
        raise FileFormatError(
            f"{path}: an .npz output can be --to google or --to big_vision; say which"
        )
    if name.endswith((".pt", ".pth")):
        raise FileFormatError(
            f"{path}: a .pt/.pth output can be --to timm, --to torchvision or --to torch; say which"
        )
    if path.suffix == "" or path.is_dir():
        return "hf"
    raise FileFormatError(
        f"{path}: cannot tell the output format from the name; pass --to with one of {', '.join(FORMATS)}"
    )


# ---- reading ---------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """An opened checkpoint: its format, its native tensors (read lazily) and its inferred spec."""

    path: Path
    format: str
    source: containers.Source
    inference: Inference

    @property
    def spec(self) -> Spec:
        return self.inference.spec

    @property
    def record(self) -> Format:
        return get_format(self.format)

    def canonical(self) -> Mapping[str, np.ndarray]:
        """Canonical tensors computed from the file as they are asked for."""
        return self.record.canonical(self.spec, self.source)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(
    path: str | os.PathLike[str],
    from_format: str | None = None,
    spec: str | Path | dict[str, Any] | Spec | None = None,
) -> Checkpoint:
    """Open a checkpoint of any format, infer its spec and check every tensor's name and shape.

    ``spec`` is a partial spec (file, preset, ``field=value`` pairs or a mapping) for what the
    file cannot tell; a value contradicting the file is an error.
    """
    path = Path(path)
    fmt = from_format or detect(path)
    record = get_format(fmt)
    given = load_partial_spec(spec)
    source = open_source(path, fmt)
    try:
        inference = infer_spec(record, source, given)
        if record.prepare is not None:
            source = record.prepare(inference.spec, source)
        check_layout(record, inference.spec, source)
    except BaseException:
        source.close()
        raise
    return Checkpoint(path, fmt, source, inference)


def open_source(path: str | os.PathLike[str], fmt: str) -> containers.Source:
    """The file's tensors under the native names of format ``fmt`` (nothing read yet)."""
    path = Path(path)
    record = get_format(fmt)
    container = containers.sniff_container(path)
    if container not in record.containers:
        kind = _KINDS.get(container, container)
        raise FileFormatError(
            f"{path}: is {kind}, which cannot hold a {fmt} checkpoint ({record.summary}); check --from{_looks_like(path, container)}"
        )
    return record.read(path)


def _looks_like(path: Path, container: str) -> str:
    """'; it looks like a torchvision ... not supported yet' when the file's names are a family vitspec knows."""
    if container in ("folder", "msgpack"):
        return ""
    with _open_container(path, container) as source:
        family = unsupported.recognise(source.names)
    return f"; {unsupported.not_supported(family)}" if family is not None else ""


def infer_spec(record: Format, source: containers.Source, given: dict[str, Any]) -> Inference:
    """The spec of an opened file: the embedded one if any, else the format's inference; ``given`` merged."""
    from vitspec.weights import SPEC_KEY, spec_from_metadata

    if SPEC_KEY in source.metadata:
        embedded = spec_from_metadata(source.metadata, str(source.path))
        assert embedded is not None
        facts = Facts(record.name, known=embedded.to_dict())
        facts.family = f"{record.name} (embedded spec)"
    else:
        try:
            facts = record.infer(source, given)
        except (SpecError, WeightsError) as exc:
            problems = list(exc.problems)
            family = unsupported.recognise(source.names)
            other = _other_format(record, source)
            if family is not None:  # the file was read as a format it is not (--from)
                problems.insert(
                    0, f"read as {record.name}, but {unsupported.not_supported(family)}"
                )
            elif other is not None:
                problems.insert(
                    0,
                    f"read as {record.name}, but its tensor names are the {other} format's; try --from {other}",
                )
            if exc.source is not None and family is None and other is None:
                raise
            raise type(exc)(
                problems, exc.source or str(source.path)
            ) from None  # name the file the problem is in
    if SPEC_KEY not in source.metadata:
        # A variant the format cannot hold (or its reader cannot tell) is known to be off.
        reads = record.expresses if record.reads is None else record.reads
        for name in VARIANTS:
            if name not in reads and name not in facts.known:
                facts.known[name] = Spec.model_fields[name].default
                facts.defaults.pop(name, None)
    return resolve(facts, given, str(source.path))


def _other_format(record: Format, source: containers.Source) -> str | None:
    """The format whose names the file has, when it was read (--from) as another that failed."""
    for name in _CANDIDATES.get(source.container, ()):
        if name not in (record.name, "canonical") and get_format(name).looks_like(source.names):
            return name
    return None


def check_layout(record: Format, spec: Spec, source: containers.Source) -> None:
    """One WeightsError listing every missing, unexpected, misshapen or non-float tensor."""
    try:
        expected = dict(record.native_layout(spec))
    except SpecError as exc:
        raise WeightsError(exc.problems, str(source.path)) from None
    holds = {r.native: r.canonical for r in record.layout.table(spec).rows}

    def beside(name: str) -> str:
        canonical = ", ".join(holds.get(name, ()))
        return name if canonical in ("", name) else f"{name} (canonical {canonical})"

    problems = name_problems(expected, source.entries)
    missing = [beside(n) for n in expected if n not in source.entries]
    if missing:  # the format's own names, each with the canonical tensor(s) it holds
        problems[0] = f"missing {len(missing)} tensor(s): {', '.join(missing)}"
    for name, shape in expected.items():
        if name not in source.entries:
            continue
        found, dtype = source.entries[name]
        if tuple(found) != tuple(shape):
            problems.append(f"{name}: expected shape {list(shape)}, found {list(found)}")
        if not containers.is_float(dtype):
            problems.append(
                f"{name}: expected a float dtype ({', '.join(containers.FLOAT_KINDS)}), found {dtype}"
            )
    if problems:
        raise WeightsError(
            problems, f"{source.path} ({record.name} format, spec inferred as above)"
        )


def load(
    path: str | os.PathLike[str],
    from_format: str | None = None,
    spec: str | Path | dict[str, Any] | Spec | None = None,
) -> tuple[dict[str, np.ndarray], Spec]:
    """All canonical weights of a checkpoint of any format, in memory, and its spec."""
    with open_checkpoint(path, from_format, spec) as ckpt:
        view = ckpt.canonical()
        weights = {p.name: np.array(view[p.name], order="C") for p in param_table(ckpt.spec)}
        _raise_nonfinite(ckpt.source)
        return weights, ckpt.spec


def save(
    path: str | os.PathLike[str],
    weights: Mapping[str, np.ndarray],
    spec: Spec,
    to_format: str | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write canonical ``weights`` of ``spec`` in any format (atomically)."""
    from vitspec.weights import check_weights

    path = Path(path)
    fmt = to_format or destination_format(path)
    record = get_format(fmt)
    check_weights(spec, weights, source=str(path))
    record.check(spec)
    _check_output(None, path, record, overwrite)
    dtype = _output_dtype({np.asarray(w).dtype for w in weights.values()})
    layout = record.native_layout(spec)
    check_free_space(
        path, sum(int(np.prod(s)) * dtype.itemsize for _, s in layout) + _overhead(layout)
    )
    record.write(path, spec, record.to_native(spec, weights), dtype, overwrite=overwrite)


# ---- converting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversion:
    """What ``convert`` did."""

    source: Path
    destination: Path
    from_format: str
    to_format: str
    inference: Inference
    spec: Spec
    n_tensors: int
    nbytes: int
    seconds: float
    dtype: str
    resampled: str | None = None


ProgressFn = Callable[[int, int], None]


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    from_format: str | None = None,
    to_format: str | None = None,
    spec: str | Path | dict[str, Any] | Spec | None = None,
    image_size: int | tuple[int, int] | None = None,
    resample: str = "bicubic-antialias",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    on_open: Callable[[Checkpoint], None] | None = None,
) -> Conversion:
    """Convert a checkpoint between formats, one tensor at a time, writing ``dst`` atomically.

    ``image_size`` resamples a learned position embedding to a new input size with the algorithm
    named by ``resample`` (``vitspec.formats.resample.ALGORITHMS``; the default is timm's). ``progress(done_bytes, total_bytes)`` is called after each
    tensor is written; ``on_open(checkpoint)`` once the source is open and its spec known.
    """
    from vitspec.formats.resample import ALGORITHMS

    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if resample not in ALGORITHMS:
        raise ValueError(
            f"unknown resampling algorithm {resample!r}; expected one of {', '.join(ALGORITHMS)}"
        )
    to_name = to_format or destination_format(dst)
    target = get_format(to_name)
    _check_output(src, dst, target, overwrite)
    with open_checkpoint(src, from_format, spec) as ckpt:
        if on_open is not None:
            on_open(ckpt)
        in_spec = ckpt.spec
        out_spec, how = _resized(in_spec, image_size, resample)
        target.check(out_spec)
        dtype = _output_dtype({d for _, d in ckpt.source.entries.values()})
        layout = target.native_layout(out_spec)
        total = sum(int(np.prod(shape)) * dtype.itemsize for _, shape in layout)
        check_free_space(dst, total + _overhead(layout))
        weights = ckpt.canonical()
        if ckpt.record.layout.dense != target.layout.dense:
            # The kernels change orientation: transpose each once, cache-blocked, as it is read.
            # (Between two (out, in) formats the canonical views cancel out and nothing is copied.)
            weights = Materialized(weights)
        if out_spec != in_spec:
            from vitspec.formats.resample import resampled

            weights = resampled(in_spec, out_spec, weights, resample)
        done = [0]

        def tick(nbytes: int) -> None:
            done[0] += nbytes
            if progress is not None:
                progress(done[0], total)

        items = _checked(target.to_native(out_spec, weights), ckpt.source)
        target.write(dst, out_spec, items, dtype, overwrite=overwrite, progress=tick)
        return Conversion(
            src,
            dst,
            ckpt.format,
            to_name,
            ckpt.inference,
            out_spec,
            len(layout),
            total,
            time.perf_counter() - start,
            str(dtype),
            how,
        )


def _overhead(layout: list[tuple[str, tuple[int, ...]]]) -> int:
    """Bytes an output holds beyond its tensors' data, generously: a safetensors header entry or a
    zip member's headers and .npy header stay under 1 KiB per tensor, an HDF5 dataset with its
    groups near 1.9 KiB (measured on Keras files); plus config.json and the containers' headers."""
    return files.RESERVE_BASE + sum(files.RESERVE_PER_TENSOR + 2 * len(n) for n, _ in layout)


def _resized(
    spec: Spec, image_size: int | tuple[int, int] | list[int] | None, algorithm: str
) -> tuple[Spec, str | None]:
    if image_size is None:
        return spec, None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if size == spec.image_size:
        return spec, None
    new = spec.replace(image_size=size)
    if spec.pos_embed != "learned":
        return (
            new,
            f"image size {spec.image_size} -> {new.image_size}; pos_embed {spec.pos_embed!r} has no table to resample",
        )
    from vitspec.formats.resample import describe

    return new, f"pos_embed grid {spec.grid} -> {new.grid} ({describe(algorithm)})"


def _checked(
    items: Iterator[tuple[str, np.ndarray]], source: containers.Source
) -> Iterator[tuple[str, np.ndarray]]:
    """Pass items through; after the last one, fail if any source tensor held NaN or Inf.

    The writer is still inside its temporary file then, so a failure leaves nothing behind.
    """
    yield from items
    _raise_nonfinite(source)


def _raise_nonfinite(source: containers.Source) -> None:
    if source.nonfinite:
        raise WeightsError(
            [f"{name}: {what}" for name, what in source.nonfinite.items()], str(source.path)
        )


def _output_dtype(dtypes: set[np.dtype]) -> np.dtype:
    """One float dtype for the whole output: the source's, or the widest when it mixes several."""
    floats = {np.dtype(d) for d in dtypes if containers.is_float(np.dtype(d))}
    if len(floats) <= 1:
        return floats.pop() if floats else np.dtype(np.float32)
    if np.dtype(np.float64) in floats:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _check_output(src: Path | None, dst: Path, target: Format, overwrite: bool) -> None:
    """Refuse, before any work: a folder for a one-file format, an existing OUT without overwrite,
    and an output that would replace or remove the input."""
    if dst.is_dir() and not target.writes_folder:
        raise FileFormatError(
            f"{dst}: is a folder, and the {target.name} format writes a single file; name the file to write "
            f"(for example {dst / ('model' + _SUFFIX.get(target.name, '.safetensors'))})"
        )
    if dst.is_dir() and not overwrite:
        raise FolderExistsError(dst, target)
    check_destination(dst, overwrite)
    if (
        src is not None
        and src.exists()
        and any(_same_file(src, out) for out in [dst, *target.touches(dst)] if out.exists())
    ):
        raise FileFormatError(
            f"{dst}: refusing to convert a checkpoint onto itself (writing it would replace {src})"
        )


_SUFFIX = {"keras": ".weights.h5", "google": ".npz", "big_vision": ".npz"}


class FolderExistsError(OutputExistsError):
    """An existing output folder: with overwrite, only the files the format writes are replaced."""

    def __init__(self, path: Path, target: Format) -> None:
        names = [p.name for p in target.touches(path)]
        shown = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
        VitspecError.__init__(
            self,
            f"{path} already exists; pass --force (overwrite=True) to replace {shown} in it (nothing else there is touched)",
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


__all__ = [
    "FORMATS",
    "PROGRESS_BYTES",
    "Checkpoint",
    "Conversion",
    "check_layout",
    "convert",
    "destination_format",
    "detect",
    "get_format",
    "infer_spec",
    "load",
    "open_checkpoint",
    "open_source",
    "save",
]
