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


# ---- the variants of issue 10 ------------------------------------------------------------------


def _variant(**fields) -> vitspec.Spec:
    return family("timm_token", **fields)


# Each new field alone, then the families that combine them (tiny sizes: 32 px, patch 8, D 32).
VARIANTS = {
    "reg_tokens": _variant(reg_tokens=3),
    "reg_tokens_no_pos_slot": _variant(reg_tokens=2, pos_embed_class_slot=False),
    "distillation": _variant(distillation_token=True),
    "distillation_no_head": _variant(distillation_token=True, n_classes=0),
    "layer_scale": _variant(layer_scale=1e-5),
    "patch_norm_no_patch_bias": _variant(patch_norm=True, patch_bias=False),
    "pre_norm_no_final_norm": _variant(pre_norm=True, final_norm="none"),
    "qk_norm": _variant(qk_norm=True),
    "qk_norm_rms": _variant(qk_norm=True, norm="rms"),
    "no_biases": _variant(qkv_bias=False, proj_bias=False, mlp_bias=False, head_bias=False),
    "quick_gelu": _variant(gelu="quick"),
    "swiglu": _variant(mlp="swiglu", mlp_ratio=2.0),
    "mlp_norm": _variant(mlp_norm=True),
    "rms": _variant(norm="rms"),
    "max": _variant(pooling="max"),
    "max_with_prefix": _variant(pooling="max", pool_include_prefix=True, reg_tokens=1),
    "avgmax": _variant(pooling="avgmax", final_norm="after_pool"),
    "avgmax_with_prefix": _variant(pooling="avgmax", pool_include_prefix=True),
    "avg_with_prefix": _variant(pooling="avg", pool_include_prefix=True, reg_tokens=2),
    "map": _variant(pooling="map", class_token=False),
    "map_with_class_token": _variant(pooling="map", n_classes=0),
    # DINOv2 with registers: 4 registers, layer scale, class token, no position rows for registers
    # in timm (here: the slot on every prefix token, the spec's default).
    "dinov2_reg": _variant(reg_tokens=4, layer_scale=1e-5, norm_eps=1e-6),
    # OpenAI CLIP: QuickGELU, ln_pre, no patch bias, a projection head without bias.
    "clip": _variant(gelu="quick", pre_norm=True, patch_bias=False, head_bias=False, norm_eps=1e-5),
    # SigLIP: MAP pooling, no class token, tanh GELU.
    "siglip": _variant(pooling="map", class_token=False, gelu="tanh", pos_embed_class_slot=False),
    "deit_distilled": _variant(distillation_token=True, norm_eps=1e-6),
    # AIMv2: RMSNorm, SwiGLU, a norm on the patches, no biases, average pooling.
    "aimv2": _variant(
        norm="rms",
        mlp="swiglu",
        patch_norm=True,
        patch_bias=True,
        qkv_bias=False,
        proj_bias=False,
        mlp_bias=False,
        class_token=False,
        pooling="avg",
        norm_eps=1e-5,
    ),
    "dynamic": _variant(dynamic_image_size=True, reg_tokens=1),
}


def test_the_variant_list_sets_every_new_field() -> None:
    from vitspec.formats.format import NEW_VALUES
    from vitspec.formats.format import VARIANTS as FIELDS

    defaults = vitspec.Spec.model_fields
    unset = [
        f
        for f in FIELDS
        if f != "pos_embed_resample"  # set in the dynamic-size tests below
        and all(getattr(s, f) == defaults[f].default for s in VARIANTS.values())
    ]
    unset += [
        f"{f}={v}"
        for f, values in NEW_VALUES.items()
        for v in values
        if all(getattr(s, f) != v for s in VARIANTS.values())
    ]
    assert unset == []


def _captures_match(spec, weights, images, got) -> dict[str, float]:
    expected = reference.forward(spec, weights, images, capture="all")
    assert sorted(got) == sorted(expected), set(got) ^ set(expected)  # jax.jit sorts dict keys
    errors = {}
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        errors[name] = rel_err(np.asarray(got[name]), value)
    return errors


