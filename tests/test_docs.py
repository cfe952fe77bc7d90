"""The docs show what the code does: generated tables and quoted outputs must match."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import run

import vitspec
from vitspec.presets import VARIANTS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_layout_page_has_the_generated_b16_table() -> None:
    generated = run("layout", "B/16", "--format", "markdown").stdout
    assert generated.strip() in (DOCS / "layout.md").read_text()


def test_layout_page_tables_every_capture_point_as_the_code_describes_it() -> None:
    from vitspec.layout import CAPTURE_MEANINGS

    page = (DOCS / "layout.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (\(B[^|]*\)) \| [^|]+ \|$", page, re.M))
    assert rows == {name: shape for name, (shape, _) in CAPTURE_MEANINGS.items()}
    for name, (shape, meaning) in CAPTURE_MEANINGS.items():
        assert f"| `{name}` | {shape} | {meaning} |" in page, name


def test_spec_page_quotes_real_validate_output() -> None:
    page = (DOCS / "spec.md").read_text()
    out = run("validate", "examples/mnist.yaml", "B/16", cwd=DOCS.parent).stdout
    for line in out.strip().splitlines():
        assert line.strip() in page, line


def test_spec_page_documents_every_field_and_preset() -> None:
    page = (DOCS / "spec.md").read_text()
    for field in vitspec.Spec.model_fields:
        assert f"| `{field}` |" in page, field
    for variant, (hidden, depth, mlp, heads) in VARIANTS.items():
        assert re.search(
            rf"\| {re.escape(variant)} \| {hidden} \| {depth} \| {mlp} \| {heads} \|", page
        ), variant


ROOT = DOCS.parent
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.MULTILINE)}


def test_every_link_and_named_page_exists() -> None:
    broken = []
    for page in PAGES:
        text = page.read_text()
        prose = re.sub(
            r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.DOTALL)
        )  # code is not links
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
        for named in re.findall(r"`?\b(docs/[\w/.-]+\.md)\b", text):
            if not (ROOT / named).exists():
                broken.append(f"{page.relative_to(ROOT)}: {named} (named, no such file)")
    assert broken == []


def test_no_page_has_a_placeholder_left() -> None:
    for page in PAGES:
        assert not re.search(
            r"\b[A-Z0-9]+_(?:TABLE|SECTION)\b|\bTODO\b|\bTBD\b", page.read_text()
        ), page


# ---- every snippet runs -----------------------------------------------------------------------
#
# Python blocks run in order, each page in one fresh process (a page's blocks continue each
# other, as a reader types them); console blocks run their `$ ` lines with bash, the venv's
# `vitspec` first on PATH. A command shown with `error:` lines after it must fail with those
# errors (`…` stands for any text); every other command must exit 0. Each page runs twice in the
# same temporary folder, so a snippet that cannot be run again (an output that already exists)
# fails. A block that cannot run here is marked `<!-- not run: reason -->` on the line before it.

RUN_LANGS = {"python", "console"}
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Snippet:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    body: str
    not_run: str | None  # the reason, when the block is marked

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def commands(self) -> list[tuple[str, list[str]]]:
        """A console block's `$ ` commands, each with the `error:` lines shown after it."""
        out: list[tuple[str, list[str]]] = []
        lines = self.body.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line.startswith("$ "):
                if out and line.startswith("error: "):
                    out[-1][1].append(line)
                continue
            command = line[2:]
            while command.endswith("\\") and i < len(lines):
                command = command[:-1] + " " + lines[i].strip()
                i += 1
            out.append((command, []))
        return out


def snippets(page: Path) -> list[Snippet]:
    found, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marked = NOT_RUN.match(before)
        found.append(
            Snippet(
                page,
                start + 1,
                match.group(1),
                "\n".join(body),
                marked.group(1) if marked else None,
            )
        )
    return found


