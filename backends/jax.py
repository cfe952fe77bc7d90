"""The JAX/Flax backend: a Flax NNX Vision Transformer taking NHWC images.

Requirements of the design:

- importing this module never imports jax or flax (the native layout is the NumPy-only table
  ``vitspec.layouts.flax.FLAX``); the NNX classes are defined on first use (``ViT``, ``JaxBackend()``);
- the native model, ``ViT``, is a plain ``flax.nnx.Module``: usable alone under ``jax.jit`` /
  ``nnx.jit`` and ``jax.grad`` / ``nnx.grad``, with ``model.train()`` / ``model.eval()`` for
  dropout, and its spec as the static attribute ``model.spec``;
- native names are the flattened ``nnx.state(model, nnx.Param)`` paths joined with "."; they
  follow the canonical names except that query, key and value are one fused ``attn.qkv`` kernel
  ``(D, 3D)`` (one matmul) and the patch embedding is a dense layer on flattened patches
  ``(patch_h * patch_w * C, D)`` (faster than a strided conv on CPU; docs/backends/jax.md);
- ``forward`` is jitted once per (graph, capture set, input shape) and computes in float32;
  jax's 64-bit mode is never switched on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from vitspec import reference
from vitspec.errors import InputError
from vitspec.init import init_weights
from vitspec.layout import capture_points, check_capture
from vitspec.layouts.flax import FLAX
from vitspec.spec import Spec
from vitspec.weights import check_weights

# ---- the layout: NumPy only, no framework -------------------------------------------------------


def _drop_path_rate(spec: Spec, i: int) -> float:
    """Stochastic depth of block i: the linear rule, 0 for the first block (timm's linspace)."""
    return spec.drop_path * i / (spec.depth - 1) if spec.depth > 1 else 0.0


# ---- the NNX model: defined on first use so that importing this module stays framework-free ----


@functools.cache
def _nnx() -> SimpleNamespace:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    zeros = nnx.initializers.zeros_init()

    def linear(din: int, dout: int, **kwargs: Any) -> nnx.Linear:
        # Zeros now, real weights at once from `assign`; the init key is never used.
        return nnx.Linear(din, dout, kernel_init=zeros, rngs=nnx.Rngs(params=0), **kwargs)

    class Dropout(nnx.Dropout):
        """nnx.Dropout, its mask drawn as one flat vector then reshaped.

        XLA:CPU compiles a 4-D threefry mask feeding a matmul about ten times slower (measured
        9.5 s against 0.85 s for the attention probabilities of a tiny model).
        """

        def __call__(self, inputs: jax.Array) -> jax.Array:
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

    def layer_norm(spec: Spec) -> nnx.LayerNorm:
        # Two-pass variance: E[x²] - E[x]² loses digits when the mean is large.
        return nnx.LayerNorm(
            spec.hidden_dim, epsilon=spec.norm_eps, use_fast_variance=False, rngs=nnx.Rngs(params=0)
        )

    class Attention(nnx.Module):
        """Multi-head self-attention with a fused (D, 3D) query/key/value projection."""

        def __init__(self, spec: Spec, rngs: nnx.Rngs) -> None:
            d = spec.hidden_dim
            self.n_heads = spec.n_heads
            self.qkv = linear(d, 3 * d, use_bias=spec.qkv_bias)
            self.out = linear(d, d)
            self.attn_drop = dropout(spec.attn_dropout, rngs)
            self.out_drop = dropout(spec.dropout, rngs)

        def __call__(self, x: jax.Array, out: dict[str, jax.Array] | None = None) -> jax.Array:
            """Attention output; with ``out``, also writes ``attn_probs`` and ``attn_heads`` into it."""
            b, n, d = x.shape
            h = self.n_heads
            # Heads-first einsums with the query pre-scaled: faster on XLA:CPU than
            # jax.nn.dot_product_attention (docs/backends/jax.md, "Speed").
            q, k, v = self.qkv(x).reshape(b, n, 3, h, d // h).transpose(2, 0, 3, 1, 4)
            probs = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q / math.sqrt(d // h), k), axis=-1)
            heads = jnp.einsum("bhqk,bhkd->bqhd", apply(self.attn_drop, probs), v)
            if out is not None:
                out["attn_probs"], out["attn_heads"] = probs, heads.transpose(0, 2, 1, 3)
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
        """Pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x)), each with drop path."""

        def __init__(self, spec: Spec, i: int, rngs: nnx.Rngs) -> None:
            self.norm1 = layer_norm(spec)
            self.attn = Attention(spec, rngs)
            self.norm2 = layer_norm(spec)
            self.mlp = Mlp(spec, rngs)
            # One mask per sample, broadcast over tokens and channels (stochastic depth).
            self.drop_path = dropout(_drop_path_rate(spec, i), rngs, broadcast_dims=(1, 2))

        def __call__(self, x: jax.Array, out: dict[str, jax.Array] | None = None) -> jax.Array:
            attn = self.attn(self.norm1(x), out)
            x = x + apply(self.drop_path, attn)
            mlp = self.mlp(self.norm2(x))
            if out is not None:
                out["attn"], out["mlp"] = attn, mlp
            return x + apply(self.drop_path, mlp)

    class ViT(nnx.Module):
        """A Vision Transformer built from a vitspec ``Spec``; NHWC float32 images in, logits out.

        ``weights`` (canonical names) default to ``vitspec.init_weights(spec, seed)``; ``rngs``
        (default ``nnx.Rngs(dropout=seed)``) drive dropout after ``model.train()``. The model is
        built in eval mode.
        """

        def __init__(
            self,
            spec: Spec,
            weights: Mapping[str, Any] | None = None,
            *,
            seed: int = 0,
            rngs: nnx.Rngs | None = None,
        ) -> None:
            rngs = rngs if rngs is not None else nnx.Rngs(dropout=seed)
            d = spec.hidden_dim
            self.spec = spec
            self.patch_embed = linear(spec.patch_dim, d)
            if spec.class_token:
                self.class_token = nnx.Param(jnp.zeros((d,), jnp.float32))
            if spec.pos_embed == "learned":
                self.pos_embed = nnx.Param(jnp.zeros((spec.n_positions, d), jnp.float32))
            self.embed_drop = dropout(spec.dropout, rngs)
            self.blocks = nnx.List([Block(spec, i, rngs) for i in range(spec.depth)])
            self.norm = layer_norm(spec)
            if spec.pre_logits_dim:
                self.pre_logits = linear(d, spec.pre_logits_dim)
            if spec.n_classes:
                self.head = linear(spec.features_dim, spec.n_classes)
            assign(self, weights if weights is not None else init_weights(spec, seed))

        def __call__(self, images: jax.Array) -> jax.Array:
            """Logits (or the features when the spec has no head) of NHWC images."""
            return self.capture(images)["output"]

        def capture(self, images: jax.Array, names: Iterable[str] | str = ()) -> dict[str, jax.Array]:
            """``{"output": ..., name: ...}`` for the capture points ``names`` ("all": every one)."""
            spec = self.spec
            wanted = set(check_capture(spec, names if isinstance(names, str) else tuple(names)))
            out: dict[str, jax.Array] = {}
            b, (gh, gw), (ph, pw), c = images.shape[0], spec.grid, spec.patch_size, spec.in_channels
            patches = images.reshape(b, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
            x = out["patch_embed"] = self.patch_embed(patches.reshape(b, gh * gw, spec.patch_dim))

            if spec.pos_embed == "learned" and not spec.pos_embed_class_slot:
                x = x + self.pos_embed[...]
            elif spec.pos_embed == "sincos2d":
                x = x + jnp.asarray(reference.sincos2d(spec.grid, spec.hidden_dim), jnp.float32)
            if spec.class_token:
                x = jnp.concatenate([jnp.broadcast_to(self.class_token[...], (b, 1, spec.hidden_dim)), x], axis=1)
            if spec.pos_embed == "learned" and spec.pos_embed_class_slot:
                x = x + self.pos_embed[...]
            x = out["embed"] = apply(self.embed_drop, x)

            for i, block in enumerate(self.blocks):
                inner: dict[str, jax.Array] = {}  # what is not returned, jit never computes
                x = out[f"blocks.{i}"] = block(x, inner)
                out.update({f"blocks.{i}.{k}": v for k, v in inner.items()})

            if spec.final_norm == "before_pool":
                x = self.norm(x)
            out["encoded"] = x
            pooled = x[:, 0] if spec.pooling == "token" else x[:, spec.n_prefix_tokens :].mean(axis=1)
            if spec.final_norm == "after_pool":
                pooled = self.norm(pooled)
            features = out["pooled"] = pooled
            if spec.pre_logits_dim:
                features = out["pre_logits"] = jnp.tanh(self.pre_logits(pooled))
            out["output"] = self.head(features) if spec.n_classes else features
            return {name: out[name] for name in capture_points(spec) if name in wanted or name == "output"}

    def params(model: ViT) -> dict[str, nnx.Param]:
        """The model's own Param variables by native name (flattened nnx.state paths)."""
        flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
        return {".".join(map(str, path)): variable for path, variable in flat}

    def assign(model: ViT, weights: Mapping[str, Any]) -> None:
        """Canonical weights into the model's variables, one tensor at a time, cast to float32."""
        check_weights(model.spec, weights)
        variables = params(model)
        for name, value in FLAX.to_native(model.spec, weights):
            variables[name].set_value(jnp.asarray(value, jnp.float32))

    @functools.partial(jax.jit, static_argnames=("names",))
    def run(model: ViT, images: jax.Array, names: tuple[str, ...]) -> dict[str, jax.Array]:
        # The model is a pytree: jit flattens it far faster than nnx.split and keys its cache on
        # the structure (spec, train/eval flags), the capture set and the input shape.
        model.eval()  # on the traced copy only: forward is inference whatever mode the user left
        with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: the reference's numbers
            return model.capture(images, names)

    for cls in (Dropout, Attention, Mlp, Block, ViT):  # reprs and pickles name this module
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return SimpleNamespace(
        jax=jax, jnp=jnp, nnx=nnx, ViT=ViT, Block=Block, Attention=Attention, Mlp=Mlp, Dropout=Dropout,
        params=params, assign=assign, run=run,
    )


_MODEL_CLASSES = ("ViT", "Block", "Attention", "Mlp", "Dropout")


def __getattr__(name: str) -> Any:
    # `from vitspec.backends.jax import ViT` imports jax and flax only now.
    if name in _MODEL_CLASSES:
        return getattr(_nnx(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- the backend object ------------------------------------------------------------------------


class JaxBackend:
    """vitspec's backend protocol on JAX/Flax NNX (``version`` is jax's; flax is ``flax_version``)."""

    name = "jax"

    def __init__(self) -> None:
        import flax
        import jax

        self.version: str = jax.__version__
        self.flax_version: str = flax.__version__
        self._nnx = _nnx()

    def build(self, spec: Spec, weights: Mapping[str, np.ndarray] | None = None, seed: int = 0) -> Any:
        """A ``ViT`` (flax.nnx.Module) with ``weights``, or ``vitspec.init_weights(spec, seed)``."""
        return self._nnx.ViT(spec, weights, seed=seed)

    def load(self, model: Any, weights: Mapping[str, np.ndarray]) -> Any:
        """Canonical weights into ``model`` in place; one WeightsError lists every mismatch."""
        self._nnx.assign(model, weights)
        return model

    def export(self, model: Any) -> dict[str, np.ndarray]:
        """Canonical weights of ``model``, bit for bit."""
        native = {name: np.array(v.get_value()) for name, v in self._nnx.params(model).items()}
        return dict(FLAX.from_native(model.spec, native))

    def forward(self, model: Any, images: np.ndarray, capture: Iterable[str] | str = ()) -> dict[str, np.ndarray]:
        """NHWC images -> ``{"output": ..., capture: ...}`` as float32 NumPy, in eval mode."""
        spec = model.spec
        names = check_capture(spec, capture if isinstance(capture, str) else tuple(capture))
        x = reference.check_images(spec, images).astype(np.float32, copy=False)
        ordered = tuple(n for n in capture_points(spec) if n in set(names))  # one cache entry per set
        out = self._nnx.run(model, x, ordered)
        return {name: np.array(out[name]) for name in (*ordered, "output")}  # jit sorts dict keys

    def save_artifact(self, model: Any, path: str | Path, batch: int | None) -> Path:
        """Write ``model`` as a serialized ``jax.export`` module (weights baked in), NHWC -> output.

        ``batch`` fixes the batch size; None leaves it symbolic (any batch). Load it with jax alone:
        ``jax.export.deserialize(Path(path).read_bytes()).call(images)``.
        """
        if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
            raise InputError(f"batch: expected a positive integer or None, found {batch!r}")
        jax, jnp, nnx = self._nnx.jax, self._nnx.jnp, self._nnx.nnx
        spec = model.spec
        served = nnx.view(model, deterministic=True, raise_if_not_found=False)  # eval, model untouched

        def serve(images: jax.Array) -> jax.Array:
            return served(images)  # closed over, not an argument: the weights become constants

        dim = jax.export.symbolic_shape("batch")[0] if batch is None else batch
        shape = jax.ShapeDtypeStruct((dim, *spec.image_size, spec.in_channels), jnp.float32)
        with jax.default_matmul_precision("highest"):
            exported = jax.export.export(jax.jit(serve))(shape)
        path = Path(path)
        path.write_bytes(exported.serialize())
        return path

    def environment(self) -> dict[str, str]:
        """Settings behind forward's numbers (the conformance report prints them)."""
        return {"flax.version": self.flax_version, "forward.dtype": "float32", "forward.matmul_precision": "highest"}
