"""Spec inference: what the file says, what the user gives, and the family's defaults for the rest.

A checkpoint's tensors fix most of a spec (widths, depth, patch size, which optional tensors
exist). What they cannot tell (for example the number of heads behind a fused ``(3D, D)`` qkv
kernel, the GELU form or the norm epsilon) comes from ``--spec`` or else from the family's known
defaults, which are reported so the user sees every guess. A ``--spec`` value that contradicts the
file is an error naming the field, the file's value and the given value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitspec.errors import SpecError
from vitspec.presets import VARIANTS
from vitspec.spec import Spec, load_yaml, read_mapping

_FIELDS = list(Spec.model_fields)


@dataclass
class Facts:
    """What a format reader learned from a file, before the user's ``--spec`` is merged in.

    ``known``: fields the file fixes. ``defaults``: fields it cannot tell, with the family's
    default. ``why``: a short reason per default (printed next to it).
    """

    family: str
    known: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)

    def default(self, name: str, value: Any, why: str) -> None:
        self.defaults[name] = value
        self.why[name] = why


@dataclass(frozen=True)
class Inference:
    """The spec of a checkpoint and where each field came from."""

    spec: Spec
    family: str
    known: dict[str, Any]
    given: dict[str, Any]
    defaulted: dict[str, Any]
    why: dict[str, str]

    def notes(self) -> list[str]:
        """One line per field taken from the family's defaults (what the user should check)."""
        return [
            f"{name} = {_show(value)} ({self.why.get(name, f'{self.family} default')})"
            for name, value in self.defaulted.items()
        ]


def _show(value: Any) -> str:
    if isinstance(value, tuple | list) and len(value) == 2 and value[0] == value[1]:
        return str(value[0])
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _norm(name: str, value: Any) -> Any:
    if name in ("image_size", "patch_size"):
        if isinstance(value, int) and not isinstance(value, bool):
            return (value, value)
        if isinstance(value, list | tuple):
            return tuple(value)
    if name == "mlp_ratio" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _same(name: str, a: Any, b: Any) -> bool:
    a, b = _norm(name, a), _norm(name, b)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def resolve(facts: Facts, given: dict[str, Any] | None, source: str) -> Inference:
    """Merge the file's facts, the user's partial spec and the defaults into a validated Spec."""
    given = dict(given or {})
    problems = [
        f"{name}: the file says {_show(_norm(name, facts.known[name]))}, --spec says {_show(_norm(name, value))}"
        for name, value in given.items()
        if name in facts.known and not _same(name, facts.known[name], value)
    ]
    if problems:
        raise SpecError([f"the given spec contradicts the file: {p}" for p in problems], source)
    defaulted = {k: v for k, v in facts.defaults.items() if k not in facts.known and k not in given}
    merged = {**defaulted, **facts.known, **given}
    if "n_heads" not in merged:
        width = merged.get("hidden_dim")
        raise SpecError(
            [
                f"n_heads cannot be read from this file and hidden_dim {width} matches no preset width; "
                "pass it with --spec (for example --spec n_heads=12)"
            ],
            source,
        )
    spec = Spec.from_dict(merged, source=f"{source} (inferred spec)")
    return Inference(spec, facts.family, dict(facts.known), given, defaulted, dict(facts.why))


def default_heads(width: int) -> tuple[int, str] | None:
    """Heads for a width when the file cannot tell: the preset of that width, else head_dim 64."""
    for variant, (w, _, _, heads) in VARIANTS.items():
        if w == width:
            return heads, f"the {variant} preset has {heads} heads at width {width}"
    if width % 64 == 0:
        return width // 64, f"head_dim 64 (width {width} matches no preset)"
    return None


def add_default_heads(facts: Facts, width: int) -> None:
    found = default_heads(width)
    if found is not None:
        facts.default("n_heads", found[0], found[1])


