"""Errors vitspec raises on bad input.

Every error names the thing that is wrong, what was expected and what was found.
The CLI prints ``str(error)`` on one line per problem and exits non-zero.
"""

from __future__ import annotations

from collections.abc import Iterable


class VitspecError(Exception):
    """Base class: bad input that the user can fix (never a bug in vitspec)."""


class SpecError(VitspecError, ValueError):
    """A spec that does not validate. ``problems`` holds one message per problem."""

    def __init__(self, problems: Iterable[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


class WeightsError(VitspecError, ValueError):
    """Weights that do not fit a spec: missing, unexpected, wrong shape or dtype, NaN/Inf."""

    def __init__(self, problems: Iterable[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


class FileFormatError(VitspecError, ValueError):
    """A file that is not what it claims to be (truncated, binary, wrong format)."""


class BackendError(VitspecError, RuntimeError):
    """A backend that is unknown, not installed or broken."""
