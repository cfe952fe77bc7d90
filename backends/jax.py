"""The JAX backend: a Flax NNX ViT taking NHWC images.

The native model, ``VisionTransformer(spec)``, is a plain ``flax.nnx.Module``: usable alone under
``jax.jit``/``nnx.jit`` and ``jax.grad``/``nnx.grad``, with ``model.train()``/``model.eval()`` for
dropout and its spec as the static attribute ``model.spec``. Native names are the flattened
``nnx.state(model, nnx.Param)`` paths joined with "."; they follow the canonical names except that
query, key and value are one fused ``attn.qkv`` kernel ``(D, 3D)`` (one matmul) and the patch
embedding is a dense layer on flattened patches ``(patch_h * patch_w * C, D)`` (faster than a
strided conv on CPU; docs/backends/jax.md).

The native layout is the table ``vitspec.layouts.flax.FLAX``; what every backend shares is
``vitspec.backends.base.Backend``. Importing this module does not import jax or flax: the model
classes are defined on first use. ``forward`` is jitted once per (graph, capture set, input
shape) and computes in float32; jax's 64-bit mode is never switched on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.backends.base import NO_CAPTURES, Backend, Captures, NativeArrays, ordered_captures
from vitspec.init import init_weights
from vitspec.layout import drop_path_rates, grid_of
from vitspec.layouts.flax import FLAX
from vitspec.reference import sincos2d
from vitspec.resample import grid_matrices
from vitspec.spec import Spec

# ---- the native model (Flax NNX, defined on first use) -----------------------------------------

MODEL_CLASSES = (
    "PatchEmbed",
    "Dropout",
    "LayerScale",
    "Attention",
    "Mlp",
    "Block",
    "AttentionPool",
    "VisionTransformer",
)


def __getattr__(name: str) -> Any:
    """The model classes (``VisionTransformer``, ``Block``…): jax and flax are imported on first access."""
    if name in MODEL_CLASSES:
        return _model_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _model_classes() -> dict[str, type]:
    """Import jax and flax and define the model classes (kept out of module import on purpose)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    zeros = nnx.initializers.zeros_init()

    def linear(din: int, dout: int, **kwargs: Any) -> nnx.Linear:
        # Zeros now, real weights at once from `load`; the init key is never used.
        return nnx.Linear(din, dout, kernel_init=zeros, rngs=nnx.Rngs(params=0), **kwargs)

    def norm(spec: Spec, width: int | None = None) -> nnx.LayerNorm | nnx.RMSNorm:
        """The spec's norm kind over ``width`` features (default hidden_dim)."""
        width = width or spec.hidden_dim
        if spec.norm == "rms":
            return nnx.RMSNorm(width, epsilon=spec.norm_eps, rngs=nnx.Rngs(params=0))
        # Two-pass variance: E[x²] - E[x]² loses digits when the mean is large.
        return nnx.LayerNorm(
            width, epsilon=spec.norm_eps, use_fast_variance=False, rngs=nnx.Rngs(params=0)
        )

    def param(*shape: int) -> nnx.Param:
        return nnx.Param(jnp.zeros(shape, jnp.float32))

    class Dropout(nnx.Dropout):
        """nnx.Dropout, its mask drawn as one flat vector then reshaped.

        XLA:CPU compiles a 4-D threefry mask feeding a matmul about ten times slower (measured
        9.5 s against 0.85 s for the attention probabilities of a tiny model).
        """

        def __call__(self, inputs: jax.Array) -> jax.Array:  # type: ignore[override]
            if self.deterministic or self.rate == 0.0:
                return inputs
            shape = [1 if i in self.broadcast_dims else n for i, n in enumerate(inputs.shape)]
            keep = 1.0 - self.rate
            mask = jax.random.bernoulli(self.rngs(), keep, (math.prod(shape),)).reshape(shape)
            return jnp.where(mask, inputs / keep, jnp.zeros_like(inputs))

    def dropout(rate: float, rngs: nnx.Rngs, **kwargs: Any) -> Dropout | None:
        # No module at rate 0: the state stays free of RNG streams nobody uses.
        return Dropout(rate, deterministic=True, rngs=rngs, **kwargs) if rate > 0 else None

    def apply(module: Any, x: jax.Array) -> jax.Array:
        """An optional layer (dropout at rate 0, a norm or layer scale the spec lacks): None is the identity."""
        return x if module is None else module(x)

    def gelu(x: jax.Array, kind: str) -> jax.Array:
        """Exact GELU (erf), its tanh approximation, or QuickGELU (x * sigmoid(1.702 x), OpenAI CLIP's)."""
        if kind == "quick":
            return x * jax.nn.sigmoid(1.702 * x)
        return jax.nn.gelu(x, approximate=kind == "tanh")

    class PatchEmbed(nnx.Module):
        """Non-overlapping patches, flattened in (row, col, channel) order, through one dense layer:
        (B, H, W, C) -> (B, patches, D); the grid is the image's (the spec's unless
        ``dynamic_image_size``)."""

        def __init__(self, spec: Spec) -> None:
            self.kernel = param(spec.patch_dim, spec.hidden_dim)
            self.bias = param(spec.hidden_dim) if spec.patch_bias else None
            self.patch_size = spec.patch_size

        def __call__(self, images: jax.Array) -> jax.Array:
            b, h, w, c = images.shape
            ph, pw = self.patch_size
            gh, gw = h // ph, w // pw
            patches = images.reshape(b, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
            x = patches.reshape(b, gh * gw, ph * pw * c) @ self.kernel[...]
            return x if self.bias is None else x + self.bias[...]

    class LayerScale(nnx.Module):
        """A learned per-channel scale on a residual branch (DeiT-III, DINOv2; timm LayerScale)."""

        def __init__(self, spec: Spec) -> None:
            self.scale = param(spec.hidden_dim)

        def __call__(self, x: jax.Array) -> jax.Array:
            return x * self.scale[...]

    class Attention(nnx.Module):
        """Multi-head self-attention with a fused (D, 3D) query/key/value projection, and a norm
        on each head's queries and keys with ``qk_norm``."""

        def __init__(self, spec: Spec, rngs: nnx.Rngs) -> None:
            d = spec.hidden_dim
            self.n_heads = spec.n_heads
            self.qkv = linear(d, 3 * d, use_bias=spec.qkv_bias)
            self.q_norm = norm(spec, spec.head_dim) if spec.qk_norm else None
            self.k_norm = norm(spec, spec.head_dim) if spec.qk_norm else None
            self.out = linear(d, d, use_bias=spec.proj_bias)
            self.attn_drop = dropout(spec.attn_dropout, rngs)
            self.out_drop = dropout(spec.dropout, rngs)

        def __call__(
            self, x: jax.Array, captures: Captures = NO_CAPTURES, prefix: str = ""
        ) -> jax.Array:
            b, n, d = x.shape
            h = self.n_heads
            # Heads-first einsums with the query pre-scaled: faster on XLA:CPU than
            # jax.nn.dot_product_attention (docs/backends/jax.md, "Speed").
            q, k, v = self.qkv(x).reshape(b, n, 3, h, d // h).transpose(2, 0, 3, 1, 4)
            q, k = apply(self.q_norm, q), apply(self.k_norm, k)
            scores = jnp.einsum("bhqd,bhkd->bhqk", q / math.sqrt(d // h), k)
            probs = captures.keep(f"{prefix}.attn_probs", jax.nn.softmax(scores, axis=-1))
            heads = jnp.einsum("bhqk,bhkd->bqhd", apply(self.attn_drop, probs), v)
            if captures.wants(f"{prefix}.attn_heads"):
                captures.keep(f"{prefix}.attn_heads", heads.transpose(0, 2, 1, 3))
            return apply(self.out_drop, self.out(heads.reshape(b, n, d)))

    class Mlp(nnx.Module):
        """fc1 -> activation -> dropout -> (norm) -> fc2 -> dropout, as timm's Mlp; with
        ``swiglu`` the hidden layer is silu(gate(x)) * fc1(x), as timm's SwiGLU."""

        def __init__(
            self,
            spec: Spec,
            rngs: nnx.Rngs,
            *,
            swiglu: bool = False,
            bias: bool = True,
            hidden_norm: bool = False,
            rate: float = 0.0,
        ) -> None:
            d, m = spec.hidden_dim, spec.mlp_dim
            self.gate = linear(d, m, use_bias=bias) if swiglu else None
            self.fc1 = linear(d, m, use_bias=bias)
            self.norm = norm(spec, m) if hidden_norm else None
            self.fc2 = linear(m, d, use_bias=bias)
            self.drop = dropout(rate, rngs)
            self.gelu = spec.gelu  # a string, not a function: the graph stays hashable by value

        def __call__(self, x: jax.Array) -> jax.Array:
            if self.gate is None:
                hidden = gelu(self.fc1(x), self.gelu)
            else:
                hidden = jax.nn.silu(self.gate(x)) * self.fc1(x)
            hidden = apply(self.norm, apply(self.drop, hidden))
            return apply(self.drop, self.fc2(hidden))

    class Block(nnx.Module):
        """Pre-norm encoder block: x + drop_path(ls1(attn(norm1(x)))), then the same with the MLP."""

        def __init__(self, spec: Spec, drop_path: float, rngs: nnx.Rngs) -> None:
            scaled = spec.layer_scale is not None
            self.norm1 = norm(spec)
            self.attn = Attention(spec, rngs)
            self.ls1 = LayerScale(spec) if scaled else None
            self.norm2 = norm(spec)
            self.mlp = Mlp(
                spec,
                rngs,
                swiglu=spec.mlp == "swiglu",
                bias=spec.mlp_bias,
                hidden_norm=spec.mlp_norm,
                rate=spec.dropout,
            )
            self.ls2 = LayerScale(spec) if scaled else None
            # One mask value per sample, broadcast over tokens and channels.
            self.drop_path = dropout(drop_path, rngs, broadcast_dims=(1, 2))

        def __call__(
            self, x: jax.Array, captures: Captures = NO_CAPTURES, prefix: str = ""
        ) -> jax.Array:
            attn = apply(self.ls1, self.attn(self.norm1(x), captures, prefix))
            x = x + apply(self.drop_path, captures.keep(f"{prefix}.attn", attn))
            mlp = captures.keep(f"{prefix}.mlp", apply(self.ls2, self.mlp(self.norm2(x))))
            return captures.keep(prefix, x + apply(self.drop_path, mlp))

    class AttentionPool(nnx.Module):
        """Multi-head attention pooling (SigLIP's MAP head, timm AttentionPoolLatent): a learned
        probe attends over every token (key and value fused in one (D, 2D) ``kv`` projection),
        then ``x + mlp(norm(x))``."""

        def __init__(self, spec: Spec, rngs: nnx.Rngs) -> None:
            d = spec.hidden_dim
            self.n_heads = spec.n_heads
            self.probe = param(d)
            self.query = linear(d, d)
            self.kv = linear(d, 2 * d)
            self.out = linear(d, d)
            self.norm = norm(spec)
            self.mlp = Mlp(spec, rngs)

        def __call__(self, x: jax.Array, captures: Captures = NO_CAPTURES) -> jax.Array:
            b, n, d = x.shape
            h = self.n_heads
            k, v = self.kv(x).reshape(b, n, 2, h, d // h).transpose(2, 0, 3, 1, 4)
            q = self.query(self.probe[...]).reshape(h, d // h) / math.sqrt(d // h)
            scores = jnp.einsum("hd,bhkd->bhk", q, k)[:, :, None, :]  # (B, heads, 1, N)
            probs = captures.keep("pool.attn_probs", jax.nn.softmax(scores, axis=-1))
            attn = self.out(jnp.einsum("bhqk,bhkd->bqhd", probs, v).reshape(b, d))
            attn = captures.keep("pool.attn", attn)
            return attn + captures.keep("pool.mlp", self.mlp(self.norm(attn)))

    class VisionTransformer(nnx.Module):
        """A ViT built from a vitspec Spec: NHWC float32 images in, logits (or features) out.

        ``weights`` are canonical vitspec weights (None: ``vitspec.init_weights(spec, seed)``;
        both None: the parameters are left zero, for weights loaded next). ``rngs`` (default
        ``nnx.Rngs(dropout=seed)``) drive dropout after ``model.train()``; the model is built in
        eval mode.
        """

        def __init__(
            self,
            spec: Spec,
            weights: Mapping[str, Any] | None = None,
            seed: int | None = 0,
            *,
            rngs: nnx.Rngs | None = None,
        ) -> None:
            rngs = rngs if rngs is not None else nnx.Rngs(dropout=0 if seed is None else seed)
            self.spec = spec
            d = spec.hidden_dim
            self.patch_embed = PatchEmbed(spec)
            self.patch_norm = norm(spec) if spec.patch_norm else None
            self.class_token = param(d) if spec.class_token else None
            self.dist_token = param(d) if spec.distillation_token else None
            self.reg_tokens = param(spec.reg_tokens, d) if spec.reg_tokens else None
            self.pos_embed = param(spec.n_positions, d) if spec.pos_embed == "learned" else None
            self.embed_drop = dropout(spec.dropout, rngs)
            self.norm_pre = norm(spec) if spec.pre_norm else None
            self.blocks = nnx.List([Block(spec, rate, rngs) for rate in drop_path_rates(spec)])
            # Optional layers are None; called only where the spec has them (Any: for mypy).
            self.norm: Any = norm(spec) if spec.final_norm != "none" else None
            self.pool: Any = AttentionPool(spec, rngs) if spec.pooling == "map" else None
            self.pre_logits = linear(d, spec.pre_logits_dim) if spec.pre_logits_dim else None
            heads = (spec.n_classes > 0, spec.n_classes > 0 and spec.distillation_token)
            self.head: Any
            self.head_dist: Any
            self.head, self.head_dist = (
                linear(spec.features_dim, spec.n_classes, use_bias=spec.head_bias) if on else None
                for on in heads
            )
            if weights is None and seed is not None:
                weights = init_weights(spec, seed)
            if weights is not None:
                JaxBackend().load(self, weights)

        def __call__(self, images: jax.Array) -> jax.Array:
            """(B, H, W, C) float images -> (B, n_classes) logits, or (B, features) with no head."""
            return self._forward(images, NO_CAPTURES)

        def forward_captures(
            self, images: jax.Array, capture: Iterable[str] | str = "all"
        ) -> dict[str, jax.Array]:
            """The named capture points (``vitspec.capture_points(spec)``, or "all") in forward order, then "output"."""
            captures = Captures(ordered_captures(self.spec, capture))
            return captures.result(self._forward(images, captures))

        def _forward(self, images: jax.Array, captures: Captures) -> jax.Array:
            spec = self.spec
            grid = grid_of(spec, (images.shape[1], images.shape[2]))
            x = captures.keep("patch_embed", apply(self.patch_norm, self.patch_embed(images)))
            x = captures.keep("embed", apply(self.embed_drop, self._embed(x, grid)))
            if self.norm_pre is not None:
                x = captures.keep("embed_norm", self.norm_pre(x))
            for i, block in enumerate(self.blocks):
                x = block(x, captures, f"blocks.{i}")
            if spec.final_norm == "before_pool":
                x = self.norm(x)
            x = captures.keep("encoded", x)
            pooled = self._pool(x, captures)
            if spec.final_norm == "after_pool":
                pooled = self.norm(pooled)
            pooled = captures.keep("pooled", pooled)
            if spec.distillation_token:
                pooled_dist = captures.keep("pooled_dist", x[:, 1])
                if not spec.n_classes:
                    return (pooled + pooled_dist) / 2
                head = captures.keep("head", self.head(pooled))
                return (head + captures.keep("head_dist", self.head_dist(pooled_dist))) / 2
            if self.pre_logits is not None:
                pooled = captures.keep("pre_logits", jnp.tanh(self.pre_logits(pooled)))
            return pooled if self.head is None else self.head(pooled)

        def _pool(self, x: jax.Array, captures: Captures) -> jax.Array:
            """(B, N, D) -> (B, D) by the spec's pooling."""
            spec = self.spec
            if spec.pooling == "token":
                return x[:, 0]
            if not spec.pool_include_prefix:
                x = x[:, spec.n_prefix_tokens :]
            if spec.pooling == "map":
                return self.pool(x, captures)
            if spec.pooling == "avg":
                return x.mean(axis=1)
            if spec.pooling == "max":
                return x.max(axis=1)
            return (x.mean(axis=1) + x.max(axis=1)) * 0.5  # avgmax

        def _embed(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
            """Prefix tokens (class, distillation, registers) and the position embedding for ``grid``."""
            spec = self.spec
            pos = self._position_table(grid)
            if pos is not None and not spec.n_position_prefix:
                x = x + pos
            tokens = (self.class_token, self.dist_token, self.reg_tokens)
            prefix = [t[...] for t in tokens if t is not None]  # (D,) each, registers (R, D)
            if prefix:
                if len(prefix) > 1:
                    prefix = [jnp.concatenate([t.reshape(-1, spec.hidden_dim) for t in prefix])]
                lead = prefix[0]
                lead = jnp.broadcast_to(lead, (x.shape[0], spec.n_prefix_tokens, spec.hidden_dim))
                x = jnp.concatenate([lead, x], axis=1)
            if pos is not None and spec.n_position_prefix:
                x = x + pos
            return x

        def _position_table(self, grid: tuple[int, int]) -> jax.Array | None:
            """The (rows, D) position table for ``grid``: the learned one (its patch rows resampled
            by the spec's algorithm on another grid, ``vitspec.resample.grid_matrices`` applied
            rows then columns, as ``vitspec.reference.position_embedding``) or sin-cos."""
            spec = self.spec
            if spec.pos_embed == "sincos2d":
                return jnp.asarray(sincos2d(grid, spec.hidden_dim), jnp.float32)
            if self.pos_embed is None:
                return None
            table = self.pos_embed[...]
            if grid == spec.grid:
                return table
            lead, d = spec.n_position_prefix, spec.hidden_dim
            rows, cols = (
                jnp.asarray(m, jnp.float32)
                for m in grid_matrices(spec.grid, grid, spec.pos_embed_resample)
            )
            patches = jnp.einsum("ab,bcd->acd", rows, table[lead:].reshape(*spec.grid, d))
            patches = jnp.einsum("ab,cbd->cad", cols, patches).reshape(-1, d)
            return jnp.concatenate([table[:lead], patches], axis=0)

    classes = (
        PatchEmbed,
        Dropout,
        LayerScale,
        Attention,
        Mlp,
        Block,
        AttentionPool,
        VisionTransformer,
    )
    for cls in classes:  # reprs, tracebacks and pickles name vitspec.backends.jax.<name>
        cls.__qualname__ = cls.__name__
    return {cls.__name__: cls for cls in classes}


def _parameters(model: Any) -> dict[str, Any]:
    """Native name (flattened ``nnx.state`` path) -> the model's ``nnx.Param``."""
    from flax import nnx

    return {
        ".".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


@functools.cache
def _compiled() -> Any:
    """``model.forward_captures`` under ``jax.jit``: compiled once per (graph, capture names, input shape)."""
    import jax

    @functools.partial(jax.jit, static_argnames=("names",))
    def forward(model: Any, images: jax.Array, names: tuple[str, ...]) -> dict[str, jax.Array]:
        # The model is a pytree: jit flattens it far faster than nnx.split and keys its cache on
        # the structure (spec, train/eval flags), the capture names and the input shape.
        model.eval()  # on the traced copy only: forward is inference whatever mode the user left
        with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: the reference's numbers
            return model.forward_captures(images, names)

    return forward


# ---- the backend ---------------------------------------------------------------------------------


class JaxBackend(Backend):
    """JAX/Flax NNX behind ``vitspec.backends.Backend`` (``version`` is jax's, ``flax_version`` flax's)."""

    name = "jax"
    layout = FLAX
    frameworks = ("jax", "flax")
    precision = "matmul precision highest (no TF32 or bfloat16 passes)"

    def __init__(self) -> None:
        import flax
        import jax

        self.version: str = jax.__version__
        self.flax_version: str = flax.__version__

    def build(
        self, spec: Spec, weights: Mapping[str, np.ndarray] | None = None, seed: int = 0
    ) -> Any:
        return _model_classes()["VisionTransformer"](spec, weights, seed)

    def write_native(self, model: Any, native: Iterable[tuple[str, np.ndarray]]) -> None:
        import jax.numpy as jnp

        params = _parameters(model)
        for name, array in native:
            params[name].set_value(jnp.asarray(array, jnp.float32))

    def read_native(self, model: Any) -> Mapping[str, np.ndarray]:
        return NativeArrays(_parameters(model), lambda param: np.array(param.get_value()))

    def run(self, model: Any, images: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        got = _compiled()(model, images.astype(np.float32, copy=False), names)
        return {name: np.array(value) for name, value in got.items()}

    def save_artifact(self, model: Any, path: str | Path, batch: int | None) -> Path:
        """Write ``model`` as a serialized ``jax.export`` module (weights baked in), NHWC -> output.

        ``batch`` fixes the batch size; None leaves it symbolic (any batch). Load it with jax alone:
        ``jax.export.deserialize(Path(path).read_bytes()).call(images)``.
        """
        import jax
        import jax.numpy as jnp
        from flax import nnx

        self.check_batch(batch)
        spec = model.spec
        served = nnx.view(
            model, deterministic=True, raise_if_not_found=False
        )  # eval, model untouched

        def serve(images: jax.Array) -> jax.Array:
            return served(images)  # closed over, not an argument: the weights become constants

        dim = jax.export.symbolic_shape("batch")[0] if batch is None else batch
        shape = jax.ShapeDtypeStruct((dim, *spec.image_size, spec.in_channels), jnp.float32)
        with jax.default_matmul_precision("highest"):
            exported = jax.export.export(jax.jit(serve))(shape)
        path = Path(path)
        path.write_bytes(exported.serialize())
        return path

    def device(self) -> str:
        import jax

        first = jax.devices()[0]
        return (
            "cpu"
            if first.platform == "cpu"
            else f"{first.platform}:{first.id} ({first.device_kind})"
        )
