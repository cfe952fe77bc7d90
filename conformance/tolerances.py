"""Tolerances: one data file (``tolerances.json``), one entry per dtype class, each with its reason.

An element passes when ``|got - expected| <= atol + rtol * |expected|``. The class is the dtype
the backend returned (``float32`` results are held to the ``float32`` entry). A case's manifest
may tighten an entry; loosening one needs ``"loosens": true`` and a reason, and every report then
flags the case as loosened. Pairwise checks allow ``factor`` times the looser of the two classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.errors import VitspecError

FORMAT = "vitspec.conformance.tolerances/1"
DEFAULT_PATH = Path(__file__).parent / "tolerances.json"
# From finest to coarsest: a pairwise check uses the coarser class of its two sides.
CLASSES = ("float64", "float32", "float16", "bfloat16")


class ToleranceError(VitspecError, ValueError):
    """A tolerance file or a case's tolerance entry that breaks the rules."""


@dataclass(frozen=True)
class Tolerance:
    """``|got - expected| <= atol + rtol * |expected|``, and why these numbers."""

    dtype_class: str
    atol: float
    rtol: float
    reason: str
    source: str = "tolerances.json"
    loosened: bool = False

    def allowed(self, scale: np.ndarray) -> np.ndarray:
        return self.atol + self.rtol * scale

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "atol": self.atol,
            "rtol": self.rtol,
            "reason": self.reason,
            "source": self.source,
        }
        if self.loosened:
            out["loosens"] = True
        return out


@dataclass(frozen=True)
class Tolerances:
    """The tolerance of every dtype class, and the pairwise factor."""

    classes: dict[str, Tolerance]
    pairwise_factor: float
    pairwise_reason: str
    path: str = str(DEFAULT_PATH)
    loosened_by: tuple[str, ...] = field(default=())

    def for_dtype(self, dtype: np.dtype | str) -> Tolerance:
        name = dtype_class(dtype)
        if name not in self.classes:
            raise ToleranceError(
                f"no tolerance for dtype {name}: {self.path} has {', '.join(self.classes)}; "
                "a backend must return float arrays of one of these dtypes"
            )
        return self.classes[name]

    def pairwise(self, a: np.dtype | str, b: np.dtype | str) -> Tolerance:
        """Tolerance between two backends: ``factor`` times the coarser of their classes."""
        ta, tb = self.for_dtype(a), self.for_dtype(b)
        coarse = max(
            ta,
            tb,
            key=lambda t: (
                CLASSES.index(t.dtype_class) if t.dtype_class in CLASSES else len(CLASSES)
            ),
        )
        f = self.pairwise_factor
        return replace(
            coarse,
            atol=coarse.atol * f,
            rtol=coarse.rtol * f,
            reason=f"{f:g} x {coarse.dtype_class} ({self.pairwise_reason})",
            source=f"{coarse.source}, pairwise",
        )

    def for_case(self, case_name: str, entries: dict[str, Any] | None) -> Tolerances:
        """These tolerances with a case's manifest entries applied: tightening only, unless marked."""
        if not entries:
            return self
        classes = dict(self.classes)
        loosened = list(self.loosened_by)
        for name, entry in entries.items():
            where = f"case {case_name!r}: tolerance {name}"
            base = self.classes.get(name)
            if base is None:
                raise ToleranceError(
                    f"{where}: unknown dtype class; {self.path} has {', '.join(self.classes)}"
                )
            atol, rtol, reason = _entry(entry, where)
            looser = [
                f"{k} {v:g} > {b:g}"
                for k, v, b in (("atol", atol, base.atol), ("rtol", rtol, base.rtol))
                if v > b
            ]
            marked = entry.get("loosens") is True
            if looser and not marked:
                raise ToleranceError(
                    f"{where} is looser than {self.path} ({', '.join(looser)}); a case may only tighten a "
                    'tolerance; to loosen it on purpose add "loosens": true and say why in "reason"'
                )
            if not looser and (atol, rtol) == (base.atol, base.rtol):
                continue  # the same numbers as the file: the file's entry (and reason) is in force
            classes[name] = Tolerance(
                name, atol, rtol, reason, source=f"case {case_name}", loosened=bool(looser)
            )
            if looser:
                loosened.append(f"{case_name} ({name}: {', '.join(looser)}: {reason})")
        return replace(self, classes=classes, loosened_by=tuple(loosened))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "path": self.path,
            "classes": {k: v.to_dict() for k, v in self.classes.items()},
            "pairwise": {"factor": self.pairwise_factor, "reason": self.pairwise_reason},
        }


def dtype_class(dtype: np.dtype | str) -> str:
    """The tolerance class of a dtype: its NumPy name (``float32``, ``bfloat16``…)."""
    return str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype


def _entry(entry: Any, where: str) -> tuple[float, float, str]:
    if not isinstance(entry, dict):
        raise ToleranceError(
            f"{where}: expected an object with atol, rtol and reason, found {type(entry).__name__}"
        )
    missing = [k for k in ("atol", "rtol", "reason") if k not in entry]
    if missing:
        raise ToleranceError(
            f"{where}: missing {', '.join(missing)} (every tolerance states atol, rtol and its reason)"
        )
    atol, rtol, reason = entry["atol"], entry["rtol"], entry["reason"]
    for key, value in (("atol", atol), ("rtol", rtol)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (0 <= value < float("inf"))
        ):
            raise ToleranceError(f"{where}: {key} must be a finite number >= 0, found {value!r}")
    if atol == 0 and rtol == 0:
        raise ToleranceError(
            f"{where}: atol and rtol are both 0; use a small atol to ask for near-exact results"
        )
    if not isinstance(reason, str) or not reason.strip():
        raise ToleranceError(f"{where}: reason must be a non-empty string saying why these numbers")
    return float(atol), float(rtol), reason


def load_tolerances(path: str | Path | None = None) -> Tolerances:
    """Read and check a tolerance file (the shipped ``tolerances.json`` by default)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ToleranceError(f"{path}: no such tolerance file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToleranceError(f"{path}: not a readable JSON tolerance file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ToleranceError(f"{path}: expected format {FORMAT!r}, found {found!r}")
    raw = data.get("classes")
    if not isinstance(raw, dict) or not raw:
        raise ToleranceError(
            f"{path}: 'classes' must map dtype classes (float32, ...) to tolerances"
        )
    classes = {}
    for name, entry in raw.items():
        atol, rtol, reason = _entry(entry, f"{path}: {name}")
        classes[name] = Tolerance(name, atol, rtol, reason, source=path.name)
    pair = data.get("pairwise")
    if (
        not isinstance(pair, dict)
        or not isinstance(pair.get("factor"), int | float)
        or pair["factor"] < 1
    ):
        raise ToleranceError(f"{path}: 'pairwise' must hold a factor >= 1 and its reason")
    if not isinstance(pair.get("reason"), str) or not pair["reason"].strip():
        raise ToleranceError(f"{path}: 'pairwise' needs a reason")
    return Tolerances(classes, float(pair["factor"]), pair["reason"], str(path))
