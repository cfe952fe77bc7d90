"""How much memory a forward pass of a spec needs, estimated before anything is allocated.

A spec is a few lines of YAML, but ``depth: 10000`` or ``image_size: 20000`` asks for more memory
than most machines have: commands estimate first and refuse with one line, instead of allocating
until the operating system or NumPy gives up. The estimate counts what dominates (the weights, and
the tensors alive at the peak of one forward pass); a framework's own overhead comes on top.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vitspec.errors import VitspecError
from vitspec.spec import Spec


class MemoryCheckError(VitspecError, MemoryError):
    """A spec (and batch) whose estimated memory exceeds what the machine has available."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes: ``parameters`` (every copy of the weights) plus ``activations`` (one forward pass)."""

    parameters: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.activations

    def __add__(self, other: MemoryEstimate) -> MemoryEstimate:
        return MemoryEstimate(
            self.parameters + other.parameters, self.activations + other.activations
        )

    def __str__(self) -> str:
        return (
            f"about {format_bytes(self.total)} ({format_bytes(self.parameters)} of weights, "
            f"{format_bytes(self.activations)} of activations)"
        )


def estimate_memory(
    spec: Spec,
    batch: int = 1,
    *,
    itemsize: int = 4,
    weight_copies: int = 2,
    captures: Iterable[str] = (),
) -> MemoryEstimate:
    """Estimate the memory of building ``spec`` and running it once on ``batch`` images.

    parameters  = n_params * itemsize * weight_copies (default 2: the canonical NumPy arrays and
                  the framework's own copy)
    activations = batch * itemsize * (H*W*C + N*patch_dim          the images and their patches
                  + 4*N*D                                           residual, norm, block in and out
                  + max(3*N*D + 2*heads*N^2, 2*N*mlp_dim)           attention (q, k, v, scores,
                                                                    probabilities) or the MLP
                  + the captured points' sizes)                     outputs kept for the caller
    with N = seq_len and D = hidden_dim; ``captures`` names capture points (or is "all").
    """
    from vitspec.layout import capture_points

    n, d, m = spec.seq_len, spec.hidden_dim, spec.mlp_dim
    (h, w), c = spec.image_size, spec.in_channels
    per_image = (
        h * w * c
        + n * spec.patch_dim
        + 4 * n * d
        + max(3 * n * d + 2 * spec.n_heads * n * n, 2 * n * m)
    )
    names = capture_points(spec) if captures == "all" else list(captures)
    per_image += sum(_capture_size(spec, name) for name in names)
    return MemoryEstimate(spec.n_params * itemsize * weight_copies, batch * itemsize * per_image)


def _capture_size(spec: Spec, name: str) -> int:
    """Elements per image of one capture point (as vitspec.capture_shapes, without building them all)."""
    n, d = spec.seq_len, spec.hidden_dim
    if name.endswith(".attn_probs"):
        return spec.n_heads * n * n
    sizes = {
        "patch_embed": spec.n_patches * d,
        "pooled": d,
        "pre_logits": spec.pre_logits_dim,
        "output": spec.output_dim,
    }
    return sizes.get(name, n * d)


def available_memory() -> int | None:
    """Bytes this process can still allocate: the smaller of the system's available memory and the
    room left under a cgroup limit (a container's); None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            room = int(Path(limit).read_text()) - int(Path(usage).read_text())
        except (OSError, ValueError):
            continue  # no such cgroup file, or "max": no limit
        if room < 1 << 60:  # cgroup v1 writes "no limit" as a huge number
            found.append(max(room, 0))
    if not found:
        try:
            found.append(
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            )  # macOS: the total
        except (OSError, ValueError, AttributeError):
            return None
    return min(found)


def check_memory(estimate: MemoryEstimate, what: str, *, hint: str = "") -> None:
    """Raise MemoryCheckError, one line, if ``estimate`` exceeds the available memory."""
    available = available_memory()
    if available is None or estimate.total <= available:
        return
    raise MemoryCheckError(
        f"{what} needs {estimate}, more than the {format_bytes(available)} of memory available"
        + (f"; {hint}" if hint else "")
    )


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; powers of 1024, as free(1) and top(1) count memory."""
    if n < 1024:
        return f"{int(n)} B"
    exponent = min(int(math.log(n, 1024)), 6)
    return f"{n / 1024**exponent:.1f} {'KMGTPE'[exponent - 1]}iB"
