"""The PyTorch backend: a plain ``nn.Module`` ViT with timm's parameter names, behind the protocol.

The native model, ``VisionTransformer(spec)``, takes NCHW float tensors and works without vitspec:
``state_dict``/``load_state_dict``, ``torch.compile`` and ``torch.export.export`` all apply. Its
state_dict uses timm's ``VisionTransformer`` names and shapes (fused ``qkv``, ``(out, in)`` linears,
an OIHW patch convolution), so timm code and checkpoints fit where timm has the concept.

The native layout (state_dict names and shapes, and the moves to and from canonical) is the table
``vitspec.layouts.timm.TORCH``. Importing this module does not import torch: the model classes
are defined on first use (``VisionTransformer``,
``Block``, ``Attention``, ``Mlp``, ``PatchEmbed`` are module attributes that import torch then).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitspec.errors import InputError
from vitspec.init import init_weights
from vitspec.layout import capture_points, check_capture
from vitspec.layouts.timm import TORCH
from vitspec.reference import check_images, sincos2d
from vitspec.spec import Spec
from vitspec.weights import check_weights

if TYPE_CHECKING:
    import torch


def drop_path_rates(spec: Spec) -> list[float]:
    """Stochastic-depth rate of each block: ``drop_path * i / (depth - 1)``; 0 for a single block (as timm)."""
    if spec.depth == 1:
        return [0.0]
    return [spec.drop_path * i / (spec.depth - 1) for i in range(spec.depth)]


# ---- the native model (torch, defined on first use) --------------------------------------------

_MODEL_CLASSES = ("VisionTransformer", "Block", "Attention", "Mlp", "PatchEmbed")


def __getattr__(name: str) -> Any:
    if name in _MODEL_CLASSES:
        return _model_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _model_classes() -> dict[str, type]:
    """The nn.Module classes, defined (and torch imported) once, on first use."""
    if "VisionTransformer" not in globals():
        globals().update(_define_model())
    return {name: globals()[name] for name in _MODEL_CLASSES}


class _Captures:
    """The capture points asked for, and the tensors kept so far."""

    def __init__(self, names: Iterable[str]) -> None:
        self.wanted = set(names)
        self.values: dict[str, torch.Tensor] = {}

    def wants(self, name: str) -> bool:
        return name in self.wanted

    def keep(self, name: str, value: torch.Tensor) -> None:
        if name in self.wanted:
            self.values[name] = value


def _define_model() -> dict[str, type]:
    """Import torch and define the nn.Module classes (kept out of module import on purpose)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
        """Stochastic depth: zero whole samples' residual branch, scale the rest by 1 / keep."""
        if rate == 0.0 or not training:
            return x
        keep = 1.0 - rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    class PatchEmbed(nn.Module):
        """Non-overlapping patches by a strided convolution: (B, C, H, W) -> (B, patches, D)."""

        def __init__(self, spec: Spec) -> None:
            super().__init__()
            self.proj = nn.Conv2d(spec.in_channels, spec.hidden_dim, spec.patch_size, stride=spec.patch_size)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x).flatten(2).transpose(1, 2)

    class Attention(nn.Module):
        """Multi-head self-attention with a fused qkv projection (timm's names and layout)."""

        def __init__(self, spec: Spec) -> None:
            super().__init__()
            d = spec.hidden_dim
            self.n_heads, self.head_dim = spec.n_heads, spec.head_dim
            self.scale = spec.head_dim**-0.5
            self.attn_dropout, self.dropout = spec.attn_dropout, spec.dropout
            self.qkv = nn.Linear(d, 3 * d, bias=spec.qkv_bias)
            self.proj = nn.Linear(d, d)

        def extra_repr(self) -> str:
            return f"n_heads={self.n_heads}, attn_dropout={self.attn_dropout}, dropout={self.dropout}"

        def forward(self, x: torch.Tensor, captures: _Captures | None = None, prefix: str = "") -> torch.Tensor:
            b, n, d = x.shape
            # One statement each, so every temporary is freed before the next matmul (as in timm).
            x = self._heads(x, captures, prefix).transpose(1, 2).reshape(b, n, d)
            x = self.proj(x)
            return F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x

        def _heads(self, x: torch.Tensor, captures: _Captures | None, prefix: str) -> torch.Tensor:
            """Each head's output, (B, heads, N, head_dim)."""
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            p_attn = self.attn_dropout if self.training else 0.0
            if captures is None or not (
                captures.wants(f"{prefix}.attn_probs") or captures.wants(f"{prefix}.attn_heads")
            ):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p_attn)
            # The fused kernel never materialises the probabilities; this path does, to keep them.
            probs = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            captures.keep(f"{prefix}.attn_probs", probs)
            heads = (F.dropout(probs, p_attn, training=True) if p_attn else probs) @ v
            captures.keep(f"{prefix}.attn_heads", heads)
            return heads

    class Mlp(nn.Module):
        """fc1 -> GELU -> dropout -> fc2 -> dropout, as timm's Mlp."""

        def __init__(self, spec: Spec) -> None:
            super().__init__()
            self.fc1 = nn.Linear(spec.hidden_dim, spec.mlp_dim)
            self.act = nn.GELU(approximate="tanh" if spec.gelu == "tanh" else "none")
            self.fc2 = nn.Linear(spec.mlp_dim, spec.hidden_dim)
            self.dropout = spec.dropout

        def extra_repr(self) -> str:
            return f"dropout={self.dropout}"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act(self.fc1(x))
            if self.dropout and self.training:
                x = F.dropout(x, self.dropout, training=True)
            x = self.fc2(x)
            return F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x

    class Block(nn.Module):
        """Pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x)), with stochastic depth."""

        def __init__(self, spec: Spec, drop_path_rate: float = 0.0) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(spec.hidden_dim, eps=spec.norm_eps)
            self.attn = Attention(spec)
            self.norm2 = nn.LayerNorm(spec.hidden_dim, eps=spec.norm_eps)
            self.mlp = Mlp(spec)
            self.drop_path = drop_path_rate

        def extra_repr(self) -> str:
            return f"drop_path={self.drop_path}"

        def forward(self, x: torch.Tensor, captures: _Captures | None = None, prefix: str = "") -> torch.Tensor:
            x = x + self._branch(self.attn(self.norm1(x), captures, prefix), captures, f"{prefix}.attn")
            x = x + self._branch(self.mlp(self.norm2(x)), captures, f"{prefix}.mlp")
            if captures is not None:
                captures.keep(prefix, x)
            return x

        def _branch(self, y: torch.Tensor, captures: _Captures | None, name: str) -> torch.Tensor:
            """A residual branch's output: kept if asked for, then stochastic depth."""
            if captures is not None:
                captures.keep(name, y)
            return drop_path(y, self.drop_path, self.training)

    class VisionTransformer(nn.Module):
        """A ViT built from a vitspec Spec; NCHW float images in, logits (or features) out.

        ``weights`` are canonical vitspec weights (``vitspec.init_weights(spec, seed)`` when None);
        the state_dict has timm's names (see ``native_layout``).
        """

        def __init__(
            self,
            spec: Spec,
            weights: Mapping[str, Any] | None = None,
            seed: int = 0,
            device: torch.device | str | None = None,
        ) -> None:
            super().__init__()
            self.spec = spec
            d = spec.hidden_dim
            # Built on the meta device, then filled once from the canonical weights: no throw-away init.
            with torch.device("meta"):
                if spec.class_token:
                    self.cls_token = nn.Parameter(torch.empty(1, 1, d))
                if spec.pos_embed == "learned":
                    self.pos_embed = nn.Parameter(torch.empty(1, spec.n_positions, d))
                self.patch_embed = PatchEmbed(spec)
                self.blocks = nn.ModuleList(Block(spec, rate) for rate in drop_path_rates(spec))
                before = spec.final_norm == "before_pool"
                self.norm = nn.LayerNorm(d, eps=spec.norm_eps) if before else nn.Identity()
                self.fc_norm = nn.Identity() if before else nn.LayerNorm(d, eps=spec.norm_eps)
                if spec.pre_logits_dim:
                    self.pre_logits = nn.Sequential()
                    self.pre_logits.add_module("fc", nn.Linear(d, spec.pre_logits_dim))
                    self.pre_logits.add_module("act", nn.Tanh())
                else:
                    self.pre_logits = nn.Identity()
                self.head = nn.Linear(spec.features_dim, spec.n_classes) if spec.n_classes else nn.Identity()
            self.to_empty(device=device or "cpu")
            if spec.pos_embed == "sincos2d":
                # Fixed, so a non-persistent buffer: it follows .to() but stays out of the state_dict.
                table = torch.from_numpy(sincos2d(spec.grid, d).astype(np.float32))[None]
                self.register_buffer("pos_embed", table.to(self.patch_embed.proj.weight.device), persistent=False)
            _copy_weights(self, weights if weights is not None else init_weights(spec, seed))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """(B, C, H, W) float images -> (B, n_classes) logits, or (B, features) with no head."""
            return self._forward(x, None)

        def forward_captures(self, x: torch.Tensor, capture: Iterable[str] | str = "all") -> dict[str, torch.Tensor]:
            """The output and the named capture points (``vitspec.capture_points(spec)``, or "all")."""
            names = check_capture(self.spec, capture if isinstance(capture, str) else tuple(capture))
            captures = _Captures(names)
            output = self._forward(x, captures)
            return {**captures.values, "output": output}

        def _forward(self, x: torch.Tensor, captures: _Captures | None) -> torch.Tensor:
            spec = self.spec
            want = (spec.in_channels, *spec.image_size)
            if x.ndim != 4 or tuple(x.shape[1:]) != want:
                raise InputError(f"images: expected shape (batch, {want[0]}, {want[1]}, {want[2]}) NCHW, found {tuple(x.shape)}")
            keep = captures.keep if captures is not None else None
            x = self.patch_embed(x)
            if keep:
                keep("patch_embed", x)
            x = self._embed(x)
            if spec.dropout and self.training:
                x = F.dropout(x, spec.dropout, training=True)
            if keep:
                keep("embed", x)
            for i, block in enumerate(self.blocks):
                x = block(x, captures, f"blocks.{i}")
            x = self.norm(x)
            if keep:
                keep("encoded", x)
            x = x[:, 0] if spec.pooling == "token" else x[:, spec.n_prefix_tokens :].mean(dim=1)
            x = self.fc_norm(x)
            if keep:
                keep("pooled", x)
            if spec.pre_logits_dim:
                x = self.pre_logits(x)
                if keep:
                    keep("pre_logits", x)
            return self.head(x)

        def _embed(self, x: torch.Tensor) -> torch.Tensor:
            """Class token and position embedding, in the order the spec's position table implies."""
            spec = self.spec
            if spec.pos_embed != "none" and not spec.pos_embed_class_slot:
                x = x + self.pos_embed
            if spec.class_token:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            if spec.pos_embed_class_slot:
                x = x + self.pos_embed
            return x

        def extra_repr(self) -> str:
            return f"spec={self.spec.to_json()}"

    classes: dict[str, type] = {
        "PatchEmbed": PatchEmbed,
        "Attention": Attention,
        "Mlp": Mlp,
        "Block": Block,
        "VisionTransformer": VisionTransformer,
    }
    for name, cls in classes.items():
        # Importable (and picklable) as vitspec.backends.torch.<name>, not as a function's local.
        cls.__module__, cls.__qualname__ = __name__, name
    return classes


