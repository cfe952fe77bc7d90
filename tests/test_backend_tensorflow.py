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

    def spy(model: Any, names: tuple[str, ...]) -> Any:
        def run(images: Any) -> Any:
            seen.append(tf.config.experimental.tensor_float_32_execution_enabled())
            return compiled(model, names)(images)

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
