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
from vitspec.layout import drop_path_rates
from vitspec.layouts.keras import KERAS
from vitspec.reference import sincos2d
from vitspec.spec import Spec

# XLA fuses the norms, GELU and attention reshapes; measured faster than plain graphs on CPU.
JIT_COMPILE = True

# ---- the native model (Keras on TensorFlow, defined on first use) ------------------------------

MODEL_CLASSES = ("PatchEmbed", "LayerNorm", "Attention", "Mlp", "Block", "VisionTransformer")


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

    class PatchEmbed(keras.layers.Layer):  # type: ignore[name-defined]
        """Cut NHWC images into patches and project each; the kernel is a Conv2D's (ph, pw, C, D)."""

        def __init__(self, patch_size: tuple[int, int], hidden_dim: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.patch_size, self.hidden_dim = tuple(patch_size), hidden_dim

        def build(self, input_shape: Any) -> None:
            shape = (*self.patch_size, input_shape[-1], self.hidden_dim)
            self.kernel = self.add_weight(name="kernel", shape=shape, initializer="zeros")
            self.bias = self.add_weight(name="bias", shape=(self.hidden_dim,), initializer="zeros")

        def call(self, images: Any) -> Any:
            (ph, pw), (h, w, c) = self.patch_size, images.shape[1:]
            gh, gw, flat = h // ph, w // pw, ph * pw * c
            # (B, gh, ph, gw, pw, C) -> (B, gh, gw, ph, pw, C): a patch flattens as (row, col, channel).
            x = tf.transpose(tf.reshape(images, [-1, gh, ph, gw, pw, c]), [0, 1, 3, 2, 4, 5])
            y = tf.matmul(
                tf.reshape(x, [-1, flat]), tf.reshape(self.kernel, [flat, self.hidden_dim])
            )
            return tf.reshape(y + self.bias, [-1, gh * gw, self.hidden_dim])

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

    class Attention(keras.layers.Layer):  # type: ignore[name-defined]
        """Multi-head self-attention with one fused projection qkv = [query | key | value]."""

        def __init__(self, spec: Spec, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.spec = spec
            d = spec.hidden_dim
            self.qkv = dense(3 * d, "qkv", self.dtype_policy, use_bias=spec.qkv_bias)
            self.out = dense(d, "out", self.dtype_policy)

        def build(self, input_shape: Any) -> None:
            self.qkv.build(input_shape)
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
            scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(hd))
            probs = captures.keep(f"{prefix}.attn_probs", tf.nn.softmax(scores, axis=-1))
            per_head = captures.keep(
                f"{prefix}.attn_heads", tf.matmul(dropout(probs, s.attn_dropout, training), v)
            )
            merged = tf.reshape(tf.transpose(per_head, [0, 2, 1, 3]), [-1, n, s.hidden_dim])
            return dropout(self.out(merged), s.dropout, training)

    class Mlp(keras.layers.Layer):  # type: ignore[name-defined]
        """fc1 -> GELU -> dropout -> fc2 -> dropout, as timm's Mlp."""

        def __init__(self, spec: Spec, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.spec = spec
            self.fc1 = dense(spec.mlp_dim, "fc1", self.dtype_policy)
            self.fc2 = dense(spec.hidden_dim, "fc2", self.dtype_policy)

        def build(self, input_shape: Any) -> None:
            self.fc1.build(input_shape)
            self.fc2.build((*input_shape[:-1], self.spec.mlp_dim))

        def call(self, x: Any, training: bool | None = None) -> Any:
            s, training = self.spec, bool(training)
            h = self.fc1(x)
            if s.gelu == "tanh":
                h = 0.5 * h * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h * h * h)))
            else:
                h = 0.5 * h * (1.0 + tf.math.erf(h * (1.0 / math.sqrt(2.0))))
            return dropout(self.fc2(dropout(h, s.dropout, training)), s.dropout, training)

    class Block(keras.layers.Layer):  # type: ignore[name-defined]
        """Pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x)), with stochastic depth."""

        def __init__(self, spec: Spec, drop_path: float = 0.0, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.spec, self.drop_path = spec, drop_path
            policy = self.dtype_policy
            self.norm1 = LayerNorm(spec.norm_eps, name="norm1", dtype=policy)
            self.attn = Attention(spec, name="attn", dtype=policy)
            self.norm2 = LayerNorm(spec.norm_eps, name="norm2", dtype=policy)
            self.mlp = Mlp(spec, name="mlp", dtype=policy)

        def build(self, input_shape: Any) -> None:
            for layer in (self.norm1, self.attn, self.norm2, self.mlp):
                layer.build(input_shape)

        def call(self, x: Any, training: bool | None = None) -> Any:
            return self.forward(x, bool(training))

        def forward(
            self, x: Any, training: bool, captures: Captures = NO_CAPTURES, prefix: str = ""
        ) -> Any:
            attn = captures.keep(
                f"{prefix}.attn", self.attn.forward(self.norm1(x), training, captures, prefix)
            )
            x = x + drop_path(attn, self.drop_path, training)
            mlp = captures.keep(f"{prefix}.mlp", self.mlp(self.norm2(x), training=training))
            return captures.keep(prefix, x + drop_path(mlp, self.drop_path, training))

    @keras.saving.register_keras_serializable(package="vitspec")
    class VisionTransformer(keras.Model):  # type: ignore[name-defined]
        """A ViT built from a vitspec Spec (or its dict): NHWC float images in, logits (or features) out.

        ``weights`` are canonical vitspec weights (None: ``vitspec.init_weights(spec, seed)``;
        both None: the parameters are left zero, for weights loaded next). The model is built on
        construction, so ``summary()``, ``weights`` and ``save_weights`` work at once.
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
            self.patch_embed = PatchEmbed(
                spec.patch_size, spec.hidden_dim, name="patch_embed", dtype=policy
            )
            for i, rate in enumerate(drop_path_rates(spec)):
                setattr(self, f"blocks_{i}", Block(spec, rate, name=f"blocks_{i}", dtype=policy))
            self.norm = LayerNorm(spec.norm_eps, name="norm", dtype=policy)
            if spec.pre_logits_dim:
                self.pre_logits = dense(
                    spec.pre_logits_dim, "pre_logits", policy, activation="tanh"
                )
            if spec.n_classes:
                self.head = dense(spec.n_classes, "head", policy)
            self.build((None, *spec.image_size, spec.in_channels))
            if weights is None and seed is not None:
                weights = init_weights(spec, seed)
            if weights is not None:
                TensorFlowBackend().load(self, weights)

        def build(self, input_shape: Any) -> None:
            s = self.spec
            d = s.hidden_dim
            if s.class_token:
                self.class_token = self.add_weight(
                    name="class_token", shape=(d,), initializer="zeros"
                )
            if s.pos_embed == "learned":
                self.pos_embed = self.add_weight(
                    name="pos_embed", shape=(s.n_positions, d), initializer="zeros"
                )
            self.patch_embed.build(input_shape)
            for block in self.blocks():
                block.build((None, s.seq_len, d))
            self.norm.build((None, s.seq_len, d))
            if s.pre_logits_dim:
                self.pre_logits.build((None, d))
            if s.n_classes:
                self.head.build((None, s.features_dim))

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
            x = captures.keep("patch_embed", self.patch_embed(images))
            x = captures.keep("embed", dropout(self._embed(x), s.dropout, training))
            for i, block in enumerate(self.blocks()):
                x = block.forward(x, training, captures, f"blocks.{i}")
            if s.final_norm == "before_pool":
                x = self.norm(x)
            x = captures.keep("encoded", x)
            x = (
                x[:, 0]
                if s.pooling == "token"
                else tf.reduce_mean(x[:, s.n_prefix_tokens :], axis=1)
            )
            if s.final_norm == "after_pool":
                x = self.norm(x)
            x = captures.keep("pooled", x)
            if s.pre_logits_dim:
                x = captures.keep("pre_logits", self.pre_logits(x))
            return self.head(x) if s.n_classes else x

        def _embed(self, x: Any) -> Any:
            """Class token and position embedding, in the order the spec's position table implies."""
            s = self.spec
            if s.pos_embed == "learned" and not s.pos_embed_class_slot:
                x = x + self.pos_embed
            elif s.pos_embed == "sincos2d":
                x = x + tf.constant(sincos2d(s.grid, s.hidden_dim), dtype=x.dtype)
            if s.class_token:
                x = tf.concat(
                    [
                        tf.broadcast_to(
                            tf.cast(self.class_token, x.dtype), [tf.shape(x)[0], 1, s.hidden_dim]
                        ),
                        x,
                    ],
                    axis=1,
                )
            if s.pos_embed_class_slot:
                x = x + self.pos_embed
            return x

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "spec": self.spec.to_dict(), "seed": self.seed}

    classes = (PatchEmbed, LayerNorm, Attention, Mlp, Block, VisionTransformer)
    for cls in classes:  # reprs and tracebacks name vitspec.backends.tensorflow.<name>
        cls.__qualname__ = cls.__name__
    return {cls.__name__: cls for cls in classes}


def _parameters(model: Any) -> dict[str, Any]:
    """Native name (variable path below the model) -> the model's Keras variable."""
    prefix = f"{model.path}/"
    return {v.path.removeprefix(prefix): v for v in model.weights}


# model -> {capture names: compiled forward}; the functions hold the model weakly, so it is freed.
_COMPILED: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], Any]] = weakref.WeakKeyDictionary()


def _compiled(model: Any, names: tuple[str, ...]) -> Any:
    """``model.forward_captures`` as an XLA-compiled ``tf.function``: made once per (model, capture names)."""
    import tensorflow as tf

    compiled = _COMPILED.setdefault(model, {})
    if names not in compiled:
        spec, ref = model.spec, weakref.ref(model)

        def forward(images: Any) -> dict[str, Any]:
            return ref().forward_captures(images, names)  # type: ignore[union-attr]  # alive: it is the cache's key

        signature = [tf.TensorSpec((None, *spec.image_size, spec.in_channels), tf.float32)]
        compiled[names] = tf.function(forward, input_signature=signature, jit_compile=JIT_COMPILE)
    return compiled[names]


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
            got = _compiled(model, names)(tf.constant(images.astype(np.float32, copy=False)))
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
