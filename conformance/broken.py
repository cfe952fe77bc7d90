"""Deliberately broken backends: the suite must fail each of them, at the right capture point.

Each wraps any backend (ours or a third party's) and gets exactly one thing wrong, the way real
ports do::

    from vitspec.conformance import broken
    bad = broken.swap_query_key(vitspec.backend("torch"))
    report = run_suite([bad], cases)      # fails; first divergent point: blocks.0.attn_probs

``DEFECTS`` maps each defect's name to its factory; ``bad.first_touched(spec)`` is the first
capture point the defect changes for ``spec`` (None when it changes nothing there, e.g. tanh GELU
on a spec that already uses it). The self-tests hold the checker to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from vitspec.init import init_weights
from vitspec.spec import Spec

WeightsFix = Callable[[Spec, dict[str, np.ndarray]], dict[str, np.ndarray]]


class BrokenBackend:
    """``inner`` with one defect: a change to the weights it loads and/or to the spec it builds."""

    def __init__(
        self,
        inner: Any,
        defect: str,
        *,
        weights: WeightsFix | None = None,
        spec: Callable[[Spec], Spec] | None = None,
        first_touched: Callable[[Spec], str | None],
    ) -> None:
        self.inner = inner
        self.defect = defect
        self.name = f"{inner.name}+{defect}"
        self.version = inner.version
        self._weights = weights
        self._spec = spec
        self._first = first_touched

    def supports(self, spec: Spec) -> Any:
        """The inner backend's answer: a defect does not change what a backend can build."""
        hook = getattr(self.inner, "supports", None)
        return hook(spec) if hook is not None else None

    def first_touched(self, spec: Spec) -> str | None:
        """The first capture point this defect changes for ``spec``, or None if it changes nothing."""
        return self._first(spec)

    def _fix(self, spec: Spec, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        w = {k: np.asarray(v) for k, v in weights.items()}
        return self._weights(spec, w) if self._weights else w

    def build(
        self, spec: Spec, weights: Mapping[str, np.ndarray] | None = None, seed: int = 0
    ) -> Any:
        weights = weights if weights is not None else init_weights(spec, seed)
        built = self._spec(spec) if self._spec else spec
        return self.inner.build(built, self._fix(spec, weights))

    def load(self, model: Any, weights: Mapping[str, np.ndarray]) -> Any:
        return self.inner.load(model, self._fix(model.spec, weights))

    def export(self, model: Any) -> dict[str, np.ndarray]:
        return self.inner.export(model)

    def forward(
        self, model: Any, images: np.ndarray, capture: Iterable[str] | str = ()
    ) -> dict[str, np.ndarray]:
        return self.inner.forward(model, images, capture=capture)


def swap_query_key(inner: Any) -> BrokenBackend:
    """Query and key weights swapped in every block: attention becomes its transpose."""

    def fix(spec: Spec, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for i in range(spec.depth):
            for part in ("kernel", "bias"):
                q, k = f"blocks.{i}.attn.query.{part}", f"blocks.{i}.attn.key.{part}"
                if q in w:
                    w[q], w[k] = w[k], w[q]
        return w

    # With one token, attention is 1 whatever query and key are.
    return BrokenBackend(
        inner,
        "swap_query_key",
        weights=fix,
        first_touched=lambda s: "blocks.0.attn_probs" if s.seq_len > 1 else None,
    )


def transpose_patch_kernel(inner: Any) -> BrokenBackend:
    """The patch kernel's height and width axes swapped (a patch flattened column-major)."""

    def fix(spec: Spec, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        k = w["patch_embed.kernel"]
        w["patch_embed.kernel"] = np.ascontiguousarray(k.transpose(1, 0, 2, 3)).reshape(k.shape)
        return w

    # A 1x1 patch has nothing to transpose.
    return BrokenBackend(
        inner,
        "transpose_patch_kernel",
        weights=fix,
        first_touched=lambda s: "patch_embed" if s.patch_size[0] * s.patch_size[1] > 1 else None,
    )


def norm_eps(inner: Any, eps: float = 1e-3) -> BrokenBackend:
    """Every LayerNorm built with ``eps`` instead of the spec's (1e-3: Keras' default; 1e-5: PyTorch's)."""
    return BrokenBackend(
        inner,
        f"norm_eps_{eps:g}",
        spec=lambda s: s.replace(norm_eps=eps),
        first_touched=lambda s: "blocks.0.attn_probs" if s.norm_eps != eps else None,
    )


def tanh_gelu(inner: Any) -> BrokenBackend:
    """GELU's tanh approximation where the spec asks for the exact (erf) form."""
    return BrokenBackend(
        inner,
        "tanh_gelu",
        spec=lambda s: s.replace(gelu="tanh"),
        first_touched=lambda s: "blocks.0.mlp" if s.gelu == "exact" else None,
    )


def scale_block(inner: Any, block: int = -1, factor: float = 1.01) -> BrokenBackend:
    """Every weight of one block (the last by default) multiplied by ``factor``."""

    def index(spec: Spec) -> int:
        return block % spec.depth

    def fix(spec: Spec, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prefix = f"blocks.{index(spec)}."
        return {
            k: (v * v.dtype.type(factor)).astype(v.dtype) if k.startswith(prefix) else v
            for k, v in w.items()
        }

    return BrokenBackend(
        inner,
        f"scale_block_{block}_{factor:g}",
        weights=fix,
        first_touched=lambda s: f"blocks.{index(s)}.attn_probs",
    )


DEFECTS: dict[str, Callable[[Any], BrokenBackend]] = {
    "swap_query_key": swap_query_key,
    "transpose_patch_kernel": transpose_patch_kernel,
    "norm_eps": norm_eps,
    "tanh_gelu": tanh_gelu,
    "scale_block": scale_block,
}
