"""The PyTorch backend: a plain ``nn.Module`` ViT with timm's parameter names, taking NCHW images.

The native model, ``VisionTransformer(spec)``, works without vitspec's adapter:
``state_dict``/``load_state_dict``, ``torch.compile`` and ``torch.export.export`` all apply. Its
state_dict uses timm's ``VisionTransformer`` names and shapes (fused ``qkv``, ``(out, in)`` linears,
an OIHW patch convolution), so timm code and checkpoints fit where timm has the concept.

The native layout is the table ``vitspec.layouts.timm.TORCH``; what every backend shares is
``vitspec.backends.base.Backend``. Importing this module does not import torch: the model classes
are defined on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.backends.base import NO_CAPTURES, Backend, Captures, NativeArrays, ordered_captures
from vitspec.errors import InputError
from vitspec.init import init_weights
from vitspec.layout import drop_path_rates
from vitspec.layouts.timm import TORCH
from vitspec.reference import sincos2d
from vitspec.spec import Spec

# ---- the native model (torch, defined on first use) --------------------------------------------

MODEL_CLASSES = ("PatchEmbed", "Attention", "Mlp", "Block", "VisionTransformer")


def __getattr__(name: str) -> Any:
    """The model classes (``VisionTransformer``, ``Block``…): torch is imported on first access."""
    if name in MODEL_CLASSES:
        return _model_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _model_classes() -> dict[str, type]:
    """Import torch and define the model classes (kept out of module import on purpose)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def dropout(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
        return F.dropout(x, rate, training=True) if training and rate > 0 else x

    def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
        """Stochastic depth: zero whole samples' residual branch, scale the rest by 1 / keep."""
        if not training or rate <= 0:
            return x
        keep = 1.0 - rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    class PatchEmbed(nn.Module):
        """Non-overlapping patches by a strided convolution: (B, C, H, W) -> (B, patches, D)."""

        def __init__(self, spec: Spec) -> None:
            super().__init__()
            self.proj = nn.Conv2d(
                spec.in_channels, spec.hidden_dim, spec.patch_size, stride=spec.patch_size
            )

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
            return (
                f"n_heads={self.n_heads}, attn_dropout={self.attn_dropout}, dropout={self.dropout}"
            )

        def forward(
            self, x: torch.Tensor, captures: Captures = NO_CAPTURES, prefix: str = ""
        ) -> torch.Tensor:
            b, n, d = x.shape
            # One statement each, so every temporary is freed before the next matmul (as in timm).
            x = self._heads(x, captures, prefix).transpose(1, 2).reshape(b, n, d)
            return dropout(self.proj(x), self.dropout, self.training)

        def _heads(self, x: torch.Tensor, captures: Captures, prefix: str) -> torch.Tensor:
            """Each head's output, (B, heads, N, head_dim)."""
            b, n, _ = x.shape
            q, k, v = (
                self.qkv(x)
                .reshape(b, n, 3, self.n_heads, self.head_dim)
                .permute(2, 0, 3, 1, 4)
                .unbind(0)
            )
            p_attn = self.attn_dropout if self.training else 0.0
            if not (
                captures.wants(f"{prefix}.attn_probs") or captures.wants(f"{prefix}.attn_heads")
            ):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p_attn)
            # The fused kernel never materialises the probabilities; this path does, to keep them.
            probs = captures.keep(
                f"{prefix}.attn_probs", ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            )
            return captures.keep(f"{prefix}.attn_heads", dropout(probs, p_attn, self.training) @ v)

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
            x = dropout(self.act(self.fc1(x)), self.dropout, self.training)
            return dropout(self.fc2(x), self.dropout, self.training)

    class Block(nn.Module):
        """Pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x)), with stochastic depth."""

        def __init__(self, spec: Spec, drop_path: float = 0.0) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(spec.hidden_dim, eps=spec.norm_eps)
            self.attn = Attention(spec)
            self.norm2 = nn.LayerNorm(spec.hidden_dim, eps=spec.norm_eps)
            self.mlp = Mlp(spec)
            self.drop_path = drop_path

        def extra_repr(self) -> str:
            return f"drop_path={self.drop_path}"

        def forward(
            self, x: torch.Tensor, captures: Captures = NO_CAPTURES, prefix: str = ""
        ) -> torch.Tensor:
            attn = captures.keep(f"{prefix}.attn", self.attn(self.norm1(x), captures, prefix))
            x = x + drop_path(attn, self.drop_path, self.training)
            mlp = captures.keep(f"{prefix}.mlp", self.mlp(self.norm2(x)))
            return captures.keep(prefix, x + drop_path(mlp, self.drop_path, self.training))

    class VisionTransformer(nn.Module):
        """A ViT built from a vitspec Spec: NCHW float images in, logits (or features) out.

        ``weights`` are canonical vitspec weights (None: ``vitspec.init_weights(spec, seed)``;
        both None: the parameters are left unset, for weights loaded next). The model is built
        in training mode, as every ``nn.Module``; the state_dict has timm's names.
        """

        def __init__(
            self,
            spec: Spec,
            weights: Mapping[str, Any] | None = None,
            seed: int | None = 0,
            device: torch.device | str | None = None,
        ) -> None:
            super().__init__()
            self.spec = spec
            d = spec.hidden_dim
            # Built on the meta device, then filled once from the canonical weights: no throw-away init.
            with torch.device("meta"):
                self.patch_embed = PatchEmbed(spec)
                if spec.class_token:
                    self.cls_token = nn.Parameter(torch.empty(1, 1, d))
                if spec.pos_embed == "learned":
                    self.pos_embed = nn.Parameter(torch.empty(1, spec.n_positions, d))
                self.blocks = nn.ModuleList(Block(spec, rate) for rate in drop_path_rates(spec))
                before = spec.final_norm == "before_pool"
                self.norm = nn.LayerNorm(d, eps=spec.norm_eps) if before else nn.Identity()
                self.fc_norm = nn.Identity() if before else nn.LayerNorm(d, eps=spec.norm_eps)
                self.pre_logits: nn.Module
                if spec.pre_logits_dim:
                    self.pre_logits = nn.Sequential()
                    self.pre_logits.add_module("fc", nn.Linear(d, spec.pre_logits_dim))
                    self.pre_logits.add_module("act", nn.Tanh())
                else:
                    self.pre_logits = nn.Identity()
                self.head = (
                    nn.Linear(spec.features_dim, spec.n_classes)
                    if spec.n_classes
                    else nn.Identity()
                )
            self.to_empty(device=device or "cpu")
            if spec.pos_embed == "sincos2d":
                # Fixed, so a non-persistent buffer: it follows .to() but stays out of the state_dict.
                table = torch.from_numpy(sincos2d(spec.grid, d).astype(np.float32))[None]
                self.register_buffer(
                    "pos_embed", table.to(self.patch_embed.proj.weight.device), persistent=False
                )
            if weights is None and seed is not None:
                weights = init_weights(spec, seed)
            if weights is not None:
                TorchBackend().load(self, weights)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """(B, C, H, W) float images -> (B, n_classes) logits, or (B, features) with no head."""
            return self._forward(x, NO_CAPTURES)

        def forward_captures(
            self, x: torch.Tensor, capture: Iterable[str] | str = "all"
        ) -> dict[str, torch.Tensor]:
            """The named capture points (``vitspec.capture_points(spec)``, or "all") in forward order, then "output"."""
            captures = Captures(ordered_captures(self.spec, capture))
            return captures.result(self._forward(x, captures))

        def _forward(self, x: torch.Tensor, captures: Captures) -> torch.Tensor:
            spec = self.spec
            want = (spec.in_channels, *spec.image_size)
            if x.ndim != 4 or tuple(x.shape[1:]) != want:
                raise InputError(
                    f"images: expected shape (batch, {want[0]}, {want[1]}, {want[2]}) NCHW, found {tuple(x.shape)}"
                )
            x = captures.keep("patch_embed", self.patch_embed(x))
            x = captures.keep("embed", dropout(self._embed(x), spec.dropout, self.training))
            for i, block in enumerate(self.blocks):
                x = block(x, captures, f"blocks.{i}")
            x = captures.keep("encoded", self.norm(x))
            x = x[:, 0] if spec.pooling == "token" else x[:, spec.n_prefix_tokens :].mean(dim=1)
            x = captures.keep("pooled", self.fc_norm(x))
            if spec.pre_logits_dim:
                x = captures.keep("pre_logits", self.pre_logits(x))
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

    classes = (PatchEmbed, Attention, Mlp, Block, VisionTransformer)
    for cls in classes:  # reprs, tracebacks and pickles name vitspec.backends.torch.<name>
        cls.__qualname__ = cls.__name__
    return {cls.__name__: cls for cls in classes}


