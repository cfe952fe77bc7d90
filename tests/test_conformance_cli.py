"""`vitspec conformance`, `vitspec diff` and the pytest plugin, run as a user (and a third party) would.

The third-party backend lives in a temporary folder with a ``.dist-info`` that registers it under
the ``vitspec.backends`` entry-point group: nothing in vitspec changes for it to be found.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import vitspec
from vitspec.conformance.case import CASES_DIR, load_case
from vitspec.families import family

THIRD_PARTY = '''
"""A third party's backend: the NumPy reference under another name, and a broken twin."""
from vitspec.backends.numpy import NumpyBackend
from vitspec.conformance import broken


class ThirdBackend(NumpyBackend):
    name = "thirdvit"
    version = "0.1"

    def environment(self):
        return {"thirdvit.kernels": "reference"}


def broken_twin():
    return broken.swap_query_key(ThirdBackend())
'''


@pytest.fixture(scope="module")
def third_party(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("site")
    (root / "thirdvit.py").write_text(THIRD_PARTY)
    info = root / "thirdvit-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdvit\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[vitspec.backends]\nthirdvit = thirdvit:ThirdBackend\nthirdbroken = thirdvit:broken_twin\n"
        "ghost = nosuchpkg.backend:Ghost\n"
    )
    return {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200", "NO_COLOR": "1"}


def vitspec_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = env or {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vitspec.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def pytest_run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = env or {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _case_args(*names: str) -> list[str]:
    return [a for n in names for a in ("--vitspec-case", str(CASES_DIR / n))]


# ---- vitspec conformance ------------------------------------------------------------------------


def test_corpus_run_writes_every_report(tmp_path: Path) -> None:
    res = vitspec_cli(
        "conformance",
        "--backend",
        "numpy",
        "--report",
        str(tmp_path / "r.json"),
        "--junit",
        str(tmp_path / "r.xml"),
        "--markdown",
        str(tmp_path / "r.md"),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    n = len(list(CASES_DIR.iterdir()))
    assert f"CONFORMS: {n} checks, {n} passed, 0 failed, 0 errors" in res.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ok"] is True and data["summary"]["pass"] == n
    assert ET.parse(tmp_path / "r.xml").getroot().get("tests") == str(n)
    assert "| family_vit_paper | ok " in (tmp_path / "r.md").read_text()


def test_third_party_backend_runs_with_no_change_to_vitspec(third_party: dict[str, str]) -> None:
    ok = vitspec_cli("conformance", "--backend", "thirdvit", env=third_party)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "thirdvit 0.1" in ok.stdout and "CONFORMS" in ok.stdout
    bad = vitspec_cli(
        "conformance",
        "--backend",
        "thirdvit",
        "--backend",
        "thirdbroken",
        "family_mnist",
        env=third_party,
    )
    assert bad.returncode == 1
    assert (
        "thirdbroken vs the reference on family_mnist: FAIL: first divergent capture point blocks.0.attn_probs"
        in bad.stdout
    )
    assert (
        "thirdvit vs thirdbroken on family_mnist: FAIL: first divergent capture point blocks.0.attn_probs"
        in bad.stdout
    )
    assert (
        bad.stdout.strip()
        .splitlines()[-1]
        .startswith("DOES NOT CONFORM: 3 checks, 1 passed, 2 failed")
    )


def test_spec_with_weights_becomes_a_case(tmp_path: Path) -> None:
    spec = family("mnist", hidden_dim=16, n_heads=2, depth=1)
    (tmp_path / "s.yaml").write_text(spec.to_yaml())
    vitspec.save_weights(
        tmp_path / "w.safetensors", vitspec.init_weights(spec, seed=4, scheme="random"), spec
    )
    res = vitspec_cli(
        "conformance",
        "-b",
        "numpy",
        str(tmp_path / "s.yaml"),
        "--weights",
        str(tmp_path / "w.safetensors"),
        "--batch",
        "3",
        "--save-case",
        str(tmp_path / "cases"),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    case = load_case(tmp_path / "cases" / "s")
    assert case.batch == 3 and case.spec == spec
    assert vitspec.load_weights(tmp_path / "w.safetensors")[0].keys() == case.weights.keys()
    # A saved case is an ordinary case folder; no spec needed alongside the weights either.
    again = vitspec_cli("conformance", "-b", "numpy", str(tmp_path / "cases" / "s"))
    assert again.returncode == 0 and "s  " in again.stdout
    alone = vitspec_cli("conformance", "-b", "numpy", "--weights", str(tmp_path / "w.safetensors"))
    assert alone.returncode == 0, alone.stderr


def test_a_failing_random_case_is_saved_and_reruns_as_a_case_folder(
    third_party: dict[str, str], tmp_path: Path
) -> None:
    saved = tmp_path / "failing"
    res = vitspec_cli(
        "conformance",
        "-b",
        "thirdbroken",
        "--random",
        "4",
        "--seed",
        "3",
        "--save-case",
        str(saved),
        "--report",
        str(tmp_path / "r.json"),
        env=third_party,
    )
    assert res.returncode == 1
    data = json.loads((tmp_path / "r.json").read_text())
    failing = sorted(r["case"] for r in data["results"] if r["status"] == "fail")
    assert failing and sorted(p.name for p in saved.iterdir()) == failing
    assert f"wrote failing random case {saved / failing[0]}" in res.stderr
    again = vitspec_cli(
        "conformance", "-b", "thirdbroken", str(saved / failing[0]), env=third_party
    )
    assert again.returncode == 1
    first = next(r["first_divergent"] for r in data["results"] if r["case"] == failing[0])
    assert (
        f"thirdbroken vs the reference on {failing[0]}: FAIL: first divergent capture point {first}"
        in again.stdout
    )
    # The plugin saves the same cases with the same options.
    plugin_saved = tmp_path / "plugin"
    res = pytest_run(
        "--pyargs",
        "vitspec.conformance",
        "--vitspec-backend",
        "thirdbroken",
        "--vitspec-random",
        "4",
        "--vitspec-seed",
        "3",
        "--vitspec-save-case",
        str(plugin_saved),
        env=third_party,
        cwd=tmp_path,
    )
    assert res.returncode == 1
    assert sorted(p.name for p in plugin_saved.iterdir()) == failing


def test_backends_listing_reads_metadata_only(third_party: dict[str, str]) -> None:
    code = (
        "import sys\nfrom vitspec.cli.main import main\nmain(['backends'])\n"
        "print('imported:', sorted(m for m in ('torch', 'tensorflow', 'jax', 'thirdvit') if m in sys.modules))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=third_party, timeout=120
    )
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line for line in res.stdout.splitlines() if "│" in line}
    assert (
        "installed" in rows["thirdvit"]
        and "│ 0.1 " in rows["thirdvit"]
        and "not installed" not in rows["thirdvit"]
    )
    assert "not installed" in rows["ghost"]
    assert (
        "ghost: backend 'ghost': module 'nosuchpkg.backend' of entry point 'nosuchpkg.backend:Ghost' is not installed"
        in res.stdout
    )
    assert "imported: []" in res.stdout
    checked = vitspec_cli("backends", "--check", "thirdvit", "ghost", env=third_party)
    assert checked.returncode == 1  # a named backend that is not installed
    assert (
        re.search(r"thirdvit\s+│ ok\s+│ 0\.1", checked.stdout)
        and "ghost: backend 'ghost': module 'nosuchpkg.backend'" in checked.stdout
    )


def test_terminal_header_shows_each_backends_environment(third_party: dict[str, str]) -> None:
    res = vitspec_cli("conformance", "-b", "thirdvit", "family_mnist", env=third_party)
    assert res.returncode == 0, res.stderr
    assert (
        "  backend thirdvit 0.1 [thirdvit:ThirdBackend]: thirdvit.kernels=reference"
        in res.stdout.splitlines()[:3]
    )


def test_bad_input_is_one_line_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_size: 32\npatch_size: 5\nhidden_dim: 16\nn_heads: 4\ndepth: 1\n")
    res = vitspec_cli("conformance", "-b", "numpy", str(bad))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"error: {bad}: image_size 32 is not divisible by patch_size 5"
    res = vitspec_cli("conformance", "-b", "nosuch", "family_mnist")
    assert res.returncode == 1 and "error: no backend named 'nosuch'" in res.stderr
    res = vitspec_cli("conformance", "-b", "numpy", "B/16", "S/16", "--weights", str(bad))
    assert res.returncode == 2 and "--weights goes with one SPEC, found 2" in res.stderr


def test_diff_names_the_first_divergent_layer(third_party: dict[str, str], tmp_path: Path) -> None:
    res = vitspec_cli(
        "diff",
        "--backend",
        "thirdvit",
        "--backend",
        "thirdbroken",
        "family_vit_paper",
        "--json",
        str(tmp_path / "d.json"),
        env=third_party,
    )
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert lines[0].startswith(
        "thirdvit vs thirdbroken on family_vit_paper: FAIL: first divergent capture point blocks.0.attn_probs"
    )
    marked = [line.split()[0] for line in lines if "<< first divergence" in line]
    assert marked == ["blocks.0.attn_probs"]
    assert [line.split()[0] for line in lines if " pass " in line][:2] == ["patch_embed", "embed"]
    assert json.loads((tmp_path / "d.json").read_text())["first_divergent"] == "blocks.0.attn_probs"
    ref = vitspec_cli(
        "diff",
        "-b",
        "numpy",
        "-b",
        "reference",
        "examples/mnist.yaml",
        cwd=Path(__file__).parent.parent,
    )
    assert ref.returncode == 0, ref.stderr
    assert ref.stdout.startswith("numpy vs the reference on mnist: pass")


# ---- the pytest plugin --------------------------------------------------------------------------


def test_plugin_is_inert_without_the_option(tmp_path: Path) -> None:
    (tmp_path / "test_plain.py").write_text(
        textwrap.dedent("""
        import sys
        def test_nothing_heavy_was_imported():
            heavy = [m for m in ("torch", "tensorflow", "jax", "vitspec.conformance.case", "numpy") if m in sys.modules]
            assert heavy == []
    """)
    )
    res = pytest_run("test_plain.py", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stdout
    assert "vitspec conformance" not in res.stdout
    res = pytest_run("--pyargs", "vitspec.conformance", "-q", cwd=tmp_path)
    assert res.returncode != 0
    assert "--vitspec-backend NAME" in res.stdout + res.stderr


def test_plugin_runs_a_third_party_backend(third_party: dict[str, str], tmp_path: Path) -> None:
    res = pytest_run(
        "--pyargs",
        "vitspec.conformance",
        "--vitspec-backend",
        "thirdvit",
        "--junitxml",
        str(tmp_path / "j.xml"),
        "--vitspec-report",
        str(tmp_path / "r.json"),
        "--vitspec-markdown",
        str(tmp_path / "r.md"),
        env=third_party,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout
    n = len(list(CASES_DIR.iterdir()))
    assert f"{n} passed" in res.stdout
    assert "backend thirdvit 0.1 [thirdvit:ThirdBackend]: thirdvit.kernels=reference" in res.stdout
    assert (
        f"{n} passed, 0 failed, 0 known failures (not passes), 0 unsupported (not passes), 0 skipped (not passes)"
        in res.stdout
    )
    assert ET.parse(tmp_path / "j.xml").getroot().find("testsuite").get("tests") == str(n)
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["pass"] == n
    assert (tmp_path / "r.md").read_text().startswith("# vitspec conformance")


def test_plugin_fails_a_broken_backend_and_names_the_point(
    third_party: dict[str, str], tmp_path: Path
) -> None:
    res = pytest_run(
        "--pyargs",
        "vitspec.conformance",
        "--vitspec-backend",
        "thirdvit",
        "--vitspec-backend",
        "thirdbroken",
        *_case_args("family_mnist", "batch8"),
        env=third_party,
        cwd=tmp_path,
    )
    assert res.returncode == 1
    assert "2 passed, 4 failed" in res.stdout
    assert "test_conformance[thirdbroken-family_mnist]" in res.stdout
    assert "test_conformance[thirdvit~thirdbroken-batch8]" in res.stdout
    assert (
        "thirdbroken vs the reference on family_mnist: FAIL: first divergent capture point blocks.0.attn_probs"
        in res.stdout
    )


def test_plugin_expectations_xfail_and_stale_entries_warn(
    third_party: dict[str, str], tmp_path: Path
) -> None:
    exp = tmp_path / "thirdbroken.json"
    exp.write_text(
        json.dumps(
            {
                "format": "vitspec.conformance.expectations/1",
                "backend": "thirdbroken",
                "known_failures": [
                    {
                        "case": "family_mnist",
                        "first_divergent": "blocks.0.attn_probs",
                        "reason": "query and key swapped on purpose",
                    },
                    {
                        "case": "single_patch",
                        "reason": "an entry for a case this run does not include",
                    },
                    {"case": "no_such_case", "reason": "a misspelt entry"},
                ],
            }
        )
    )
    res = pytest_run(
        "--pyargs",
        "vitspec.conformance",
        "--vitspec-backend",
        "thirdbroken",
        "--vitspec-expectations",
        str(exp),
        *_case_args("family_mnist"),
        "-rxX",
        env=third_party,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout
    assert (
        "0 passed, 0 failed, 1 known failures (not passes), 0 unsupported (not passes), 0 skipped (not passes)"
        in res.stdout
    )
    assert "query and key swapped on purpose" in res.stdout
    assert (
        "expectation thirdbroken on no_such_case (thirdbroken.json) names no known case"
        in res.stdout
    )
    assert "single_patch" not in res.stdout.split("vitspec conformance ====")[-1]
    # The same entries against a backend that passes: the entry no longer matches, and says so.
    ok = exp.read_text().replace('"thirdbroken"', '"thirdvit"')
    exp.write_text(ok)
    res = pytest_run(
        "--pyargs",
        "vitspec.conformance",
        "--vitspec-backend",
        "thirdvit",
        "--vitspec-expectations",
        str(exp),
        *_case_args("family_mnist"),
        env=third_party,
        cwd=tmp_path,
    )
    assert res.returncode == 0
    assert (
        "expectation thirdvit on family_mnist at blocks.0.attn_probs (thirdbroken.json) no longer matches: the check passes"
        in res.stdout
    )


def test_plugin_zero_cases_and_skips_fail(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = pytest_run(
        "--pyargs",
        "vitspec.conformance",
        "--vitspec-backend",
        "numpy",
        "--vitspec-case",
        str(tmp_path / "empty"),
        cwd=tmp_path,
    )
    assert res.returncode != 0
    assert "collected zero cases" in res.stdout + res.stderr
    res = pytest_run(
        "--pyargs",
        "vitspec.conformance",
        "--vitspec-backend",
        "numpy",
        "-k",
        "nothing_matches",
        cwd=tmp_path,
    )
    assert res.returncode == 1
    assert "no conformance check ran" in res.stdout
    (tmp_path / "skipper.py").write_text(
        "import pytest\ndef pytest_runtest_setup(item):\n    pytest.skip('not today')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    res = pytest_run(
        "--pyargs",
        "vitspec.conformance",
        "--vitspec-backend",
        "numpy",
        "-p",
        "skipper",
        *_case_args("batch8"),
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 1
    assert "FAILED: 1 conformance check(s) skipped; a skip is not a pass" in res.stdout
