"""Files of families vitspec knows but does not read yet (keras-hub), made by their own
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

KERAS_HUB = (
    "it looks like a keras-hub ViT .weights.h5 (keras_hub.models.ViTBackbone or ViTImageClassifier: "
    "vi_t_patching_and_embedding, vi_t_encoder), which vitspec does not support yet"
)
READS = "the formats vitspec reads: canonical, torch, keras, flax, timm, torchvision, hf, google, big_vision"


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
