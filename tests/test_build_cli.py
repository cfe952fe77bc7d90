"""`vitspec build`: the summary, the check, canonical weights out, each framework's artifact, bad input."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import rel_err
from test_convert_cli import _error_lines, vitspec_cli

import vitspec
from vitspec.families import family
from vitspec.layout import capture_shapes

ROOT = Path(__file__).resolve().parents[1]
MNIST = str(ROOT / "examples" / "mnist.yaml")
SPEC = vitspec.load_spec(MNIST)


@pytest.fixture(autouse=True)
def _wide_plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")


def _rows(out: str) -> dict[str, tuple[str, str]]:
    """The summary table as {part: (output shape, parameters)}."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 3 and cells[1].startswith("("):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def _shape(*dims: int) -> str:
    return "(" + ", ".join(map(str, dims)) + ")"


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "jax"])
def test_summary_has_the_tutorial_shapes_the_parameter_counts_and_a_passing_check(
    capsys, backend: str
) -> None:
    code, out, err = vitspec_cli(
        capsys, "build", "--backend", backend, MNIST, "--batch", "3", "--check"
    )
    assert code == 0, err
    rows = _rows(out)
    b, n, d, h = 3, SPEC.seq_len, SPEC.hidden_dim, SPEC.n_heads
    shapes = capture_shapes(SPEC, b)
    assert rows["patch_embed"][0] == _shape(*shapes["patch_embed"]) == _shape(b, SPEC.n_patches, d)
    assert rows["blocks.0 attention, one head"][0] == _shape(b, n, d // h)
    assert rows["blocks.0 multi-head attention"][0] == _shape(b, n, d)
    assert rows[f"blocks.0–{SPEC.depth - 1} × {SPEC.depth}"][0] == _shape(b, n, d)
    assert rows["output (head)"][0] == _shape(b, SPEC.n_classes)
    counted = sum(int(p.replace(",", "")) for _, p in rows.values() if p)
    assert counted == SPEC.n_params
    assert f"total: {SPEC.n_params:,} parameters" in out
    (check,) = [line for line in out.splitlines() if line.startswith("check:")]
    assert float(re.search(r"= ([0-9.e+-]+) \(ok", check).group(1)) <= 1e-5


@pytest.mark.needs("torch", "jax")
def test_out_writes_the_init_weights_and_weights_reads_them_back(capsys, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    code, _, err = vitspec_cli(
        capsys, "build", "--backend", "jax", MNIST, "--seed", "3", "--out", str(out)
    )
    assert code == 0, err
    weights, spec = vitspec.load_weights(out)
    assert spec == SPEC
    expected = vitspec.init_weights(SPEC, seed=3)
    assert all(np.array_equal(weights[k], expected[k]) for k in expected)
    code, out_text, err = vitspec_cli(
        capsys, "build", "--backend", "torch", MNIST, "--weights", str(out), "--check"
    )
    assert code == 0 and f"weights from {out}" in out_text, err


@pytest.mark.needs("torch")
def test_existing_outputs_need_force_and_are_refused_before_any_work(
    capsys, tmp_path: Path
) -> None:
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")
    code, stdout, err = vitspec_cli(capsys, "build", "--backend", "torch", MNIST, "--out", str(out))
    assert code == 1 and _error_lines(err) == [
        f"error: {out} already exists; pass --force (overwrite=True) to replace it"
    ]
    assert out.read_bytes() == b"keep me" and "part" not in stdout  # nothing was built
    code, _, err = vitspec_cli(
        capsys, "build", "--backend", "torch", MNIST, "--out", str(out), "--force"
    )
    assert code == 0 and vitspec.load_weights(out)[1] == SPEC
    nowhere = tmp_path / "no" / "such" / "a.pt2"
    code, _, err = vitspec_cli(
        capsys, "build", "--backend", "torch", MNIST, "--export", str(nowhere)
    )
    assert code == 1 and _error_lines(err) == [
        f"error: cannot write {nowhere}: folder {nowhere.parent} does not exist"
    ]


def test_weights_of_another_spec_are_refused_by_name(capsys, tmp_path: Path) -> None:
    other = SPEC.replace(n_classes=5)
    path = tmp_path / "other.safetensors"
    vitspec.save_weights(path, vitspec.init_weights(other), other)
    code, _, err = vitspec_cli(capsys, "build", "--backend", "torch", MNIST, "--weights", str(path))
    assert code == 1
    assert _error_lines(err) == [
        f"error: {path}: the given spec contradicts the embedded one (n_classes: file 5, given 10)"
    ]


def test_unknown_backend_and_bad_spec_are_one_line(capsys) -> None:
    code, _, err = vitspec_cli(capsys, "build", "--backend", "mxnet", MNIST)
    assert code == 1 and _error_lines(err)[0].startswith(
        "error: no backend named 'mxnet'; registered backends: jax, numpy"
    )
    code, _, err = vitspec_cli(capsys, "build", "--backend", "torch", "B/17")
    assert code == 1 and "B/17" in _error_lines(err)[0]
    code, _, err = vitspec_cli(capsys, "build", "--backend", "numpy", MNIST, "--export", "x.bin")
    assert code == 1 and _error_lines(err) == [
        "error: backend 'numpy' cannot write a deployable artifact (it has no save_artifact)"
    ]


def _run_artifact(backend: str, path: Path, images: np.ndarray) -> np.ndarray:
    """Run an artifact with its framework alone, as docs/build.md shows."""
    if backend == "torch":
        import torch

        program = torch.export.load(str(path))
        return (
            program.module()(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
            .detach()
            .numpy()
        )
    if backend == "tensorflow":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(path))
        return loaded.signatures["serving_default"](images=tf.constant(images))["output"].numpy()
    import jax

    return np.asarray(jax.export.deserialize(bytearray(path.read_bytes())).call(images))


ARTIFACT = {"torch": "vit.pt2", "tensorflow": "vit_savedmodel", "jax": "vit.jax"}


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "jax"])
def test_export_writes_an_artifact_the_framework_runs_alone_for_any_batch(
    capsys, tmp_path: Path, backend: str
) -> None:
    weights_path, artifact = tmp_path / "w.safetensors", tmp_path / ARTIFACT[backend]
    code, out, err = vitspec_cli(
        capsys,
        "build",
        "--backend",
        backend,
        MNIST,
        "--out",
        str(weights_path),
        "--export",
        str(artifact),
    )
    assert code == 0, err
    assert f"wrote {backend} artifact: {artifact} (batch: any)" in out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    weights, _ = vitspec.load_weights(weights_path)
    for batch in (1, 5):
        images = np.random.default_rng(batch).standard_normal((batch, 28, 28, 1)).astype(np.float32)
        got = _run_artifact(backend, artifact, images)
        assert rel_err(got, vitspec.reference.forward(SPEC, weights, images)["output"]) <= 1e-5


