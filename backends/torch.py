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
from vitspec.resample import grid_matrices
from vitspec.spec import Spec

# ---- the native model (torch, defined on first use) --------------------------------------------

MODEL_CLASSES = (
    "QuickGELU",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "LayerScale",
    "Block",
    "AttentionPool",
    "VisionTransformer",
)


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

    def make_norm(spec: Spec, width: int) -> nn.Module:
        """The spec's norm kind: LayerNorm (weight, bias) or RMSNorm (weight only), as timm's."""
        if spec.norm == "rms":
            return nn.RMSNorm(width, eps=spec.norm_eps)
        return nn.LayerNorm(width, eps=spec.norm_eps)

    class QuickGELU(nn.Module):
        """``x * sigmoid(1.702 x)``: OpenAI CLIP's activation (timm's ``QuickGELU``)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(1.702 * x)

    def activation(kind: str) -> nn.Module:
        if kind == "quick":
            return QuickGELU()
        return nn.GELU(approximate="tanh" if kind == "tanh" else "none")

    class PatchEmbed(nn.Module):
        """Non-overlapping patches by a strided convolution: (B, C, H, W) -> (B, patches, D),
        then the patch norm when the spec has one (timm's ``embed_norm_layer``)."""

        def __init__(self, spec: Spec) -> None:
            super().__init__()
            self.proj = nn.Conv2d(
                spec.in_channels,
                spec.hidden_dim,
                spec.patch_size,
                stride=spec.patch_size,
                bias=spec.patch_bias,
            )
            self.norm = make_norm(spec, spec.hidden_dim) if spec.patch_norm else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.proj(x).flatten(2).transpose(1, 2)
            return x if self.norm is None else self.norm(x)

    class Attention(nn.Module):
        """Multi-head self-attention with a fused qkv projection (timm's names and layout), and
        timm's ``q_norm``/``k_norm`` on each head's queries and keys when the spec has qk_norm."""

        def __init__(self, spec: Spec) -> None:
            super().__init__()
            d = spec.hidden_dim
            self.n_heads, self.head_dim = spec.n_heads, spec.head_dim
            self.scale = spec.head_dim**-0.5
            self.attn_dropout, self.dropout = spec.attn_dropout, spec.dropout
            self.qkv = nn.Linear(d, 3 * d, bias=spec.qkv_bias)
            self.q_norm = make_norm(spec, spec.head_dim) if spec.qk_norm else None
            self.k_norm = make_norm(spec, spec.head_dim) if spec.qk_norm else None
            self.proj = nn.Linear(d, d, bias=spec.proj_bias)

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
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
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
        """timm's Mlp (fc1 -> GELU -> dropout -> [norm] -> fc2 -> dropout) or, with ``swiglu``,
        timm's SwiGLU (silu(fc1_g(x)) * fc1_x(x) -> dropout -> [norm] -> fc2 -> dropout)."""

        def __init__(self, spec: Spec, swiglu: bool, bias: bool, norm: bool, rate: float) -> None:
            super().__init__()
            d, m = spec.hidden_dim, spec.mlp_dim
            self.swiglu = swiglu
            if swiglu:
                self.fc1_g = nn.Linear(d, m, bias=bias)  # the gate (silu) branch
                self.fc1_x = nn.Linear(d, m, bias=bias)  # the linear branch
                self.act: nn.Module = nn.SiLU()
            else:
                self.fc1 = nn.Linear(d, m, bias=bias)
                self.act = activation(spec.gelu)
            self.norm = make_norm(spec, m) if norm else None
            self.fc2 = nn.Linear(m, d, bias=bias)
            self.dropout = rate

        def extra_repr(self) -> str:
            return f"dropout={self.dropout}"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act(self.fc1_g(x)) * self.fc1_x(x) if self.swiglu else self.act(self.fc1(x))
            x = dropout(x, self.dropout, self.training)
            if self.norm is not None:
                x = self.norm(x)
            return dropout(self.fc2(x), self.dropout, self.training)

    class LayerScale(nn.Module):
        """A learned per-channel scale on a residual branch (timm's ``LayerScale``, ``gamma``)."""

        def __init__(self, width: int) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.empty(width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gamma

    class Block(nn.Module):
        """Pre-norm encoder block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), with
        stochastic depth (the layer scales only when the spec has them)."""

        def __init__(self, spec: Spec, drop_path: float = 0.0) -> None:
            super().__init__()
            d, scaled = spec.hidden_dim, spec.layer_scale is not None
            self.norm1 = make_norm(spec, d)
            self.attn = Attention(spec)
            self.ls1 = LayerScale(d) if scaled else None
            self.norm2 = make_norm(spec, d)
            self.mlp = Mlp(spec, spec.mlp == "swiglu", spec.mlp_bias, spec.mlp_norm, spec.dropout)
            self.ls2 = LayerScale(d) if scaled else None
            self.drop_path = drop_path

        def extra_repr(self) -> str:
            return f"drop_path={self.drop_path}"

        def forward(
            self, x: torch.Tensor, captures: Captures = NO_CAPTURES, prefix: str = ""
        ) -> torch.Tensor:
            attn = self.attn(self.norm1(x), captures, prefix)
            if self.ls1 is not None:
                attn = self.ls1(attn)
            x = x + drop_path(captures.keep(f"{prefix}.attn", attn), self.drop_path, self.training)
            mlp = self.mlp(self.norm2(x))
            if self.ls2 is not None:
                mlp = self.ls2(mlp)
            mlp = captures.keep(f"{prefix}.mlp", mlp)
            return captures.keep(prefix, x + drop_path(mlp, self.drop_path, self.training))

    class AttentionPool(nn.Module):
        """Multi-head attention pooling (timm's ``AttentionPoolLatent``, SigLIP's MAP head): a learned
        latent query attends over every token, then ``x + mlp(norm(x))``. (B, N, D) -> (B, D)."""

        def __init__(self, spec: Spec) -> None:
            super().__init__()
            d = spec.hidden_dim
            self.n_heads, self.head_dim = spec.n_heads, spec.head_dim
            self.scale = spec.head_dim**-0.5
            self.latent = nn.Parameter(torch.empty(1, 1, d))
            self.q = nn.Linear(d, d)
            self.kv = nn.Linear(d, 2 * d)  # rows k, v (timm's fused kv)
            self.proj = nn.Linear(d, d)
            self.norm = make_norm(spec, d)
            self.mlp = Mlp(spec, swiglu=False, bias=True, norm=False, rate=0.0)

        def forward(self, x: torch.Tensor, captures: Captures = NO_CAPTURES) -> torch.Tensor:
            b, n, d = x.shape
            q = self.q(self.latent).reshape(1, 1, self.n_heads, self.head_dim).transpose(1, 2)
            q = q.expand(b, -1, -1, -1)
            k, v = (
                self.kv(x)
                .reshape(b, n, 2, self.n_heads, self.head_dim)
                .permute(2, 0, 3, 1, 4)
                .unbind(0)
            )
            if captures.wants("pool.attn_probs"):
                probs = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
                x = captures.keep("pool.attn_probs", probs) @ v
            else:
                x = F.scaled_dot_product_attention(q, k, v)
            # (B, heads, 1, head_dim): one query, so the heads are already contiguous per image
            x = captures.keep("pool.attn", self.proj(x.reshape(b, d)))
            return x + captures.keep("pool.mlp", self.mlp(self.norm(x)))

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
            # Built on the meta device, then filled once from the canonical weights: no throw-away
            # init. Registration order is timm's, so the state_dict lists its names in timm's order.
            with torch.device("meta"):
                self.patch_embed = PatchEmbed(spec)
                if spec.class_token:
                    self.cls_token = nn.Parameter(torch.empty(1, 1, d))
                if spec.reg_tokens:
                    self.reg_token = nn.Parameter(torch.empty(1, spec.reg_tokens, d))
                if spec.pos_embed == "learned":
                    self.pos_embed = nn.Parameter(torch.empty(1, spec.n_positions, d))
                if spec.distillation_token:
                    self.dist_token = nn.Parameter(torch.empty(1, 1, d))
                self.norm_pre = make_norm(spec, d) if spec.pre_norm else None
                self.blocks = nn.ModuleList(Block(spec, rate) for rate in drop_path_rates(spec))
                before = spec.final_norm == "before_pool"
                after = spec.final_norm == "after_pool"
                self.norm = make_norm(spec, d) if before else nn.Identity()
                self.attn_pool = AttentionPool(spec) if spec.pooling == "map" else None
                self.fc_norm = make_norm(spec, d) if after else nn.Identity()
                self.pre_logits: nn.Module
                if spec.pre_logits_dim:
                    self.pre_logits = nn.Sequential()
                    self.pre_logits.add_module("fc", nn.Linear(d, spec.pre_logits_dim))
                    self.pre_logits.add_module("act", nn.Tanh())
                else:
                    self.pre_logits = nn.Identity()
                k, features = spec.n_classes, spec.features_dim
                self.head = nn.Linear(features, k, bias=spec.head_bias) if k else nn.Identity()
                if spec.distillation_token:
                    self.head_dist = (
                        nn.Linear(features, k, bias=spec.head_bias) if k else nn.Identity()
                    )
            self.to_empty(device=device or "cpu")
            # Position tables for other grids (dynamic_image_size): grid, device, dtype -> tensors.
            self._grids: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}
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
            grid = self._grid(x)
            x = captures.keep("patch_embed", self.patch_embed(x))
            x = captures.keep("embed", dropout(self._embed(x, grid), spec.dropout, self.training))
            if self.norm_pre is not None:
                x = captures.keep("embed_norm", self.norm_pre(x))
            for i, block in enumerate(self.blocks):
                x = block(x, captures, f"blocks.{i}")
            x = captures.keep("encoded", self.norm(x))
            pooled = captures.keep("pooled", self.fc_norm(self._pool(x, captures)))
            if spec.distillation_token:  # DeiT: the mean of both heads (or of both tokens)
                pooled_dist = captures.keep("pooled_dist", x[:, 1])
                if not spec.n_classes:
                    return (pooled + pooled_dist) / 2
                head = captures.keep("head", self.head(pooled))
                return (head + captures.keep("head_dist", self.head_dist(pooled_dist))) / 2
            if spec.pre_logits_dim:
                pooled = captures.keep("pre_logits", self.pre_logits(pooled))
            return self.head(pooled)

        def _grid(self, x: torch.Tensor) -> tuple[int, int]:
            """The patch grid of NCHW images ``x``, or an InputError naming the expected shape."""
            spec = self.spec
            (ph, pw), c = spec.patch_size, spec.in_channels
            if spec.dynamic_image_size:
                if (
                    x.ndim != 4
                    or x.shape[1] != c
                    or x.shape[2] < ph
                    or x.shape[3] < pw
                    or x.shape[2] % ph
                    or x.shape[3] % pw
                ):
                    raise InputError(
                        f"images: expected shape (batch, {c}, height, width) NCHW with height a "
                        f"multiple of {ph} and width a multiple of {pw} (dynamic_image_size), "
                        f"found {tuple(x.shape)}"
                    )
                return x.shape[2] // ph, x.shape[3] // pw
            want = (c, *spec.image_size)
            if x.ndim != 4 or tuple(x.shape[1:]) != want:
                raise InputError(
                    f"images: expected shape (batch, {want[0]}, {want[1]}, {want[2]}) NCHW, found {tuple(x.shape)}"
                )
            return spec.grid

        def _embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
            """Prefix tokens (class, distillation, registers) and the position embedding, in the
            order the spec's position table implies."""
            spec = self.spec
            pos = self._positions(grid, x)
            if pos is not None and not spec.n_position_prefix:
                x = x + pos
            b = x.shape[0]
            prefix = []
            if spec.class_token:
                prefix.append(self.cls_token.expand(b, -1, -1))
            if spec.distillation_token:
                prefix.append(self.dist_token.expand(b, -1, -1))
            if spec.reg_tokens:
                prefix.append(self.reg_token.expand(b, -1, -1))
            if prefix:
                x = torch.cat([*prefix, x], dim=1)
            if pos is not None and spec.n_position_prefix:
                x = x + pos
            return x

        def _positions(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor | None:
            """The (1, rows, D) position table for ``grid``: the model's own on the spec's grid; on
            another (dynamic_image_size) a sin-cos table computed for it, or the learned table's
            patch rows resampled with ``vitspec.resample.grid_matrices`` (rows, then columns)."""
            spec = self.spec
            if spec.pos_embed == "none":
                return None
            if grid == spec.grid:
                return self.pos_embed
            key = (grid, like.device, like.dtype)
            if key not in self._grids:
                mats: tuple[np.ndarray, ...] = (
                    (sincos2d(grid, spec.hidden_dim)[None],)
                    if spec.pos_embed == "sincos2d"
                    else grid_matrices(spec.grid, grid, spec.pos_embed_resample)
                )
                self._grids[key] = tuple(
                    torch.from_numpy(m).to(like.device, like.dtype) for m in mats
                )
            if spec.pos_embed == "sincos2d":
                return self._grids[key][0]
            rows, cols = self._grids[key]
            lead, table = spec.n_position_prefix, self.pos_embed[0]
            patches = table[lead:].reshape(*spec.grid, spec.hidden_dim)
            patches = torch.einsum("ab,bcd->acd", rows, patches)
            patches = torch.einsum("ab,cbd->cad", cols, patches)
            return torch.cat([table[:lead], patches.flatten(0, 1)])[None]

        def _pool(self, x: torch.Tensor, captures: Captures) -> torch.Tensor:
            """(B, N, D) -> (B, D) by the spec's pooling (the prefix tokens take part only with
            pool_include_prefix, in avg/max/avgmax and map alike, as in timm)."""
            spec = self.spec
            if spec.pooling == "token":
                return x[:, 0]
            if not spec.pool_include_prefix:
                x = x[:, spec.n_prefix_tokens :]
            if self.attn_pool is not None:
                return self.attn_pool(x, captures)
            if spec.pooling == "avg":
                return x.mean(dim=1)
            if spec.pooling == "max":
                return x.amax(dim=1)
            return (x.mean(dim=1) + x.amax(dim=1)) * 0.5  # avgmax

        def extra_repr(self) -> str:
            return f"spec={self.spec.to_json()}"

    classes = (
        QuickGELU,
        PatchEmbed,
        Attention,
        Mlp,
        LayerScale,
        Block,
        AttentionPool,
        VisionTransformer,
    )
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