def test_snippets_are_python_console_or_data_and_every_skip_says_why() -> None:
    """Every block is run, or is data (yaml, json, toml, text), or is marked with a reason."""
    unmarked_shell, skipped = [], []
    for page in PAGES:
        for s in snippets(page):
            if s.lang in {"bash", "sh", "shell"} or (
                s.lang == "console" and not s.commands() and s.not_run is None
            ):
                unmarked_shell.append(
                    f"{s.where}: a {s.lang} block with no `$ ` command; mark it or write it as text"
                )
            if s.not_run is not None:
                skipped.append(f"{s.where}: {s.not_run}")
                assert s.lang in RUN_LANGS, (
                    f"{s.where}: only python and console blocks are run; the mark is not needed"
                )
                assert len(s.not_run) >= 15, (
                    f"{s.where}: say why the block cannot run here, found {s.not_run!r}"
                )
    assert unmarked_shell == []
    assert len(skipped) < 20, "\n".join(
        skipped
    )  # a few: hub downloads, a GPU, runs of many minutes
    for line in skipped:
        print("not run:", line)


def run_page(page: Path, workdir: Path) -> None:
    """Run a page's python and console blocks twice in ``workdir`` (called in a fresh process)."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401  -- before TensorFlow, as docs/backends/tensorflow.md says

    os.chdir(workdir)
    sys.path.insert(0, str(workdir))
    blocks = [s for s in snippets(page) if s.lang in RUN_LANGS and s.not_run is None]
    for round_ in (1, 2):
        namespace: dict[str, object] = {"__name__": "__main__"}
        for s in blocks:
            t0 = time.perf_counter()
            if s.lang == "python":
                try:
                    exec(compile(s.body, s.where, "exec"), namespace)
                except Exception as exc:
                    raise AssertionError(
                        f"{s.where} (run {round_}): {type(exc).__name__}: {exc}"
                    ) from exc
            else:
                for command, errors in s.commands():
                    code, out, err = _shell(command)
                    said = f"{s.where} (run {round_}): $ {command}\nexit {code}\n{out}{err}"
                    if not errors:
                        assert code == 0, said
                        continue
                    assert code == 1, said
                    for shown in errors:
                        pattern = ".*".join(re.escape(part) for part in shown.split("…"))
                        assert any(re.fullmatch(pattern, line) for line in err.splitlines()), (
                            f"{said}\nexpected: {shown}"
                        )
            print(
                f"{s.where} run {round_}: {time.perf_counter() - t0:.1f}s",
                file=sys.stderr,
                flush=True,
            )


def _shell(command: str) -> tuple[int, str, str]:
    """Run one `$ ` line: `vitspec ...` in this process (the venv's vitspec, its frameworks imported
    once per page), anything else with bash and the venv's bin folder first on PATH."""
    import contextlib
    import io
    import shlex

    words = shlex.split(command, comments=True)
    redirect = None
    if ">" in words:
        words, redirect = words[: words.index(">")], words[words.index(">") + 1]
    if words[0] != "vitspec" or any(w in words for w in ("|", "&&", ";", "<")):
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(
                [os.getcwd(), os.environ.get("PYTHONPATH", "")]
            ),  # a prepared backend
        }
        res = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, env=env, timeout=600
        )
        return res.returncode, res.stdout, res.stderr
    from vitspec.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(words[1:])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if redirect is not None:
        Path(redirect).write_text(out.getvalue())
    return code, out.getvalue(), err.getvalue()


RUNNABLE = [p for p in PAGES if any(s.lang in RUN_LANGS and s.not_run is None for s in snippets(p))]


def _prepare(page: Path, workdir: Path) -> None:
    """What a page's snippets expect to find: the repository's examples and golden cases."""
    shutil.copytree(ROOT / "examples", workdir / "examples")
    shutil.copytree(ROOT / "conformance" / "cases", workdir / "conformance" / "cases")
    for name, make in PREPARED.get(page.relative_to(ROOT).as_posix(), {}).items():
        make(workdir / name)


def _spec_file(path: Path) -> None:
    path.write_text(vitspec.load_spec(ROOT / "examples" / "mnist.yaml").replace(depth=2).to_yaml())


def _weights_file(path: Path) -> None:
    spec = vitspec.load_spec(ROOT / "examples" / "mnist.yaml").replace(depth=2)
    vitspec.save_weights(path, vitspec.init_weights(spec, seed=1), spec)


