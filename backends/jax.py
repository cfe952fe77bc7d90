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
from vitspec.layout import drop_path_rates
from vitspec.layouts.flax import FLAX
from vitspec.reference import sincos2d
from vitspec.spec import Spec

# ---- the native model (Flax NNX, defined on first use) -----------------------------------------

MODEL_CLASSES = ("PatchEmbed", "Dropout", "Attention", "Mlp", "Block", "VisionTransformer")


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

    def layer_norm(spec: Spec) -> nnx.LayerNorm:
        # Two-pass variance: E[x²] - E[x]² loses digits when the mean is large.
        return nnx.LayerNorm(
            spec.hidden_dim, epsilon=spec.norm_eps, use_fast_variance=False, rngs=nnx.Rngs(params=0)
        )

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

    def apply(drop: Dropout | None, x: jax.Array) -> jax.Array:
        return x if drop is None else drop(x)

    class PatchEmbed(nnx.Module):
        """Non-overlapping patches, flattened in (row, col, channel) order, through one dense layer:
        (B, H, W, C) -> (B, patches, D)."""

        def __init__(self, spec: Spec) -> None:
            self.kernel = nnx.Param(jnp.zeros((spec.patch_dim, spec.hidden_dim), jnp.float32))
            self.bias = nnx.Param(jnp.zeros((spec.hidden_dim,), jnp.float32))
            self.grid, self.patch_size = spec.grid, spec.patch_size

        def __call__(self, images: jax.Array) -> jax.Array:
            b, (gh, gw), (ph, pw), c = images.shape[0], self.grid, self.patch_size, images.shape[-1]
            patches = images.reshape(b, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
            return patches.reshape(b, gh * gw, ph * pw * c) @ self.kernel[...] + self.bias[...]

    class Attention(nnx.Module):
        """Multi-head self-attention with a fused (D, 3D) query/key/value projection."""

        def __init__(self, spec: Spec, rngs: nnx.Rngs) -> None:
            d = spec.hidden_dim
            self.n_heads = spec.n_heads
            self.qkv = linear(d, 3 * d, use_bias=spec.qkv_bias)
            self.out = linear(d, d)
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
            scores = jnp.einsum("bhqd,bhkd->bhqk", q / math.sqrt(d // h), k)
            probs = captures.keep(f"{prefix}.attn_probs", jax.nn.softmax(scores, axis=-1))
            heads = jnp.einsum("bhqk,bhkd->bqhd", apply(self.attn_drop, probs), v)
            if captures.wants(f"{prefix}.attn_heads"):
                captures.keep(f"{prefix}.attn_heads", heads.transpose(0, 2, 1, 3))
            return apply(self.out_drop, self.out(heads.reshape(b, n, d)))

    class Mlp(nnx.Module):
        """fc1 -> GELU -> dropout -> fc2 -> dropout, as timm's Mlp."""

        def __init__(self, spec: Spec, rngs: nnx.Rngs) -> None:
            self.fc1 = linear(spec.hidden_dim, spec.mlp_dim)
            self.fc2 = linear(spec.mlp_dim, spec.hidden_dim)
            self.drop = dropout(spec.dropout, rngs)
            self.approximate = spec.gelu == "tanh"

        def __call__(self, x: jax.Array) -> jax.Array:
            x = apply(self.drop, jax.nn.gelu(self.fc1(x), approximate=self.approximate))
            return apply(self.drop, self.fc2(x))

    class Block(nnx.Module):
        """Pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x)), with stochastic depth."""

        def __init__(self, spec: Spec, drop_path: float, rngs: nnx.Rngs) -> None:
            self.norm1 = layer_norm(spec)
            self.attn = Attention(spec, rngs)
            self.norm2 = layer_norm(spec)
            self.mlp = Mlp(spec, rngs)
            # One mask value per sample, broadcast over tokens and channels.
            self.drop_path = dropout(drop_path, rngs, broadcast_dims=(1, 2))

        def __call__(
            self, x: jax.Array, captures: Captures = NO_CAPTURES, prefix: str = ""
        ) -> jax.Array:
            attn = captures.keep(f"{prefix}.attn", self.attn(self.norm1(x), captures, prefix))
            x = x + apply(self.drop_path, attn)
            mlp = captures.keep(f"{prefix}.mlp", self.mlp(self.norm2(x)))
            return captures.keep(prefix, x + apply(self.drop_path, mlp))

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
            if spec.class_token:
                self.class_token = nnx.Param(jnp.zeros((d,), jnp.float32))
            if spec.pos_embed == "learned":
                self.pos_embed = nnx.Param(jnp.zeros((spec.n_positions, d), jnp.float32))
            self.embed_drop = dropout(spec.dropout, rngs)
            self.blocks = nnx.List([Block(spec, rate, rngs) for rate in drop_path_rates(spec)])
            self.norm = layer_norm(spec)
            if spec.pre_logits_dim:
                self.pre_logits = linear(d, spec.pre_logits_dim)
            if spec.n_classes:
                self.head = linear(spec.features_dim, spec.n_classes)
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
            x = captures.keep("patch_embed", self.patch_embed(images))
            x = captures.keep("embed", apply(self.embed_drop, self._embed(x)))
            for i, block in enumerate(self.blocks):
                x = block(x, captures, f"blocks.{i}")
            if spec.final_norm == "before_pool":
                x = self.norm(x)
            x = captures.keep("encoded", x)
            x = x[:, 0] if spec.pooling == "token" else x[:, spec.n_prefix_tokens :].mean(axis=1)
            if spec.final_norm == "after_pool":
                x = self.norm(x)
            x = captures.keep("pooled", x)
            if spec.pre_logits_dim:
                x = captures.keep("pre_logits", jnp.tanh(self.pre_logits(x)))
            return self.head(x) if spec.n_classes else x

        def _embed(self, x: jax.Array) -> jax.Array:
            """Class token and position embedding, in the order the spec's position table implies."""
            spec = self.spec
            if spec.pos_embed == "learned" and not spec.pos_embed_class_slot:
                x = x + self.pos_embed[...]
            elif spec.pos_embed == "sincos2d":
                x = x + jnp.asarray(sincos2d(spec.grid, spec.hidden_dim), jnp.float32)
            if spec.class_token:
                x = jnp.concatenate(
                    [jnp.broadcast_to(self.class_token[...], (x.shape[0], 1, spec.hidden_dim)), x],
                    axis=1,
                )
            if spec.pos_embed_class_slot:
                x = x + self.pos_embed[...]
            return x

    classes = (PatchEmbed, Dropout, Attention, Mlp, Block, VisionTransformer)
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