def _copy_weights(model: Any, weights: Mapping[str, Any]) -> None:
    """Check canonical weights against the model's spec, then copy them in one tensor at a time."""
    import torch

    check_weights(model.spec, weights)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, array in TORCH.to_native(model.spec, weights):
            if array.dtype.name not in ("float16", "float32", "float64"):
                array = array.astype(np.float32)  # e.g. ml_dtypes bfloat16, which torch cannot wrap
            if not array.flags.writeable:
                array = array.copy()  # torch.from_numpy warns on read-only memory (mmapped files)
            params[name].copy_(torch.from_numpy(array))


# ---- the backend ---------------------------------------------------------------------------------


class TorchBackend:
    """PyTorch behind the vitspec backend protocol."""

    name = "torch"

    def __init__(self) -> None:
        import torch

        self.version: str = torch.__version__

    def build(self, spec: Spec, weights: Mapping[str, np.ndarray] | None = None, seed: int = 0) -> Any:
        """A ``VisionTransformer`` in eval mode; weights None: ``vitspec.init_weights(spec, seed)``."""
        return _model_classes()["VisionTransformer"](spec, weights, seed).eval()

    def load(self, model: Any, weights: Mapping[str, np.ndarray]) -> Any:
        """Copy canonical weights into ``model``; one WeightsError lists every mismatch."""
        _copy_weights(model, weights)
        return model

    def export(self, model: Any) -> dict[str, np.ndarray]:
        """Canonical weights (fresh NumPy arrays in the parameters' dtype), bit for bit."""
        import torch

        state = model.state_dict()

        class _Native(Mapping[str, np.ndarray]):
            def __getitem__(self, name: str) -> np.ndarray:
                tensor = state[name].detach().cpu()
                if tensor.dtype == torch.bfloat16:
                    tensor = tensor.float()  # NumPy has no bfloat16; widening is exact
                return tensor.numpy().copy()

            def __iter__(self) -> Iterator[str]:
                return iter(state)

            def __len__(self) -> int:
                return len(state)

        return dict(TORCH.from_native(model.spec, _Native()))

    def forward(self, model: Any, images: np.ndarray, capture: Iterable[str] | str = ()) -> dict[str, np.ndarray]:
        """NHWC NumPy images in; float32 NumPy ``output`` and the requested capture points out.

        Runs in eval mode under ``torch.inference_mode()`` with TF32 off for matmuls and cuDNN
        convolutions (the model's mode and both flags are restored after).
        """
        import torch

        names = check_capture(model.spec, capture if isinstance(capture, str) else tuple(capture))
        array = check_images(model.spec, images)
        weight = model.patch_embed.proj.weight
        if array.dtype.name not in ("float16", "float32", "float64"):
            array = array.astype(np.float32)
        was_training = model.training
        model.eval()
        # cuDNN convolutions default to TF32 on GPUs (the patch embedding): off, as the reference.
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.inference_mode():
                # Contiguous NCHW, so the adapter gives the very numbers of model(nchw) (conv order).
                x = torch.from_numpy(np.ascontiguousarray(array)).to(weight.device, weight.dtype)
                x = x.permute(0, 3, 1, 2).contiguous()
                got = model.forward_captures(x, names) if names else {"output": model(x)}
                return {k: got[k].float().contiguous().cpu().numpy() for k in (*_ordered(model.spec, names), "output")}
        finally:
            model.train(was_training)
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def save_artifact(self, model: Any, path: str | Path, batch: int | None) -> Path:
        """Write a ``torch.export`` program (``.pt2``) taking (batch, C, H, W) float images.

        ``batch`` fixes the batch size; None leaves it symbolic (any batch). Load it with torch
        alone: ``torch.export.load(path).module()(images)``.
        """
        import torch

        if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
            raise InputError(f"batch: expected a positive integer or None, found {batch!r}")
        spec = model.spec
        weight = model.patch_embed.proj.weight
        # A symbolic batch is traced with 2 images: torch.export specialises a dimension of size 1.
        example = torch.zeros(batch or 2, spec.in_channels, *spec.image_size, dtype=weight.dtype, device=weight.device)
        dynamic = None if batch else ({0: torch.export.Dim("batch", min=1)},)
        was_training = model.training
        model.eval()  # dropout is traced away only in eval mode
        try:
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
        finally:
            model.train(was_training)
        path = Path(path)
        torch.export.save(program, path)
        return path


def _ordered(spec: Spec, names: Iterable[str]) -> list[str]:
    """Requested capture points in forward order, without ``output`` (added last by the caller)."""
    wanted = set(names)
    return [n for n in capture_points(spec) if n in wanted and n != "output"]

