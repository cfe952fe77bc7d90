"""The TensorFlow backend: a Keras 3 model on TensorFlow, taking NHWC images.

The native model, ``VisionTransformer``, is an ordinary ``keras.Model``: ``predict``, ``fit``,
``tf.function(jit_compile=True)``, ``model.export`` and ``model.save_weights`` all work without
vitspec's adapter. It carries its spec as ``model.spec`` and ``get_config()`` holds the spec
dict, so ``keras.saving.load_model`` rebuilds it once the backend is loaded (which registers
the class with Keras).

Keras runs on several frameworks; this backend runs on TensorFlow only. It sets
``KERAS_BACKEND=tensorflow`` when nobody has chosen, and refuses (``BackendError``) a Keras that is
already set to another backend, rather than run silently on it.

Native weight names are the Keras variable paths below the model (``blocks_0/attn/qkv/kernel``);
query, key and value are fused into one ``(D, 3D)`` kernel, the rest matches the canonical table.
The table is ``vitspec.layouts.keras.KERAS`` (and ``h5_layout`` for ``.weights.h5`` files); importing
this module does not import TensorFlow or Keras; the first ``TensorFlowBackend()`` does.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import weakref
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.errors import BackendError, InputError
from vitspec.init import init_weights
from vitspec.layout import check_capture
from vitspec.layouts.keras import KERAS
from vitspec.reference import check_images, sincos2d
from vitspec.spec import Spec
from vitspec.weights import check_weights

# XLA fuses the norms, GELU and attention reshapes; measured faster than plain graphs on CPU.
JIT_COMPILE = True

# ---- Keras (imported on first use) ------------------------------------------------------------


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


@cache
def _classes() -> dict[str, type]:
    """Define the Keras layers on first use, so that importing this module needs no framework."""
    tf, keras = _import_keras()

    def dropout(x: Any, rate: float, training: bool) -> Any:
        # tf.nn.dropout keeps no seed state, so the model's variables are exactly its parameters.
        return tf.nn.dropout(x, rate=rate) if training and rate > 0 else x

    def drop_path(x: Any, rate: float, training: bool) -> Any:
        """Stochastic depth: drop a residual branch for whole samples, rescale the kept ones."""
        if not training or rate <= 0:
            return x
        keep = 1.0 - rate
        mask = tf.floor(keep + tf.random.uniform([tf.shape(x)[0], 1, 1], dtype=x.dtype))
        return x / keep * mask

    def dense(units: int, name: str, policy: Any, **kwargs: Any) -> Any:
        # Zeros: the real values (vitspec init or loaded weights) are assigned right after build.
        return keras.layers.Dense(units, kernel_initializer="zeros", name=name, dtype=policy, **kwargs)

    class PatchEmbed(keras.layers.Layer):
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
            y = tf.matmul(tf.reshape(x, [-1, flat]), tf.reshape(self.kernel, [flat, self.hidden_dim]))
            return tf.reshape(y + self.bias, [-1, gh * gw, self.hidden_dim])

    class LayerNorm(keras.layers.Layer):
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

    class Attention(keras.layers.Layer):
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

        def forward(self, x: Any, training: bool, keep: dict[str, Any], prefix: str) -> Any:
            s = self.spec
            n, heads, hd = x.shape[1], s.n_heads, s.head_dim
            qkv = tf.transpose(tf.reshape(self.qkv(x), [-1, n, 3, heads, hd]), [2, 0, 3, 1, 4])
            q, k, v = qkv[0], qkv[1], qkv[2]
            probs = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(hd)), axis=-1)
            keep[f"{prefix}attn_probs"] = probs
            per_head = tf.matmul(dropout(probs, s.attn_dropout, training), v)
            keep[f"{prefix}attn_heads"] = per_head
            merged = tf.reshape(tf.transpose(per_head, [0, 2, 1, 3]), [-1, n, s.hidden_dim])
            return dropout(self.out(merged), s.dropout, training)

        def call(self, x: Any, training: bool | None = None) -> Any:
            return self.forward(x, bool(training), {}, "")

    class Mlp(keras.layers.Layer):
        """fc1, GELU (erf or tanh form, as the spec says), fc2; dropout after each when training."""

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

    class EncoderBlock(keras.layers.Layer):
        """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)); drop_path on both branches."""

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

        def forward(self, x: Any, training: bool, keep: dict[str, Any], prefix: str) -> Any:
            attn = self.attn.forward(self.norm1(x), training, keep, prefix)
            keep[f"{prefix}attn"] = attn
            x = x + drop_path(attn, self.drop_path, training)
            mlp = self.mlp(self.norm2(x), training=training)
            keep[f"{prefix}mlp"] = mlp
            return x + drop_path(mlp, self.drop_path, training)

        def call(self, x: Any, training: bool | None = None) -> Any:
            return self.forward(x, bool(training), {}, "")

    @keras.saving.register_keras_serializable(package="vitspec")
    class VisionTransformer(keras.Model):
        """A vitspec Vision Transformer as a Keras model: NHWC float images in, logits out.

        ``spec`` is a ``vitspec.Spec`` or its dict. ``weights`` are canonical vitspec weights;
        without them ``seed`` fills the model with ``vitspec.init_weights(spec, seed)`` (``None``
        leaves zeros, for weights loaded next). The model is built on construction, so
        ``summary()``, ``weights`` and ``save_weights`` work at once.
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
            self.patch_embed = PatchEmbed(spec.patch_size, spec.hidden_dim, name="patch_embed", dtype=policy)
            for i in range(spec.depth):
                # timm's linspace(0, drop_path, depth): 0 for the first block (and a one-block model).
                rate = spec.drop_path * i / (spec.depth - 1) if spec.depth > 1 else 0.0
                setattr(self, f"blocks_{i}", EncoderBlock(spec, rate, name=f"blocks_{i}", dtype=policy))
            self.norm = LayerNorm(spec.norm_eps, name="norm", dtype=policy)
            if spec.pre_logits_dim:
                self.pre_logits = dense(spec.pre_logits_dim, "pre_logits", policy, activation="tanh")
            if spec.n_classes:
                self.head = dense(spec.n_classes, "head", policy)
            self.build((None, *spec.image_size, spec.in_channels))
            if weights is not None:
                check_weights(spec, weights)
                _assign(self, KERAS.to_native(spec, weights))
            elif seed is not None:
                _assign(self, KERAS.to_native(spec, init_weights(spec, seed)))

        def build(self, input_shape: Any) -> None:
            s = self.spec
            d = s.hidden_dim
            if s.class_token:
                self.class_token = self.add_weight(name="class_token", shape=(d,), initializer="zeros")
            if s.pos_embed == "learned":
                self.pos_embed = self.add_weight(name="pos_embed", shape=(s.n_positions, d), initializer="zeros")
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

        def call_with_captures(self, images: Any, training: bool = False) -> dict[str, Any]:
            """Every capture point by its vitspec name (``vitspec.capture_points``), ``output`` last."""
            s, out = self.spec, {}
            tokens = self.patch_embed(images)
            out["patch_embed"] = tokens
            if s.pos_embed == "learned" and not s.pos_embed_class_slot:
                tokens = tokens + self.pos_embed
            elif s.pos_embed == "sincos2d":
                tokens = tokens + tf.constant(sincos2d(s.grid, s.hidden_dim), dtype=tokens.dtype)
            if s.class_token:
                cls = tf.broadcast_to(tf.cast(self.class_token, tokens.dtype), [tf.shape(tokens)[0], 1, s.hidden_dim])
                tokens = tf.concat([cls, tokens], axis=1)
            if s.pos_embed == "learned" and s.pos_embed_class_slot:
                tokens = tokens + self.pos_embed
            out["embed"] = tokens
            tokens = dropout(tokens, s.dropout, training)
            for i, block in enumerate(self.blocks()):
                tokens = out[f"blocks.{i}"] = block.forward(tokens, training, out, f"blocks.{i}.")
            if s.final_norm == "before_pool":
                tokens = self.norm(tokens)
            out["encoded"] = tokens
            pooled = tokens[:, 0] if s.pooling == "token" else tf.reduce_mean(tokens[:, s.n_prefix_tokens :], axis=1)
            if s.final_norm == "after_pool":
                pooled = self.norm(pooled)
            out["pooled"] = features = pooled
            if s.pre_logits_dim:
                out["pre_logits"] = features = self.pre_logits(pooled)
            out["output"] = self.head(features) if s.n_classes else features
            return out

        def call(self, images: Any, training: bool | None = None) -> Any:
            return self.call_with_captures(images, bool(training))["output"]

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "spec": self.spec.to_dict(), "seed": self.seed}

    classes = [PatchEmbed, LayerNorm, Attention, Mlp, EncoderBlock, VisionTransformer]
    for cls in classes:
        cls.__qualname__ = cls.__name__  # reprs and tracebacks read vitspec.backends.tensorflow.Mlp
    return {cls.__name__: cls for cls in classes}


