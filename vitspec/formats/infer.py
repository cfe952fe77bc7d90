"""Spec inference: what the file says, what the user gives, and what is assumed for the rest.

A checkpoint's tensors fix most of a spec (widths, depth, patch size, which optional tensors
exist). What they cannot tell (for example the number of heads behind a fused ``(3D, D)`` qkv
kernel, the GELU form, the norm epsilon, timm's pooling, or the patch grid behind a position
table) comes from ``--spec`` or else is assumed, and every assumed field is reported with the
reason, so the user sees every guess. Where the tensors admit several readings and the family's
usual choices do not single one out, nothing is guessed: the readings are listed and ``--spec``
picks one. A ``--spec`` value that contradicts the file is an error naming the field, the file's
value and the given value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitspec.errors import SpecError, WeightsError
from vitspec.presets import VARIANTS
from vitspec.spec import Spec, load_yaml, read_mapping

_FIELDS = list(Spec.model_fields)
# Why a field nobody set has vitspec's default (fields with no better reason get a generic one).
_UNSET_WHY = {
    "dropout": "a training-time rate: it changes neither the weights nor the outputs",
    "attn_dropout": "a training-time rate: it changes neither the weights nor the outputs",
    "drop_path": "a training-time rate: it changes neither the weights nor the outputs",
}


@dataclass
class Facts:
    """What a format reader learned from a file, before the user's ``--spec`` is merged in.

    ``known``: fields the file fixes (tensors, config, metadata). ``defaults``: fields it cannot
    tell, with the value assumed. ``why``: a short reason per assumed field (printed next to it).
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
    """The spec of a checkpoint and where each field came from.

    Every field is in exactly one of ``known`` (read from the file), ``given`` (``--spec``) and
    ``assumed`` (neither: a family default or vitspec's, with the reason in ``why``).
    """

    spec: Spec
    family: str
    known: dict[str, Any]
    given: dict[str, Any]
    assumed: dict[str, Any]
    why: dict[str, str]

    def notes(self) -> list[str]:
        """One line per assumed field (what the user should check); fields with one reason share a line."""
        groups: dict[str, dict[str, str]] = {}
        for name, value in self.assumed.items():
            groups.setdefault(self.why.get(name, f"{self.family} default"), {})[name] = _show(value)
        lines = []
        for reason, values in groups.items():
            if len(set(values.values())) == 1:
                lines.append(f"{', '.join(values)} = {next(iter(values.values()))} ({reason})")
            else:
                lines.append(f"{', '.join(f'{n} = {v}' for n, v in values.items())} ({reason})")
        return lines


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
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
    why = dict(facts.why)
    assumed = {}
    for name in _FIELDS:
        if name in facts.known or name in given:
            continue
        if name == "pos_embed_class_slot" and not (
            spec.n_prefix_tokens and spec.pos_embed == "learned"
        ):
            continue  # no class token or no table: the slot follows, nothing is assumed
        assumed[name] = getattr(spec, name)
        why.setdefault(name, _UNSET_WHY.get(name, "vitspec's default; the file does not say"))
    return Inference(spec, facts.family, dict(facts.known), given, assumed, why)


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


def _square(patches: int) -> int | None:
    side = math.isqrt(patches) if patches > 0 else 0
    return side if side and side * side == patches else None


def plausible_grids(patches: int) -> list[tuple[int, int]]:
    """Non-square (h, w) grids of ``patches`` patches, sides at least 2 and at most 2:1, squarest first.

    These are the non-square readings of a position table worth listing: a 1 x N strip or a 3:1
    image is not what anyone trained a ViT on, so a prime count has no plausible non-square grid.
    """
    out = []
    for h in range(2, math.isqrt(patches) + 1):
        w, rest = divmod(patches, h)
        if not rest and w != h and w <= 2 * h:
            out += [(h, w), (w, h)]
    return sorted(out, key=lambda g: (max(g) / min(g), g))


def _example(patches: int, patch: tuple[int, int]) -> str:
    """'for example --spec image_size=[224,256] for a 14x16 grid' (or why there is no example)."""
    grids = plausible_grids(patches)
    if not grids:
        return f"{patches} patches make no grid with sides of 2 or more within 2:1"
    h, w = grids[0]
    return f"for example --spec image_size=[{h * patch[0]},{w * patch[1]}] for a {h}x{w} grid"


