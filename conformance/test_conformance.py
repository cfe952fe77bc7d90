"""The conformance tests that ``pytest --pyargs vitspec.conformance --vitspec-backend NAME`` runs.

The plugin (``vitspec.conformance.plugin``) makes one test per (backend, case) against the float64
reference and one per (pair of backends, case); a failure prints every capture point in forward
order and names the first that diverges.
"""

from __future__ import annotations

from typing import Any


def test_conformance(vitspec_check: Any, vitspec_session: Any) -> None:
    vitspec_session.verify(vitspec_check)