def _my_backend(path: Path) -> None:
    """The backend docs/backend-authors.md registers: NumPy's, as if installed from mypackage."""
    path.mkdir()
    (path / "__init__.py").write_text("")
    (path / "vitspec_backend.py").write_text(
        "from vitspec.backends.numpy import NumpyBackend\n\n\n"
        "class MyBackend(NumpyBackend):\n    name = 'mybackend'\n    version = '0.1'\n"
    )
    info = path.parent / "mypackage-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypackage\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[vitspec.backends]\nmybackend = mypackage.vitspec_backend:MyBackend\n"
    )


# Stand-ins for the public checkpoints docs/convert.md names: the same formats, a small model.
STAND_IN = vitspec.Spec(
    image_size=32, patch_size=16, hidden_dim=64, n_heads=1, depth=2, n_classes=10
)


def _checkpoint(
    to_format: str, *, tanh: bool = False, bare: bool = False
) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        from vitspec.formats import save

        spec = STAND_IN.replace(gelu="tanh") if tanh else STAND_IN
        save(path, vitspec.init_weights(spec, seed=2, scheme="random"), spec, to_format)
        if bare:  # as timm writes it: tensors only, no vitspec spec in the metadata
            from safetensors.numpy import load_file, save_file

            save_file(load_file(path), path)

    return make


def _training_checkpoint(path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    timm = path.with_suffix(".safetensors")
    _checkpoint("timm", bare=True)(timm)
    torch.save({"model": load_file(timm), "epoch": 3}, path)
    timm.unlink()


# Files that snippets name as the reader's own, made before a page runs.
PREPARED: dict[str, dict[str, Callable[[Path], None]]] = {
    "docs/conformance.md": {"my_spec.yaml": _spec_file, "w.safetensors": _weights_file},
    "docs/backend-authors.md": {
        "mypackage": _my_backend,
        "my.yaml": _spec_file,
        "my.safetensors": _weights_file,
    },
    "docs/build.md": {
        "huge.yaml": lambda path: path.write_text(
            vitspec.preset("B/16").replace(image_size=20000).to_yaml()
        )
    },
    "docs/convert.md": {
        "vit_base_patch16_224.safetensors": _checkpoint("timm", bare=True),
        "vit-base-patch16-224": _checkpoint("hf"),
        "vit_b_16.pth": _checkpoint("torchvision"),
        "ViT-B_16.npz": _checkpoint("google", tanh=True),
        "vit_s16_i1k_300ep.npz": _checkpoint("big_vision", tanh=True),
        "checkpoint.pth": _training_checkpoint,
        "spec.yaml": lambda path: path.write_text(STAND_IN.to_yaml()),
    },
}


@pytest.fixture(scope="module")
def page_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Path, Future[subprocess.CompletedProcess[str]]]]:
    """The selected pages started at once, a few at a time: each is mostly one busy core (imports, compiles)."""
    selected = {
        item.callspec.params["page"]
        for item in request.session.items
        if item.originalname == "test_every_snippet_runs_twice"
    }
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 1))))
    runs = {}
    for page in [p for p in RUNNABLE if p in selected]:
        workdir = tmp_path_factory.mktemp(page.stem)
        _prepare(page, workdir)
        code = (
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
            f"from test_docs import run_page; run_page(Path({str(page)!r}), Path({str(workdir)!r}))"
        )
        # Started by fork, not vfork (tests/conftest.py): CI once saw exec fail with EFAULT when
        # these threads vforked while the main thread ran other tests.
        runs[page] = pool.submit(
            subprocess.run,
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=900,
        )
    yield runs
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("page", RUNNABLE, ids=[p.relative_to(ROOT).as_posix() for p in RUNNABLE])
def test_every_snippet_runs_twice(
    page: Path, page_runs: dict[Path, Future[subprocess.CompletedProcess[str]]]
) -> None:
    res = page_runs[page].result()
    print(
        "\n".join(
            line for line in res.stderr.splitlines() if re.search(r":\d+ run \d: [\d.]+s$", line)
        )
    )
    assert res.returncode == 0, "\n".join(res.stderr.splitlines()[-30:])


def test_readme_says_how_to_reach_the_command_after_make_demo() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Two commands") : readme.index("## A taste")]
    assert "source .venv/bin/activate" in setup and ".venv/bin/vitspec" in setup
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^VITSPEC := \$\(VENV\)/bin/vitspec$", makefile, re.MULTILINE)
    assert re.search(r"^VENV \?= \.venv$", makefile, re.MULTILINE)