# ---- the backend ---------------------------------------------------------------------------------


class TorchBackend(Backend):
    """PyTorch behind ``vitspec.backends.Backend``; models are built on the CPU."""

    name = "torch"
    layout = TORCH
    frameworks = ("torch",)
    precision = "no TF32 (off during each forward)"

    def __init__(self) -> None:
        import torch

        self.version: str = torch.__version__

    def build(
        self, spec: Spec, weights: Mapping[str, np.ndarray] | None = None, seed: int = 0
    ) -> Any:
        return _model_classes()["VisionTransformer"](spec, weights, seed).eval()

    def write_native(self, model: Any, native: Iterable[tuple[str, np.ndarray]]) -> None:
        import torch

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, array in native:
                if array.dtype.name not in ("float16", "float32", "float64"):
                    array = array.astype(
                        np.float32
                    )  # e.g. ml_dtypes bfloat16, which torch cannot wrap
                if not array.flags.writeable:
                    array = (
                        array.copy()
                    )  # torch.from_numpy warns on read-only memory (mmapped files)
                params[name].copy_(torch.from_numpy(array))

    def read_native(self, model: Any) -> Mapping[str, np.ndarray]:
        import torch

        def to_numpy(tensor: torch.Tensor) -> np.ndarray:
            tensor = tensor.detach().cpu()
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()  # NumPy has no bfloat16; widening is exact
            return tensor.numpy().copy()

        return NativeArrays(model.state_dict(), to_numpy)

    def run(self, model: Any, images: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        import torch

        weight = model.patch_embed.proj.weight
        if images.dtype.name not in ("float16", "float32", "float64"):
            images = images.astype(np.float32)
        was_training = model.training
        model.eval()
        # TF32 is off for this forward only: forward gives the reference's float32 numbers, and
        # outside it the setting stays the user's (their training may want TF32). Two flags in
        # torch: matmuls, and cuDNN convolutions (the patch embedding).
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.inference_mode():
                # Contiguous NCHW, so the adapter gives the very numbers of model(nchw) (conv order).
                x = torch.from_numpy(np.ascontiguousarray(images)).to(weight.device, weight.dtype)
                got = model.forward_captures(x.permute(0, 3, 1, 2).contiguous(), names)
                return {name: value.float().cpu().numpy() for name, value in got.items()}
        finally:
            model.train(was_training)
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def save_artifact(self, model: Any, path: str | Path, batch: int | None) -> Path:
        """Write a ``torch.export`` program (``.pt2``) taking (batch, C, H, W) float images.

        ``batch`` fixes the batch size; None leaves it symbolic (any batch). Load it with torch
        alone: ``torch.export.load(path).module()(images)``.
        """
        import torch

        self.check_batch(batch)
        spec = model.spec
        weight = model.patch_embed.proj.weight
        # A symbolic batch is traced with 2 images: torch.export specialises a dimension of size 1.
        example = torch.zeros(
            batch or 2, spec.in_channels, *spec.image_size, dtype=weight.dtype, device=weight.device
        )
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

    def threads(self) -> int:
        import torch

        return torch.get_num_threads()
