"""The fuzzing harness: run one reader on one input and judge how it ended (docs/reliability.md).

An input passes when the reader either reads it completely (every tensor) or raises a
``VitspecError`` whose message is one line per problem and names the file; anything else fails the
campaign: another exception type (a traceback in the CLI), a run over ``DEADLINE_S`` seconds, a
Python-side allocation peak over twice the input's size (plus a fixed allowance), or the marker a
hostile pickle would create if it ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vitspec.errors import VitspecError

DEADLINE_S = 5.0
# Allocations the readers make whatever the input (parsers' tables, error strings, module caches).
ALLOWANCE = 4 << 20


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Tally:
    """How the inputs of one reader ended."""

    reader: str
    read: int = 0
    refused: int = 0
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.read + self.refused

    def save(self) -> None:
        """Add to $FUZZ_REPORT (a JSON file, reader -> counts) when the campaign asks for it."""
        report = os.environ.get("FUZZ_REPORT")
        if not report:
            return
        path = Path(report)
        data = json.loads(path.read_text()) if path.exists() else {}
        old = data.get(self.reader, {"read": 0, "refused": 0})
        data[self.reader] = {
            "read": old["read"] + self.read,
            "refused": old["refused"] + self.refused,
        }
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def judge(
    tally: Tally,
    read: Callable[[], object],
    size: int,
    name: str,
    marker: Path | None = None,
    one_line: bool = True,
) -> None:
    """Run ``read`` (a reader on an input of ``size`` bytes at ``name``); assert it ended well."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        with deadline(DEADLINE_S):
            read()
        tally.read += 1
    except VitspecError as exc:
        text = str(exc)
        lines = text.splitlines()
        assert lines, "an empty error message"
        if one_line:
            assert len(lines) == 1, f"a {len(lines)}-line error: {text!r}"
        assert all(line.strip() for line in lines), f"an empty line in {text!r}"
        assert name in text, f"the error does not name {name}: {text!r}"
        tally.refused += 1
        tally.kinds[type(exc).__name__] = tally.kinds.get(type(exc).__name__, 0) + 1
    peak = tracemalloc.get_traced_memory()[1] - base
    assert peak <= 2 * size + ALLOWANCE, f"allocated {peak} bytes reading a {size}-byte input"
    if marker is not None:
        assert not marker.exists(), "a pickle in the input ran code"


# ---- mutations ---------------------------------------------------------------------------------

HUGE = [2**63 - 1, 2**62, 2**40, 2**32 + 7, 2**31, 10**12, 0xFFFFFFFF, 1 << 20]


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    """Apply byte-level mutations; positions are fractions of the current length."""
    out = bytearray(data)
    for op in ops:
        kind, where = op[0], op[1]
        at = min(int(where * len(out)), max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[at] ^= op[2] or 1
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = op[2]
        elif kind == "delete":
            del out[at : at + op[2]]
        elif kind == "int64":
            out[at : at + 8] = (op[2] & (2**64 - 1)).to_bytes(8, "little")
        elif kind == "int32":
            out[at : at + 4] = (op[2] & (2**32 - 1)).to_bytes(4, "little")
        elif kind == "dup" and out:
            piece = out[at : at + op[2]]
            out[int(op[3] * len(out)) : int(op[3] * len(out))] = piece
    return bytes(out)
