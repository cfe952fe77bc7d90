"""A third party's backend, end to end: a package built and pip-installed into a fresh virtual
environment, then taken through `vitspec backends`, `vitspec conformance --random`, the pytest
plugin and the commands of the CI template in docs/backend-authors.md, run as written.

The package is not part of vitspec: its backend wraps the NumPy reference, declares one feature
unsupported (a pre-logits layer) and has one known failure (it zeroes NaN pixels, so `nan_pixel`
diverges at `patch_embed`), listed in its own expectations file. The fresh environment sees
vitspec and its dependencies through a `.pth` file (no network), exactly as an installed vitspec.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from vitspec.conformance.case import CASES_DIR
from vitspec.conformance.corpus import VERSION
from vitspec.conformance.random_specs import random_cases

DOCS = Path(__file__).resolve().parent.parent / "docs"
N_CASES = len([p for p in CASES_DIR.iterdir() if (p / "manifest.json").is_file()])
UNSUPPORTED = [
    "family_vit_paper_pre_logits",
    "pre_logits_no_head",
]  # the corpus cases with a pre-logits layer
REASON = "no pre-logits layer (dense + tanh before the head)"

PYPROJECT = """
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "mybackend-vitspec"
version = "0.3.1"
dependencies = ["vitspec"]

[project.entry-points."vitspec.backends"]
mybackend = "mybackend_vitspec.backend:MyBackend"

[tool.setuptools]
packages = ["mybackend_vitspec"]
"""

BACKEND = '''
"""mybackend: the NumPy reference, with no pre-logits layer and an input pipeline that zeroes NaN pixels."""
import numpy as np

from vitspec.backends.numpy import NumpyBackend


class MyBackend(NumpyBackend):
    name = "mybackend"
    version = "0.3.1"

    def supports(self, spec):
        if spec.pre_logits_dim:
            return "no pre-logits layer (dense + tanh before the head)"
        return None

    def environment(self):
        return {"mybackend.kernels": "numpy"}

    def forward(self, model, images, capture=()):
        return super().forward(model, np.nan_to_num(np.asarray(images), nan=0.0), capture)
'''

EXPECTATIONS = {
    "format": "vitspec.conformance.expectations/1",
    "backend": "mybackend",
    "known_failures": [
        {
            "case": "nan_pixel",
            "first_divergent": "patch_embed",
            "reason": "our input pipeline zeroes NaN pixels; issue #3",
        },
    ],
}


def ci_template() -> dict[str, Any]:
    page = (DOCS / "backend-authors.md").read_text()
    section = page.split("## CI template", 1)[1]
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The backend's repository and a fresh virtual environment that does not have it installed yet."""
    root = tmp_path_factory.mktemp("external")
    src = root / "mybackend-repo"
    (src / "mybackend_vitspec").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "mybackend_vitspec" / "__init__.py").write_text('"""mybackend for vitspec."""\n')
    (src / "mybackend_vitspec" / "backend.py").write_text(BACKEND)
    (src / "vitspec-expectations.json").write_text(json.dumps(EXPECTATIONS, indent=1))
    venv = root / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    purelib = Path(
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # vitspec, pip, pytest and setuptools come from this interpreter's environment, as if installed.
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages())
    (purelib / "zz_vitspec_under_test.pth").write_text(lines)
    # The console script pip writes when it installs vitspec (vitspec itself is "already satisfied").
    script = venv / "bin" / "vitspec"
    script.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom vitspec.cli.main import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        {
            "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "VIRTUAL_ENV": str(venv),
            "COLUMNS": "200",
            "NO_COLOR": "1",
            "PIP_NO_INDEX": "1",  # offline: every requirement but the backend is already there
            "PIP_NO_BUILD_ISOLATION": "0",  # pip's spelling of --no-build-isolation (setuptools is already there)
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "GITHUB_STEP_SUMMARY": str(root / "step-summary.md"),
        }
    )
    return {"root": root, "src": src, "venv": venv, "env": env}