def grid_from_positions(rows: int, class_token: bool) -> tuple[tuple[int, int], bool] | None:
    """(grid, has class slot) from a learned position table of ``rows`` rows, if it is square."""
    if class_token:
        side = math.isqrt(rows - 1) if rows > 1 else 0
        if side * side == rows - 1 and side > 0:
            return (side, side), True
    side = math.isqrt(rows)
    if side * side == rows and side > 0:
        return (side, side), False
    return None


def place_positions(
    facts: Facts,
    rows: int,
    patch: tuple[int, int],
    class_token: bool,
    image_size: Any = None,
    *,
    by: str = "--spec",
    slot: bool | None = None,
) -> None:
    """Set image_size and pos_embed_class_slot from a learned position table's row count.

    ``image_size`` is the size declared elsewhere (``by`` says where), if any; the rows must agree
    with it. Without it the grid must be square. ``slot`` fixes the class slot when the format does.
    """
    if image_size is not None:
        ih, iw = _norm("image_size", image_size)
        patches = (ih // patch[0]) * (iw // patch[1])
        options = [s for s in ((False, True) if slot is None else (slot,)) if patches + int(s) == rows and (class_token or not s)]
        if not options:
            raise SpecError(
                [f"image_size: {by} says {ih}x{iw} ({patches} patches of {patch[0]}x{patch[1]}), "
                 f"but the file's position embedding has {rows} rows"]
            )
        facts.known["pos_embed_class_slot"] = options[0]
        return
    found = grid_from_positions(rows, class_token)
    if slot is not None and found is not None and found[1] != slot:
        found = None
    if found is None:
        raise SpecError(
            [f"cannot tell the image size: the position embedding has {rows} rows, not a square grid"
             f"{' plus a class-token row' if class_token else ''}; pass image_size with --spec"]
        )
    (gh, gw), has_slot = found
    facts.known["image_size"] = (gh * patch[0], gw * patch[1])
    facts.known["pos_embed_class_slot"] = has_slot


# ---- the user's partial spec -----------------------------------------------------------------

_INLINE = re.compile(r",(?![^\[]*\])")


def load_partial_spec(value: str | Path | dict[str, Any] | Spec | None) -> dict[str, Any]:
    """A partial spec: a YAML/JSON file, a preset name, ``field=value,...`` pairs, a mapping or a Spec.

    Only the fields present are returned; unknown field names are an error.
    """
    if value is None:
        return {}
    if isinstance(value, Spec):
        data: Any = value.to_dict()
        source = "--spec"
    elif isinstance(value, dict):
        data, source = dict(value), "--spec"
    else:
        text = str(value)
        path = Path(text)
        if path.is_file():
            data, source = read_mapping(path), str(path)
        elif "=" in text:
            data, source = _parse_inline(text), "--spec"
        else:
            from vitspec.presets import is_preset_name, preset

            if not is_preset_name(text):
                raise SpecError(
                    [f"--spec {text!r} is neither a spec file, a preset name (such as B/16) nor field=value pairs"]
                )
            data, source = preset(text).to_dict(), f"preset {text}"
    unknown = [k for k in data if k not in _FIELDS]
    if unknown:
        import difflib

        msgs = []
        for k in unknown:
            close = difflib.get_close_matches(k, _FIELDS, n=1, cutoff=0.5)
            msgs.append(f"unknown field {k!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        raise SpecError(msgs, source)
    return {k: _norm(k, v) for k, v in data.items()}


def _parse_inline(text: str) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for part in _INLINE.split(text):
        if not part.strip():
            continue
        if "=" not in part:
            raise SpecError([f"--spec: expected field=value, found {part.strip()!r}"])
        key, raw = part.split("=", 1)
        try:
            out[key.strip()] = load_yaml(raw.strip())
        except yaml.YAMLError:
            raise SpecError([f"--spec: cannot read the value of {key.strip()}: {raw.strip()!r}"]) from None
    return out
