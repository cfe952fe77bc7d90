"""The torchvision format, proven against torchvision's own ``VisionTransformer``.

Each test makes its own random weights (no hub access). A torchvision checkpoint converted to
canonical must run in every backend with torchvision's own output; a canonical checkpoint written
as torchvision must load into torchvision's model with strict loading and give the reference's
output. Numbers are compared as max |a - ref| / max |ref| <= 1e-5 in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.needs("torch", "torchvision")
pytest.importorskip("torchvision", reason="the torchvision tests need torchvision")
# torchvision imports triton's native library through torch._dynamo; loaded after TensorFlow it
# segfaults here (tests/conftest.py), so it is imported when pytest collects this module.
import torch  # noqa: E402
import torchvision.models.vision_transformer  # noqa: E402, F401
from conftest import rel_err  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import vitspec  # noqa: E402
from vitspec import formats, reference  # noqa: E402
from vitspec.cli.main import main  # noqa: E402
from vitspec.errors import SpecError, WeightsError  # noqa: E402

TOL = 1e-5
FRAMEWORK_BACKENDS = ["torch", "tensorflow", "jax"]
# torchvision constructor arguments of the small models; None: no representation layer.
SMALL = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 4, "hidden_dim": 32}
CASES = {"plain": None, "representation": 16}


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


def _model(representation: int | None, seed: int = 0, **changes: int) -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    kwargs = {**SMALL, "mlp_dim": 64, "num_classes": 5, **changes}
    model = VisionTransformer(**kwargs, representation_size=representation).eval()
    # Every parameter non-trivial: torchvision starts the class token and the head at zero.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            big = name in ("class_token", "encoder.pos_embedding")
            noise = torch.randn(p.shape, generator=gen) * (0.5 if big else 0.1)
            norm = name.endswith(("ln_1.weight", "ln_2.weight", "encoder.ln.weight"))
            p.copy_(1.0 + noise if norm else noise)
    return model


def _images(batch: int = 2, seed: int = 7, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _run(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """torchvision's forward pass: it takes NCHW, vitspec NHWC."""
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()


def _save(model: torch.nn.Module, path: Path) -> Path:
    if path.suffix == ".pth":
        torch.save(model.state_dict(), path)
    else:
        save_file(model.state_dict(), path)
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, list[str]]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("case", list(CASES))
def test_torchvision_checkpoint_runs_in_every_backend(
    tmp_path: Path, backend, case: str, suffix: str
) -> None:
    model = _model(CASES[case])
    src = _save(model, tmp_path / f"vit{suffix}")
    images = _images()
    expected = _run(model, images)
    out = tmp_path / "canonical.safetensors"
    result = formats.convert(src, out, spec={"n_heads": 4})
    assert result.from_format == "torchvision" and result.to_format == "canonical"
    weights, spec = vitspec.load_weights(out)
    assert spec.pre_logits_dim == (CASES[case] or 0) and spec.n_classes == 5
    got = backend.forward(backend.build(spec, weights), images)["output"]
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= TOL, f"{backend.name}: {rel_err(got, expected):.2e}"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("case", list(CASES))
def test_canonical_to_torchvision_loads_strictly_and_matches(
    tmp_path: Path, case: str, suffix: str
) -> None:
    # canonical weights vitspec made itself, not read from torchvision
    spec = vitspec.Spec(
        image_size=32,
        patch_size=8,
        hidden_dim=32,
        n_heads=4,
        depth=2,
        mlp_ratio=2.0,
        n_classes=5,
        pre_logits_dim=CASES[case] or 0,
    )
    weights = vitspec.init_weights(spec, seed=3, scheme="random")
    canonical = tmp_path / "c.safetensors"
    vitspec.save_weights(canonical, weights, spec)
    out = tmp_path / f"tv{suffix}"
    formats.convert(canonical, out, to_format="torchvision")
    state = (
        torch.load(out, weights_only=True, map_location="cpu")
        if suffix == ".pth"
        else load_file(out)
    )
    fresh = _model(CASES[case], seed=99)
    fresh.load_state_dict(state, strict=True)
    assert np.array_equal(
        fresh.encoder.layers[1].self_attention.in_proj_weight[32:64].detach().numpy(),
        weights["blocks.1.attn.key.kernel"].T,
    )
    images = _images()
    assert rel_err(_run(fresh, images), reference.forward(spec, weights, images)["output"]) <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_canonical_torchvision_canonical_is_bit_exact(tmp_path: Path, case: str) -> None:
    original = _model(CASES[case], seed=1)
    src = _save(original, tmp_path / "vit.pth")
    canonical = tmp_path / "c.safetensors"
    formats.convert(src, canonical, spec={"n_heads": 4})
    back = tmp_path / "back.pth"
    formats.convert(canonical, back, to_format="torchvision")
    state = torch.load(back, weights_only=True, map_location="cpu")
    assert list(state) == list(original.state_dict())
    for name, value in original.state_dict().items():
        assert torch.equal(state[name], value), name
    again = tmp_path / "again.safetensors"
    formats.convert(back, again, spec={"n_heads": 4})
    first, spec = vitspec.load_weights(canonical)
    second, spec2 = vitspec.load_weights(again)
    assert spec == spec2 and list(first) == list(second)
    for name in first:
        assert first[name].dtype == second[name].dtype and np.array_equal(
            first[name], second[name]
        ), name


