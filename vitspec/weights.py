"""Canonical weight files: safetensors with the spec in the metadata, so a file describes itself."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import numpy as np

from vitspec.containers import FLOAT_KINDS, nonfinite_summary, open_safetensors, write_safetensors
from vitspec.errors import SpecError, WeightsError
from vitspec.layout import param_table
from vitspec.spec import Spec

FORMAT = "vitspec"
SPEC_KEY = "vitspec.spec"


def name_problems(expected: Iterable[str], found: Iterable[str], what: str = "tensor") -> list[str]:
    """The 'missing N tensor(s): ...' and 'unexpected N tensor(s): ...' lines; empty when they match."""
    expected, found = list(expected), list(found)
    known, present = set(expected), set(found)
    missing = [n for n in expected if n not in present]
    unexpected = [n for n in found if n not in known]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} {what}(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} {what}(s): {', '.join(unexpected)}")
    return problems


def check_weights(
    spec: Spec,
    weights: Mapping[str, object],
    *,
    source: str | None = None,
    check_values: bool = False,
) -> None:
    """Raise one WeightsError listing every missing, unexpected, misshapen or non-float tensor."""
    table = param_table(spec)
    expected = {p.name: p.shape for p in table}
    problems = name_problems(expected, weights)
    for name, shape in expected.items():
        if name not in weights:
            continue
        value = weights[name]
        got_shape = tuple(getattr(value, "shape", ()))
        if got_shape != shape:
            problems.append(f"{name}: expected shape {list(shape)}, found {list(got_shape)}")
        dtype = str(getattr(value, "dtype", type(value).__name__))
        if dtype not in FLOAT_KINDS:
            problems.append(
                f"{name}: expected a float dtype ({', '.join(FLOAT_KINDS)}), found {dtype}"
            )
        elif check_values:
            bad = nonfinite_summary(np.asarray(value))
            if bad:
                problems.append(f"{name}: {bad}")
    if problems:
        raise WeightsError(problems, source)


def save_weights(
    path: str | os.PathLike[str],
    weights: Mapping[str, np.ndarray],
    spec: Spec,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write canonical weights with ``spec`` embedded in the safetensors metadata, atomically."""
    check_weights(spec, weights, source=str(path))
    meta = {"format": FORMAT, SPEC_KEY: spec.to_json(), **(metadata or {})}
    from vitspec import __version__

    meta["vitspec.version"] = __version__
    ordered = [(p.name, np.asarray(weights[p.name])) for p in param_table(spec)]
    write_safetensors(path, ordered, meta, overwrite=overwrite)


def spec_from_metadata(metadata: Mapping[str, str], source: str) -> Spec | None:
    raw = metadata.get(SPEC_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SpecError([f"the embedded spec is not JSON ({exc.msg})"], source) from None
    return Spec.from_dict(data, source=f"{source} (embedded spec)")


def load_weights(
    path: str | os.PathLike[str], spec: Spec | None = None, *, check_values: bool = True
) -> tuple[dict[str, np.ndarray], Spec]:
    """Read a canonical weights file; returns ``(weights, spec)``.

    The file's embedded spec is used; ``spec`` is needed only for a file without one, and must
    agree with the embedded one when both exist. Every mismatch is reported at once.
    """
    source = str(path)
    with open_safetensors(path) as tensors:
        use = _agreed_spec(spec_from_metadata(tensors.metadata, source), spec, source)
        check_weights(
            use,
            {name: _Shaped(shape, str(dtype)) for name, (shape, dtype) in tensors.entries.items()},
            source=source,
        )
        # copies of their own (a mapped array is read-only and would keep the file open); each
        # checked for NaN/Inf as it is read
        weights = {p.name: np.array(tensors[p.name]) for p in param_table(use)}
    if check_values and tensors.nonfinite:
        raise WeightsError([f"{n}: {msg}" for n, msg in tensors.nonfinite.items()], source)
    return weights, use


def read_spec(path: str | os.PathLike[str], spec: Spec | None = None) -> Spec:
    """The spec of a weights file, read from its metadata alone (no tensor data is read).

    As in ``load_weights``: the embedded spec, or ``spec`` for a file without one; when both exist
    they must agree, and every field that differs is named.
    """
    with open_safetensors(path) as tensors:
        return _agreed_spec(spec_from_metadata(tensors.metadata, str(path)), spec, str(path))


def _agreed_spec(embedded: Spec | None, spec: Spec | None, source: str) -> Spec:
    if embedded is None and spec is None:
        raise SpecError(
            [
                "has no embedded vitspec spec; pass a spec, or use `vitspec convert` to read a foreign checkpoint"
            ],
            source,
        )
    if embedded is not None and spec is not None and embedded != spec:
        diff = [
            f"{k}: file {getattr(embedded, k)!r}, given {getattr(spec, k)!r}"
            for k in Spec.model_fields
            if getattr(embedded, k) != getattr(spec, k)
        ]
        raise SpecError(
            [f"the given spec contradicts the embedded one ({'; '.join(diff)})"], source
        )
    use = embedded or spec
    assert use is not None
    return use


class _Shaped:
    """A stand-in with shape and dtype, to check a file's table before reading any data."""

    def __init__(self, shape: tuple[int, ...], dtype: str) -> None:
        self.shape, self.dtype = shape, dtype