def sh(command: str, repo: dict[str, Any], **extra: str) -> subprocess.CompletedProcess[str]:
    # GitHub runs each `run:` with bash -e -o pipefail in the checkout.
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", command],
        cwd=repo["src"],
        env={**repo["env"], **extra},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def ci(repo: dict[str, Any]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every `run:` step of the CI template, in order, as GitHub would run it; step name -> result."""
    job = next(iter(ci_template()["jobs"].values()))
    env = {k: str(v) for k, v in job.get("env", {}).items()}
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    for step in job["steps"]:
        if "run" not in step:
            continue
        command = step["run"].replace("${{ github.run_id }}", "4242")
        assert "${{" not in command, f"the test knows no value for the expression in: {command}"
        done[step["name"]] = sh(command, repo, **env)
    return done


def test_ci_template_is_a_complete_workflow(
    ci: dict[str, subprocess.CompletedProcess[str]], repo: dict[str, Any]
) -> None:
    workflow = ci_template()
    job = workflow["jobs"]["conformance"]
    uses = [s["uses"].split("@")[0] for s in job["steps"] if "uses" in s]
    assert uses == ["actions/checkout", "actions/setup-python", "actions/upload-artifact"]
    assert job["env"] == {"BACKEND": "mybackend", "CORPUS_VERSION": str(VERSION)}
    runs = " ".join(s.get("run", "") for s in job["steps"])
    assert "pip install ." in runs and "--pyargs vitspec.conformance" in runs and "--random" in runs
    for name, res in ci.items():
        if name.startswith("Golden corpus") or name.startswith("Fresh random"):
            assert res.returncode == 0, f"{name}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        else:
            assert res.returncode == 0, f"{name}:\n{res.stdout}\n{res.stderr}"
    upload = next(
        s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")
    )
    paths = upload["with"]["path"].split()
    assert {"conformance.xml", "conformance.md", "random.xml", "random.md"} <= set(paths)
    for p in paths:
        assert (repo["src"] / p).exists(), (
            f"the template uploads {p}, which its commands did not write"
        )
    summary = Path(repo["env"]["GITHUB_STEP_SUMMARY"]).read_text()
    assert summary.count("# vitspec conformance") == 2


def test_the_package_was_built_and_installed_into_the_venv(
    ci: dict[str, Any], repo: dict[str, Any]
) -> None:
    out = ci["Install the backend, vitspec and pytest"]
    assert "Successfully installed mybackend-vitspec-0.3.1" in out.stdout
    found = list(
        repo["venv"].glob(
            "lib/python*/site-packages/mybackend_vitspec-0.3.1.dist-info/entry_points.txt"
        )
    )
    assert (
        len(found) == 1
        and "mybackend = mybackend_vitspec.backend:MyBackend" in found[0].read_text()
    )


def test_backends_lists_it_from_metadata_without_importing_a_framework(
    ci: dict[str, Any], repo: dict[str, Any]
) -> None:
    probe = textwrap.dedent("""
        import sys
        from vitspec.cli.main import main
        main(["backends"])
        heavy = sorted(m for m in ("torch", "tensorflow", "jax", "flax", "keras", "mybackend_vitspec.backend") if m in sys.modules)
        print("imported:", heavy)
    """)
    res = sh(f"python -c '{probe}'", repo)
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.strip().startswith("mybackend "))
    assert re.split(r"\s*[│┃]\s*", row.strip()) == [
        "mybackend",
        "installed",
        "0.3.1",
        "mybackend_vitspec.backend:MyBackend",
        "mybackend-vitspec",
    ]
    assert "imported: []" in res.stdout
    check = ci["The backend loads and runs"]
    row = next(line for line in check.stdout.splitlines() if line.strip().startswith("mybackend "))
    assert "│ ok " in row and "0.3.1" in row
    assert re.search(
        r"mybackend: forward pass in [\d.]+s \(import included\), max error \d", check.stdout
    )


def test_plugin_reports_pass_unsupported_and_known_failure(
    ci: dict[str, Any], repo: dict[str, Any]
) -> None:
    src = repo["src"]
    out = ci["Golden corpus (pytest plugin)"].stdout
    n_pass = N_CASES - len(UNSUPPORTED) - 1
    assert (
        f"{n_pass} passed, 0 failed, 1 known failures (not passes), 2 unsupported (not passes), 0 skipped (not passes)"
        in out
    )
    assert (
        "backend mybackend 0.3.1 [mybackend_vitspec.backend:MyBackend]: mybackend.kernels=numpy"
        in out
    )
    assert f"(corpus version {VERSION})" in out

    data = json.loads((src / "conformance.json").read_text())
    assert data["corpus_version"] == VERSION and data["ok"] is True
    assert {k: data["summary"][k] for k in ("pass", "fail", "error", "xfail", "unsupported")} == {
        "pass": n_pass,
        "fail": 0,
        "error": 0,
        "xfail": 1,
        "unsupported": 2,
    }
    status = {r["case"]: r for r in data["results"]}
    assert all(
        status[c]["status"] == "unsupported" and status[c]["unsupported"] == REASON
        for c in UNSUPPORTED
    )
    assert (
        status["nan_pixel"]["status"] == "xfail"
        and status["nan_pixel"]["first_divergent"] == "patch_embed"
    )
    assert status["family_mnist"]["status"] == "pass"

    root = ET.parse(src / "conformance.xml").getroot()
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert (
        props["mybackend.version"] == "0.3.1"
        and props["mybackend.env.mybackend.kernels"] == "numpy"
    )
    assert props["mybackend.target"] == "mybackend_vitspec.backend:MyBackend"
    assert props["vitspec.corpus_version"] == str(VERSION)
    skipped = {
        tc.get("name"): tc.find("skipped")
        for tc in root.iter("testcase")
        if tc.find("skipped") is not None
    }
    assert (
        skipped["test_conformance[mybackend-family_vit_paper_pre_logits]"].get("message")
        == f"vitspec unsupported: {REASON}"
    )
    assert skipped["test_conformance[mybackend-nan_pixel]"].get("type") == "pytest.xfail"
    assert len(skipped) == 3 and root.find("testsuite").get("failures") == "0"

    md = (src / "conformance.md").read_text()
    assert (
        "| family_vit_paper_pre_logits | unsupported |" in md
        and "| nan_pixel | xfail patch_embed |" in md
    )
    assert f"- unsupported: mybackend on pre_logits_no_head: {REASON}" in md
    assert (
        f"{n_pass} passed, 0 failed, 0 errors, 1 known failures (not passes), 2 unsupported (not passes)"
        in md
    )


def test_random_cases_report_unsupported_specs_apart(
    ci: dict[str, Any], repo: dict[str, Any]
) -> None:
    drawn = random_cases(25, 4242)  # what the template's step drew with run id 4242
    declined = sorted(c.name for c in drawn if c.spec.pre_logits_dim)
    assert 0 < len(declined) < 25
    out = ci["Fresh random cases"].stdout
    assert "25 random (--random 25 --seed 4242)" in out
    assert (
        "backend mybackend 0.3.1 [mybackend_vitspec.backend:MyBackend]: mybackend.kernels=numpy"
        in out
    )
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith(
            f"CONFORMS: 25 checks, {25 - len(declined)} passed, 0 failed, 0 errors, {len(declined)} unsupported (not passes)"
        )
    )
    data = json.loads((repo["src"] / "random.json").read_text())
    assert data["random"] == {"n": 25, "seed": 4242} and data["corpus_version"] is None
    assert sorted(r["case"] for r in data["results"] if r["status"] == "unsupported") == declined
    root = ET.parse(repo["src"] / "random.xml").getroot()
    kinds = [s.get("type") for s in root.iter("skipped")]
    assert kinds == ["unsupported"] * len(declined)
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert (
        props["vitspec.unsupported"] == str(len(declined))
        and props["mybackend.env.mybackend.kernels"] == "numpy"
    )
    assert list((repo["src"] / "failing-cases").iterdir()) == []  # nothing failed, nothing saved


def test_pairs_leave_out_unsupported_and_known_failing_cases_once(
    ci: dict[str, Any], repo: dict[str, Any]
) -> None:
    cases = ["family_mnist", "nan_pixel", "family_vit_paper_pre_logits"]
    res = sh(
        "vitspec conformance -b mybackend -b numpy --expectations vitspec-expectations.json "
        + " ".join(cases),
        repo,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ERROR" not in res.stdout and "nothing to compare" not in res.stdout
    assert (
        res.stdout.count(
            "nan_pixel: mybackend left out of its pairs: a known failure against the reference"
        )
        == 1
    )
    assert (
        res.stdout.count(
            f"family_vit_paper_pre_logits: mybackend left out of its pairs: unsupported: {REASON}"
        )
        == 1
    )
    pair_rows = res.stdout.split("pairwise:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"family_mnist\s+ok", pair_rows) and re.search(
        r"nan_pixel\s+left out", pair_rows
    )
    assert (
        res.stdout.strip()
        .splitlines()[-1]
        .startswith(
            "CONFORMS: 7 checks, 5 passed, 0 failed, 0 errors, 1 known failures (not passes), 1 unsupported (not passes)"
        )
    )
    # The plugin leaves the same pairs out: no test is collected for them.
    res = sh(
        "python -m pytest -p no:cacheprovider --pyargs vitspec.conformance --vitspec-backend mybackend --vitspec-backend numpy "
        "--vitspec-expectations vitspec-expectations.json "
        + " ".join(f"--vitspec-case {CASES_DIR / c}" for c in cases)
        + " -v",
        repo,
    )
    assert res.returncode == 0, res.stdout
    assert (
        "5 passed, 0 failed, 1 known failures (not passes), 1 unsupported (not passes)"
        in res.stdout
    )
    assert (
        res.stdout.count(
            "nan_pixel: mybackend left out of its pairs: a known failure against the reference"
        )
        == 1
    )
    assert sorted(re.findall(r"test_conformance\[(mybackend~numpy-\w+)\]", res.stdout)) == [
        "mybackend~numpy-family_mnist"
    ]
    assert (
        "test_conformance[mybackend-family_vit_paper_pre_logits] SKIPPED (vitspec unsupported: no pre-logits"
        in res.stdout
    )


def test_corpus_version_pin_mismatch_is_one_line(ci: dict[str, Any], repo: dict[str, Any]) -> None:
    res = sh(f"vitspec conformance -b mybackend --corpus-version {VERSION + 1} family_mnist", repo)
    assert res.returncode == 1
    assert res.stderr.strip() == (
        f"error: corpus version: expected {VERSION + 1} (--corpus-version), found {VERSION}: the cases are from corpus "
        f"version {VERSION}; install a vitspec that ships corpus {VERSION + 1}, or review the changes "
        f"(docs/conformance.md#corpus-versions) and pin {VERSION}"
    )
    res = sh(
        f"python -m pytest -p no:cacheprovider --pyargs vitspec.conformance --vitspec-backend mybackend "
        f"--vitspec-corpus-version {VERSION + 1}",
        repo,
    )
    assert (
        res.returncode == 4
        and f"corpus version: expected {VERSION + 1} (--corpus-version), found {VERSION}"
        in res.stderr
    )