def _variables(model: Any) -> dict[str, Any]:
    """Native name (variable path below the model) -> Keras variable."""
    prefix = f"{model.path}/"
    return {v.path.removeprefix(prefix): v for v in model.weights}


def _assign(model: Any, native: Iterable[tuple[str, np.ndarray]]) -> None:
    variables = _variables(model)
    for name, value in native:
        variables[name].assign(np.asarray(value, dtype=variables[name].dtype))


def __getattr__(name: str) -> Any:
    """The Keras classes (``VisionTransformer``, ``EncoderBlock``…), defined on first access."""
    if name in ("PatchEmbed", "LayerNorm", "Attention", "Mlp", "EncoderBlock", "VisionTransformer"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- the backend --------------------------------------------------------------------------------

# model -> {captured names: compiled forward}; the functions hold the model weakly, so it is freed.
_FORWARD: weakref.WeakKeyDictionary[Any, dict[frozenset[str], Any]] = weakref.WeakKeyDictionary()


class TensorFlowBackend:
    """vitspec's backend protocol over ``VisionTransformer``, a Keras 3 model on TensorFlow."""

    name = "tensorflow"

    def __init__(self) -> None:
        tf, keras = _import_keras()
        _classes()  # registers VisionTransformer with Keras, for keras.saving.load_model
        self.version: str = tf.__version__
        self.keras_version: str = keras.__version__
        # TF32 matmuls (Ampere and later GPUs) would put float32 results ~1e-3 off the reference.
        tf.config.experimental.enable_tensor_float_32_execution(False)
        self._tf = tf

    def build(self, spec: Spec, weights: Mapping[str, np.ndarray] | None = None, seed: int = 0) -> Any:
        return _classes()["VisionTransformer"](spec, weights, seed=seed, dtype="float32")

    def load(self, model: Any, weights: Mapping[str, np.ndarray]) -> Any:
        check_weights(model.spec, weights)
        _assign(model, KERAS.to_native(model.spec, weights))
        return model

    def export(self, model: Any) -> dict[str, np.ndarray]:
        return dict(KERAS.from_native(model.spec, _VariableArrays(_variables(model))))

    def forward(self, model: Any, images: np.ndarray, capture: Iterable[str] | str = ()) -> dict[str, np.ndarray]:
        spec = model.spec
        wanted = [c for c in check_capture(spec, capture if isinstance(capture, str) else tuple(capture)) if c != "output"]
        x = check_images(spec, images).astype(np.float32, copy=False)
        got = self._compiled(model, frozenset(wanted))(self._tf.constant(x))
        return {name: got[name].numpy() for name in (*wanted, "output")}

    def save_artifact(self, model: Any, path: str | os.PathLike[str], batch: int | None) -> Path:
        """Write a SavedModel whose ``serving_default`` maps ``images`` (NHWC) to ``{"output": ...}``.

        ``batch`` fixes the batch dimension of the signature; ``None`` accepts any batch. Load it
        with TensorFlow alone: ``tf.saved_model.load(path).signatures["serving_default"]``.
        """
        if batch is not None and (not isinstance(batch, int) or batch < 1):
            raise InputError(f"batch: expected a positive integer or None, found {batch!r}")
        tf, keras = _import_keras()
        spec = model.spec
        archive = keras.export.ExportArchive()
        archive.track(model)
        signature = tf.TensorSpec((batch, *spec.image_size, spec.in_channels), tf.float32, name="images")
        archive.add_endpoint("serve", lambda images: {"output": model(images, training=False)}, input_signature=[signature])
        archive.write_out(os.fspath(path), verbose=False)
        return Path(path)

    def _compiled(self, model: Any, wanted: frozenset[str]) -> Any:
        fns = _FORWARD.setdefault(model, {})
        if wanted not in fns:
            tf, spec, ref = self._tf, model.spec, weakref.ref(model)
            names = (*wanted, "output")

            def run(images: Any) -> dict[str, Any]:
                out = ref().call_with_captures(images, training=False)
                return {name: out[name] for name in names}

            signature = [tf.TensorSpec((None, *spec.image_size, spec.in_channels), tf.float32)]
            fns[wanted] = tf.function(run, input_signature=signature, jit_compile=JIT_COMPILE)
        return fns[wanted]


class _VariableArrays(Mapping[str, np.ndarray]):
    """Keras variables read into NumPy one at a time, as from_native asks for them."""

    def __init__(self, variables: Mapping[str, Any]) -> None:
        self._variables = variables

    def __getitem__(self, name: str) -> np.ndarray:
        return np.asarray(self._variables[name].numpy())

    def __iter__(self) -> Iterator[str]:
        return iter(self._variables)

    def __len__(self) -> int:
        return len(self._variables)