def test_spec_inference_marks_heads_and_image_size_assumed_and_takes_spec(tmp_path: Path) -> None:
    src = _save(_model(None, hidden_dim=64, num_heads=2), tmp_path / "vit.pth")
    with formats.open_checkpoint(src) as ckpt:
        inference = ckpt.inference
    assert inference.family == "torchvision"
    assert set(inference.assumed) >= {"n_heads", "image_size"}
    assert inference.assumed["image_size"] == (32, 32)
    assert inference.assumed["n_heads"] == 64 // 64  # head_dim 64: the file does not record heads
    for field in ("class_token", "pooling", "qkv_bias", "norm_eps", "gelu", "final_norm"):
        assert field in inference.known and field not in inference.assumed, field
    with formats.open_checkpoint(src, spec="n_heads=2,image_size=32") as ckpt:
        assert ckpt.inference.given == {"n_heads": 2, "image_size": (32, 32)}
        assert "n_heads" not in ckpt.inference.assumed and ckpt.spec.n_heads == 2
    # what torchvision fixes cannot be overridden; a size the table does not fit is an error
    with pytest.raises(SpecError, match="pooling"):
        formats.open_checkpoint(src, spec="n_heads=2,pooling=avg")
    with pytest.raises(SpecError, match="image_size: --spec says 48x48"):
        formats.open_checkpoint(src, spec="n_heads=2,image_size=48")


def test_legacy_mlp_names_read_as_the_new_ones(tmp_path: Path) -> None:
    """torchvision before 0.13 saved the MLP as mlp.linear_1/linear_2 (its loader still renames them)."""
    model = _model(None, seed=4)
    state = {
        k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
        for k, v in model.state_dict().items()
    }
    assert any("linear_1" in k for k in state)
    src = tmp_path / "old.pth"
    torch.save(state, src)
    weights, spec = formats.load(src, spec="n_heads=4")
    assert np.array_equal(
        weights["blocks.1.mlp.fc2.kernel"],
        model.encoder.layers[1].mlp[3].weight.detach().numpy().T,
    )
    images = _images()
    assert rel_err(reference.forward(spec, weights, images)["output"], _run(model, images)) <= TOL


