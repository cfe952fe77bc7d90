"""The JAX/Flax backend's own promises: the NNX model alone (jit, grad, dropout), native names,
the framework-free layout functions and the jax.export artifact. The protocol itself is checked
for every backend in test_backend_contract.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import rel_err

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")

import vitspec  # noqa: E402
from vitspec import reference  # noqa: E402
from vitspec.backends import jax as vjax  # noqa: E402
from vitspec.errors import WeightsError  # noqa: E402
from vitspec.families import family  # noqa: E402
from vitspec.layouts.flax import FLAX  # noqa: E402

TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]

# Small specs covering every optional tensor: class token or not, learned/sincos/no position,
# qkv bias or not, pre-logits, no head, non-square patches.
SPECS = {
    "vit_paper": family("vit_paper"),
    "pre_logits": family("vit_paper_pre_logits"),
    "gap_sincos": family("big_vision_sincos"),
    "no_qkv_bias": family("timm_no_qkv_bias"),
    "no_head_no_pos": family("no_pos_embed", n_classes=0),
    "non_square": family("non_square", depth=1),
}


@pytest.fixture(scope="module")
def backend() -> vjax.JaxBackend:
    return vitspec.backend("jax")


def _images(spec: vitspec.Spec, batch: int, seed: int = 1) -> np.ndarray:
    return (
        np.random.default_rng(seed)
        .standard_normal((batch, *spec.image_size, spec.in_channels))
        .astype(np.float32)
    )


def _flat_params(model) -> dict[str, jax.Array]:
    return {
        ".".join(map(str, path)): v.get_value()
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def test_identity(backend) -> None:
    import flax

    assert backend.name == "jax"
    assert backend.version == jax.__version__
    assert backend.flax_version == flax.__version__


@pytest.mark.parametrize("key", list(SPECS))
def test_native_names_are_the_flattened_nnx_state_paths(backend, key: str) -> None:
    spec = SPECS[key]
    weights = vitspec.init_weights(spec, seed=2, scheme="random")
    model = backend.build(spec, weights)
    state = _flat_params(model)
    layout = FLAX.native_layout(spec)
    assert sorted(name for name, _ in layout) == sorted(state)
    for name, shape in layout:
        assert state[name].shape == shape, name
        assert state[name].dtype == np.float32, name
    for name, value in FLAX.to_native(spec, weights):
        assert np.array_equal(np.asarray(state[name]), value), name


def test_fused_qkv_and_patch_kernel_layout() -> None:
    spec = family("vit_paper")
    weights = vitspec.init_weights(spec, seed=0, scheme="random")
    native = dict(FLAX.to_native(spec, weights))
    d = spec.hidden_dim
    assert native["blocks.1.attn.qkv.kernel"].shape == (d, 3 * d)
    np.testing.assert_array_equal(
        native["blocks.1.attn.qkv.kernel"][:, d : 2 * d], weights["blocks.1.attn.key.kernel"]
    )
    np.testing.assert_array_equal(
        native["blocks.1.attn.qkv.bias"][2 * d :], weights["blocks.1.attn.value.bias"]
    )
    # A patch flattens in (row, column, channel) order, as the canonical HWIO kernel does.
    np.testing.assert_array_equal(
        native["patch_embed.kernel"][1 * 3 + 2], weights["patch_embed.kernel"][0, 1, 2]
    )


def test_from_native_inverts_to_native_bit_for_bit() -> None:
    spec = SPECS["no_qkv_bias"]
    weights = vitspec.init_weights(spec, seed=4, scheme="random")
    native = dict(FLAX.to_native(spec, weights))
    back = dict(FLAX.from_native(spec, native))
    assert list(back) == list(weights)
    for name, value in weights.items():
        assert back[name].flags.c_contiguous, name
        assert np.array_equal(back[name].view(np.uint32), value.view(np.uint32)), name


def test_layout_functions_import_neither_jax_nor_flax() -> None:
    code = """
