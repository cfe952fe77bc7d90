"""Conversion proven against the real libraries: timm, HF transformers, and timm's Google/big_vision npz loader.

Each test makes its own random weights (no hub access). A library checkpoint converted to
canonical must run in every backend with the library's own output; a canonical checkpoint
converted back must load into the library with strict loading and give the same output.
Numbers are compared as max |a - ref| / max |ref| <= 1e-5 in float32.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("timm", reason="the peer-library tests need timm (pip install 'vitspec[test]')")
import timm.models.vision_transformer  # noqa: F401 - see below
import torch
from conftest import rel_err
from safetensors.torch import save_file

import vitspec
from vitspec import formats, reference
from vitspec.families import family
from vitspec.formats.resample import resample_grid, resample_pos_embed

# timm imports torch._dynamo, which loads triton's native library; loading that after TensorFlow
# segfaults in this environment, so it is imported above, when pytest collects this module.
TOL = 1e-5
FRAMEWORK_BACKENDS = ["torch", "tensorflow", "jax"]


@pytest.fixture(scope="module", params=FRAMEWORK_BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[vitspec.backends.Backend]:
    if request.param != "tensorflow":
        yield vitspec.backend(request.param)
        return
    # These tests check weights, not XLA: plain tf.function graphs skip a compile per spec.
    from vitspec.backends import tensorflow

    jit, tensorflow.JIT_COMPILE = tensorflow.JIT_COMPILE, False
    try:
        yield vitspec.backend("tensorflow")
    finally:
        tensorflow.JIT_COMPILE = jit


def _images(spec: vitspec.Spec, batch: int = 2, seed: int = 7) -> np.ndarray:
    shape = (batch, *spec.image_size, spec.in_channels)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter non-trivial (zero biases and unit norms would hide layout bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if name.endswith(("cls_token", "pos_embed", "position_embeddings")) else 0.1
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(
                1.0 + noise
                if name.endswith(
                    (
                        "norm1.weight",
                        "norm2.weight",
                        "norm.weight",
                        "layernorm_before.weight",
                        "layernorm_after.weight",
                        "layernorm.weight",
                    )
                )
                else noise
            )


def _run_everywhere(
    backend: vitspec.backends.Backend, path: Path, images: np.ndarray, expected: np.ndarray
) -> vitspec.Spec:
    weights, spec = vitspec.load_weights(path)
    got = backend.forward(backend.build(spec, weights), images)["output"]
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= TOL, f"{backend.name}: {rel_err(got, expected):.2e}"
    return spec


# ---- timm ------------------------------------------------------------------------------------

TIMM_CASES = {
    "token": {},
    "avg_fc_norm": {"global_pool": "avg"},
    "no_qkv_bias": {"qkv_bias": False},
    "no_head": {"num_classes": 0},
}


def _timm_model(options: dict, seed: int = 0) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 4,
        "num_classes": 5,
        **options,
    }
    model = VisionTransformer(**kwargs).eval()
    _randomize(model, seed)
    return model


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_checkpoint_runs_in_every_backend(tmp_path: Path, backend, case: str) -> None:
    model = _timm_model(TIMM_CASES[case])
    src = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), src)
    images = _images(vitspec.Spec(image_size=32, patch_size=8, hidden_dim=32, n_heads=4, depth=2))
    with torch.no_grad():
        expected = model(_nchw(images)).numpy()
    out = tmp_path / "canonical.safetensors"
    result = formats.convert(src, out, spec={"n_heads": 4})
    assert result.from_format == "timm" and result.to_format == "canonical"
    spec = _run_everywhere(backend, out, images, expected)
    assert spec.pooling == ("avg" if case == "avg_fc_norm" else "token")
    assert spec.qkv_bias == (case != "no_qkv_bias")
    assert spec.n_classes == (0 if case == "no_head" else 5)


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_canonical_to_timm_loads_strictly_and_matches(tmp_path: Path, case: str) -> None:
    original = _timm_model(TIMM_CASES[case], seed=1)
    src = tmp_path / "timm.safetensors"
    save_file(original.state_dict(), src)
    canonical = tmp_path / "c.safetensors"
    formats.convert(src, canonical, spec={"n_heads": 4})
    back = tmp_path / "back.safetensors"
    formats.convert(canonical, back, to_format="timm")

    from safetensors.torch import load_file

    fresh = _timm_model(TIMM_CASES[case], seed=99)
    fresh.load_state_dict(load_file(back), strict=True)
    for name, value in original.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    weights, spec = vitspec.load_weights(canonical)
    images = _images(spec)
    with torch.no_grad():
        got = fresh(_nchw(images)).numpy()
    assert rel_err(got, reference.forward(spec, weights, images)["output"]) <= TOL


def test_timm_pth_checkpoint_reads_through_weights_only(tmp_path: Path) -> None:
    model = _timm_model({})
    src = tmp_path / "model.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, src)
    weights, spec = formats.load(src, spec="n_heads=4")
    assert np.array_equal(
        weights["blocks.1.attn.key.kernel"],
        model.blocks[1].attn.qkv.weight[32:64].T.detach().numpy(),
    )
    images = _images(spec)
    with torch.no_grad():
        expected = model(_nchw(images)).numpy()
    assert rel_err(reference.forward(spec, weights, images)["output"], expected) <= TOL


# Real timm files whose patch grid the tensors do not tell: the img_size=(224, 256) (225
# rows, also a 15x15 grid without a class row), other n x (n+2) grids, the mirror (a square grid
# with no_embed_class, also n x (n+2) with a row) and a non-square grid without a class token.
TIMM_GRIDS = {
    "224x256": (
        {"img_size": (224, 256)},
        "image_size=[224,256]",
        "225 rows, which can be read two ways",
    ),
    "48x80_slot_given": (
        {"img_size": (48, 80)},
        "pos_embed_class_slot=true,image_size=[48,80]",
        "16 rows, which can be read two ways",
    ),
    "80x48": ({"img_size": (80, 48)}, "image_size=[80,48]", "16 rows, which can be read two ways"),
    "no_embed_class_80": (
        {"img_size": 80, "no_embed_class": True},
        "pos_embed_class_slot=false",
        "25 rows, which can be read two ways",
    ),
    "no_class_token_64x112": (
        {"img_size": (64, 112), "class_token": False, "global_pool": "avg"},
        "image_size=[64,112]",
        "cannot tell the image size: the position embedding has 28 rows",
    ),
}


@pytest.mark.parametrize("case", list(TIMM_GRIDS))
def test_timm_grids_the_tensors_cannot_tell_are_asked_for_never_guessed(
    tmp_path: Path, case: str
) -> None:
    from timm.models.vision_transformer import VisionTransformer

    options, given, refusal = TIMM_GRIDS[case]
    model = VisionTransformer(
        patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3, **options
    ).eval()
    _randomize(model, 3)
    src = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), src)
    with pytest.raises(vitspec.errors.SpecError, match=re.escape(refusal)):
        formats.convert(src, tmp_path / "guess.safetensors", spec="n_heads=2")
    assert not (tmp_path / "guess.safetensors").exists()
    result = formats.convert(src, tmp_path / "c.safetensors", spec=f"n_heads=2,{given}")
    weights, spec = vitspec.load_weights(tmp_path / "c.safetensors")
    assert spec.image_size == tuple(model.patch_embed.img_size)
    assert spec.pos_embed_class_slot == (model.has_class_token and not model.no_embed_class)
    images = _images(spec, batch=1)
    with torch.no_grad():
        expected = model(_nchw(images)).numpy()
    assert rel_err(reference.forward(spec, weights, images)["output"], expected) <= TOL
    # a square grid the user did not give is still an assumption, and marked as one
    assert ("image_size" in result.inference.assumed) == ("image_size" not in given)
    assert "pooling" in result.inference.assumed


@pytest.mark.parametrize(
    "options",
    [
        {"global_pool": "max"},
        {"global_pool": "avgmax"},
        {"global_pool": "avg", "pool_include_prefix": True},
    ],
)
def test_timm_pooling_vitspec_cannot_express_is_named_where_pooling_is_assumed(
    tmp_path: Path, options: dict
) -> None:
    model = _timm_model(options)
    src = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), src)
    result = formats.convert(src, tmp_path / "c.safetensors", spec={"n_heads": 4})
    assert result.inference.assumed["pooling"] == "avg"
    note = next(line for line in result.inference.notes() if line.startswith("pooling = avg"))
    assert "does not record global_pool" in note
    assert (
        "global_pool='max' and 'avgmax' and pool_include_prefix=True leave the same tensors and have no vitspec equivalent"
        in note
    )
    # which is why it must be said: such a model's numbers are not the converted model's
    weights, spec = vitspec.load_weights(tmp_path / "c.safetensors")
    images = _images(spec)
    with torch.no_grad():
        expected = model(_nchw(images)).numpy()
    assert rel_err(reference.forward(spec, weights, images)["output"], expected) > 1e-3


# ---- HF transformers ---------------------------------------------------------------------------

HF_CASES = {
    "ViTModel": ({}, "ViTModel"),
    "ViTForImageClassification": ({"num_labels": 5}, "ViTForImageClassification"),
    "tanh_no_qkv_bias": (
        {
            "num_labels": 3,
            "hidden_act": "gelu_pytorch_tanh",
            "qkv_bias": False,
            "layer_norm_eps": 1e-6,
        },
        "ViTForImageClassification",
    ),
}


def _hf_model(options: dict, cls_name: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        **options,
    )
    model = getattr(transformers, cls_name)(config).eval()
    _randomize(model, seed)
    return model


def _hf_output(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(pixel_values=_nchw(images))
    return (out.logits if hasattr(out, "logits") else out.pooler_output).numpy()


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_checkpoint_runs_in_every_backend(tmp_path: Path, backend, case: str) -> None:
    options, cls_name = HF_CASES[case]
    model = _hf_model(options, cls_name)
    folder = tmp_path / "hf"
    # ViTModel is saved sharded: the index and both shards must be read.
    model.save_pretrained(folder, max_shard_size="20KB" if cls_name == "ViTModel" else "5GB")
    if cls_name == "ViTModel":
        assert (folder / "model.safetensors.index.json").is_file()
    spec0 = vitspec.Spec(image_size=32, patch_size=8, hidden_dim=32, n_heads=4, depth=2)
    images = _images(spec0)
    out = tmp_path / "c.safetensors"
    result = formats.convert(folder, out)
    assert result.from_format == "hf" and result.inference.assumed == {}
    spec = _run_everywhere(backend, out, images, _hf_output(model, images))
    if cls_name == "ViTModel":
        assert spec.n_classes == 0 and spec.pre_logits_dim == 32
    assert spec.norm_eps == options.get("layer_norm_eps", 1e-12)
    assert spec.gelu == ("tanh" if "hidden_act" in options else "exact")


@pytest.mark.parametrize("case", list(HF_CASES))
def test_canonical_to_hf_loads_strictly_and_matches(tmp_path: Path, case: str) -> None:
    import transformers

    options, cls_name = HF_CASES[case]
    original = _hf_model(options, cls_name, seed=3)
    original.save_pretrained(tmp_path / "orig")
    canonical = tmp_path / "c.safetensors"
    formats.convert(tmp_path / "orig", canonical)
    folder = tmp_path / "back"
    formats.convert(canonical, folder, to_format="hf")
    loaded, info = getattr(transformers, cls_name).from_pretrained(folder, output_loading_info=True)
    assert not any(
        info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    ), info
    loaded.eval()
    for name, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    weights, spec = vitspec.load_weights(canonical)
    images = _images(spec)
    assert (
        rel_err(_hf_output(loaded, images), reference.forward(spec, weights, images)["output"])
        <= TOL
    )


def test_hf_reads_transformers5_in_memory_names(tmp_path: Path) -> None:
    model = _hf_model({"num_labels": 4}, "ViTForImageClassification")
    save_file(
        model.state_dict(), tmp_path / "model.safetensors"
    )  # layers.{i}.attention.q_proj ... names
    model.config.to_json_file(tmp_path / "config.json")
    weights, spec = formats.load(tmp_path / "model.safetensors")
    images = _images(spec)
    assert (
        rel_err(reference.forward(spec, weights, images)["output"], _hf_output(model, images))
        <= TOL
    )


# ---- Google / big_vision npz through timm's loader -------------------------------------------

NPZ_CASES = {
    # format, vitspec family, timm options that build the same model
    "google_token": ("google", family("vit_paper", n_classes=5), {}),
    "google_gap": (
        "google",
        family("big_vision_gap", n_classes=5),
        {"class_token": False, "global_pool": "avg", "fc_norm": False},
    ),
    "big_vision_tok": (
        "big_vision",
        family("timm_no_embed_class", n_classes=5),
        {"no_embed_class": True},
    ),
    "big_vision_gap": (
        "big_vision",
        family("big_vision_gap", n_classes=5),
        {"class_token": False, "global_pool": "avg", "fc_norm": False},
    ),
    # SigLIP's pool_type='map': timm reads MAPHead_0 into its AttentionPoolLatent
    "big_vision_map": (
        "big_vision",
        family("big_vision_gap", pooling="map", n_classes=5),
        {"class_token": False, "global_pool": "map", "fc_norm": False},
    ),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_npz_written_by_vitspec_loads_in_timm_and_matches(tmp_path: Path, case: str) -> None:
    from timm.models.vision_transformer import VisionTransformer

    fmt, spec, options = NPZ_CASES[case]
    weights = vitspec.init_weights(spec, seed=5, scheme="random")
    canonical = tmp_path / "c.safetensors"
    vitspec.save_weights(canonical, weights, spec)
    npz = tmp_path / "w.npz"
    formats.convert(canonical, npz, to_format=fmt)
    assert formats.detect(npz) == fmt
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5, **options
    ).eval()
    model.load_pretrained(str(npz))
    images = _images(spec)
    with torch.no_grad():
        got = model(_nchw(images)).numpy()
    assert rel_err(got, reference.forward(spec, weights, images)["output"]) <= TOL
    # and back: the npz converts to the same canonical tensors, bit for bit
    back, spec_back = formats.load(npz, spec={"gelu": "exact"})
    assert spec_back == spec
    for name, value in weights.items():
        assert np.array_equal(back[name], value), name


# ---- position-embedding resampling vs timm ---------------------------------------------------


RESIZES = [
    ((4, 4), (6, 6)),
    ((6, 6), (4, 4)),
    ((4, 4), (3, 5)),
    ((2, 3), (7, 5)),
    ((14, 14), (24, 24)),
    ((24, 24), (14, 16)),
    ((14, 16), (7, 9)),
    ((7, 7), (7, 12)),
]
# each algorithm and the timm call it equals (the first: timm's defaults, antialias=True)
TIMM_CALLS = {"bicubic-antialias": {}, "bicubic": {"interpolation": "bicubic", "antialias": False}}


@pytest.mark.parametrize("algorithm", list(TIMM_CALLS))
@pytest.mark.parametrize(("old", "new"), RESIZES)
def test_resampling_matches_timm_and_torch(
    old: tuple[int, int], new: tuple[int, int], algorithm: str
) -> None:
    import torch.nn.functional as F
    from timm.layers import resample_abs_pos_embed

    table = np.random.default_rng(0).standard_normal((1 + old[0] * old[1], 16)).astype(np.float32)
    want = resample_abs_pos_embed(
        torch.from_numpy(table[None]),
        new_size=list(new),
        old_size=list(old),
        num_prefix_tokens=1,
        **TIMM_CALLS[algorithm],
    )[0].numpy()
    spec = vitspec.Spec(
        image_size=(old[0] * 4, old[1] * 4), patch_size=4, hidden_dim=16, n_heads=2, depth=1
    )
    got = resample_pos_embed(spec, table, new, algorithm)
    assert got.shape == want.shape == (1 + new[0] * new[1], 16)
    assert np.array_equal(got[0], table[0])
    assert rel_err(got, want) <= 4e-6  # timm computes in float32: a few roundings of 6e-8 each
    # the kernel itself, against torch in float64
    grid = torch.from_numpy(table[1:].astype(np.float64).reshape(1, *old, 16)).permute(0, 3, 1, 2)
    exact = F.interpolate(
        grid,
        size=new,
        mode="bicubic",
        align_corners=False,
        antialias=algorithm == "bicubic-antialias",
    )
    exact = exact.permute(0, 2, 3, 1).reshape(-1, 16).numpy()
    assert np.abs(resample_grid(table[1:], old, new, algorithm) - exact).max() <= 1e-12
    assert np.array_equal(
        resample_grid(table[1:], old, old, algorithm), table[1:].astype(np.float64)
    )


@pytest.mark.parametrize(("old", "new"), [((4, 4), (6, 6)), ((6, 6), (4, 4))])
def test_antialiasing_changes_the_numbers_up_and_down(
    old: tuple[int, int], new: tuple[int, int]
) -> None:
    # torch's antialiased bicubic is Pillow's a=-0.5 filter, renormalised at the border: it differs
    # from plain bicubic when upsampling too, not only when the support is stretched
    table = np.random.default_rng(1).standard_normal((old[0] * old[1], 8))
    difference = rel_err(
        resample_grid(table, old, new, "bicubic-antialias"),
        resample_grid(table, old, new, "bicubic"),
    )
    assert difference > 1e-2


def test_convert_resamples_as_timm_does_by_default(tmp_path: Path) -> None:
    from timm.layers import resample_abs_pos_embed

    model = _timm_model({})  # 32 px, patch 8: a 4x4 grid
    src = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), src)
    table = model.pos_embed.detach()
    for algorithm, call in TIMM_CALLS.items():
        out = tmp_path / f"{algorithm}.safetensors"
        options = {} if algorithm == "bicubic-antialias" else {"resample": algorithm}
        result = formats.convert(src, out, spec={"n_heads": 4}, image_size=(40, 56), **options)
        assert result.resampled.startswith(f"pos_embed grid (4, 4) -> (5, 7) ({algorithm}: ")
        want = resample_abs_pos_embed(
            table, new_size=[5, 7], old_size=[4, 4], num_prefix_tokens=1, **call
        )[0].numpy()
        assert rel_err(vitspec.load_weights(out)[0]["pos_embed"], want) <= 1e-6
