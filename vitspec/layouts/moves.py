"""The moves between a canonical tensor and a native one, each written once with its inverse.

A move takes the canonical part(s) of one native tensor to that tensor (``forward``) and gives
back part ``j`` of a native tensor (``inverse``). Every move is a reshape, a transpose, a
concatenation or a slice, so conversion is exact in both directions; ``inverse`` returns views
where NumPy can (callers that need C order copy, once, where it is cheapest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Shape = tuple[int, ...]


class Move:
    """Canonical parts -> one native tensor, and back."""

    def shape(self, parts: Sequence[Shape]) -> Shape:
        """The native shape, given the canonical parts' shapes."""
        raise NotImplementedError

    def forward(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def inverse(self, native: np.ndarray, j: int, parts: Sequence[Shape]) -> np.ndarray:
        """Canonical part ``j`` (of shape ``parts[j]``) of a native tensor."""
        raise NotImplementedError


@dataclass(frozen=True)
class Same(Move):
    """The native tensor is the canonical one."""

    def shape(self, parts: Sequence[Shape]) -> Shape:
        return parts[0]

    def forward(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return parts[0]

    def inverse(self, native: np.ndarray, j: int, parts: Sequence[Shape]) -> np.ndarray:
        return native


@dataclass(frozen=True)
class Reshape(Move):
    """The same values in another shape (a token as (1, 1, D), per-head kernels as (D, heads, d))."""

    to: Shape

    def shape(self, parts: Sequence[Shape]) -> Shape:
        return self.to

    def forward(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return parts[0].reshape(self.to)

    def inverse(self, native: np.ndarray, j: int, parts: Sequence[Shape]) -> np.ndarray:
        return native.reshape(parts[0])


@dataclass(frozen=True)
class Transpose(Move):
    """Axes permuted: ``native = canonical.transpose(axes)``."""

    axes: tuple[int, ...]

    def shape(self, parts: Sequence[Shape]) -> Shape:
        return tuple(parts[0][a] for a in self.axes)

    def forward(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return parts[0].transpose(self.axes)

    def inverse(self, native: np.ndarray, j: int, parts: Sequence[Shape]) -> np.ndarray:
        return native.transpose(tuple(int(a) for a in np.argsort(self.axes)))


@dataclass(frozen=True)
class Concat(Move):
    """Several canonical tensors, each moved by ``each``, joined along ``axis`` (a fused qkv)."""

    axis: int
    each: Move = Same()

    def _sizes(self, parts: Sequence[Shape]) -> list[int]:
        return [self.each.shape([p])[self.axis] for p in parts]

    def shape(self, parts: Sequence[Shape]) -> Shape:
        first = list(self.each.shape([parts[0]]))
        first[self.axis] = sum(self._sizes(parts))
        return tuple(first)

    def forward(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([self.each.forward([p]) for p in parts], axis=self.axis)

    def inverse(self, native: np.ndarray, j: int, parts: Sequence[Shape]) -> np.ndarray:
        sizes = self._sizes(parts)
        start = sum(sizes[:j])
        index = [slice(None)] * native.ndim
        index[self.axis] = slice(start, start + sizes[j])
        return self.each.inverse(native[tuple(index)], 0, [parts[j]])


SAME = Same()
DENSE = Transpose((1, 0))  # (in, out) <-> (out, in), as torch.nn.Linear keeps its weight
CONV = Transpose((3, 2, 0, 1))  # HWIO <-> OIHW, as torch.nn.Conv2d keeps its weight