@pytest.mark.needs("jax")
def test_export_batch_fixes_the_batch_and_force_replaces_an_artifact(
    capsys, tmp_path: Path
) -> None:
    artifact = tmp_path / "vit.jax"
    artifact.write_bytes(b"old")
    code, _, err = vitspec_cli(
        capsys, "build", "--backend", "jax", MNIST, "--export", str(artifact), "--export-batch", "4"
    )
    assert (
        code == 1 and "already exists" in _error_lines(err)[0] and artifact.read_bytes() == b"old"
    )
    code, out, err = vitspec_cli(
        capsys,
        "build",
        "--backend",
        "jax",
        MNIST,
        "--export",
        str(artifact),
        "--export-batch",
        "4",
        "--force",
    )
    assert code == 0 and "(batch: 4)" in out, err
    import jax

    exported = jax.export.deserialize(bytearray(artifact.read_bytes()))
    assert exported.in_avals[0].shape == (4, 28, 28, 1)


def test_an_interrupted_export_leaves_nothing(
    capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = vitspec.backend("tensorflow")

    def half_then_interrupt(model, path, batch):
        Path(path).mkdir()
        (Path(path) / "saved_model.pb").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(backend), "save_artifact", lambda self, *a: half_then_interrupt(*a))
    artifact = tmp_path / "vit_savedmodel"
    code, _, err = vitspec_cli(
        capsys,
        "build",
        "--backend",
        "tensorflow",
        str(ROOT / "examples" / "mnist.yaml"),
        "--export",
        str(artifact),
    )
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.needs("jax")
@pytest.mark.parametrize(
    "name", ["no_head", "vit_paper_pre_logits", "timm_avg_fc_norm", "big_vision_sincos"]
)
def test_families_that_change_the_summary_build_and_check(
    capsys, tmp_path: Path, name: str
) -> None:
    spec = family(name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(spec.to_yaml())
    code, out, err = vitspec_cli(capsys, "build", "--backend", "jax", str(path), "--check")
    assert code == 0, err
    rows = _rows(out)
    last = "output (head)" if spec.n_classes else "output (features)"
    assert rows[last][0] == _shape(2, spec.n_classes or spec.features_dim)
    assert sum(int(p.replace(",", "")) for _, p in rows.values() if p) == spec.n_params


# ---- SPEC from --weights ---------------------------------------------------------------------


def test_spec_comes_from_the_weights_when_not_given(capsys, tmp_path: Path) -> None:
    """build, conformance and diff take the spec embedded in --weights; a SPEC that disagrees is named field by field."""
    path = tmp_path / "w.safetensors"
    vitspec.save_weights(path, vitspec.init_weights(SPEC, seed=1), SPEC)
    code, out, err = vitspec_cli(
        capsys, "build", "--backend", "numpy", "--weights", str(path), "--check"
    )
    assert code == 0, err
    assert (
        f"weights from {path}" in out
        and f"total: {SPEC.n_params:,} parameters" in out
        and "(ok, limit" in out
    )
    code, out, err = vitspec_cli(capsys, "diff", "--backend", "numpy", "--weights", str(path))
    assert code == 0 and out.startswith("numpy vs the reference on w: pass"), err
    code, out, err = vitspec_cli(
        capsys, "conformance", "--backend", "numpy", "--weights", str(path)
    )
    assert code == 0 and "CONFORMS" in out, err
    other = SPEC.replace(norm_eps=1e-5, depth=3)
    other_path = tmp_path / "other.yaml"
    other_path.write_text(other.to_yaml())
    contradiction = f"error: {path}: the given spec contradicts the embedded one (depth: file 4, given 3; norm_eps: file 1e-06, given 1e-05)"
    for command in ("build", "diff", "conformance"):
        code, out, err = vitspec_cli(
            capsys, command, "--backend", "numpy", str(other_path), "--weights", str(path)
        )
        assert code == 1 and _error_lines(err) == [contradiction], (command, err)
    for command in ("build", "diff"):
        code, _, err = vitspec_cli(capsys, command, "--backend", "numpy")
        assert code == 2 and "or --weights with a spec embedded in it" in err, (command, err)


# ---- specs too big for the machine; the folded summary ------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("image_size", 20000), ("depth", 10000)])
def test_a_spec_too_big_for_memory_is_refused_before_anything_is_allocated(
    capsys, tmp_path: Path, field: str, value: int
) -> None:
    from vitspec.memory import available_memory, estimate_memory

    spec = vitspec.preset("B/16").replace(**{field: value})
    path = tmp_path / "big.yaml"
    path.write_text(spec.to_yaml())
    need = estimate_memory(spec, 2, captures=("output",))
    assert need.total > available_memory()
    for command in ("build", "diff", "conformance"):
        t0 = time.perf_counter()
        code, _, err = vitspec_cli(capsys, command, "--backend", "numpy", str(path))
        (line,) = _error_lines(err)
        assert code == 1 and time.perf_counter() - t0 < 30, (command, err)
        assert re.fullmatch(
            rf"error: (a case from )?{re.escape(str(path))} with a batch of 2 needs about [\d.]+ [GTPE]iB \([\d.]+ [KMGTPE]iB of weights, "
            r"[\d.]+ [KMGTPE]iB of activations\), more than the [\d.]+ [KMGTPE]iB of memory available; use a smaller spec or "
            r"--batch, or pass --ignore-memory-check to try anyway",
            line,
        ), line


def test_ignore_memory_check_goes_on_anyway(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitspec import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    code, _, err = vitspec_cli(capsys, "build", "--backend", "numpy", MNIST)
    assert code == 1 and "more than the 1000 B of memory available" in _error_lines(err)[0]
    code, out, err = vitspec_cli(
        capsys, "build", "--backend", "numpy", MNIST, "--ignore-memory-check"
    )
    assert code == 0 and f"total: {SPEC.n_params:,} parameters" in out, err
    code, out, err = vitspec_cli(
        capsys, "diff", "--backend", "numpy", MNIST, "--ignore-memory-check"
    )
    assert code == 0, err


def test_estimate_counts_weights_images_attention_and_captures() -> None:
    from vitspec.memory import estimate_memory, format_bytes

    one = estimate_memory(SPEC)
    n, d, m, h = SPEC.seq_len, SPEC.hidden_dim, SPEC.mlp_dim, SPEC.n_heads
    assert one.parameters == SPEC.n_params * 4 * 2
    per_image = 28 * 28 * 1 + n * 49 + 4 * n * d + max(3 * n * d + 2 * h * n * n, 2 * n * m)
    assert one.activations == 4 * per_image
    assert estimate_memory(SPEC, 8).activations == 8 * one.activations
    every = estimate_memory(SPEC, 1, itemsize=8, weight_copies=1, captures="all")
    shapes = vitspec.capture_shapes(SPEC, 1)
    assert every.activations == 8 * (per_image + sum(math.prod(s) for s in shapes.values()))
    assert every.parameters == SPEC.n_params * 8
    assert vitspec.estimate_memory is estimate_memory
    assert [format_bytes(x) for x in (512, 1536, 3 * 2**30, 1.2 * 2**50)] == [
        "512 B",
        "1.5 KiB",
        "3.0 GiB",
        "1.2 PiB",
    ]


def test_the_summary_folds_the_blocks_into_one_row(capsys, tmp_path: Path) -> None:
    spec = SPEC.replace(depth=40)
    path = tmp_path / "deep.yaml"
    path.write_text(spec.to_yaml())
    code, out, err = vitspec_cli(capsys, "build", "--backend", "numpy", str(path))
    assert code == 0, err
    rows = _rows(out)
    assert [k for k in rows if k.startswith("blocks.") and "attention" not in k] == [
        "blocks.0–39 × 40"
    ]
    assert rows["blocks.0–39 × 40"] == (
        _shape(2, spec.seq_len, spec.hidden_dim),
        f"{40 * 33_472:,}",
    )
    assert sum(int(p.replace(",", "")) for _, p in rows.values() if p) == spec.n_params
    assert len(out.splitlines()) < 20


def test_check_that_fails_exits_1_and_says_failed(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitspec.backends.numpy import NumpyBackend
    from vitspec.conformance import broken

    bad = broken.scale_block(NumpyBackend())  # the last block's output 1% off
    monkeypatch.setattr(
        vitspec, "backend", lambda name: bad if name == "bad" else pytest.fail(name)
    )
    code, out, err = vitspec_cli(capsys, "build", "--backend", "bad", MNIST, "--check")
    assert code == 1, (out, err)
    (check,) = [line for line in out.splitlines() if line.startswith("check:")]
    assert "FAILED, limit 1e-05" in check
    assert float(re.search(r"= ([0-9.e+-]+) \(FAILED", check).group(1)) > 1e-3
    code, out, err = vitspec_cli(
        capsys, "build", "--backend", "bad", MNIST
    )  # no --check: nothing compared
    assert code == 0 and "check:" not in out, err
