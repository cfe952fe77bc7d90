"""Errors vitspec raises on bad input: one base class, each error a list of problems.

Every problem names the thing that is wrong, what was expected and what was found. The CLI
prints each problem on its own line (``error: SOURCE: PROBLEM``) and exits 1. Any other
exception escaping vitspec is a bug in vitspec, never the user's fault: the CLI reports it as an
internal error and exits 2 (``vitspec.cli.main``).

The subclasses only say which kind of input was bad; each also subclasses the builtin a caller
would catch for it (``ValueError`` for bad values, ``RuntimeError`` for a broken backend).
"""

from __future__ import annotations

from collections.abc import Iterable


class VitspecError(Exception):
    """Bad input that the user can fix: ``problems`` (one message each) and the ``source`` they are in."""

    def __init__(self, problems: str | Iterable[str], source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        return "\n".join(prefix + p for p in self.problems)


class SpecError(VitspecError, ValueError):
    """A spec that does not validate, or that contradicts a file."""


class WeightsError(VitspecError, ValueError):
    """Weights that do not fit a spec: missing, unexpected, wrong shape or dtype, NaN/Inf."""


class FileFormatError(VitspecError, ValueError):
    """A file that is not what it claims to be (truncated, binary, wrong format)."""


class InputError(VitspecError, ValueError):
    """An argument a function cannot use: images of the wrong shape or dtype, an unknown capture
    point, a bad seed, scheme or batch size."""


class BackendError(VitspecError, RuntimeError):
    """A backend that is unknown, not installed or broken."""