def _with_row(slot: bool) -> str:
    return "plus a class-token row" if slot else "without a class-token row"


def place_positions(
    facts: Facts,
    rows: int,
    patch: tuple[int, int],
    class_token: bool | int,
    given: Mapping[str, Any],
    *,
    declared: Any = None,
    slot: bool | None = None,
    usual_slot: bool = True,
) -> None:
    """Set image_size and pos_embed_class_slot from a learned position table of ``rows`` rows.

    ``declared`` is an image size the file itself states (config.json); else ``given`` (the user's
    partial spec) may hold one. ``slot`` fixes the class-token row when the format does;
    ``usual_slot`` is the family's usual choice when both are possible (timm: a row for the class
    token; big_vision: none). Without an image size the grid is assumed square, and a reading is
    taken only when it is the one the family's usual choices give, or the only plausible one; it
    is marked as assumed. Otherwise the readings are listed and ``--spec`` must choose.
    ``class_token`` may be the number of prefix tokens (class, distillation, registers): the
    "class-token row" is then a row for each.
    """
    lead = int(class_token)
    size = declared if declared is not None else given.get("image_size")
    by = "config.json" if declared is not None else "--spec"
    if not class_token:
        slot = False
    if slot is not None:
        facts.known["pos_embed_class_slot"] = slot
        slots: tuple[bool, ...] = (slot,)
    elif given.get("pos_embed_class_slot") is not None:
        slots = (bool(given["pos_embed_class_slot"]),)
    else:
        slots = (usual_slot, not usual_slot)
    if size is not None:
        ih, iw = _norm("image_size", size)
        patches = (ih // patch[0]) * (iw // patch[1])
        fits = [s for s in slots if patches + lead * int(s) == rows]
        if not fits:
            row = f" {_with_row(slots[0])}" if len(slots) == 1 else ""
            raise SpecError(
                [
                    f"image_size: {by} says {ih}x{iw} ({patches} patches of {patch[0]}x{patch[1]}{row}), "
                    f"but the file's position embedding has {rows} rows"
                ]
            )
        if len(slots) > 1:
            facts.known["pos_embed_class_slot"] = fits[0]
        return
    square = {s: _square(rows - lead * int(s)) for s in slots}
    if len(slots) == 1:
        s = slots[0]
        if square[s] is None:
            raise SpecError(
                [
                    f"cannot tell the image size: the position embedding has {rows} rows, {rows - lead * int(s)} patches "
                    f"{_with_row(s)}, which is not a square grid; pass image_size with --spec "
                    f"({_example(rows - lead * int(s), patch)})"
                ]
            )
        _assume_square(facts, rows, patch, s, square[s] or 0, "", lead)
        return
    usual, other = slots
    if square[usual] is not None:
        alt = plausible_grids(rows - lead * int(other))
        also = (
            f"; {rows - lead * int(other)} patches {_with_row(other)} in a {alt[0][0]}x{alt[0][1]} grid would fit too"
            if alt
            else ""
        )
        _assume_square(
            facts,
            rows,
            patch,
            usual,
            square[usual] or 0,
            f"{facts.family}'s usual layout{also}",
            lead,
        )
        return
    if square[other] is not None and not plausible_grids(rows - lead * int(usual)):
        _assume_square(
            facts,
            rows,
            patch,
            other,
            square[other] or 0,
            f"{rows - lead * int(usual)} patches {_with_row(usual)}, {facts.family}'s usual layout, make no plausible grid",
            lead,
        )
        return
    fitting = [s for s in slots if square[s] or plausible_grids(rows - lead * int(s))]
    if len(fitting) < 2:
        example = rows - lead * int(fitting[0] if fitting else usual)
        raise SpecError(
            [
                f"cannot tell the image size: the position embedding has {rows} rows, which is not a square grid with "
                f"or without a class-token row; pass image_size with --spec ({_example(example, patch)})"
            ]
        )
    readings = [_reading(rows, patch, s, square[s], lead) for s in fitting]
    raise SpecError(
        [
            f"the position embedding has {rows} rows, which can be read two ways (vitspec does not guess): "
            f"(a) {readings[0]}; (b) {readings[1]}"
        ]
    )


def _reading(rows: int, patch: tuple[int, int], slot: bool, side: int | None, lead: int = 1) -> str:
    """One reading of a position table, and the ``--spec`` that chooses it."""
    n = rows - lead * int(slot)
    if side is not None:
        h, w = side * patch[0], side * patch[1]
        size = str(h) if h == w else f"[{h},{w}]"
        return (
            f"{n} patches {_with_row(slot)} in a square {side}x{side} grid (image_size {size}): "
            f"--spec pos_embed_class_slot={str(slot).lower()}"
        )
    grids = plausible_grids(n)[:2]
    shown = " or ".join(f"{h}x{w}" for h, w in grids)
    sizes = " or ".join(f"[{h * patch[0]},{w * patch[1]}]" for h, w in grids)
    return f"{n} patches {_with_row(slot)} in a non-square grid such as {shown}: --spec image_size={sizes}"


def _assume_square(
    facts: Facts,
    rows: int,
    patch: tuple[int, int],
    slot: bool,
    side: int,
    why: str,
    lead: int = 1,
) -> None:
    """image_size (and the class-token row, unless known) from a square-grid reading, marked as assumed."""
    reason = (
        f"{rows} position rows read as {rows - lead * int(slot)} patches {_with_row(slot)} in a square "
        f"{side}x{side} grid{f', {why}' if why else ''}; --spec image_size=[H,W] for another grid"
    )
    facts.default("image_size", (side * patch[0], side * patch[1]), reason)
    if "pos_embed_class_slot" not in facts.known:
        facts.default("pos_embed_class_slot", slot, reason)


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
                    [
                        f"--spec {text!r} is neither a spec file, a preset name (such as B/16) nor field=value pairs"
                    ]
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
            raise SpecError(
                [f"--spec: cannot read the value of {key.strip()}: {raw.strip()!r}"]
            ) from None
    return out


# ---- reading a spec from tensor names and shapes --------------------------------------------

Shape = tuple[int, ...]


def block_count(names: list[str], pattern: str, what: str) -> int:
    """Number of blocks, from names matching ``pattern`` (one group: the index); indices must be 0..n-1."""
    rx = re.compile(pattern)
    found = sorted({int(m.group(1)) for n in names if (m := rx.match(n))})
    if not found:
        return 0
    if found != list(range(len(found))):
        gaps = sorted(set(range(max(found) + 1)) - set(found))
        raise WeightsError(
            [f"{what} indices are not contiguous: missing block(s) {', '.join(map(str, gaps))}"]
        )
    return len(found)


def need(
    shapes: Mapping[str, Shape],
    name: str,
    ndim: int,
    what: str,
    canonical: str,
    native: str | None = None,
) -> Shape:
    """The shape of a tensor the format requires, or an error naming it by the format's own name
    (``native``, when ``shapes`` is keyed otherwise; else ``name``) with the canonical name beside it."""
    shown = native or name
    beside = f"canonical {canonical}, " if canonical != shown else ""
    if name not in shapes:
        raise WeightsError(
            [f"missing tensor {shown} ({beside}{what}); is this file of the format it was read as?"]
        )
    shape = shapes[name]
    if len(shape) != ndim:
        raise WeightsError(
            [f"{shown}: expected {ndim} dimensions ({beside}{what}), found shape {list(shape)}"]
        )
    return shape


def reject_features(names: list[str], features: Mapping[str, str], fmt: str) -> None:
    """Error out on tensors of features a vitspec spec cannot express (name pattern -> feature)."""
    problems = []
    for pattern, feature in features.items():
        hits = [n for n in names if re.search(pattern, n)]
        if hits:
            shown = ", ".join(hits[:3]) + (f" and {len(hits) - 3} more" if len(hits) > 3 else "")
            problems.append(
                f"this {fmt} checkpoint uses {feature} ({shown}), which a vitspec spec cannot express"
            )
    if problems:
        raise WeightsError(problems)