# One line per thing torchvision cannot hold (a spec without a class token also has no class row
# and cannot pool it).
REFUSED = {
    "reg_tokens=1": ["no way to hold register tokens"],
    "pooling=avg": ["always pools the class token's output (spec has pooling 'avg')"],
    "class_token=false,pooling=avg": [
        "always has a class token (spec has class_token false)",
        "always pools the class token's output (spec has pooling 'avg')",
        "always has a class-token row (spec has pos_embed_class_slot false)",
    ],
    "pos_embed=sincos2d": [
        "always has a learned position embedding (spec has pos_embed 'sincos2d')"
    ],
    "pos_embed_class_slot=false": ["always has a class-token row"],
    "final_norm=after_pool": ["normalises every token before pooling"],
    "gelu=tanh": ["uses exact GELU (nn.GELU; spec has gelu 'tanh')"],
    "qkv_bias=false": ["always has a qkv bias"],
    "image_size=[32,48]": ["takes square images only (spec has image_size 32x48)"],
    "n_classes=0": ["always has a classification head"],
}


@pytest.mark.parametrize("changes", list(REFUSED))
def test_a_spec_torchvision_cannot_hold_is_one_line_each_before_anything_is_written(
    capsys, tmp_path: Path, changes: str
) -> None:
    from vitspec.formats.infer import load_partial_spec

    base = vitspec.Spec(image_size=32, patch_size=8, hidden_dim=32, n_heads=4, depth=1, n_classes=5)
    spec = base.replace(**load_partial_spec(changes))
    canonical = tmp_path / "c.safetensors"
    vitspec.save_weights(canonical, vitspec.init_weights(spec, seed=0, scheme="random"), spec)
    out = tmp_path / "tv.pth"
    code, _, lines = _cli(capsys, "convert", str(canonical), str(out), "--to", "torchvision")
    assert code == 1 and len(lines) == len(REFUSED[changes]), lines
    for line, expected in zip(lines, REFUSED[changes], strict=True):
        assert line.startswith("error: cannot write the torchvision format: ") and expected in line
    assert not out.exists() and list(tmp_path.iterdir()) == [canonical]


def test_cli_detects_converts_to_timm_and_inspects(capsys, tmp_path: Path) -> None:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    model = _model(None, seed=5)
    src = _save(model, tmp_path / "vit_b_16.pth")
    out = tmp_path / "vit_timm.safetensors"
    code, _, lines = _cli(
        capsys, "convert", str(src), str(out), "--to", "timm", "--spec", "n_heads=4"
    )
    assert code == 0 and lines == []
    assert formats.detect(out) == "timm"
    timm_model = TimmViT(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5, mlp_ratio=2.0
    )
    timm_model.load_state_dict(load_file(out), strict=True)
    images = _images()
    assert rel_err(_run(timm_model.eval(), images), _run(model, images)) <= TOL
    code, text, lines = _cli(capsys, "inspect", str(src))
    assert code == 0 and lines == []
    assert "format: torchvision (detected)" in text
    assert "n_heads: 2  # assumed, not in the file" in text  # the preset of width 32
    assert "encoder.layers.encoder_layer_1.self_attention.in_proj_weight" in text


def test_torchvision_and_timm_names_are_never_taken_for_each_other(tmp_path: Path) -> None:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    tv = _save(_model(None), tmp_path / "tv.safetensors")
    timm_file = tmp_path / "timm.safetensors"
    save_file(
        TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4).state_dict(),
        timm_file,
    )
    assert formats.detect(tv) == "torchvision" and formats.detect(timm_file) == "timm"
    with pytest.raises(WeightsError) as info:
        formats.load(tv, from_format="timm")
    assert info.value.problems[0] == (
        "read as timm, but its tensor names are the torchvision format's; try --from torchvision"
    )
    assert "missing tensor patch_embed.proj.weight" in info.value.problems[1]
    with pytest.raises(WeightsError) as info:
        formats.load(timm_file, from_format="torchvision")
    assert info.value.problems[0] == (
        "read as torchvision, but its tensor names are the timm format's; try --from timm"
    )
    assert "missing tensor conv_proj.weight" in info.value.problems[1]
