"""The backend protocol, checked the same way for every backend in conftest.BACKENDS.

Numbers are compared with the float64 NumPy reference as max |backend - ref| / max |ref|.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest
from conftest import BACKENDS, rel_err

import vitspec
from vitspec import backends, reference
from vitspec.backends.base import ENVIRONMENT_KEYS, Backend
from vitspec.conformance.suite import environment
from vitspec.errors import BackendError, WeightsError
from vitspec.families import FAMILIES, family
from vitspec.layout import capture_points, capture_shapes, check_capture, drop_path_rates

TOL = 1e-5


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> vitspec.backends.Backend:
    return vitspec.backend(request.param)


# The backends that write a deployable artifact (numpy has none).
ARTIFACT_BACKENDS = [name for name in BACKENDS if name != "numpy"]


@pytest.fixture(scope="module", params=ARTIFACT_BACKENDS)
def artifact_backend(request: pytest.FixtureRequest) -> vitspec.backends.Backend:
    return vitspec.backend(request.param)


def _images(spec: vitspec.Spec, batch: int, seed: int = 1) -> np.ndarray:
    return (
        np.random.default_rng(seed)
        .standard_normal((batch, *spec.image_size, spec.in_channels))
        .astype(np.float32)
    )


def test_identity(backend) -> None:
    assert isinstance(backend.name, str) and backend.name
    assert isinstance(backend.version, str) and backend.version[0].isdigit()
    assert isinstance(backend, vitspec.backends.Backend)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_matches_reference_at_every_capture_point(backend, name: str) -> None:
    spec = family(name)
    weights = vitspec.init_weights(spec, seed=3, scheme="random")
    images = _images(spec, batch=2)
    ref = reference.forward(spec, weights, images, capture="all")
    got = backend.forward(backend.build(spec, weights), images, capture="all")
    assert set(got) == set(capture_points(spec))
    shapes = capture_shapes(spec, 2)
    for point in capture_points(spec):
        assert got[point].shape == shapes[point], point
        assert got[point].dtype == np.float32, point
        assert rel_err(got[point], ref[point]) <= TOL, (
            f"{point}: {rel_err(got[point], ref[point]):.2e}"
        )


@pytest.mark.parametrize("batch", [1, 3])
def test_output_only_and_batch_sizes(backend, batch: int) -> None:
    spec = family("vit_paper", depth=3, n_heads=2)
    weights = vitspec.init_weights(spec, seed=5, scheme="random")
    images = _images(spec, batch)
    got = backend.forward(backend.build(spec, weights), images)
    assert list(got) == ["output"]
    assert got["output"].shape == (batch, 10)
    assert rel_err(got["output"], reference.forward(spec, weights, images)["output"]) <= TOL


def test_requested_captures_only(backend) -> None:
    spec = family("vit_paper")
    model = backend.build(spec, vitspec.init_weights(spec, seed=0, scheme="random"))
    got = backend.forward(model, _images(spec, 2), capture=("blocks.1.attn_heads", "patch_embed"))
    assert set(got) == {"blocks.1.attn_heads", "patch_embed", "output"}
    assert got["blocks.1.attn_heads"].shape == (2, 4, 17, 8)


def test_tutorial_shapes(backend) -> None:
    """The table every ViT tutorial checks: patches (B,N,D), one head (B,N,D/h), MHA, block, model."""
    spec = vitspec.Spec(image_size=32, patch_size=4, hidden_dim=48, n_heads=6, depth=2, n_classes=7)
    got = backend.forward(backend.build(spec), _images(spec, 4), capture="all")
    assert got["patch_embed"].shape == (4, 64, 48)
    assert got["blocks.0.attn_heads"][:, 0].shape == (4, 65, 8)
    assert got["blocks.0.attn"].shape == (4, 65, 48)
    assert got["blocks.1"].shape == (4, 65, 48)
    assert got["output"].shape == (4, 7)
    np.testing.assert_allclose(got["blocks.0.attn_probs"].sum(-1), 1.0, atol=1e-5)


_ROUNDTRIP_SPECS = [
    *(family(n) for n in FAMILIES),
    vitspec.Spec(
        image_size=16, patch_size=4, hidden_dim=12, n_heads=3, depth=1, n_classes=3, mlp_ratio=2.5
    ),
    vitspec.Spec(
        image_size=[8, 12],
        patch_size=[4, 2],
        hidden_dim=16,
        n_heads=1,
        depth=3,
        n_classes=0,
        in_channels=5,
        qkv_bias=False,
        pre_logits_dim=6,
    ),
]


@pytest.mark.parametrize(
    "spec", _ROUNDTRIP_SPECS, ids=lambda s: f"{s.hidden_dim}d{s.depth}x{s.n_heads}h"
)
def test_export_of_load_is_bit_exact(backend, spec: vitspec.Spec) -> None:
    weights = vitspec.init_weights(spec, seed=11, scheme="random")
    exported = backend.export(backend.build(spec, weights))
    assert list(exported) == list(weights)
    for name, value in weights.items():
        assert exported[name].dtype == value.dtype, name
        assert exported[name].shape == value.shape, name
        assert np.array_equal(exported[name].view(np.uint32), value.view(np.uint32)), name


def test_build_without_weights_uses_vitspec_init(backend) -> None:
    spec = family("timm_avg_fc_norm")
    exported = backend.export(backend.build(spec, seed=4))
    expected = vitspec.init_weights(spec, seed=4)
    for name in expected:
        assert np.array_equal(exported[name], expected[name]), name


def test_load_lists_every_mismatch_at_once(backend) -> None:
    spec = family("vit_paper")
    model = backend.build(spec)
    weights = dict(vitspec.init_weights(spec, seed=0))
    del weights["blocks.1.mlp.fc1.bias"]
    weights["blocks.0.attn.query.kernel"] = np.zeros((32, 16), np.float32)
    weights["head.extra"] = np.zeros((3,), np.float32)
    with pytest.raises(WeightsError) as info:
        backend.load(model, weights)
    message = str(info.value)
    for name in ("blocks.1.mlp.fc1.bias", "blocks.0.attn.query.kernel", "head.extra"):
        assert name in message


def test_load_replaces_weights(backend) -> None:
    spec = family("big_vision_gap")
    model = backend.build(spec, seed=0)
    new = vitspec.init_weights(spec, seed=9, scheme="random")
    backend.load(model, new)
    images = _images(spec, 2)
    assert (
        rel_err(
            backend.forward(model, images)["output"], reference.forward(spec, new, images)["output"]
        )
        <= TOL
    )


def _raised(call, *args) -> Exception:
    """The exception ``call(*args)`` raises (the test fails if it raises none)."""
    with pytest.raises(Exception) as info:
        call(*args)
    return info.value


def test_captures_come_in_forward_order_whatever_the_request_order(backend) -> None:
    spec = family("vit_paper_pre_logits")
    model = backend.build(spec)
    images = _images(spec, 2)
    points = capture_points(spec)
    requested = [
        "output",
        "pre_logits",
        "blocks.1",
        "patch_embed",
        "blocks.0.attn_probs",
        "embed",
        "pre_logits",
    ]
    got = backend.forward(model, images, capture=requested)
    assert list(got) == [
        "patch_embed",
        "embed",
        "blocks.0.attn_probs",
        "blocks.1",
        "pre_logits",
        "output",
    ]
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in got.values())
    assert list(backend.forward(model, images, capture=points[::-1])) == points
    assert list(backend.forward(model, images, capture="all")) == points
    assert list(backend.forward(model, images, capture="blocks.1.mlp")) == [
        "blocks.1.mlp",
        "output",
    ]


_BAD_IMAGES = {
    "nchw": np.zeros((2, 3, 32, 32), np.float32),
    "no_batch_axis": np.zeros((32, 32, 3), np.float32),
    "empty_batch": np.zeros((0, 32, 32, 3), np.float32),
    "integers": np.zeros((2, 32, 32, 3), np.uint8),
}


@pytest.mark.parametrize("case", list(_BAD_IMAGES))
def test_bad_images_raise_the_references_error(backend, case: str) -> None:
    spec = family("vit_paper")
    expected = _raised(reference.check_images, spec, _BAD_IMAGES[case])
    got = _raised(backend.forward, backend.build(spec), _BAD_IMAGES[case])
    assert type(got) is type(expected) and isinstance(got, ValueError)
    assert str(got) == str(expected)


def test_bad_images_name_the_problem(backend) -> None:
    spec = family("vit_paper")
    with pytest.raises(
        ValueError,
        match=r"images: expected shape \(batch, 32, 32, 3\) NHWC, found \(2, 3, 32, 32\)",
    ):
        backend.forward(backend.build(spec), _BAD_IMAGES["nchw"])


def test_unknown_capture_raises_the_same_error_everywhere(backend) -> None:
    spec = family("vit_paper")
    expected = _raised(check_capture, spec, ("blocks.0", "blocks.9"))
    got = _raised(backend.forward, backend.build(spec), _images(spec, 1), ("blocks.0", "blocks.9"))
    assert type(got) is type(expected) and isinstance(got, ValueError)
    assert str(got) == str(expected) and "'blocks.9'" in str(got)


@pytest.mark.parametrize("batch", [True, False, 0, -2, 2.0, "2"], ids=repr)
def test_save_artifact_rejects_a_bad_batch_before_writing(
    artifact_backend, tmp_path: Path, batch: object
) -> None:
    expected = _raised(Backend.check_batch, batch)
    got = _raised(
        artifact_backend.save_artifact,
        artifact_backend.build(family("mnist", depth=1)),
        tmp_path / "artifact",
        batch,
    )
    assert type(got) is type(expected) and isinstance(got, ValueError)
    assert str(got) == f"batch: expected a positive integer or None, found {batch!r}"
    assert not (tmp_path / "artifact").exists()


def test_check_batch_passes_good_batches_through() -> None:
    assert Backend.check_batch(None) is None
    assert Backend.check_batch(3) == 3


def test_environment_has_the_same_keys_for_every_backend(backend) -> None:
    env = backend.environment()
    assert tuple(env) == ENVIRONMENT_KEYS
    assert all(isinstance(v, str) and v for v in env.values())
    assert env["backend"] == backend.name
    assert env["framework"].split(", ")[0].endswith(f" {backend.version}")
    assert env["numpy"] == np.__version__ and env["python"] == platform.python_version()
    assert int(env["threads"]) >= 1
    assert env["forward"].split(", ")[0] == "float32"
    # The conformance report shows them with the suite's own probes.
    assert environment(backend).items() >= env.items()


def test_every_family_is_supported(backend) -> None:
    assert [n for n in FAMILIES if backend.supports(family(n)) is not None] == []


def test_drop_path_rates_follow_timms_linspace() -> None:
    assert drop_path_rates(family("vit_paper", depth=1, drop_path=0.2)) == [0.0]
    assert drop_path_rates(family("vit_paper", depth=5, drop_path=0.2)) == pytest.approx(
        [0.0, 0.05, 0.1, 0.15, 0.2]
    )
    assert drop_path_rates(family("vit_paper", depth=3)) == [0.0, 0.0, 0.0]


class _EntryPoint:
    def __init__(self, name: str, factory: type) -> None:
        self.name, self.value, self.dist, self._factory = (
            name,
            f"thirdparty:{factory.__name__}",
            None,
            factory,
        )

    def load(self) -> type:
        return self._factory


def test_a_duck_typed_backend_loads_and_one_missing_a_method_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Lame:  # no forward
        name, version = "lame", "1.0"

        def build(self, spec, weights=None, seed=0): ...
        def load(self, model, weights): ...
        def export(self, model): ...

    class Duck(Lame):  # the public methods, and no subclass of Backend
        name = "duck"

        def forward(self, model, images, capture=()): ...

    monkeypatch.setattr(
        backends,
        "_entry_points",
        lambda: {"duck": _EntryPoint("duck", Duck), "lame": _EntryPoint("lame", Lame)},
    )
    monkeypatch.setattr(backends, "_CACHE", {})
    duck = backends.get_backend("duck")
    assert isinstance(duck, Duck) and not isinstance(duck, Backend)
    with pytest.raises(BackendError, match=r"backend 'lame' \(thirdparty:Lame\) has no 'forward'"):
        backends.get_backend("lame")
