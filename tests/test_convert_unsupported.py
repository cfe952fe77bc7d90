"""Files of families vitspec knows but does not read yet (torchvision, keras-hub), made by their own
libraries: they are named for what they are, never "cannot tell which format", and a format they
are read as (``--from``) names its missing tensor by its own name with the canonical one beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import vitspec
from vitspec import formats
from vitspec.cli.main import main
from vitspec.errors import FileFormatError, WeightsError
from vitspec.families import family

TORCHVISION = (
    "it looks like a torchvision VisionTransformer state_dict (torchvision.models.vit_*: conv_proj, "
    "encoder.layers.encoder_layer_{i}), which vitspec does not support yet"
)
KERAS_HUB = (
    "it looks like a keras-hub ViT .weights.h5 (keras_hub.models.ViTBackbone or ViTImageClassifier: "
    "vi_t_patching_and_embedding, vi_t_encoder), which vitspec does not support yet"
)
READS = "the formats vitspec reads: canonical, torch, keras, flax, timm, hf, google, big_vision"


@pytest.fixture(scope="module")
def torchvision_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=5,
    )
    folder = tmp_path_factory.mktemp("torchvision")
    save_file(model.state_dict(), folder / "vit.safetensors")
    torch.save(model.state_dict(), folder / "vit.pth")
    return {"safetensors": folder / "vit.safetensors", "pth": folder / "vit.pth"}


@pytest.fixture(scope="module")
def keras_hub_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    path = tmp_path_factory.mktemp("keras_hub") / "vit.weights.h5"
    backbone.save_weights(path)
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_a_torchvision_file_is_named_not_unknown(
    capsys, tmp_path: Path, torchvision_files: dict[str, Path], kind: str
) -> None:
    path = torchvision_files[kind]
    with pytest.raises(FileFormatError) as info:
        formats.detect(path)
    assert str(info.value) == f"{path}: {TORCHVISION}; {READS}"
    code, lines = _cli(capsys, "convert", str(path), str(tmp_path / "o.safetensors"))
    assert code == 1 and lines == [f"error: {path}: {TORCHVISION}; {READS}"]
    assert not (tmp_path / "o.safetensors").exists()


def test_a_torchvision_file_read_as_timm_or_hf_names_their_tensors(
    torchvision_files: dict[str, Path],
) -> None:
    path = torchvision_files["safetensors"]
    with pytest.raises(WeightsError) as info:
        formats.load(path, from_format="timm")
    assert info.value.problems == [
        f"read as timm, but {TORCHVISION}",
        "missing tensor patch_embed.proj.weight (canonical patch_embed.kernel, the patch projection); "
        "is this file of the format it was read as?",
    ]
    with pytest.raises(WeightsError) as info:
        formats.load(path, from_format="hf")
    assert (
        "missing tensor embeddings.patch_embeddings.projection.weight (canonical patch_embed.kernel, the patch projection)"
        in info.value.problems[1]
    )
    with pytest.raises(FileFormatError) as info:
        formats.load(torchvision_files["pth"], from_format="keras")
    assert str(info.value).startswith(
        f"{torchvision_files['pth']}: is a torch.save file, which cannot hold a keras checkpoint"
    )
    assert str(info.value).endswith(f"; check --from; {TORCHVISION}")


def test_a_keras_hub_file_is_named_not_unknown(
    capsys, tmp_path: Path, keras_hub_file: Path
) -> None:
    with pytest.raises(FileFormatError) as info:
        formats.detect(keras_hub_file)
    assert str(info.value) == f"{keras_hub_file}: {KERAS_HUB}; {READS}"
    code, lines = _cli(capsys, "inspect", str(keras_hub_file))
    assert code == 1 and lines == [f"error: {keras_hub_file}: {KERAS_HUB}; {READS}"]
    # read as vitspec's own Keras file: the dataset that file would have, canonical name beside it
    code, lines = _cli(
        capsys, "convert", str(keras_hub_file), str(tmp_path / "o.safetensors"), "--from", "keras"
    )
    assert code == 1 and lines == [
        f"error: {keras_hub_file}: read as keras, but {KERAS_HUB}",
        f"error: {keras_hub_file}: missing tensor layers/patch_embed/vars/1 (canonical patch_embed.bias, the patch embedding bias); "
        "is this file of the format it was read as?",
    ]
    code, lines = _cli(
        capsys, "convert", str(keras_hub_file), str(tmp_path / "o.safetensors"), "--from", "timm"
    )
    assert (
        code == 1
        and len(lines) == 1
        and lines[0].endswith(
            f"which cannot hold a timm checkpoint (timm VisionTransformer state_dict (safetensors or .pt/.pth)); check --from; {KERAS_HUB}"
        )
    )


def test_missing_tensors_are_named_as_the_format_names_them(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    spec = family("vit_paper")
    weights = vitspec.init_weights(spec, seed=0, scheme="random")
    native = {
        k: np.ascontiguousarray(v) for k, v in formats.get_format("timm").to_native(spec, weights)
    }
    del native["blocks.1.attn.qkv.weight"], native["blocks.0.norm1.bias"], native["norm.weight"]
    path = tmp_path / "timm.safetensors"
    save_file(native, path)
    with pytest.raises(WeightsError) as info:
        formats.load(path, spec="n_heads=4")
    assert info.value.problems == [
        "missing 3 tensor(s): blocks.0.norm1.bias, blocks.1.attn.qkv.weight (canonical blocks.1.attn.query.kernel, "
        "blocks.1.attn.key.kernel, blocks.1.attn.value.kernel), norm.weight (canonical norm.scale)"
    ]
