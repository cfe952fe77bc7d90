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
# (spec, the inner backend's outputs) -> the output the broken backend returns instead.
OutputFix = Callable[[Spec, dict[str, np.ndarray]], np.ndarray]


class BrokenBackend:
    """``inner`` with one defect: a change to the weights it loads, to the spec it builds, and/or
    to the output it returns (``output``, computed from the capture points named by ``needs``)."""

    def __init__(
        self,
        inner: Any,
        defect: str,
        *,
        weights: WeightsFix | None = None,
        spec: Callable[[Spec], Spec] | None = None,
        first_touched: Callable[[Spec], str | None],
        output: OutputFix | None = None,
        needs: Callable[[Spec], tuple[str, ...]] = lambda spec: (),
    ) -> None:
        self.inner = inner
        self.defect = defect
        self.name = f"{inner.name}+{defect}"
        self.version = inner.version
        self._weights = weights
        self._spec = spec
        self._first = first_touched
        self._output = output
        self._needs = needs

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
        if self._output is None:
            return self.inner.forward(model, images, capture=capture)
        spec = model.spec
        wanted = capture if isinstance(capture, str) else tuple(capture)
        extra = () if wanted == "all" else tuple(n for n in self._needs(spec) if n not in wanted)
        out = self.inner.forward(
            model, images, capture=wanted if wanted == "all" else (*wanted, *extra)
        )
        out["output"] = self._output(spec, out)
        for name in extra:
            del out[name]
        return out


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


def _first_norm(spec: Spec) -> str:
    """The first capture point computed through a norm."""
    if spec.patch_norm:
        return "patch_embed"
    return "embed_norm" if spec.pre_norm else "blocks.0.attn_probs"


def norm_eps(inner: Any, eps: float = 1e-3) -> BrokenBackend:
    """Every norm built with ``eps`` instead of the spec's (1e-3: Keras' default; 1e-5: PyTorch's)."""
    return BrokenBackend(
        inner,
        f"norm_eps_{eps:g}",
        spec=lambda s: s.replace(norm_eps=eps),
        first_touched=lambda s: _first_norm(s) if s.norm_eps != eps else None,
    )


def _first_gelu(spec: Spec) -> str | None:
    """The first capture point computed through a GELU: block 0's standard MLP, else the MAP pool's."""
    if spec.mlp == "standard":
        return "blocks.0.mlp"
    return "pool.mlp" if spec.pooling == "map" else None  # SwiGLU blocks use SiLU


def tanh_gelu(inner: Any) -> BrokenBackend:
    """GELU's tanh approximation where the spec asks for the exact (erf) form or QuickGELU."""
    return BrokenBackend(
        inner,
        "tanh_gelu",
        spec=lambda s: s.replace(gelu="tanh"),
        first_touched=lambda s: _first_gelu(s) if s.gelu != "tanh" else None,
    )


def quick_gelu_as_exact(inner: Any) -> BrokenBackend:
    """QuickGELU (x * sigmoid(1.702 x), OpenAI CLIP) computed as the exact GELU."""
    return BrokenBackend(
        inner,
        "quick_gelu_as_exact",
        spec=lambda s: s.replace(gelu="exact") if s.gelu == "quick" else s,
        first_touched=lambda s: _first_gelu(s) if s.gelu == "quick" else None,
    )


def skip_layer_scale(inner: Any) -> BrokenBackend:
    """Layer scale skipped: both residual branches of every block added unscaled."""

    def fix(spec: Spec, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in w.items() if not k.endswith((".ls1.scale", ".ls2.scale"))}

    return BrokenBackend(
        inner,
        "skip_layer_scale",
        weights=fix,
        spec=lambda s: s.replace(layer_scale=None),
        # The attn capture is the scaled branch: the first value the scale changes.
        first_touched=lambda s: "blocks.0.attn" if s.layer_scale is not None else None,
    )


def pool_registers(inner: Any) -> BrokenBackend:
    """Average, max or avgmax pooling over every token: the registers (and any class or
    distillation token) pooled with the patches, as if ``pool_include_prefix`` were set."""

    def touched(spec: Spec) -> str | None:
        pools = spec.pooling in ("avg", "max", "avgmax") and not spec.pool_include_prefix
        return "pooled" if pools and spec.n_prefix_tokens else None

    return BrokenBackend(
        inner,
        "pool_registers",
        spec=lambda s: s.replace(pool_include_prefix=True) if touched(s) else s,
        first_touched=touched,
    )


def ignore_map_probe(inner: Any) -> BrokenBackend:
    """MAP pooling that ignores its learned probe: the query is zero, so every token gets the
    same attention and the pool is a plain mean of the values (then out, norm and MLP as usual)."""

    def fix(spec: Spec, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in ("pool.probe", "pool.query.bias"):
            if name in w:
                w[name] = np.zeros_like(w[name])
        return w

    return BrokenBackend(
        inner,
        "ignore_map_probe",
        weights=fix,
        first_touched=lambda s: "pool.attn_probs" if s.pooling == "map" else None,
    )


def drop_distillation_head(inner: Any) -> BrokenBackend:
    """The distillation head dropped: the output is the class head's logits alone (without
    heads, the class token's pooled features alone), not the mean of the two."""

    def needs(spec: Spec) -> tuple[str, ...]:
        if not spec.distillation_token:
            return ()
        return ("head",) if spec.n_classes else ("pooled",)

    def output(spec: Spec, out: dict[str, np.ndarray]) -> np.ndarray:
        return out[needs(spec)[0]] if spec.distillation_token else out["output"]

    return BrokenBackend(
        inner,
        "drop_distillation_head",
        output=output,
        needs=needs,
        first_touched=lambda s: "output" if s.distillation_token else None,
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
    "skip_layer_scale": skip_layer_scale,
    "pool_registers": pool_registers,
    "quick_gelu_as_exact": quick_gelu_as_exact,
    "ignore_map_probe": ignore_map_probe,
    "drop_distillation_head": drop_distillation_head,
}
