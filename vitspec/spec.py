"""The architecture spec: one frozen pydantic model that names every choice changing the numbers.

A field that a framework would otherwise default silently (norm eps, GELU kind, where the final
norm sits) is explicit here, with the default most checkpoints use. Derived values (patch grid,
sequence length, head dim, parameter count, FLOPs) are properties, never fields.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vitspec.errors import SpecError

PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
Rate = Annotated[float, Strict(), Field(ge=0.0, lt=1.0, allow_inf_nan=False)]

Pooling = Literal["token", "avg", "max", "avgmax", "map"]
PosEmbed = Literal["learned", "sincos2d", "none"]
Gelu = Literal["exact", "tanh", "quick"]
FinalNorm = Literal["before_pool", "after_pool", "none"]
Norm = Literal["layer", "rms"]
MlpKind = Literal["standard", "swiglu"]
Resample = Literal["bicubic-antialias", "bicubic"]
Flag = Annotated[bool, Strict()]

MAX_SPEC_FILE_BYTES = 1 << 20


def _pair(value: Any) -> Any:
    """An int n means (n, n); anything else is left for the tuple validator to judge."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    return value


class Spec(BaseModel):
    """A Vision Transformer architecture. Every field that changes the numbers is here."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    image_size: tuple[PositiveInt, PositiveInt] = Field(
        description="Input image (height, width) in pixels; a single integer means a square image.",
    )
    patch_size: tuple[PositiveInt, PositiveInt] = Field(
        description="Patch (height, width) in pixels; a single integer means a square patch.",
    )
    hidden_dim: PositiveInt = Field(description="Token width D (the ViT paper's 'Hidden size D').")
    mlp_ratio: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)] = Field(
        default=4.0,
        description="MLP hidden width as a multiple of hidden_dim; hidden_dim * mlp_ratio must be a whole number.",
    )
    n_heads: PositiveInt = Field(description="Attention heads per block; must divide hidden_dim.")
    depth: PositiveInt = Field(description="Number of encoder blocks (the paper's 'Layers').")
    in_channels: PositiveInt = Field(default=3, description="Channels of the input image.")
    n_classes: NonNegativeInt = Field(
        default=1000,
        description="Classes of the linear head; 0 means no head (output = pooled features).",
    )
    pooling: Pooling = Field(
        default="token",
        description=(
            "'token': the class token's output; 'avg', 'max', 'avgmax' (the mean of the two): over "
            "the patch tokens (and the prefix tokens with pool_include_prefix); 'map': multi-head "
            "attention pooling with a learned probe (SigLIP, timm global_pool='map')."
        ),
    )
    pool_include_prefix: Flag = Field(
        default=False,
        description="avg/max/avgmax/map pooling also takes the prefix tokens (class, distillation, registers), as timm pool_include_prefix.",
    )
    class_token: Flag = Field(
        default=True, description="Prepend a learned class token to the patch tokens."
    )
    distillation_token: Flag = Field(
        default=False,
        description=(
            "DeiT's distillation token after the class token, with a head of its own; the output "
            "is the mean of the two heads' logits (timm, transformers)."
        ),
    )
    reg_tokens: NonNegativeInt = Field(
        default=0,
        description="Register tokens after the class (and distillation) token (DINOv2 with registers); never pooled.",
    )
    pos_embed: PosEmbed = Field(
        default="learned",
        description="'learned': a trained table; 'sincos2d': fixed 2-D sine-cosine (big_vision); 'none'.",
    )
    pos_embed_class_slot: Flag | None = Field(
        default=None,
        description=(
            "Whether a learned position embedding has a row for each prefix token (class, "
            "distillation, registers: ViT paper, timm, HF) or covers the patches only (timm "
            "no_embed_class). Default: true exactly when there are prefix tokens and the position "
            "embedding is learned."
        ),
    )
    dynamic_image_size: Flag = Field(
        default=False,
        description=(
            "Accept images of any size divisible by patch_size at run time; the position embedding "
            "is resampled to the image's grid inside the forward (timm dynamic_img_size)."
        ),
    )
    pos_embed_resample: Resample = Field(
        default="bicubic-antialias",
        description="How a dynamic image size resamples a learned position embedding (as `vitspec convert --resample`).",
    )
    patch_bias: Flag = Field(
        default=True, description="The patch projection has a bias (CLIP's has none)."
    )
    patch_norm: Flag = Field(
        default=False,
        description="A norm on the patch tokens before the position embedding (AIMv2, timm embed_norm_layer).",
    )
    pre_norm: Flag = Field(
        default=False,
        description="A norm on the tokens entering block 0 (CLIP's ln_pre, timm pre_norm).",
    )
    qkv_bias: Flag = Field(
        default=True, description="Query, key and value projections have a bias."
    )
    qk_norm: Flag = Field(
        default=False,
        description="A norm over each head's queries and keys before the scores (timm qk_norm, ViT-22B).",
    )
    proj_bias: Flag = Field(default=True, description="The attention output projection has a bias.")
    layer_scale: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None,
        description=(
            "Learned per-channel scales on both residual branches of every block, initialised to "
            "this value (DeiT-III, DINOv2, CaiT; timm init_values); null = none."
        ),
    )
    mlp: MlpKind = Field(
        default="standard",
        description=(
            "'standard': fc1, activation, fc2; 'swiglu': silu(gate(x)) * fc1(x), then fc2, with "
            "mlp_dim the width of each branch (DINOv2 giant, AIMv2)."
        ),
    )
    mlp_bias: Flag = Field(default=True, description="The MLP's layers have biases.")
    mlp_norm: Flag = Field(
        default=False,
        description="A norm on the MLP's hidden layer, before fc2 (timm scale_mlp_norm).",
    )
    norm: Norm = Field(
        default="layer",
        description="Every norm's kind: 'layer' (LayerNorm: scale and bias) or 'rms' (RMSNorm: scale only; AIMv2).",
    )
    norm_eps: Annotated[float, Strict(), Field(gt=0, lt=1, allow_inf_nan=False)] = Field(
        default=1e-6,
        description="Norm epsilon (timm, big_vision: 1e-6; HF transformers: 1e-12; CLIP, AIMv2: 1e-5).",
    )
    gelu: Gelu = Field(
        default="exact",
        description=(
            "The standard MLP's activation: 'exact' GELU (erf), 'tanh' (GELU's tanh approximation) "
            "or 'quick' (x * sigmoid(1.702 x): OpenAI CLIP's QuickGELU)."
        ),
    )
    final_norm: FinalNorm = Field(
        default="before_pool",
        description="Final norm on every token before pooling, on the pooled vector (timm fc_norm), or 'none'.",
    )
    pre_logits_dim: NonNegativeInt = Field(
        default=0,
        description="Width of a dense + tanh layer between pooling and the head (ViT paper's representation layer); 0 = none.",
    )
    dropout: Rate = Field(
        default=0.0,
        description="Dropout after the position embedding, the attention output and each MLP layer (training only).",
    )
    attn_dropout: Rate = Field(
        default=0.0, description="Dropout on attention probabilities (training only)."
    )
    head_bias: Flag = Field(
        default=True,
        description="The head has a bias; a head without one is a projection (CLIP's visual projection).",
    )
    drop_path: Rate = Field(
        default=0.0,
        description="Stochastic depth: the last block's rate; block i uses drop_path * i / (depth - 1), 0 when depth is 1 (training only).",
    )

    @field_validator("image_size", "patch_size", mode="before")
    @classmethod
    def _square_from_int(cls, value: Any) -> Any:
        return _pair(value)

    @field_validator("pos_embed_class_slot", mode="after")
    @classmethod
    def _default_class_slot(cls, value: bool | None, info: ValidationInfo) -> bool:
        # Derived here, not filled into the input, so the field stays out of model_fields_set and
        # replace() derives it again from the new class_token / pos_embed.
        if value is None:
            prefix = (
                info.data.get("class_token") is True
                or info.data.get("distillation_token") is True
                or (info.data.get("reg_tokens") or 0) > 0
            )
            return prefix and info.data.get("pos_embed") == "learned"
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Spec:
        problems: list[str] = []
        (ih, iw), (ph, pw) = self.image_size, self.patch_size
        if ih % ph or iw % pw:
            problems.append(
                f"image_size {_fmt_pair(self.image_size)} is not divisible by patch_size {_fmt_pair(self.patch_size)}"
            )
        if self.hidden_dim % self.n_heads:
            problems.append(
                f"hidden_dim {self.hidden_dim} is not divisible by n_heads {self.n_heads}"
            )
        mlp = self.hidden_dim * self.mlp_ratio
        if abs(mlp - round(mlp)) > 1e-6 or round(mlp) < 1:
            problems.append(
                f"hidden_dim * mlp_ratio must be a whole number, found {self.hidden_dim} * {self.mlp_ratio} = {mlp:g}"
            )
        if self.pos_embed == "sincos2d" and (self.hidden_dim % 4 or self.hidden_dim < 8):
            problems.append(
                f"pos_embed 'sincos2d' needs hidden_dim divisible by 4 and at least 8, found {self.hidden_dim}"
            )
        if self.pooling == "token" and not self.class_token:
            problems.append(
                "pooling 'token' needs class_token true, found class_token false (use pooling 'avg')"
            )
        if self.pos_embed_class_slot and not (self.n_prefix_tokens and self.pos_embed == "learned"):
            found = (
                "no prefix token" if not self.n_prefix_tokens else f"pos_embed {self.pos_embed!r}"
            )
            problems.append(
                "pos_embed_class_slot true needs a prefix token (class_token, distillation_token or "
                f"reg_tokens) and pos_embed 'learned', found {found}"
            )
        if self.pool_include_prefix and self.pooling == "token":
            problems.append(
                "pool_include_prefix true needs pooling 'avg', 'max', 'avgmax' or 'map', found 'token'"
            )
        if self.distillation_token:
            wrong = [
                f"{name} {str(value).lower() if isinstance(value, bool) else repr(value)}"
                for name, value, ok in (
                    ("class_token", self.class_token, self.class_token),
                    ("pooling", self.pooling, self.pooling == "token"),
                    ("final_norm", self.final_norm, self.final_norm != "after_pool"),
                    ("pre_logits_dim", self.pre_logits_dim, not self.pre_logits_dim),
                )
                if not ok
            ]
            if wrong:
                problems.append(
                    "distillation_token true needs class_token true, pooling 'token', final_norm "
                    f"'before_pool' or 'none' and pre_logits_dim 0 (DeiT's distilled model), found {', '.join(wrong)}"
                )
        if problems:
            raise PydanticCustomError("vitspec_rule", "\n".join(problems))
        return self

    # ---- derived values -------------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns)."""
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation and register tokens, in that order."""
        return int(self.class_token) + int(self.distillation_token) + self.reg_tokens

    @property
    def seq_len(self) -> int:
        """Tokens seen by the encoder: patches plus the class token."""
        return self.n_patches + self.n_prefix_tokens

    @property
    def n_positions(self) -> int:
        """Rows of a learned position embedding (0 when it is not learned)."""
        if self.pos_embed != "learned":
            return 0
        return self.n_patches + self.n_position_prefix

    @property
    def n_position_prefix(self) -> int:
        """Rows of a learned position embedding that belong to prefix tokens (0 or n_prefix_tokens)."""
        return self.n_prefix_tokens if self.pos_embed_class_slot else 0

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    @property
    def mlp_dim(self) -> int:
        return round(self.hidden_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: patch_h * patch_w * in_channels."""
        return self.patch_size[0] * self.patch_size[1] * self.in_channels

    @property
    def features_dim(self) -> int:
        """Width of the vector the head sees (pre-logits width if there is one)."""
        return self.pre_logits_dim or self.hidden_dim

    @property
    def output_dim(self) -> int:
        """Width of the model output: classes, or the features when there is no head."""
        return self.n_classes or self.features_dim

    @property
    def n_params(self) -> int:
        """Number of parameters (equals timm's count for the same architecture)."""
        from vitspec.layout import param_table

        return sum(math.prod(p.shape) for p in param_table(self))

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one forward pass on one image (matmuls only)."""
        n, d, m = self.seq_len, self.hidden_dim, self.mlp_dim
        patch = self.n_patches * self.patch_dim * d
        mlp_layers = 3 if self.mlp == "swiglu" else 2
        block = n * d * 3 * d + 2 * n * n * d + n * d * d + mlp_layers * n * d * m
        tail = self.hidden_dim * self.pre_logits_dim + self.features_dim * self.n_classes
        if self.distillation_token:
            tail += self.features_dim * self.n_classes
        if self.pooling == "map":  # probe query, keys and values of every token, one output
            tail += d * d + 2 * n * d * d + 2 * n * d + d * d + 2 * d * m
        return patch + self.depth * block + tail

    @property
    def flops(self) -> int:
        """Floating-point operations of one forward pass on one image: 2 * MACs (norms, softmax, GELU not counted)."""
        return 2 * self.macs

    # ---- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; square sizes are written as one integer."""
        data = self.model_dump()
        for key in ("image_size", "patch_size"):
            h, w = data[key]
            data[key] = h if h == w else [h, w]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    def to_yaml(self) -> str:
        """Block-style YAML, one field a line, in declaration order; pairs stay inline ([24, 40])."""
        import yaml

        class _Dumper(yaml.SafeDumper):
            pass

        _Dumper.add_representer(
            list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
        )
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Spec:
        """Validate a mapping; every problem is reported at once as a SpecError."""
        if not isinstance(data, dict):
            raise SpecError(
                [f"a spec must be a mapping of field: value, found {_kind(data)}"], source
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = _describe_errors(exc, data)
            known = {k: v for k, v in data.items() if k in cls.model_fields}
            if len(known) < len(data):
                # Unknown keys stop pydantic before the cross-field rules: check the rest too.
                try:
                    cls.model_validate(known)
                except ValidationError as rest:
                    problems += [p for p in _describe_errors(rest, known) if p not in problems]
            raise SpecError(problems, source) from None

    def replace(self, **changes: Any) -> Spec:
        """A copy with some fields changed, validated again.

        Fields that were set explicitly keep their values; derived defaults (pos_embed_class_slot)
        follow the changed fields, as if the spec had been written with the changes in it.
        """
        return Spec.from_dict({**self.model_dump(exclude_unset=True), **changes})


def _fmt_pair(pair: tuple[int, int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (an empty document)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, float):
        return f"a float ({value!r})"
    if isinstance(value, int):
        return f"an integer ({value!r})"
    return type(value).__name__


def _describe_errors(exc: ValidationError, data: dict[str, Any]) -> list[str]:
    """One readable message per pydantic error: field, rule, value."""
    known = list(Spec.model_fields)
    problems: list[str] = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else ""
        value = err.get("input")
        kind = err["type"]
        ctx = err.get("ctx") or {}
        if kind == "vitspec_rule":
            problems.extend(err["msg"].splitlines())
            continue
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(field, known, n=1, cutoff=0.5)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
            )
            problems.append(f"unknown field {field!r}{hint}")
            continue
        if kind == "missing":
            problems.append(f"{field} is required (for example {_EXAMPLES.get(field, '...')})")
            continue
        if field in ("image_size", "patch_size") and kind in {
            "tuple_type",
            "too_long",
            "too_short",
        }:
            problems.append(
                f"{field} must be a positive integer or a pair [height, width], found {_kind(data.get(field))}"
            )
            continue
        # pydantic gives no location for a string it cannot encode (a lone surrogate: tests/fuzz)
        where = (field or "a value") if len(loc) <= 1 else f"{field}[{loc[1]}]"
        if kind in {"int_type", "int_parsing", "int_from_float"}:
            problems.append(f"{where} must be an integer, found {_kind(value)}")
        elif kind in {"float_type", "float_parsing"}:
            problems.append(f"{where} must be a number, found {_kind(value)}")
        elif kind in {"bool_type", "bool_parsing"}:
            problems.append(f"{where} must be true or false, found {_kind(value)}")
        elif kind == "greater_than":
            problems.append(f"{where} must be greater than {ctx.get('gt')}, found {value!r}")
        elif kind == "greater_than_equal":
            problems.append(f"{where} must be at least {ctx.get('ge')}, found {value!r}")
        elif kind == "less_than":
            problems.append(f"{where} must be less than {ctx.get('lt')}, found {value!r}")
        elif kind == "finite_number":
            problems.append(f"{where} must be a finite number, found {value!r}")
        elif kind == "literal_error":
            problems.append(f"{where} must be one of {ctx.get('expected')}, found {value!r}")
        else:
            problems.append(f"{where}: {err['msg']} (found {value!r})")
    return problems


_EXAMPLES = {
    "image_size": "image_size: 224",
    "patch_size": "patch_size: 16",
    "hidden_dim": "hidden_dim: 768",
    "n_heads": "n_heads: 12",
    "depth": "depth: 12",
}


# ---- loading ---------------------------------------------------------------------------------


def read_mapping(path: Path) -> Any:
    """Parse a YAML or JSON file safely: size-capped, no binary, no YAML aliases."""
    name = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_FILE_BYTES:
            raise SpecError(
                [f"file is {size} bytes; a spec file is at most {MAX_SPEC_FILE_BYTES} bytes"], name
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError([f"cannot read the file: {exc.strerror or exc}"], name) from None
    if b"\x00" in raw:
        raise SpecError(["is a binary file, expected a YAML or JSON spec"], name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            [f"is not UTF-8 text (byte {exc.start}), expected a YAML or JSON spec"], name
        ) from None
    if not text.strip():
        raise SpecError(["is empty, expected a YAML or JSON spec"], name)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(
                [f"line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"], name
            ) from None
        except RecursionError:  # found by tests/fuzz: '[' * 100000
            raise SpecError([_TOO_DEEP], name) from None
    else:
        data = _safe_yaml(text, name)
    if not isinstance(data, dict):
        raise SpecError([f"a spec must be a mapping of field: value, found {_kind(data)}"], name)
    return data


# YAML 1.2 float notations that PyYAML (YAML 1.1) reads as strings: 1e-5, 1E-5, 5e-1, +.5, 1.0e5.
_FLOAT = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
    |[-+]?[0-9][0-9_]*\.[0-9_]*
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)
_yaml_loader: Any = None


def _loader() -> Any:
    """PyYAML's safe loader with YAML 1.2's float resolver (built once, on first use: yaml is lazy)."""
    global _yaml_loader
    if _yaml_loader is None:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        float_tag = "tag:yaml.org,2002:float"
        Loader.yaml_implicit_resolvers = {
            first: [(tag, regexp) for tag, regexp in resolvers if tag != float_tag]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }
        # Added after the int resolver of each first character, so 12 and 012 stay integers.
        Loader.add_implicit_resolver(float_tag, _FLOAT, list("-+0123456789."))
        _yaml_loader = Loader
    return _yaml_loader


def load_yaml(text: str) -> Any:
    """Parse YAML safely, reading every float notation (``1e-5``, ``.5``) as a number."""
    import yaml

    return yaml.load(text, Loader=_loader())  # a SafeLoader subclass: builds no Python objects


def _safe_yaml(text: str, name: str) -> Any:
    import yaml

    try:
        # Aliases are refused before anything is built: an alias bomb costs nothing to reject.
        depth = 0
        for event in yaml.parse(text, Loader=_loader()):
            # PyYAML's scanner slows quadratically with nesting (5000 levels: seconds) and its
            # composer recurses: a spec is two levels deep, so deep nesting stops here (tests/fuzz).
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > _MAX_DEPTH:
                    raise SpecError([_TOO_DEEP], name)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                mark = event.start_mark
                raise SpecError(
                    [
                        f"line {mark.line + 1} column {mark.column + 1}: YAML anchors and aliases are not allowed in a spec"
                    ],
                    name,
                )
        return load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        raise SpecError([f"{where}invalid YAML: {exc.problem or exc.context}"], name) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"invalid YAML: {exc}"], name) from None
    except RecursionError:  # found by tests/fuzz: 'a: ' + '[' * 5000
        raise SpecError([_TOO_DEEP], name) from None


_MAX_DEPTH = 32
_TOO_DEEP = "nested too deeply to be a spec (lists or mappings more than 32 levels deep)"
