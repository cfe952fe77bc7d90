"""The TensorFlow backend: a Keras 3 model on TensorFlow, taking NHWC images.

The native model, ``VisionTransformer(spec)``, is an ordinary ``keras.Model``: ``predict``, ``fit``,
``tf.function(jit_compile=True)``, ``model.export`` and ``model.save_weights`` all work without
vitspec's adapter. It carries its spec as ``model.spec`` and ``get_config()`` holds the spec dict,
so ``keras.saving.load_model`` rebuilds it once the class is defined (which registers it with
Keras as ``vitspec>VisionTransformer``). Native names are the Keras variable paths below the model
(``blocks_0/attn/qkv/kernel``); query, key and value are fused into one ``(D, 3D)`` kernel.

Keras runs on several frameworks; this backend runs on TensorFlow only. It sets
``KERAS_BACKEND=tensorflow`` when nobody has chosen, and refuses (``BackendError``) a Keras that is
already set to another backend, rather than run silently on it.

The native layout is the table ``vitspec.layouts.keras.KERAS`` (and ``h5_layout`` for
``.weights.h5`` files); what every backend shares is ``vitspec.backends.base.Backend``. Importing
this module does not import TensorFlow or Keras: the model classes are defined on first use.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.backends.base import NO_CAPTURES, Backend, Captures, NativeArrays, ordered_captures
from vitspec.errors import BackendError
from vitspec.init import init_weights
from vitspec.layout import drop_path_rates, grid_of
from vitspec.layouts.keras import KERAS
from vitspec.reference import sincos2d
from vitspec.resample import grid_matrices
from vitspec.spec import Spec

# XLA fuses the norms, GELU and attention reshapes; measured faster than plain graphs on CPU.
JIT_COMPILE = True

# ---- the native model (Keras on TensorFlow, defined on first use) ------------------------------

MODEL_CLASSES = (
    "PatchEmbed",
    "LayerNorm",
    "RMSNorm",
    "LayerScale",
    "Attention",
    "Mlp",
    "Block",
    "PoolAttention",
    "AttentionPool",
    "VisionTransformer",
)


def __getattr__(name: str) -> Any:
    """The model classes (``VisionTransformer``, ``Block``…): TensorFlow is imported on first access."""
    if name in MODEL_CLASSES:
        return _model_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _import_keras() -> tuple[Any, Any]:
    """TensorFlow and Keras, refusing a Keras that runs on another backend."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    already = "keras" in sys.modules
    if "tensorflow" not in sys.modules and importlib.util.find_spec("triton") is not None:
        # triton (torch.compile, torch.export, torchvision) segfaults while loading its native
        # library if TensorFlow's is already loaded; loaded first, both work in one process.
        import triton  # noqa: F401
    import keras

    found = keras.backend.backend()
    if found != "tensorflow":
        how = "was already imported" if already else "is configured"
        raise BackendError(
            f"the tensorflow backend needs Keras on TensorFlow, but Keras {how} with the {found!r} "
            f"backend (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}); set KERAS_BACKEND=tensorflow "
            "before anything imports keras (a fresh process), or use another vitspec backend"
        )
    import tensorflow as tf

    return tf, keras


