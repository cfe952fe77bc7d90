"""The docs show what the code does: generated tables and quoted outputs must match."""

from __future__ import annotations

import re
from pathlib import Path

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
        assert re.search(rf"\| {re.escape(variant)} \| {hidden} \| {depth} \| {mlp} \| {heads} \|", page), variant


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
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.DOTALL))  # code is not links
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
        assert not re.search(r"\b[A-Z0-9]+_(?:TABLE|SECTION)\b|\bTODO\b|\bTBD\b", page.read_text()), page
