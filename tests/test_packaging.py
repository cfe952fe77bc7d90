"""Packaging: the wheel holds every module and data file, and a missing framework names its extra."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> import name, as pyproject.toml's package-dir maps them.
MAPPED = {
    "vitspec": "vitspec",
    "backends": "vitspec/backends",
    "conformance": "vitspec/conformance",
    "cli": "vitspec/cli",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools leaves a build/ folder beside the sources it builds.
    source = tmp_path_factory.mktemp("source") / "vitspec"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "out", "__pycache__", "*.egg-info"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (path,) = out.glob("vitspec-*.whl")
    return zipfile.ZipFile(path)


def _shipped(folder: str) -> list[Path]:
    """Every file of a source folder that belongs in the wheel (no caches)."""
    return [
        p
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]


def test_wheel_holds_every_source_file_under_its_import_name(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    missing = [
        f"{folder}/{p.relative_to(ROOT / folder)} -> {target}/{p.relative_to(ROOT / folder)}"
        for folder, target in MAPPED.items()
        for p in _shipped(folder)
        if f"{target}/{p.relative_to(ROOT / folder).as_posix()}" not in names
    ]
    assert missing == []
    assert "vitspec/py.typed" in names
    n_cases = len({n.split("/")[3] for n in names if n.startswith("vitspec/conformance/cases/")})
    assert (
        n_cases == len([p for p in (ROOT / "conformance" / "cases").iterdir() if p.is_dir()]) >= 24
    )


def test_wheel_registers_the_backends_the_command_and_the_plugin(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    for line in (
        "vitspec = vitspec.cli.main:main",
        "torch = vitspec.backends.torch:TorchBackend",
        "tensorflow = vitspec.backends.tensorflow:TensorFlowBackend",
        "jax = vitspec.backends.jax:JaxBackend",
        "numpy = vitspec.backends.numpy:NumpyBackend",
        "vitspec = vitspec.conformance.plugin",
    ):
        assert line in text
    for group in ("[console_scripts]", "[vitspec.backends]", "[pytest11]"):
        assert group in text


# A framework that is not importable: None in sys.modules makes `import name` raise ImportError.
_HIDE = "import sys\nfor m in {mods!r}: sys.modules[m] = None\n"


@pytest.mark.parametrize(
    ("backend", "hidden", "extra"),
    [
        ("jax", ("jax", "flax"), "jax"),
        ("torch", ("torch",), "torch"),
        ("tensorflow", ("tensorflow", "keras"), "tensorflow"),
    ],
)
def test_a_missing_framework_names_the_extra_to_install(
    backend: str, hidden: tuple[str, ...], extra: str
) -> None:
    code = _HIDE.format(mods=hidden) + (
        "import vitspec\n"
        "try:\n"
        f"    vitspec.backend({backend!r})\n"
        "except vitspec.errors.BackendError as exc:\n"
        "    print('ERROR', exc)\n"
        "print('OTHER', vitspec.backend('numpy').name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    # The first hidden module the backend imports is the one named.
    assert lines[0] in [
        f"ERROR backend {backend!r} needs {m}, which is not installed; install it with: pip install 'vitspec[{extra}]'"
        for m in hidden
    ]
    assert lines[1] == "OTHER numpy"  # the other backends keep working


def test_the_cli_says_which_extra_without_a_traceback() -> None:
    code = _HIDE.format(mods=("jax", "flax")) + (
        "from vitspec.cli.main import main\n"
        "main(['build', '--backend', 'jax', 'examples/mnist.yaml'])\n"
    )
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() in [
        [
            f"error: backend 'jax' needs {m}, which is not installed; install it with: pip install 'vitspec[jax]'"
        ]
        for m in ("jax", "flax")
    ]
    code = (
        _HIDE.format(mods=("jax", "flax"))
        + "from vitspec.cli.main import main\nmain(['backends', '--check', 'jax'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    jax_row = next(line for line in out.stdout.splitlines() if line.lstrip("│ ").startswith("jax"))
    assert "not installed" in jax_row
    assert "jax: backend 'jax' needs" in out.stdout and "pip install 'vitspec[jax]'" in out.stdout