@functools.cache
def _model_classes() -> dict[str, type]:
    """Import TensorFlow and Keras and define the model classes (kept out of module import on purpose)."""
    tf, keras = _import_keras()

    def dense(units: int, name: str, policy: Any, **kwargs: Any) -> Any:
        # Zeros now, real weights at once from `load`.
        return keras.layers.Dense(
            units, kernel_initializer="zeros", name=name, dtype=policy, **kwargs
        )

    def norm(spec: Spec, name: str, policy: Any) -> Any:
        """The spec's norm kind: LayerNorm (scale, bias) or RMSNorm (scale)."""
        cls = LayerNorm if spec.norm == "layer" else RMSNorm
        return cls(spec.norm_eps, name=name, dtype=policy)

    def dropout(x: Any, rate: float, training: bool) -> Any:
        # tf.nn.dropout keeps no seed state, so the model's variables are exactly its parameters.
        return tf.nn.dropout(x, rate=rate) if training and rate > 0 else x

    def drop_path(x: Any, rate: float, training: bool) -> Any:
        """Stochastic depth: zero whole samples' residual branch, scale the rest by 1 / keep."""
        if not training or rate <= 0:
            return x
        keep = 1.0 - rate
        mask = tf.floor(keep + tf.random.uniform([tf.shape(x)[0], 1, 1], dtype=x.dtype))
        return x / keep * mask

    def split_heads(x: Any, n: int, heads: int, hd: int) -> Any:
        """(B, n, heads * hd) -> (B, heads, n, hd)."""
        return tf.transpose(tf.reshape(x, [-1, n, heads, hd]), [0, 2, 1, 3])

    class PatchEmbed(keras.layers.Layer):  # type: ignore[name-defined]
        """Cut NHWC images into patches and project each; the kernel is a Conv2D's (ph, pw, C, D).

        The patch grid comes from the images' static shape, so a model with a dynamic image size
        is traced once per image size.
        """

        def __init__(
            self, patch_size: tuple[int, int], hidden_dim: int, use_bias: bool = True, **kwargs: Any
        ) -> None:
            super().__init__(**kwargs)
            self.patch_size, self.hidden_dim, self.use_bias = (
                tuple(patch_size),
                hidden_dim,
                use_bias,
            )

        def build(self, input_shape: Any) -> None:
            shape = (*self.patch_size, input_shape[-1], self.hidden_dim)
            self.kernel = self.add_weight(name="kernel", shape=shape, initializer="zeros")
            if self.use_bias:
                self.bias = self.add_weight(
                    name="bias", shape=(self.hidden_dim,), initializer="zeros"
                )

        def call(self, images: Any) -> Any:
            (ph, pw), (h, w, c) = self.patch_size, images.shape[1:]
            if h is None or w is None:
                raise ValueError(
                    f"PatchEmbed needs the image height and width known when traced, found {tuple(images.shape)}"
                )
            gh, gw, flat = h // ph, w // pw, ph * pw * c
            # (B, gh, ph, gw, pw, C) -> (B, gh, gw, ph, pw, C): a patch flattens as (row, col, channel).
            x = tf.transpose(tf.reshape(images, [-1, gh, ph, gw, pw, c]), [0, 1, 3, 2, 4, 5])
            y = tf.matmul(
                tf.reshape(x, [-1, flat]), tf.reshape(self.kernel, [flat, self.hidden_dim])
            )
            if self.use_bias:
                y = y + self.bias
            return tf.reshape(y, [-1, gh * gw, self.hidden_dim])

    class LayerNorm(keras.layers.Layer):  # type: ignore[name-defined]
        """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * scale + bias, eps exact.

        keras.layers.LayerNormalization defaults to eps 1e-3 (5e-4 off the reference at unit
        variance) and computes x * inv - mean * inv, which loses more digits than subtracting the
        mean first when |mean| >> std (1.5x the error at mean 100, measured).
        """

        def __init__(self, epsilon: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.epsilon = epsilon

        def build(self, input_shape: Any) -> None:
            d = input_shape[-1]
            self.scale = self.add_weight(name="scale", shape=(d,), initializer="ones")
            self.bias = self.add_weight(name="bias", shape=(d,), initializer="zeros")

        def call(self, x: Any) -> Any:
            centred = x - tf.reduce_mean(x, axis=-1, keepdims=True)
            var = tf.reduce_mean(tf.square(centred), axis=-1, keepdims=True)
            return centred * tf.math.rsqrt(var + self.epsilon) * self.scale + self.bias

    class RMSNorm(keras.layers.Layer):  # type: ignore[name-defined]
        """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * scale (no centring, no bias)."""

        def __init__(self, epsilon: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.epsilon = epsilon

        def build(self, input_shape: Any) -> None:
            d = input_shape[-1]
            self.scale = self.add_weight(name="scale", shape=(d,), initializer="ones")

        def call(self, x: Any) -> Any:
            ms = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)
            return x * tf.math.rsqrt(ms + self.epsilon) * self.scale

    class LayerScale(keras.layers.Layer):  # type: ignore[name-defined]
        """A learned per-channel scale on a residual branch (keras-hub DINOv2's, variable ``lambda1``)."""

        def __init__(self, init_value: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.init_value = init_value

        def build(self, input_shape: Any) -> None:
            init = keras.initializers.Constant(self.init_value)
            self.lambda1 = self.add_weight(
                name="lambda1", shape=(input_shape[-1],), initializer=init
            )

        def call(self, x: Any) -> Any:
            return x * self.lambda1

    class Attention(keras.layers.Layer):  # type: ignore[name-defined]
        """Multi-head self-attention with one fused projection qkv = [query | key | value]; with
        ``qk_norm``, ``query_norm`` and ``key_norm`` act on each head's queries and keys."""

        def __init__(self, spec: Spec, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.spec = spec
            d, policy = spec.hidden_dim, self.dtype_policy
            self.qkv = dense(3 * d, "qkv", policy, use_bias=spec.qkv_bias)
            if spec.qk_norm:
                self.query_norm = norm(spec, "query_norm", policy)
                self.key_norm = norm(spec, "key_norm", policy)
            self.out = dense(d, "out", policy, use_bias=spec.proj_bias)

        def build(self, input_shape: Any) -> None:
            self.qkv.build(input_shape)
            if self.spec.qk_norm:
                self.query_norm.build((None, self.spec.head_dim))
                self.key_norm.build((None, self.spec.head_dim))
            self.out.build(input_shape)

        def call(self, x: Any, training: bool | None = None) -> Any:
            return self.forward(x, bool(training))

        def forward(
            self, x: Any, training: bool, captures: Captures = NO_CAPTURES, prefix: str = ""
        ) -> Any:
            s = self.spec
            n, heads, hd = x.shape[1], s.n_heads, s.head_dim
            qkv = tf.transpose(tf.reshape(self.qkv(x), [-1, n, 3, heads, hd]), [2, 0, 3, 1, 4])
            q, k, v = qkv[0], qkv[1], qkv[2]
            if s.qk_norm:
                q, k = self.query_norm(q), self.key_norm(k)
            scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(hd))
            probs = captures.keep(f"{prefix}.attn_probs", tf.nn.softmax(scores, axis=-1))
            per_head = captures.keep(
                f"{prefix}.attn_heads", tf.matmul(dropout(probs, s.attn_dropout, training), v)
            )
            merged = tf.reshape(tf.transpose(per_head, [0, 2, 1, 3]), [-1, n, s.hidden_dim])
            return dropout(self.out(merged), s.dropout, training)

    class Mlp(keras.layers.Layer):  # type: ignore[name-defined]
        """fc1 -> GELU -> dropout -> fc2 -> dropout, as timm's Mlp; or SwiGLU, keras-hub DINOv2's
        ``weights_in`` = [gate | fc1] -> silu(gate) * fc1 -> ``weights_out``; with ``mlp_norm``
        a norm on the hidden layer before the last projection."""

        def __init__(
            self,
            spec: Spec,
            swiglu: bool = False,
            use_bias: bool = True,
            hidden_norm: bool = False,
            rate: float = 0.0,
            **kwargs: Any,
        ) -> None:
            super().__init__(**kwargs)
            self.spec, self.swiglu, self.hidden_norm, self.rate = spec, swiglu, hidden_norm, rate
            m, policy = spec.mlp_dim, self.dtype_policy
            if swiglu:
                self.weights_in = dense(2 * m, "weights_in", policy, use_bias=use_bias)
            else:
                self.fc1 = dense(m, "fc1", policy, use_bias=use_bias)
            if hidden_norm:
                self.norm = norm(spec, "norm", policy)
            if swiglu:
                self.weights_out = dense(spec.hidden_dim, "weights_out", policy, use_bias=use_bias)
            else:
                self.fc2 = dense(spec.hidden_dim, "fc2", policy, use_bias=use_bias)

        def build(self, input_shape: Any) -> None:
            hidden = (*input_shape[:-1], self.spec.mlp_dim)
            (self.weights_in if self.swiglu else self.fc1).build(input_shape)
            if self.hidden_norm:
                self.norm.build(hidden)
            (self.weights_out if self.swiglu else self.fc2).build(hidden)

        def call(self, x: Any, training: bool | None = None) -> Any:
            s, training = self.spec, bool(training)
            if self.swiglu:
                gate, linear = tf.split(self.weights_in(x), 2, axis=-1)
                h = tf.nn.silu(gate) * linear
            else:
                h = self.fc1(x)
                if s.gelu == "tanh":
                    h = (
                        0.5
                        * h
                        * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h * h * h)))
                    )
                elif s.gelu == "quick":
                    h = h * tf.sigmoid(1.702 * h)
                else:
                    h = 0.5 * h * (1.0 + tf.math.erf(h * (1.0 / math.sqrt(2.0))))
            h = dropout(h, self.rate, training)
            if self.hidden_norm:
                h = self.norm(h)
            out = self.weights_out(h) if self.swiglu else self.fc2(h)
            return dropout(out, self.rate, training)

    class Block(keras.layers.Layer):  # type: ignore[name-defined]
        """Pre-norm encoder block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), with
        stochastic depth; the layer scales exist only with ``layer_scale``."""

        def __init__(self, spec: Spec, drop_path: float = 0.0, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.spec, self.drop_path = spec, drop_path
            policy = self.dtype_policy
            self.norm1 = norm(spec, "norm1", policy)
            self.attn = Attention(spec, name="attn", dtype=policy)
            self.norm2 = norm(spec, "norm2", policy)
            self.mlp = Mlp(
                spec,
                spec.mlp == "swiglu",
                spec.mlp_bias,
                spec.mlp_norm,
                spec.dropout,
                name="mlp",
                dtype=policy,
            )
            if spec.layer_scale is not None:
                self.layer_scale1 = LayerScale(spec.layer_scale, name="layer_scale1", dtype=policy)
                self.layer_scale2 = LayerScale(spec.layer_scale, name="layer_scale2", dtype=policy)

        def build(self, input_shape: Any) -> None:
            for layer in (self.norm1, self.attn, self.norm2, self.mlp):
                layer.build(input_shape)
            if self.spec.layer_scale is not None:
                self.layer_scale1.build(input_shape)
                self.layer_scale2.build(input_shape)

        def call(self, x: Any, training: bool | None = None) -> Any:
            return self.forward(x, bool(training))

        def forward(
            self, x: Any, training: bool, captures: Captures = NO_CAPTURES, prefix: str = ""
        ) -> Any:
            scaled = self.spec.layer_scale is not None
            attn = self.attn.forward(self.norm1(x), training, captures, prefix)
            if scaled:
                attn = self.layer_scale1(attn)
            attn = captures.keep(f"{prefix}.attn", attn)
            x = x + drop_path(attn, self.drop_path, training)
            mlp = self.mlp(self.norm2(x), training=training)
            if scaled:
                mlp = self.layer_scale2(mlp)
            mlp = captures.keep(f"{prefix}.mlp", mlp)
            return captures.keep(prefix, x + drop_path(mlp, self.drop_path, training))

    class PoolAttention(keras.layers.Layer):  # type: ignore[name-defined]
        """The attention pool's attention (keras MultiHeadAttention's sublayer names): one query,
        the probe's, attends over every token."""

        def __init__(self, spec: Spec, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.spec = spec
            d, policy = spec.hidden_dim, self.dtype_policy
            self.query = dense(d, "query", policy)
            self.key = dense(d, "key", policy)
            self.value = dense(d, "value", policy)
            self.attention_output = dense(d, "attention_output", policy)

        def build(self, input_shape: Any) -> None:
            for layer in (self.query, self.key, self.value, self.attention_output):
                layer.build((None, self.spec.hidden_dim))

        def forward(self, probe: Any, x: Any, captures: Captures) -> Any:
            s = self.spec
            n, heads, hd = x.shape[1], s.n_heads, s.head_dim
            q = tf.reshape(self.query(probe[None]), [heads, 1, hd])
            k = split_heads(self.key(x), n, heads, hd)
            v = split_heads(self.value(x), n, heads, hd)
            scores = tf.einsum("hqe,bhke->bhqk", q, k) * (1.0 / math.sqrt(hd))
            probs = captures.keep("pool.attn_probs", tf.nn.softmax(scores, axis=-1))
            return self.attention_output(tf.reshape(tf.matmul(probs, v), [-1, s.hidden_dim]))

    class AttentionPool(keras.layers.Layer):  # type: ignore[name-defined]
        """Multi-head attention pooling (timm AttentionPoolLatent; keras-hub SigLIP's names):
        a learned ``probe`` attends over the tokens, then x + mlp(layernorm(x))."""

        def __init__(self, spec: Spec, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.spec, policy = spec, self.dtype_policy
            self.attention = PoolAttention(spec, name="attention", dtype=policy)
            self.layernorm = norm(spec, "layernorm", policy)
            self.mlp = Mlp(spec, name="mlp", dtype=policy)  # standard, biased, no dropout (timm)

        def build(self, input_shape: Any) -> None:
            d = self.spec.hidden_dim
            self.probe = self.add_weight(name="probe", shape=(d,), initializer="zeros")
            self.attention.build(input_shape)
            self.layernorm.build((None, d))
            self.mlp.build((None, d))

        def call(self, x: Any) -> Any:
            return self.forward(x, NO_CAPTURES)

        def forward(self, x: Any, captures: Captures) -> Any:
            attn = captures.keep("pool.attn", self.attention.forward(self.probe, x, captures))
            mlp = captures.keep("pool.mlp", self.mlp(self.layernorm(attn)))
            return attn + mlp

    @keras.saving.register_keras_serializable(package="vitspec")
    class VisionTransformer(keras.Model):  # type: ignore[name-defined]
        """A ViT built from a vitspec Spec (or its dict): NHWC float images in, logits (or features) out.

        ``weights`` are canonical vitspec weights (None: ``vitspec.init_weights(spec, seed)``;
        both None: the parameters are left zero, for weights loaded next). The model is built on
        construction, so ``summary()``, ``weights`` and ``save_weights`` work at once. With
        ``spec.dynamic_image_size`` it takes any image height and width that are multiples of the
        patch size (the grid is read from the images' static shape when traced).
        """

        def __init__(
            self,
            spec: Spec | Mapping[str, Any],
            weights: Mapping[str, np.ndarray] | None = None,
            seed: int | None = 0,
            **kwargs: Any,
        ) -> None:
            kwargs.setdefault("name", "vision_transformer")
            super().__init__(**kwargs)
            spec = spec if isinstance(spec, Spec) else Spec.from_dict(dict(spec))
            self.spec, self.seed = spec, seed
            policy = self.dtype_policy
            # Creation order is what save_weights numbers layers by (vitspec.layouts.keras.top_layers).
            self.patch_embed = PatchEmbed(
                spec.patch_size, spec.hidden_dim, spec.patch_bias, name="patch_embed", dtype=policy
            )
            if spec.patch_norm:
                self.patch_norm = norm(spec, "patch_norm", policy)
            if spec.pre_norm:
                self.pre_layer_norm = norm(spec, "pre_layer_norm", policy)
            for i, rate in enumerate(drop_path_rates(spec)):
                setattr(self, f"blocks_{i}", Block(spec, rate, name=f"blocks_{i}", dtype=policy))
            if spec.final_norm != "none":
                self.norm = norm(spec, "norm", policy)
            if spec.pooling == "map":
                self.pool = AttentionPool(spec, name="pool", dtype=policy)
            if spec.pre_logits_dim:
                self.pre_logits = dense(
                    spec.pre_logits_dim, "pre_logits", policy, activation="tanh"
                )
            if spec.n_classes:
                self.head = dense(spec.n_classes, "head", policy, use_bias=spec.head_bias)
                if spec.distillation_token:
                    self.distillation_head = dense(
                        spec.n_classes, "distillation_head", policy, use_bias=spec.head_bias
                    )
            self.build((None, *spec.image_size, spec.in_channels))
            if weights is None and seed is not None:
                weights = init_weights(spec, seed)
            if weights is not None:
                TensorFlowBackend().load(self, weights)

        def build(self, input_shape: Any) -> None:
            s = self.spec
            d = s.hidden_dim
            tokens = (None, s.seq_len, d)
            if s.class_token:
                self.class_token = self.add_weight(
                    name="class_token", shape=(d,), initializer="zeros"
                )
            if s.distillation_token:
                self.distillation_token = self.add_weight(
                    name="distillation_token", shape=(d,), initializer="zeros"
                )
            if s.reg_tokens:
                self.register_tokens = self.add_weight(
                    name="register_tokens", shape=(s.reg_tokens, d), initializer="zeros"
                )
            if s.pos_embed == "learned":
                self.pos_embed = self.add_weight(
                    name="pos_embed", shape=(s.n_positions, d), initializer="zeros"
                )
            self.patch_embed.build(input_shape)
            if s.patch_norm:
                self.patch_norm.build((None, s.n_patches, d))
            if s.pre_norm:
                self.pre_layer_norm.build(tokens)
            for block in self.blocks():
                block.build(tokens)
            if s.final_norm != "none":
                self.norm.build(tokens)
            if s.pooling == "map":
                self.pool.build(tokens)
            if s.pre_logits_dim:
                self.pre_logits.build((None, d))
            if s.n_classes:
                self.head.build((None, s.features_dim))
                if s.distillation_token:
                    self.distillation_head.build((None, s.features_dim))

        def blocks(self) -> list[Any]:
            """The encoder blocks in order (a method, not a list attribute, so saving walks each once)."""
            return [getattr(self, f"blocks_{i}") for i in range(self.spec.depth)]

        def call(self, images: Any, training: bool | None = None) -> Any:
            """(B, H, W, C) float images -> (B, n_classes) logits, or (B, features) with no head."""
            return self._forward(images, bool(training), NO_CAPTURES)

        def forward_captures(
            self, images: Any, capture: Iterable[str] | str = "all", training: bool = False
        ) -> dict[str, Any]:
            """The named capture points (``vitspec.capture_points(spec)``, or "all") in forward order, then "output"."""
            captures = Captures(ordered_captures(self.spec, capture))
            return captures.result(self._forward(images, training, captures))

        def _forward(self, images: Any, training: bool, captures: Captures) -> Any:
            s = self.spec
            x = self.patch_embed(images)
            if s.patch_norm:
                x = self.patch_norm(x)
            x = captures.keep("patch_embed", x)
            grid = grid_of(s, tuple(images.shape[1:3]))
            x = captures.keep("embed", dropout(self._embed(x, grid), s.dropout, training))
            if s.pre_norm:
                x = captures.keep("embed_norm", self.pre_layer_norm(x))
            for i, block in enumerate(self.blocks()):
                x = block.forward(x, training, captures, f"blocks.{i}")
            if s.final_norm == "before_pool":
                x = self.norm(x)
            x = captures.keep("encoded", x)
            tokens = x
            x = self._pool(x, captures)
            if s.final_norm == "after_pool":
                x = self.norm(x)
            x = captures.keep("pooled", x)
            if s.distillation_token:
                dist = captures.keep("pooled_dist", tokens[:, 1])
                if not s.n_classes:
                    return (x + dist) / 2.0
                head = captures.keep("head", self.head(x))
                head_dist = captures.keep("head_dist", self.distillation_head(dist))
                return (head + head_dist) / 2.0
            if s.pre_logits_dim:
                x = captures.keep("pre_logits", self.pre_logits(x))
            return self.head(x) if s.n_classes else x

        def _pool(self, x: Any, captures: Captures) -> Any:
            """(B, N, D) -> (B, D) by the spec's pooling."""
            s = self.spec
            if s.pooling == "token":
                return x[:, 0]
            if not s.pool_include_prefix:
                x = x[:, s.n_prefix_tokens :]
            if s.pooling == "map":
                return self.pool.forward(x, captures)
            if s.pooling == "avg":
                return tf.reduce_mean(x, axis=1)
            if s.pooling == "max":
                return tf.reduce_max(x, axis=1)
            return (tf.reduce_mean(x, axis=1) + tf.reduce_max(x, axis=1)) * 0.5  # avgmax

        def _positions(self, grid: tuple[int, int], dtype: Any) -> Any:
            """The position table for ``grid``: prefix rows (if any), then the patches; None if none.

            Another grid than the spec's resamples a learned table's patch rows with
            ``vitspec.resample.grid_matrices`` (float64 NumPy, cast to ``dtype``, rows then
            columns, as the reference) and computes a sin-cos table for the grid.
            """
            s = self.spec
            if s.pos_embed == "sincos2d":
                return tf.constant(sincos2d(grid, s.hidden_dim), dtype=dtype)
            if s.pos_embed != "learned":
                return None
            if grid == s.grid:
                return self.pos_embed
            d, lead = s.hidden_dim, s.n_position_prefix
            rows, cols = (
                tf.constant(m, dtype=dtype)
                for m in grid_matrices(s.grid, grid, s.pos_embed_resample)
            )
            table = tf.cast(self.pos_embed, dtype)
            patches = tf.reshape(table[lead:], [*s.grid, d])
            patches = tf.einsum("ab,bcd->acd", rows, patches)
            patches = tf.einsum("ab,cbd->cad", cols, patches)
            return tf.concat([table[:lead], tf.reshape(patches, [-1, d])], axis=0)

        def _embed(self, x: Any, grid: tuple[int, int]) -> Any:
            """Prefix tokens and position embedding, in the order the spec's position table implies."""
            s = self.spec
            pos = self._positions(grid, x.dtype)
            if pos is not None and not s.n_position_prefix:
                x = x + pos
            prefix = []  # each (rows, D) or (D,): broadcast_to takes either to (B, rows, D)
            if s.class_token:
                prefix.append(self.class_token)
            if s.distillation_token:
                prefix.append(self.distillation_token)
            if s.reg_tokens:
                prefix.append(self.register_tokens)
            if prefix:
                d = s.hidden_dim
                lead = (
                    prefix[0]
                    if len(prefix) == 1
                    else tf.concat([tf.reshape(t, [-1, d]) for t in prefix], axis=0)
                )
                lead = tf.broadcast_to(
                    tf.cast(lead, x.dtype), [tf.shape(x)[0], s.n_prefix_tokens, d]
                )
                x = tf.concat([lead, x], axis=1)
            if pos is not None and s.n_position_prefix:
                x = x + pos
            return x

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "spec": self.spec.to_dict(), "seed": self.seed}

    classes = (
        PatchEmbed,
        LayerNorm,
        RMSNorm,
        LayerScale,
        Attention,
        Mlp,
        Block,
        PoolAttention,
        AttentionPool,
        VisionTransformer,
    )
    for cls in classes:  # reprs and tracebacks name vitspec.backends.tensorflow.<name>
        cls.__qualname__ = cls.__name__
    return {cls.__name__: cls for cls in classes}


def _parameters(model: Any) -> dict[str, Any]:
    """Native name (variable path below the model) -> the model's Keras variable."""
    prefix = f"{model.path}/"
    return {v.path.removeprefix(prefix): v for v in model.weights}


# model -> {(capture names, image size): compiled forward}; the functions hold the model weakly, so
# it is freed.
_COMPILED: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


def _compiled(model: Any, names: tuple[str, ...], size: tuple[int, int] | None = None) -> Any:
    """``model.forward_captures`` as an XLA-compiled ``tf.function``: made once per (model, capture
    names, image size); ``size`` None is the spec's (another one only with a dynamic image size)."""
    import tensorflow as tf

    spec = model.spec
    hw: tuple[int, ...] = spec.image_size if size is None else tuple(size)
    compiled = _COMPILED.setdefault(model, {})
    key = (names, hw)
    if key not in compiled:
        ref = weakref.ref(model)

        def forward(images: Any) -> dict[str, Any]:
            return ref().forward_captures(images, names)  # type: ignore[union-attr]  # alive: it is the cache's key

        signature = [tf.TensorSpec((None, *hw, spec.in_channels), tf.float32)]
        compiled[key] = tf.function(forward, input_signature=signature, jit_compile=JIT_COMPILE)
    return compiled[key]


# ---- the backend ---------------------------------------------------------------------------------


class TensorFlowBackend(Backend):
    """Keras 3 on TensorFlow behind ``vitspec.backends.Backend`` (``keras_version`` is Keras')."""

    name = "tensorflow"
    layout = KERAS
    frameworks = ("tensorflow", "keras")
    precision = "no TF32 (off during each forward)"

    def __init__(self) -> None:
        tf, keras = _import_keras()
        _model_classes()  # registers VisionTransformer with Keras, for keras.saving.load_model
        self.version: str = tf.__version__
        self.keras_version: str = keras.__version__

    def build(
        self, spec: Spec, weights: Mapping[str, np.ndarray] | None = None, seed: int = 0
    ) -> Any:
        return _model_classes()["VisionTransformer"](spec, weights, seed, dtype="float32")

    def write_native(self, model: Any, native: Iterable[tuple[str, np.ndarray]]) -> None:
        variables = _parameters(model)
        for name, array in native:
            variables[name].assign(np.asarray(array, dtype=variables[name].dtype))

    def read_native(self, model: Any) -> Mapping[str, np.ndarray]:
        return NativeArrays(_parameters(model), lambda variable: np.asarray(variable.numpy()))

    def run(self, model: Any, images: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        # TF32 is off for this forward only: forward gives the reference's float32 numbers, and
        # outside it the setting stays the user's (their training may want TF32).
        tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        try:
            run = _compiled(model, names, images.shape[1:3])
            got = run(tf.constant(images.astype(np.float32, copy=False)))
            return {name: value.numpy() for name, value in got.items()}
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(tf32)

    def save_artifact(self, model: Any, path: str | Path, batch: int | None) -> Path:
        """Write a SavedModel whose ``serving_default`` maps ``images`` (NHWC) to ``{"output": ...}``.

        ``batch`` fixes the batch size; None accepts any batch. Load it with TensorFlow alone:
        ``tf.saved_model.load(path).signatures["serving_default"]``.
        """
        tf, keras = _import_keras()
        self.check_batch(batch)
        spec = model.spec
        archive = keras.export.ExportArchive()
        archive.track(model)
        signature = tf.TensorSpec(
            (batch, *spec.image_size, spec.in_channels), tf.float32, name="images"
        )
        archive.add_endpoint(
            "serve",
            lambda images: {"output": model(images, training=False)},
            input_signature=[signature],
        )
        archive.write_out(os.fspath(path), verbose=False)
        return Path(path)

    def device(self) -> str:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return "cpu"
        return f"gpu:0 ({tf.config.experimental.get_device_details(gpus[0]).get('device_name', 'GPU')})"

    def threads(self) -> int:
        import tensorflow as tf

        return tf.config.threading.get_intra_op_parallelism_threads() or super().threads()