import json, sys
import numpy as np
import vitspec
from vitspec.backends import jax as vjax
from vitspec.layouts.flax import FLAX
spec = vitspec.preset("Ti/16")
weights = vitspec.init_weights(spec, seed=0)
native = dict(FLAX.to_native(spec, weights))
back = dict(FLAX.from_native(spec, native))
ok = list(back) == list(weights) and all(np.array_equal(back[k], weights[k]) for k in weights)
print(json.dumps({"ok": ok, "layout": len(FLAX.native_layout(spec)),
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax"))}))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"ok": True, "layout": 4 + 12 * 12 + 4, "loaded": []}


def test_model_alone_under_jit_matches_reference() -> None:
    spec = family("timm_avg_fc_norm", depth=1)
    weights = vitspec.init_weights(spec, seed=6, scheme="random")
    model = vjax.VisionTransformer(spec, weights)
    images = _images(spec, 3)
    expected = reference.forward(spec, weights, images, capture=("blocks.0.attn_probs", "pooled"))
    by_nnx = nnx.jit(lambda m, x: m(x))(model, images)
    # model.forward_captures: the backend's named intermediates, from the plain module under jax.jit.
    by_jax = jax.jit(lambda m, x: m.forward_captures(x, ("blocks.0.attn_probs", "pooled")))(
        model, images
    )
    assert set(by_jax) == {"blocks.0.attn_probs", "pooled", "output"}
    assert by_jax["blocks.0.attn_probs"].shape == (3, 4, 17, 17)
    for got in (by_nnx, by_jax["output"]):
        assert got.shape == (3, 10) and got.dtype == np.float32
        assert rel_err(np.asarray(got), expected["output"]) <= TOL
    for name in ("blocks.0.attn_probs", "pooled"):
        assert rel_err(np.asarray(by_jax[name]), expected[name]) <= TOL, name


def test_spec_is_static_and_the_model_holds_only_float32_arrays() -> None:
    spec = family("big_vision_gap", dropout=0.1)
    model = vjax.VisionTransformer(spec)
    assert model.spec is spec
    graphdef, state = nnx.split(model)
    assert spec not in jax.tree.leaves(state)  # static: part of the graph definition, hashable
    assert isinstance(hash(graphdef), int) and nnx.merge(graphdef, state).spec == spec
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert params and all(p.dtype == np.float32 for p in params)
    assert not jax.config.jax_enable_x64


def test_default_init_is_vitspec_init() -> None:
    spec = family("vit_paper")
    model = vjax.VisionTransformer(spec, seed=7)
    native = dict(FLAX.to_native(spec, vitspec.init_weights(spec, seed=7)))
    for name, value in _flat_params(model).items():
        assert np.array_equal(np.asarray(value), native[name]), name


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits)
    return -jax.numpy.take_along_axis(logp, labels[:, None], axis=1).mean()


def test_gradient_step_has_finite_grads_for_every_parameter_and_lowers_the_loss() -> None:
    spec = family("vit_paper_pre_logits", depth=2, dropout=0.1, drop_path=0.1)
    model = vjax.VisionTransformer(
        spec, vitspec.init_weights(spec, seed=0, scheme="random"), rngs=nnx.Rngs(dropout=3)
    )
    images = jax.numpy.asarray(_images(spec, 4))
    labels = jax.numpy.asarray([1, 3, 5, 7])

    # Plain JAX: split once, jax.grad over the Param state, an SGD step, the loss goes down.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_and_grad = jax.jit(
        jax.value_and_grad(lambda p: _cross_entropy(nnx.merge(graphdef, p, rest)(images), labels))
    )
    loss0, grads = loss_and_grad(params)
    loss1, _ = loss_and_grad(jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
    assert float(loss1) < float(loss0)

    # NNX: nnx.grad under nnx.jit in training mode (dropout and drop path on).
    model.train()

    @nnx.jit
    def train_grads(m):
        return nnx.grad(lambda m: _cross_entropy(m(images), labels))(m)

    for tree in (grads, train_grads(model)):
        flat = {
            ".".join(map(str, k)): np.asarray(g.get_value()) for k, g in nnx.to_flat_state(tree)
        }
        assert sorted(flat) == sorted(name for name, _ in FLAX.native_layout(spec))
        for name, g in flat.items():
            assert np.isfinite(g).all() and np.abs(g).max() > 0, name


def test_forward_compiles_once_per_capture_set_and_shape(backend) -> None:
    spec = family("mnist", depth=1, hidden_dim=16, n_heads=2)
    model = backend.build(spec)
    run = vjax._compiled()
    before = run._cache_size()
    first = backend.forward(model, _images(spec, 2), capture=("pooled", "embed"))
    backend.forward(model, _images(spec, 2, seed=5), capture=["embed", "pooled"])
    assert run._cache_size() == before + 1
    assert list(first) == ["embed", "pooled", "output"]  # forward order, output last
    backend.forward(model, _images(spec, 3), capture=("embed", "pooled"))
    assert run._cache_size() == before + 2


def test_dropout_only_in_training_and_forward_always_evaluates(backend) -> None:
    spec = family("vit_paper", depth=3, dropout=0.5, attn_dropout=0.2, drop_path=0.3)
    weights = vitspec.init_weights(spec, seed=1, scheme="random")
    model = vjax.VisionTransformer(spec, weights, rngs=nnx.Rngs(dropout=0))
    images = _images(spec, 8)
    expected = reference.forward(spec, weights, images, capture=("embed",))
    assert [b.drop_path.rate if b.drop_path else 0.0 for b in model.blocks] == [0.0, 0.15, 0.3]
    assert model.embed_drop.deterministic is True  # built in eval mode
    # nnx.jit carries the advanced dropout RNG state back into the model.
    apply = nnx.jit(lambda m, x: m.forward_captures(x, ("embed",)))

    model.train()
    first, second = apply(model, images), apply(model, images)
    assert np.isfinite(first["output"]).all()
    assert not np.array_equal(first["output"], second["output"])
    assert rel_err(np.asarray(first["output"]), expected["output"]) > 1e-2

    # backend.forward is inference: dropout off, and the user's model stays in training mode.
    assert rel_err(backend.forward(model, images)["output"], expected["output"]) <= TOL
    assert model.embed_drop.deterministic is False
    model.eval()
    assert rel_err(np.asarray(apply(model, images)["output"]), expected["output"]) <= TOL


@pytest.mark.parametrize(
    "rates",
    [{"dropout": 0.3}, {"attn_dropout": 0.3}, {"drop_path": 0.3}],
    ids=lambda r: "+".join(r),
)
def test_each_rate_alone_changes_the_output_in_training_only(rates: dict[str, float]) -> None:
    spec = family("vit_paper", depth=2, **rates)
    weights = vitspec.init_weights(spec, seed=1, scheme="random")
    model = vjax.VisionTransformer(spec, weights, rngs=nnx.Rngs(dropout=0))
    images = _images(spec, 4)
    expected = reference.forward(spec, weights, images)["output"]
    apply = nnx.jit(lambda m, x: m(x))
    evaluated, again = np.asarray(apply(model, images)), np.asarray(apply(model, images))
    assert np.array_equal(evaluated, again)
    assert rel_err(evaluated, expected) <= TOL
    model.train()
    first, second = np.asarray(apply(model, images)), np.asarray(apply(model, images))
    assert rel_err(first, expected) > 1e-3 and rel_err(second, expected) > 1e-3
    assert not np.array_equal(first, second)
    model.eval()
    assert np.array_equal(np.asarray(apply(model, images)), evaluated)


def _within(fraction: float, p: float, n: int) -> bool:
    """A Bernoulli(p) frequency over n draws within 5 standard deviations of p."""
    return abs(fraction - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_dropout_rates_are_right_statistically() -> None:
    spec = family("vit_paper", depth=3, dropout=0.3, attn_dropout=0.2, drop_path=0.4)
    weights = vitspec.init_weights(spec, seed=2, scheme="random")
    model = vjax.VisionTransformer(spec, weights, rngs=nnx.Rngs(dropout=5))
    images = _images(spec, 16)
    expected = reference.forward(spec, weights, images, capture=("embed",))["embed"]
    model.train()
    # Dropout after the position embedding, end to end: each value zeroed with probability 0.3,
    # the kept ones scaled by 1 / 0.7.
    embed = np.asarray(
        nnx.jit(lambda m, x: m.forward_captures(x, ("embed",)))(model, images)["embed"]
    )
    kept = embed != 0
    assert _within(1 - kept.mean(), 0.3, kept.size), kept.mean()
    np.testing.assert_allclose(embed[kept], expected[kept] / 0.7, rtol=1e-5, atol=1e-6)
    n = 200_000
    for i, block in enumerate(model.blocks):
        # Attention dropout: every block's module, on n attention probabilities.
        probs = np.asarray(block.attn.attn_drop(jax.numpy.ones((n,))))
        assert set(np.unique(probs).tolist()) == {0.0, float(np.float32(1 / 0.8))}, i
        assert _within((probs == 0).mean(), 0.2, n), (i, (probs == 0).mean())
        # Stochastic depth: block i drops with rate 0.4 * i / 2, one mask value per sample.
        rate = 0.4 * i / 2
        if rate == 0:
            assert block.drop_path is None
            continue
        mask = np.asarray(block.drop_path(jax.numpy.ones((n // 10, 5, 3))))
        assert (mask == mask[:, :1, :1]).all(), i
        assert set(np.unique(mask).tolist()) == {0.0, float(np.float32(1 / (1 - rate)))}, i
        assert _within((mask[:, 0, 0] == 0).mean(), rate, n // 10), (i, (mask[:, 0, 0] == 0).mean())


def test_load_casts_to_float32_and_refuses_bad_weights_whole(backend) -> None:
    spec = family("hf_vit")
    weights = vitspec.init_weights(spec, seed=2, scheme="random")
    model = backend.build(spec, {k: v.astype(np.float64) for k, v in weights.items()})
    assert all(v.dtype == np.float32 for v in _flat_params(model).values())
    before = backend.export(model)
    bad = dict(weights, **{"norm.scale": np.zeros((3,), np.float32)})
    with pytest.raises(WeightsError, match=r"norm.scale: expected shape \[32\], found \[3\]"):
        backend.load(model, bad)
    after = backend.export(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


_LOAD_WITH_JAX_ALONE = """
import json, sys
import jax, numpy as np
from pathlib import Path
exported = jax.export.deserialize(bytearray(Path(sys.argv[1]).read_bytes()))
results = {}
for batch in map(int, sys.argv[3:]):
    images = np.load(sys.argv[2])[:batch]
    results[batch] = np.asarray(exported.call(images)).tolist()
print(json.dumps({"results": results, "flax": "flax" in sys.modules, "vitspec": "vitspec" in sys.modules}))
"""


@pytest.mark.parametrize("batch", [2, None])
def test_artifact_loads_and_runs_with_jax_alone(backend, tmp_path: Path, batch: int | None) -> None:
    spec = family("gelu_tanh", depth=1)
    weights = vitspec.init_weights(spec, seed=8, scheme="random")
    model = backend.build(spec, weights)
    model.train()  # the artifact is served in eval mode regardless
    path = backend.save_artifact(model, tmp_path / "vit.jax_exported", batch)
    assert path.stat().st_size > 4 * spec.n_params  # weights are baked in
    assert model.embed_drop is None or model.embed_drop.deterministic is False
    images = _images(spec, 3)
    np.save(tmp_path / "images.npy", images)
    batches = ["2"] if batch else ["1", "3"]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_WITH_JAX_ALONE,
            str(path),
            str(tmp_path / "images.npy"),
            *batches,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["flax"] and not result["vitspec"]
    for n, got in result["results"].items():
        expected = reference.forward(spec, weights, images[: int(n)])["output"]
        assert rel_err(np.asarray(got, np.float32), expected) <= TOL


@pytest.mark.parametrize("batch", [0, 2.0, True])
def test_save_artifact_rejects_a_bad_batch(backend, tmp_path: Path, batch: object) -> None:
    model = backend.build(family("mnist", depth=1))
    with pytest.raises(ValueError, match=r"batch: expected a positive integer or None, found"):
        backend.save_artifact(model, tmp_path / "bad", batch)
    assert not (tmp_path / "bad").exists()
