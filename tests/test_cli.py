"""The `vitspec` command: spec commands, error handling, and start-up without frameworks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vitspec
from vitspec.families import family

FRAMEWORKS = ("torch", "tensorflow", "jax", "flax", "keras")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vitspec.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_import_vitspec_imports_no_framework() -> None:
    code = (
        "import sys, vitspec; vitspec.load_spec('B/16'); vitspec.init_weights(vitspec.load_spec('mu/16')); "
        "import vitspec.reference, vitspec.backends; "
        f"print(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_help_imports_no_framework_and_no_pydantic() -> None:
    code = (
        "import sys\nfrom vitspec.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', ','.join(m for m in {(*FRAMEWORKS, 'pydantic', 'numpy')!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Commands:" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "LOADED"


def test_validate_ok_and_bad(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(family("mnist").to_yaml())
    ok = run("validate", str(good), "B/16")
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout and "86.57M parameters" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "image_size: 224\npatch_size: 16\nhidden_dim: 100\nn_heads: 12\ndepth: 12\nfoo: 1\n"
    )
    res = run("validate", str(good), str(bad))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"error: {bad}: unknown field 'foo'; known fields: " + ", ".join(vitspec.Spec.model_fields),
        f"error: {bad}: hidden_dim 100 is not divisible by n_heads 12",
    ]


def test_validate_reports_field_rule_and_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_size: 224\npatch_size: 16\nhidden_dim: 100\nn_heads: 12\ndepth: 12\n")
    res = run("validate", str(bad))
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: {bad}: hidden_dim 100 is not divisible by n_heads 12"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"\x00\x01\x02", "is a binary file"),
        (b"- a\n- b\n", "found a list"),
        (b"image_size: [\n", "invalid YAML"),
    ],
)
def test_bad_spec_files_exit_non_zero_without_traceback(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    for command in (["validate", str(path)], ["layout", str(path)]):
        res = run(*command)
        assert res.returncode == 1
        assert "Traceback" not in res.stderr
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_schema_is_json_schema_with_every_field() -> None:
    res = run("schema")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert set(schema["properties"]) == set(vitspec.Spec.model_fields)


def test_presets_lists_the_paper_sizes() -> None:
    res = run("presets")
    assert res.returncode == 0
    for row in ("B ", "768", "3072", "L ", "1024", "H ", "1280", "86.57M"):
        assert row in res.stdout


def test_layout_formats() -> None:
    md = run("layout", "B/16", "--format", "markdown")
    assert md.returncode == 0
    assert "| `patch_embed.kernel` | `(16, 16, 3, 768)` | 589,824 |" in md.stdout
    assert "Total: 86,567,656 parameters." in md.stdout
    js = json.loads(run("layout", "mu/16", "--format", "json").stdout)
    assert [p["name"] for p in js] == [
        p.name for p in vitspec.param_table(vitspec.load_spec("mu/16"))
    ]
    table = run("layout", "S/16")
    assert "total: 22,050,664 parameters" in table.stdout


def test_inspect_shows_spec_and_tensors(tmp_path: Path) -> None:
    spec = family("mnist")
    path = tmp_path / "w.safetensors"
    vitspec.save_weights(path, vitspec.init_weights(spec), spec)
    res = run("inspect", str(path))
    assert res.returncode == 0, res.stderr
    assert "patch_size: 7" in res.stdout and "in_channels: 1" in res.stdout
    assert "patch_embed.kernel" in res.stdout and "(7, 7, 1, 32)" in res.stdout
    missing = run("inspect", str(tmp_path / "nope.safetensors"))
    assert (
        missing.returncode == 1
        and "Traceback" not in missing.stderr
        and "no such file" in missing.stderr
    )


def test_unknown_command_and_bad_preset() -> None:
    res = run("frobnicate")
    assert res.returncode == 2 and "No such command" in res.stderr
    res = run("layout", "Q/16")
    assert res.returncode == 1
    assert (
        res.stderr.strip()
        == "error: 'Q/16' is neither a spec file nor a preset name (presets look like 'B/16'; `vitspec presets` lists them)"
    )


# ---- exit status: 1 for the user's errors, 2 for vitspec's ------------------------------------


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from vitspec.cli.main import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_a_user_error_exits_1_with_one_line_per_problem(capsys, monkeypatch) -> None:
    import vitspec.layout

    def bad(spec: object) -> None:
        raise vitspec.WeightsError(
            ["missing 1 tensor(s): head.bias", "pos_embed: expected shape [5, 8], found [4, 8]"],
            "w.safetensors",
        )

    monkeypatch.setattr(vitspec.layout, "param_table", bad)
    code, err = _main(capsys, "layout", "B/16")
    assert code == 1 and "Traceback" not in err
    assert err.splitlines() == [
        "error: w.safetensors: missing 1 tensor(s): head.bias",
        "error: w.safetensors: pos_embed: expected shape [5, 8], found [4, 8]",
    ]


@pytest.mark.parametrize(
    "exc",
    [ValueError("operands could not be broadcast\ntogether"), RuntimeError("boom"), KeyError("x")],
)
def test_an_internal_error_exits_2_with_a_hint_not_blaming_the_user(
    capsys, monkeypatch, exc: Exception
) -> None:
    import vitspec.layout

    def broken(spec: object) -> None:
        raise exc

    monkeypatch.setattr(vitspec.layout, "param_table", broken)
    monkeypatch.delenv("VITSPEC_DEBUG", raising=False)
    code, err = _main(capsys, "layout", "B/16")
    assert code == 2 and "Traceback" not in err
    message = "; ".join(line for line in str(exc).splitlines())
    assert err.splitlines() == [
        f"internal error: {type(exc).__name__}: {message} — this is a bug in vitspec; rerun with VITSPEC_DEBUG=1 for the traceback"
    ]
    monkeypatch.setenv("VITSPEC_DEBUG", "1")
    with pytest.raises(type(exc)):
        _main(capsys, "layout", "B/16")


@pytest.mark.parametrize(
    ("module", "extra"), [("torch", "torch"), ("h5py", "tensorflow"), ("flax.nnx", "jax")]
)
def test_a_missing_framework_is_the_users_to_install(
    capsys, monkeypatch, module: str, extra: str
) -> None:
    import vitspec.layout

    def absent(spec: object) -> None:
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    monkeypatch.setattr(vitspec.layout, "param_table", absent)
    monkeypatch.delenv("VITSPEC_DEBUG", raising=False)
    code, err = _main(capsys, "layout", "B/16")
    top = module.split(".")[0]
    assert code == 1 and err.splitlines() == [
        f"error: this needs {top}, which is not installed here (pip install 'vitspec[{extra}]')"
    ]


def test_a_missing_module_of_vitspec_itself_is_a_bug(capsys, monkeypatch) -> None:
    import vitspec.layout

    def absent(spec: object) -> None:
        raise ModuleNotFoundError("No module named 'vitspec.nothing'", name="vitspec.nothing")

    monkeypatch.setattr(vitspec.layout, "param_table", absent)
    monkeypatch.delenv("VITSPEC_DEBUG", raising=False)
    code, err = _main(capsys, "layout", "B/16")
    assert code == 2 and err.startswith("internal error: ModuleNotFoundError")


def test_an_operating_system_refusal_exits_1(capsys, monkeypatch) -> None:
    import vitspec.layout

    def full(spec: object) -> None:
        raise OSError(28, "No space left on device", "out.safetensors")

    monkeypatch.setattr(vitspec.layout, "param_table", full)
    code, err = _main(capsys, "layout", "B/16")
    assert (code, err.splitlines()) == (
        1,
        ["error: [Errno 28] No space left on device: 'out.safetensors'"],
    )


def test_bad_arguments_are_vitspec_errors_and_value_errors() -> None:
    import numpy as np

    from vitspec import reference
    from vitspec.errors import InputError, VitspecError

    spec = family("mnist")
    weights = vitspec.init_weights(spec)
    calls = [
        lambda: reference.forward(spec, weights, np.zeros((1, 3, 28, 28))),
        lambda: reference.forward(spec, weights, np.zeros((1, 28, 28, 1)), capture=("blocks.9",)),
        lambda: vitspec.init_weights(spec, seed=-1),
    ]
    for call in calls:
        with pytest.raises(InputError) as info:
            call()
        assert isinstance(info.value, VitspecError) and isinstance(info.value, ValueError)
        assert len(info.value.problems) == 1 and str(info.value) == info.value.problems[0]


def test_every_error_kind_shares_the_base_body() -> None:
    from vitspec import errors

    kinds = [
        errors.SpecError,
        errors.WeightsError,
        errors.FileFormatError,
        errors.InputError,
        errors.BackendError,
    ]
    for kind in kinds:
        assert "__init__" not in vars(kind) and "__str__" not in vars(kind), kind
        one, many = kind("one problem"), kind(["a", "b"], "f.yaml")
        assert (one.problems, one.source, str(one)) == (["one problem"], None, "one problem")
        assert (many.problems, str(many)) == (["a", "b"], "f.yaml: a\nf.yaml: b")


def test_piped_output_is_not_wrapped(tmp_path: Path) -> None:
    """Redirected to a file or a pipe, a line stays one line however long (rich wraps at 80 columns)."""
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES"}}
    spec = (
        tmp_path / "a_spec_file_with_a_rather_long_name_to_push_the_line_past_eighty_columns.yaml"
    )
    spec.write_text(family("mnist").to_yaml())
    out = subprocess.run(
        [sys.executable, "-m", "vitspec.cli.main", "validate", str(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert out == f"ok {spec}: 27.98k parameters, 960.38kFLOPs/image, 17 tokens of width 32\n"
    table = subprocess.run(
        [sys.executable, "-m", "vitspec.cli.main", "layout", "B/16"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.splitlines()
    row = next(line for line in table if "blocks.{i}.attn.query.kernel" in line)
    assert "(768, 768)" in row and row.rstrip().endswith("(i = 0..11)")
    assert max(map(len, table)) > 80
