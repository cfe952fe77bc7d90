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