@pytest.mark.parametrize("key", list(VARIANTS))
def test_variant_matches_reference_at_every_capture_point(backend, key: str) -> None:
    spec = VARIANTS[key]
    weights = vitspec.init_weights(spec, seed=3, scheme="random")
    model = backend.build(spec, weights)
    images = _images(spec, 2)
    got = backend.forward(model, images, "all")
    assert list(got) == vitspec.capture_points(spec)  # forward order, output last
    errors = _captures_match(spec, weights, images, got)
    assert max(errors.values()) <= TOL, max(errors, key=errors.get)
    # export(load(w)) == w bit for bit, in the canonical table's order
    exported = backend.export(backend.load(model, weights))
    assert list(exported) == list(weights)
    for name, value in weights.items():
        assert exported[name].tobytes() == value.tobytes(), name
    # and the native names are the model's flattened nnx.state paths, with the layout's shapes
    state = _flat_params(model)
    assert dict(FLAX.native_layout(spec)) == {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("key", ["dinov2_reg", "clip", "siglip", "deit_distilled", "aimv2"])
def test_variant_family_is_the_same_under_jit_and_eagerly(key: str) -> None:
    spec = VARIANTS[key]
    weights = vitspec.init_weights(spec, seed=5, scheme="random")
    model = vjax.VisionTransformer(spec, weights)
    images = _images(spec, 2, seed=4)
    with jax.default_matmul_precision("highest"):
        eager = model.forward_captures(images)
        jitted = jax.jit(lambda m, x: m.forward_captures(x))(model, images)
        by_nnx = nnx.jit(lambda m, x: m(x))(model, images)
    for got in (eager, jitted):
        errors = _captures_match(spec, weights, images, got)
        assert max(errors.values()) <= TOL, max(errors, key=errors.get)
    assert rel_err(np.asarray(by_nnx), np.asarray(jitted["output"])) <= 1e-6


def test_distillation_output_is_the_mean_of_both_heads(backend) -> None:
    spec = VARIANTS["deit_distilled"]
    weights = vitspec.init_weights(spec, seed=6, scheme="random")
    got = backend.forward(backend.build(spec, weights), _images(spec, 3), ("head", "head_dist"))
    assert not np.allclose(got["head"], got["head_dist"])
    np.testing.assert_allclose(got["output"], (got["head"] + got["head_dist"]) / 2, rtol=1e-6)


def test_each_variant_changes_the_numbers(backend) -> None:
    """The variants are not no-ops in the model: each output differs from the plain spec's on
    the weights they share (so matching the reference above means computing the feature)."""
    plain = _variant()
    images = _images(plain, 2)
    shared = vitspec.init_weights(plain, seed=3, scheme="random")
    base = reference.forward(plain, shared, images)["output"]
    for key in ("layer_scale", "qk_norm", "quick_gelu", "rms", "max", "avgmax", "mlp_norm"):
        spec = VARIANTS[key]
        weights = {**vitspec.init_weights(spec, seed=3, scheme="random"), **shared}
        weights = {k: weights[k] for k in vitspec.layout.param_shapes(spec)}
        out = backend.forward(backend.build(spec, weights), images)["output"]
        assert rel_err(out, base) > 1e-3, key


# ---- dynamic image size --------------------------------------------------------------------------

DYNAMIC = {
    "learned": _variant(dynamic_image_size=True),
    "learned_bicubic": _variant(dynamic_image_size=True, pos_embed_resample="bicubic"),
    "learned_registers_no_slot": _variant(
        dynamic_image_size=True, reg_tokens=2, pos_embed_class_slot=False
    ),
    "sincos": _variant(
        dynamic_image_size=True, pos_embed="sincos2d", class_token=False, pooling="avg"
    ),
    "siglip": _variant(
        dynamic_image_size=True, pooling="map", class_token=False, pos_embed_class_slot=False
    ),
    "non_square": family("non_square", dynamic_image_size=True),
}


@pytest.mark.parametrize("key", list(DYNAMIC))
def test_dynamic_image_size_matches_reference_larger_and_smaller(backend, key: str) -> None:
    spec = DYNAMIC[key]
    weights = vitspec.init_weights(spec, seed=7, scheme="random")
    model = backend.build(spec, weights)
    (h, w), (ph, pw) = spec.image_size, spec.patch_size
    for size in [(h, w), (h + 2 * ph, w + 3 * pw), (h - ph, w - 2 * pw), (ph, pw)]:
        images = np.random.default_rng(1).standard_normal((2, *size, 3)).astype(np.float32)
        got = backend.forward(model, images, "all")
        shapes = vitspec.layout.capture_shapes(spec, 2, size)
        assert {k: v.shape for k, v in got.items()} == shapes, size
        errors = _captures_match(spec, weights, images, got)
        assert max(errors.values()) <= TOL, (size, max(errors, key=errors.get))
    # the other sizes are not the spec's size read wrongly: the grid really changes the tokens
    assert got["patch_embed"].shape[1] == 1


def test_dynamic_size_resamples_inside_jit_and_compiles_per_shape() -> None:
    spec = DYNAMIC["learned"]
    weights = vitspec.init_weights(spec, seed=8, scheme="random")
    model = vjax.VisionTransformer(spec, weights)
    forward = jax.jit(lambda m, x: m(x))
    for size in [(48, 40), (24, 16)]:
        images = np.random.default_rng(2).standard_normal((3, *size, 3)).astype(np.float32)
        expected = reference.forward(spec, weights, images)["output"]
        with jax.default_matmul_precision("highest"):
            assert rel_err(np.asarray(forward(model, images)), expected) <= TOL, size
    assert forward._cache_size() == 2


def test_fixed_size_spec_still_refuses_other_sizes(backend) -> None:
    spec = _variant()
    model = backend.build(spec)
    with pytest.raises(ValueError, match=r"images: expected shape \(batch, 32, 32, 3\) NHWC"):
        backend.forward(model, np.zeros((1, 40, 40, 3), np.float32))
    dynamic = backend.build(DYNAMIC["learned"])
    with pytest.raises(ValueError, match=r"height a multiple of 8 .*found \(1, 36, 40, 3\)"):
        backend.forward(dynamic, np.zeros((1, 36, 40, 3), np.float32))


# ---- training with the new blocks ----------------------------------------------------------------

TRAINABLE = {
    "every_block_feature": _variant(
        reg_tokens=2,
        layer_scale=0.5,
        qk_norm=True,
        mlp="swiglu",
        mlp_norm=True,
        norm="rms",
        patch_norm=True,
        pre_norm=True,
        pooling="map",
        class_token=False,
        pos_embed_class_slot=False,
        depth=2,
        dropout=0.1,
        attn_dropout=0.1,
        drop_path=0.1,
    ),
    "deit_distilled": _variant(distillation_token=True, layer_scale=0.5, gelu="quick", dropout=0.1),
}


@pytest.mark.parametrize("key", list(TRAINABLE))
def test_new_blocks_train_with_finite_gradients_everywhere(key: str) -> None:
    spec = TRAINABLE[key]
    model = vjax.VisionTransformer(
        spec, vitspec.init_weights(spec, seed=0, scheme="random"), rngs=nnx.Rngs(dropout=3)
    )
    images = jax.numpy.asarray(_images(spec, 4))
    labels = jax.numpy.asarray([1, 3, 5, 7])
    model.train()

    @nnx.jit
    def step(m):
        return nnx.value_and_grad(lambda m: _cross_entropy(m(images), labels))(m)

    loss, grads = step(model)
    assert np.isfinite(float(loss))
    flat = {".".join(map(str, k)): np.asarray(g.get_value()) for k, g in nnx.to_flat_state(grads)}
    assert sorted(flat) == sorted(name for name, _ in FLAX.native_layout(spec))
    for name, g in flat.items():
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name
    # training mode really draws masks: two calls differ, eval matches the reference again
    assert not np.array_equal(np.asarray(step(model)[0]), np.asarray(loss))


def test_layer_scale_comes_before_drop_path_in_training() -> None:
    """timm's x + drop_path(ls(attn)): the branch capture is the scaled branch, and each sample
    either adds it scaled by 1 / (1 - rate) or not at all."""
    spec = _variant(layer_scale=0.5, drop_path=0.5, depth=2)  # block 1 drops with rate 0.5
    weights = vitspec.init_weights(spec, seed=1, scheme="random")
    model = vjax.VisionTransformer(spec, weights, rngs=nnx.Rngs(dropout=11))
    images = _images(spec, 16)
    names = ("blocks.0", "blocks.1.attn", "blocks.1.mlp", "blocks.1")
    expected = reference.forward(spec, weights, images, capture=names)
    model.train()
    got = {
        k: np.asarray(v)
        for k, v in nnx.jit(lambda m, x: m.forward_captures(x, names))(model, images).items()
    }
    # block 0 never drops, so block 1's scaled attention branch is the reference's exactly
    assert rel_err(got["blocks.0"], expected["blocks.0"]) <= TOL
    assert rel_err(got["blocks.1.attn"], expected["blocks.1.attn"]) <= TOL
    kept = {"attn": [], "mlp": []}
    for s in range(16):
        added = got["blocks.1"][s] - got["blocks.0"][s]
        fits = {
            (a, m): rel_err(added, 2 * a * got["blocks.1.attn"][s] + 2 * m * got["blocks.1.mlp"][s])
            for a in (0, 1)
            for m in (0, 1)
            if a or m
        }
        fits[(0, 0)] = float(np.abs(added).max())
        (a, m), err = min(fits.items(), key=lambda kv: kv[1])
        assert err <= 1e-5, (s, fits)
        kept["attn"].append(a)
        kept["mlp"].append(m)
    assert 0 < sum(kept["attn"]) < 16 and 0 < sum(kept["mlp"]) < 16, kept
