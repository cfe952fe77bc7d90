"""The TensorFlow backend beyond the contract: the Keras model on its own, its files, its guards.

The model must work as any Keras 3 model on TensorFlow does (predict, fit, XLA, SavedModel,
.weights.h5, .keras), and the NumPy-only layout functions must describe what Keras really writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import rel_err

import vitspec
from vitspec import reference
from vitspec.backends import tensorflow as tfb
from vitspec.families import family
from vitspec.layouts.keras import KERAS, h5_layout

pytest.importorskip("tensorflow")
h5py = pytest.importorskip("h5py")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


@pytest.fixture(scope="module")
def backend() -> vitspec.backends.Backend:
    return vitspec.backend("tensorflow")


def _images(spec: vitspec.Spec, batch: int, seed: int = 1) -> np.ndarray:
    return (
        np.random.default_rng(seed)
        .standard_normal((batch, *spec.image_size, spec.in_channels))
        .astype(np.float32)
    )


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (its own imports, its own KERAS_BACKEND)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    full_env = {k: v for k, v in full_env.items() if v != ""}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=120,
    )


# ---- identity and the NumPy-only layout ---------------------------------------------------------


def test_identity(backend) -> None:
    assert backend.name == "tensorflow"
    assert backend.version == tf.__version__
    assert backend.keras_version == keras.__version__
    assert keras.backend.backend() == "tensorflow"


def test_layout_functions_import_no_framework() -> None:
    result = _python(
        """
        import sys
        import numpy as np
        import vitspec
        from vitspec.backends import tensorflow as tfb
        from vitspec.families import family
        from vitspec.layouts.keras import KERAS, h5_layout

        spec = family("vit_paper_pre_logits", depth=2)
        weights = vitspec.init_weights(spec, seed=1, scheme="random")
        native = dict(KERAS.to_native(spec, weights))
        back = dict(KERAS.from_native(spec, native))
        assert list(native) == [n for n, _ in KERAS.native_layout(spec)] == [n for n, _ in h5_layout(spec)]
        assert all(np.array_equal(back[k], weights[k]) for k in weights)
        loaded = sorted(m for m in ("tensorflow", "keras", "jax", "torch") if m in sys.modules)
        print("frameworks:", loaded)
        """,
        KERAS_BACKEND="",
    )
    assert result.returncode == 0, result.stderr
    assert "frameworks: []" in result.stdout


@pytest.mark.parametrize("name", ["vit_paper", "timm_no_qkv_bias", "no_head"])
def test_native_round_trip_is_bit_exact_and_fuses_qkv(name: str) -> None:
    spec = family(name, depth=2)
    weights = vitspec.init_weights(spec, seed=2, scheme="random")
    native = dict(KERAS.to_native(spec, weights))
    assert [(k, v.shape) for k, v in native.items()] == KERAS.native_layout(spec)
    d = spec.hidden_dim
    qkv = native["blocks_1/attn/qkv/kernel"]
    assert qkv.shape == (d, 3 * d)
    assert np.array_equal(qkv[:, d : 2 * d], weights["blocks.1.attn.key.kernel"])
    assert ("blocks_0/attn/qkv/bias" in native) == spec.qkv_bias
    back = dict(KERAS.from_native(spec, native))
    assert list(back) == list(weights)
    for k, v in weights.items():
        assert back[k].flags.c_contiguous and np.array_equal(
            back[k].view(np.uint32), v.view(np.uint32)
        ), k


def test_native_names_are_the_keras_variable_paths(backend) -> None:
    spec = family("vit_paper_pre_logits", depth=2)
    model = backend.build(spec)
    paths = {v.path: tuple(v.shape) for v in model.weights}
    assert paths == {
        f"vision_transformer/{name}": shape for name, shape in KERAS.native_layout(spec)
    }
    assert all(
        v.trainable for v in model.weights
    )  # no seed or counter state hides among the weights


_H5_SPECS = [
    family("vit_paper_pre_logits", depth=2),
    family("big_vision_gap", depth=2, qkv_bias=False, n_classes=0, pre_logits_dim=8),
]


@pytest.mark.parametrize("spec", _H5_SPECS, ids=["pre_logits_and_head", "gap_no_head"])
def test_h5_layout_matches_save_weights_and_load_weights(
    backend, tmp_path: Path, spec: vitspec.Spec
) -> None:
    weights = vitspec.init_weights(spec, seed=4, scheme="random")
    native = dict(KERAS.to_native(spec, weights))
    layout = h5_layout(spec)

    written = tmp_path / "real.weights.h5"
    backend.build(spec, weights).save_weights(written)
    with h5py.File(written, "r") as f:
        datasets: list[str] = []
        f.visititems(
            lambda path, obj: datasets.append(path) if isinstance(obj, h5py.Dataset) else None
        )
        assert sorted(datasets) == sorted(path for _, path in layout)
        for native_name, path in layout:
            assert np.array_equal(f[path][()], native[native_name]), (native_name, path)

    # What a converter does: write the file with h5py alone, then Keras reads it.
    ours = tmp_path / "ours.weights.h5"
    with h5py.File(ours, "w") as f:
        for native_name, path in layout:
            f.create_dataset(path, data=native[native_name])
    model = backend.build(spec, seed=0)
    model.load_weights(ours)
    exported = backend.export(model)
    assert all(np.array_equal(exported[k], weights[k]) for k in weights)


# ---- the Keras model on its own ------------------------------------------------------------------


def test_predict_and_jit_compile_match_the_reference(backend) -> None:
    spec = family("timm_avg_fc_norm")
    weights = vitspec.init_weights(spec, seed=5, scheme="random")
    model = backend.build(spec, weights)
    images = _images(spec, 3)
    expected = reference.forward(spec, weights, images)["output"]
    predicted = model.predict(images, batch_size=2, verbose=0)
    assert predicted.shape == (3, spec.n_classes)
    assert rel_err(predicted, expected) <= TOL
    xla = tf.function(lambda x: model(x, training=False), jit_compile=True)(
        tf.constant(images)
    ).numpy()
    assert rel_err(xla, expected) <= TOL
    eager = model(images).numpy()
    assert rel_err(eager, expected) <= TOL


def test_fit_lowers_the_loss_with_dropout_on(backend, tmp_path: Path) -> None:
    spec = family("vit_paper", depth=1, dropout=0.1, attn_dropout=0.1, drop_path=0.1)
    model = backend.build(spec, seed=0)
    rng = np.random.default_rng(0)
    images, labels = _images(spec, 16), rng.integers(0, spec.n_classes, 16)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)  # "auto": XLA on GPU, not CPU
    before = model.evaluate(images, labels, verbose=0)
    history = model.fit(images, labels, batch_size=8, epochs=6, verbose=0, shuffle=False)
    after = model.evaluate(images, labels, verbose=0)
    assert len(history.history["loss"]) == 6
    assert after < 0.85 * before, (before, after)
    # A trained model's file adds optimizer groups; the weights stay where h5_layout says.
    model.save_weights(tmp_path / "trained.weights.h5")
    native = dict(KERAS.to_native(spec, backend.export(model)))
    with h5py.File(tmp_path / "trained.weights.h5", "r") as f:
        assert "optimizer" in f
        for name, path in h5_layout(spec):
            assert np.array_equal(f[path][()], native[name]), name


def test_keras_export_savedmodel_serves_the_same_numbers(backend, tmp_path: Path) -> None:
    spec = family("big_vision_sincos")
    model = backend.build(spec, vitspec.init_weights(spec, seed=6, scheme="random"))
    images = _images(spec, 2)
    expected = model.predict(images, verbose=0)
    model.export(tmp_path / "exported", verbose=False)
    exported = tf.saved_model.load(str(tmp_path / "exported"))  # keep it: it owns the variables
    served = exported.serve(tf.constant(images)).numpy()
    assert np.allclose(served, expected, rtol=0, atol=1e-6)
    tf.saved_model.save(model, str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    signature = loaded.signatures["serving_default"]
    (result,) = signature(
        **{next(iter(signature.structured_input_signature[1])): tf.constant(images)}
    ).values()
    assert np.allclose(result.numpy(), expected, rtol=0, atol=1e-6)


def test_config_and_keras_file_round_trip(backend, tmp_path: Path) -> None:
    spec = family("non_square", depth=1)
    model = backend.build(spec, vitspec.init_weights(spec, seed=7, scheme="random"))
    config = model.get_config()
    assert config["spec"] == spec.to_dict()
    json.dumps(config)
    assert tfb.VisionTransformer.from_config(config).spec == spec
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert isinstance(loaded, tfb.VisionTransformer) and loaded.spec == spec
    images = _images(spec, 2)
    assert np.array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))


def test_save_artifact_loads_with_tensorflow_alone(backend, tmp_path: Path) -> None:
    spec = family("mnist")
    weights = vitspec.init_weights(spec, seed=8, scheme="random")
    images = _images(spec, 3)
    np.save(tmp_path / "images.npy", images)
    assert (
        backend.save_artifact(backend.build(spec, weights), tmp_path / "artifact", batch=3)
        == tmp_path / "artifact"
    )
    result = _python(
        f"""
        import sys
        import numpy as np
        import tensorflow as tf

        serve = tf.saved_model.load({str(tmp_path / "artifact")!r}).signatures["serving_default"]
        print("input", serve.structured_input_signature[1]["images"].shape)
        np.save({str(tmp_path / "out.npy")!r}, serve(images=tf.constant(np.load({str(tmp_path / "images.npy")!r})))["output"].numpy())
        print("vitspec imported:", "vitspec" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "input (3, 28, 28, 1)" in result.stdout
    assert "vitspec imported: False" in result.stdout
    out = np.load(tmp_path / "out.npy")
    assert rel_err(out, reference.forward(spec, weights, images)["output"]) <= TOL
    with pytest.raises(ValueError, match="batch: expected a positive integer or None, found 0"):
        backend.save_artifact(backend.build(spec), tmp_path / "bad", batch=0)


# ---- never on another Keras backend -------------------------------------------------------------


def test_refuses_keras_running_on_another_backend() -> None:
    result = _python(
        """
        import keras
        import vitspec
        from vitspec.errors import BackendError
        from vitspec.backends import tensorflow as tfb
        from vitspec.layouts.keras import KERAS

        print("layout works:", len(KERAS.native_layout(vitspec.load_spec("Ti/16"))) > 0)
        try:
            tfb.TensorFlowBackend()
        except BackendError as exc:
            print("refused:", exc)
        try:
            vitspec.backend("tensorflow")
        except BackendError as exc:
            print("registry:", exc)
        """,
        KERAS_BACKEND="jax",
        JAX_PLATFORMS="cpu",
    )
    assert result.returncode == 0, result.stderr
    assert "layout works: True" in result.stdout
    refused = next(line for line in result.stdout.splitlines() if line.startswith("refused:"))
    assert "Keras was already imported with the 'jax' backend" in refused
    assert "KERAS_BACKEND=tensorflow" in refused
    assert "registry:" in result.stdout and "'jax' backend" in result.stdout


# ---- dropout and stochastic depth ---------------------------------------------------------------


def test_dropout_is_active_only_when_training(backend) -> None:
    images = _images(family("vit_paper"), 4)
    for rates in ({"dropout": 0.3}, {"attn_dropout": 0.3}, {"drop_path": 0.3}):
        spec = family("vit_paper", **rates)
        weights = vitspec.init_weights(spec, seed=9, scheme="random")
        model = backend.build(spec, weights)
        inference = model(images).numpy()
        assert np.array_equal(model(images, training=False).numpy(), inference)
        assert rel_err(inference, reference.forward(spec, weights, images)["output"]) <= TOL
        first, second = model(images, training=True).numpy(), model(images, training=True).numpy()
        assert rel_err(first, inference) > 1e-3, rates
        assert rel_err(first, second) > 1e-3, rates
    # The random ops compile under XLA, as fit(jit_compile=True) needs.
    xla = tf.function(lambda x: model(x, training=True), jit_compile=True)
    assert rel_err(xla(tf.constant(images)).numpy(), inference) > 1e-3
    quiet = family("vit_paper")
    model = backend.build(quiet, seed=1)
    assert np.array_equal(
        model(images, training=True).numpy(), model(images, training=False).numpy()
    )


def test_drop_path_follows_the_linear_rule_and_drops_whole_branches(backend) -> None:
    spec = family("vit_paper", depth=5, drop_path=0.2)
    model = backend.build(spec, seed=0)
    assert [b.drop_path for b in model.blocks()] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert backend.build(family("vit_paper", depth=1, drop_path=0.2)).blocks()[0].drop_path == 0.0
    # At rate 0.999 block 1's branches are dropped for every sample: its output is its input.
    spec = family("vit_paper", depth=2, drop_path=0.999)
    model = backend.build(spec, vitspec.init_weights(spec, seed=3, scheme="random"))
    tf.random.set_seed(0)
    out = model.forward_captures(tf.constant(_images(spec, 2)), "all", training=True)
    assert np.array_equal(out["blocks.1"].numpy(), out["blocks.0"].numpy())
    assert not np.array_equal(out["blocks.0"].numpy(), out["embed"].numpy())


def test_forward_runs_without_tf32_and_restores_the_setting(
    backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = family("vit_paper", depth=1)
    model = backend.build(spec)
    seen: list[bool] = []
    compiled = tfb._compiled

    def spy(model: Any, names: tuple[str, ...], size: Any = None) -> Any:
        def run(images: Any) -> Any:
            seen.append(tf.config.experimental.tensor_float_32_execution_enabled())
            return compiled(model, names, size)(images)

        return run

    monkeypatch.setattr(tfb, "_compiled", spy)
    saved = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(True)
    try:
        backend.forward(model, _images(spec, 1))
        assert seen == [False]
        assert tf.config.experimental.tensor_float_32_execution_enabled() is True
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(saved)


# ---- the variants of issue 10: every capture point against the reference ----------------------

_TINY = dict(image_size=16, patch_size=4, hidden_dim=16, n_heads=2, depth=2, n_classes=5)
VARIANTS = {
    # one feature at a time
    "registers": dict(reg_tokens=3),
    "registers_no_position_rows": dict(reg_tokens=2, pos_embed_class_slot=False),
    "distilled_features": dict(distillation_token=True, n_classes=0),
    "layer_scale": dict(layer_scale=0.1),
    "no_patch_bias": dict(patch_bias=False),
    "patch_norm": dict(patch_norm=True),
    "pre_norm": dict(pre_norm=True),
    "no_final_norm": dict(final_norm="none"),
    "qk_norm": dict(qk_norm=True),
    "no_biases": dict(qkv_bias=False, proj_bias=False, mlp_bias=False, head_bias=False),
    "quick_gelu": dict(gelu="quick"),
    "swiglu": dict(mlp="swiglu", mlp_ratio=2.0),
    "mlp_norm": dict(mlp_norm=True),
    "rms": dict(norm="rms"),
    "max": dict(pooling="max", reg_tokens=1),
    "max_with_prefix": dict(pooling="max", pool_include_prefix=True, reg_tokens=1),
    "avgmax": dict(pooling="avgmax", reg_tokens=1),
    "avgmax_with_prefix": dict(pooling="avgmax", pool_include_prefix=True, reg_tokens=1),
    "avg_with_prefix_fc_norm": dict(
        pooling="avg", pool_include_prefix=True, final_norm="after_pool"
    ),
    # the families
    "dinov2_reg": dict(reg_tokens=4, layer_scale=1e-5, mlp="swiglu", mlp_ratio=2.0),
    "clip": dict(gelu="quick", pre_norm=True, patch_bias=False, head_bias=False, norm_eps=1e-5),
    "siglip": dict(pooling="map", class_token=False, gelu="tanh", n_classes=0),
    "siglip_head": dict(pooling="map", class_token=False, pre_logits_dim=12, qk_norm=True),
    "deit_distilled": dict(distillation_token=True),
    "aimv2": dict(
        norm="rms",
        mlp="swiglu",
        patch_norm=True,
        class_token=False,
        pooling="avg",
        qkv_bias=False,
        proj_bias=False,
        mlp_bias=False,
        patch_bias=False,
        norm_eps=1e-5,
    ),
    "rms_map_mlp_norm": dict(norm="rms", pooling="map", mlp_norm=True, layer_scale=0.5),
}


def _variant(name: str) -> vitspec.Spec:
    return vitspec.Spec(**{**_TINY, **VARIANTS[name]})


def _check_every_capture(backend, spec, weights, images) -> None:
    got = backend.forward(backend.build(spec, weights), images, capture="all")
    ref = reference.forward(spec, weights, images, capture="all")
    shapes = vitspec.layout.capture_shapes(spec, len(images), images.shape[1:3])
    assert list(got) == vitspec.capture_points(spec)
    assert set(got) == set(ref)
    for name, value in ref.items():
        assert got[name].shape == value.shape == shapes.get(name, value.shape), name
        assert rel_err(got[name], value) <= TOL, (name, rel_err(got[name], value))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_match_the_reference_at_every_capture_point(backend, name: str) -> None:
    spec = _variant(name)
    weights = vitspec.init_weights(spec, seed=11, scheme="random")
    model = backend.build(spec, weights)
    exported = backend.export(model)
    assert list(exported) == list(weights)
    for k, v in weights.items():
        assert exported[k].tobytes() == v.tobytes(), k
    _check_every_capture(backend, spec, weights, _images(spec, 2))


def test_variant_models_keep_only_the_variables_they_need(backend) -> None:
    spec = _variant("aimv2")
    paths = {v.path.removeprefix("vision_transformer/") for v in backend.build(spec).weights}
    assert paths == {name for name, _ in KERAS.native_layout(spec)}
    # RMSNorm and every bias switched off but the head's
    assert [p for p in paths if p.endswith("/bias")] == ["head/bias"]
    assert "blocks_0/mlp/weights_in/kernel" in paths and "patch_norm/scale" in paths
    plain = family("vit_paper", depth=1)
    names = {v.path for v in backend.build(plain).weights}
    assert not any(
        key in n
        for n in names
        for key in ("layer_scale", "query_norm", "register", "distillation", "pool", "pre_layer")
    )


@pytest.mark.parametrize(
    "changes",
    [
        dict(reg_tokens=2),
        dict(reg_tokens=1, pos_embed_class_slot=False, pos_embed_resample="bicubic"),
        dict(pos_embed="sincos2d", class_token=False, pooling="avg"),
        dict(distillation_token=True, layer_scale=0.1, pre_norm=True),
    ],
    ids=["antialias_slot", "bicubic_no_slot", "sincos", "distilled"],
)
def test_dynamic_image_size_larger_and_smaller(backend, changes: dict) -> None:
    spec = vitspec.Spec(**{**_TINY, "dynamic_image_size": True, **changes})
    weights = vitspec.init_weights(spec, seed=12, scheme="random")
    for size in ((24, 20), (8, 12), (16, 16)):
        images = np.random.default_rng(3).standard_normal((2, *size, 3)).astype(np.float32)
        _check_every_capture(backend, spec, weights, images)
    # The Keras model alone (no adapter) takes the new size too.
    model = backend.build(spec, weights)
    images = np.random.default_rng(4).standard_normal((1, 28, 8, 3)).astype(np.float32)
    assert rel_err(model(images).numpy(), reference.forward(spec, weights, images)["output"]) <= TOL


def test_a_fixed_size_model_refuses_another_image_size(backend) -> None:
    spec = vitspec.Spec(**_TINY)
    model = backend.build(spec)
    with pytest.raises(ValueError, match=r"expected shape \(batch, 16, 16, 3\) NHWC"):
        backend.forward(model, np.zeros((1, 20, 20, 3), np.float32))
    dynamic = backend.build(spec.replace(dynamic_image_size=True))
    with pytest.raises(ValueError, match="height a multiple of 4"):
        backend.forward(dynamic, np.zeros((1, 18, 20, 3), np.float32))


_VARIANT_H5 = {
    name: vitspec.Spec(**{**_TINY, "hidden_dim": 8, **changes})
    for name, changes in {
        "every_block_switch": dict(
            reg_tokens=2,
            distillation_token=True,
            layer_scale=0.1,
            pre_norm=True,
            patch_norm=True,
            qk_norm=True,
            mlp="swiglu",
            mlp_norm=True,
            head_bias=False,
        ),
        "rms_map_pre_logits": dict(
            norm="rms",
            pooling="map",
            class_token=False,
            patch_bias=False,
            proj_bias=False,
            mlp_bias=False,
            qkv_bias=False,
            pre_logits_dim=6,
            pre_norm=True,
        ),
        "fc_norm_after_patch_and_pre_norm": dict(
            pooling="avg", final_norm="after_pool", patch_norm=True, pre_norm=True, reg_tokens=1
        ),
    }.items()
}


@pytest.mark.parametrize("name", list(_VARIANT_H5))
def test_h5_layout_matches_save_weights_for_variants(backend, tmp_path: Path, name: str) -> None:
    spec = _VARIANT_H5[name]
    test_h5_layout_matches_save_weights_and_load_weights(backend, tmp_path, spec)


def test_keras_file_round_trips_a_model_with_many_variants(backend, tmp_path: Path) -> None:
    spec = _VARIANT_H5["every_block_switch"].replace(dynamic_image_size=True, gelu="quick")
    weights = vitspec.init_weights(spec, seed=13, scheme="random")
    model = backend.build(spec, weights)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert isinstance(loaded, tfb.VisionTransformer) and loaded.spec == spec
    exported = backend.export(loaded)
    assert all(exported[k].tobytes() == v.tobytes() for k, v in weights.items())
    for size in ((16, 16), (12, 20)):
        images = np.random.default_rng(5).standard_normal((2, *size, 3)).astype(np.float32)
        assert np.array_equal(loaded(images).numpy(), model(images).numpy())


# ---- peers: keras-hub's DINOv2 and SigLIP through our layout ------------------------------------


def _set(variable: Any, value: np.ndarray) -> None:
    variable.assign(np.asarray(value, np.float32).reshape(tuple(variable.shape)))


def _mha(mha: Any, w: dict[str, np.ndarray], prefix: str, parts: tuple[str, ...]) -> None:
    """keras MultiHeadAttention's kernels are our dense kernels with the heads split out."""
    for dense, part in zip(
        (mha._query_dense, mha._key_dense, mha._value_dense, mha._output_dense), parts, strict=True
    ):
        _set(dense.kernel, w[f"{prefix}.{part}.kernel"])
        _set(dense.bias, w[f"{prefix}.{part}.bias"])


def _layer_norm(layer: Any, w: dict[str, np.ndarray], name: str) -> None:
    _set(layer.gamma, w[f"{name}.scale"])
    _set(layer.beta, w[f"{name}.bias"])


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_keras_hub_dinov2_with_registers_and_layer_scale_agrees(backend, swiglu: bool) -> None:
    keras_hub = pytest.importorskip("keras_hub")
    regs, d = 2, 16
    # keras-hub's SwiGLU width is int(intermediate * 2 / 3) rounded up to a multiple of 8: 48 -> 32.
    spec = vitspec.Spec(
        **{**_TINY, "n_classes": 0},
        reg_tokens=regs,
        layer_scale=0.1,
        mlp="swiglu" if swiglu else "standard",
        mlp_ratio=2.0 if swiglu else 4.0,
    )
    weights = vitspec.init_weights(spec, seed=14, scheme="random")
    weights["pos_embed"][1 : 1 + regs] = 0.0  # DINOv2 adds no position to its registers
    peer = keras_hub.models.DINOV2Backbone(
        patch_size=4,
        num_layers=2,
        hidden_dim=d,
        num_heads=2,
        intermediate_dim=48 if swiglu else 64,
        layer_scale_init_value=0.1,
        num_register_tokens=regs,
        use_mask_token=False,
        use_swiglu_ffn=swiglu,
        image_shape=(16, 16, 3),
        position_embedding_shape=(16, 16, 3),
    )
    native = dict(KERAS.to_native(spec, weights))  # our layout's names, as the peer's are alike
    emb = peer.embeddings
    _set(emb.cls_token, native["class_token"])
    _set(emb.register_tokens, native["register_tokens"])
    table = np.concatenate([native["pos_embed"][:1], native["pos_embed"][1 + regs :]])
    _set(emb.position_embeddings, table)
    _set(emb.interpolated_position_embeddings, table)
    _set(emb.patch_embeddings.projection.kernel, native["patch_embed/kernel"])
    _set(emb.patch_embeddings.projection.bias, native["patch_embed/bias"])
    for i, layer in enumerate(peer.encoder.layers):
        b = f"blocks.{i}"
        _layer_norm(layer.norm1, weights, f"{b}.norm1")
        _mha(layer.attention.attention, weights, f"{b}.attn", ("query", "key", "value", "out"))
        _set(layer.layer_scale1.lambda1, native[f"blocks_{i}/layer_scale1/lambda1"])
        _layer_norm(layer.norm2, weights, f"{b}.norm2")
        if swiglu:  # the same fused [gate | linear] kernel: keras-hub's weights_in is ours
            for ours, theirs in (
                ("weights_in", layer.mlp.weights_in),
                ("weights_out", layer.mlp.weights_out),
            ):
                _set(theirs.kernel, native[f"blocks_{i}/mlp/{ours}/kernel"])
                _set(theirs.bias, native[f"blocks_{i}/mlp/{ours}/bias"])
        else:
            for fc in ("fc1", "fc2"):
                _set(getattr(layer.mlp, fc).kernel, native[f"blocks_{i}/mlp/{fc}/kernel"])
                _set(getattr(layer.mlp, fc).bias, native[f"blocks_{i}/mlp/{fc}/bias"])
        _set(layer.layer_scale2.lambda1, native[f"blocks_{i}/layer_scale2/lambda1"])
    _layer_norm(peer.layernorm, weights, "norm")
    images = _images(spec, 2)
    theirs = peer({"images": images}).numpy()
    ours = backend.forward(backend.build(spec, weights), images, capture="encoded")["encoded"]
    ref = reference.forward(spec, weights, images, capture="encoded")["encoded"]
    assert rel_err(theirs, ref) <= TOL and rel_err(ours, theirs) <= 2 * TOL


def test_keras_hub_siglip_map_pooling_agrees(backend) -> None:
    keras_hub = pytest.importorskip("keras_hub")
    spec = vitspec.Spec(
        **VARIANTS["siglip"], **{k: v for k, v in _TINY.items() if k != "n_classes"}
    )
    weights = vitspec.init_weights(spec, seed=15, scheme="random")
    peer = keras_hub.models.SigLIPVisionEncoder(
        patch_size=4,
        hidden_dim=16,
        num_layers=2,
        num_heads=2,
        intermediate_dim=64,
        intermediate_activation="gelu_approximate",
        layer_norm_epsilon=1e-6,
        image_shape=(16, 16, 3),
    )
    _set(peer.embedding.patch_embedding.kernel, weights["patch_embed.kernel"])
    _set(peer.embedding.patch_embedding.bias, weights["patch_embed.bias"])
    _set(peer.embedding.position_embedding.embeddings, weights["pos_embed"])
    for i, layer in enumerate(peer.encoder_layers):
        b = f"blocks.{i}"
        _layer_norm(layer.layer_norm1, weights, f"{b}.norm1")
        _mha(layer.self_attn, weights, f"{b}.attn", ("query", "key", "value", "out"))
        _layer_norm(layer.layer_norm2, weights, f"{b}.norm2")
        for fc in ("fc1", "fc2"):
            _set(getattr(layer.mlp, fc).kernel, weights[f"{b}.mlp.{fc}.kernel"])
            _set(getattr(layer.mlp, fc).bias, weights[f"{b}.mlp.{fc}.bias"])
    _layer_norm(peer.post_layer_norm, weights, "norm")
    # SigLIP's pool, by our layout's names (pool/probe, pool/attention/..., pool/layernorm, pool/mlp)
    native = dict(KERAS.to_native(spec, weights))
    pool = peer.head
    _set(pool.probe, native["pool/probe"])
    mha = pool.attention
    for dense, part in zip(
        (mha._query_dense, mha._key_dense, mha._value_dense, mha._output_dense),
        ("query", "key", "value", "attention_output"),
        strict=True,
    ):
        _set(dense.kernel, native[f"pool/attention/{part}/kernel"])
        _set(dense.bias, native[f"pool/attention/{part}/bias"])
    _set(pool.layer_norm.gamma, native["pool/layernorm/scale"])
    _set(pool.layer_norm.beta, native["pool/layernorm/bias"])
    for fc in ("fc1", "fc2"):
        _set(getattr(pool.mlp, fc).kernel, native[f"pool/mlp/{fc}/kernel"])
        _set(getattr(pool.mlp, fc).bias, native[f"pool/mlp/{fc}/bias"])
    images = _images(spec, 2)
    theirs = peer({"images": images}).numpy()
    ours = backend.forward(backend.build(spec, weights), images)["output"]
    ref = reference.forward(spec, weights, images)["output"]
    assert theirs.shape == ours.shape == (2, 16)
    assert rel_err(theirs, ref) <= TOL and rel_err(ours, theirs) <= 2 * TOL
