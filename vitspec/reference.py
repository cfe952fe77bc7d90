"""The reference forward pass: plain NumPy, the definition of the numbers.

Run it in float64 to get the numbers every backend is compared against. Images are NHWC.
Every capture point of ``vitspec.capture_points(spec)`` can be returned by name; the names and
shapes are the same in every backend (see ``vitspec.layout.capture_shapes``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from vitspec.errors import InputError
from vitspec.layout import check_capture
from vitspec.spec import Spec
from vitspec.weights import check_weights

# math.erf is correctly rounded in double precision; NumPy has no erf of its own.
_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray, kind: str = "exact") -> np.ndarray:
    """GELU: ``x * Phi(x)`` exactly (erf), or Hendrycks & Gimpel's tanh approximation."""
    if kind == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    phi = 0.5 * (1.0 + np.asarray(_erf(x.astype(np.float64) / math.sqrt(2.0)), dtype=np.float64))
    return (x * phi.astype(x.dtype)).astype(x.dtype)


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis with the biased variance, as every framework computes it."""
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + x.dtype.type(eps)) * scale + bias


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sincos2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's ``posemb_sincos_2d``: (rows*cols, width) as [sin x, cos x, sin y, cos y].

    x is the column index and y the row index of each patch (row-major order); the frequencies
    are ``temperature ** -(k / (width/4 - 1))`` for k = 0 .. width/4 - 1.
    """
    rows, cols = grid
    y, x = np.meshgrid(
        np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij"
    )
    quarter = width // 4
    omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / (quarter - 1))
    xs = x.reshape(-1)[:, None] * omega[None, :]
    ys = y.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(xs), np.cos(xs), np.sin(ys), np.cos(ys)], axis=1)


def patchify(spec: Spec, images: np.ndarray) -> np.ndarray:
    """(B, H, W, C) -> (B, patches, patch_h * patch_w * C) in (row, col, channel) order."""
    b = images.shape[0]
    (gh, gw), (ph, pw), c = spec.grid, spec.patch_size, spec.in_channels
    x = images.reshape(b, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, ph * pw * c)


def check_images(spec: Spec, images: object) -> np.ndarray:
    """Images as a float array of shape (B, H, W, C), or an InputError naming the problem."""
    arr = np.asarray(images)
    want = (*spec.image_size, spec.in_channels)
    if arr.ndim != 4 or arr.shape[1:] != want:
        raise InputError(
            f"images: expected shape (batch, {want[0]}, {want[1]}, {want[2]}) NHWC, found {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise InputError("images: the batch is empty")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"images: expected a float array, found {arr.dtype}")
    return arr


def forward(
    spec: Spec,
    weights: Mapping[str, np.ndarray],
    images: np.ndarray,
    dtype: type | np.dtype = np.float64,
    capture: Iterable[str] | str = (),
) -> dict[str, np.ndarray]:
    """Run the model; returns ``{"output": ..., **captures}`` computed in ``dtype``."""
    wanted = set(check_capture(spec, capture if isinstance(capture, str) else tuple(capture)))
    check_weights(spec, weights)
    dt = np.dtype(dtype)
    # C order whatever the source's strides: BLAS rounds differently on transposed operands.
    w = {k: np.ascontiguousarray(v, dtype=dt) for k, v in weights.items()}
    x = check_images(spec, images).astype(dt)
    out: dict[str, np.ndarray] = {}

    def keep(name: str, value: np.ndarray) -> None:
        if name in wanted:
            out[name] = value

    b, d, heads, hd = x.shape[0], spec.hidden_dim, spec.n_heads, spec.head_dim
    tokens = patchify(spec, x) @ w["patch_embed.kernel"].reshape(-1, d) + w["patch_embed.bias"]
    keep("patch_embed", tokens)

    if spec.pos_embed == "learned" and not spec.pos_embed_class_slot:
        tokens = tokens + w["pos_embed"]
    elif spec.pos_embed == "sincos2d":
        tokens = tokens + sincos2d(spec.grid, d).astype(dt)
    if spec.class_token:
        cls = np.broadcast_to(w["class_token"], (b, 1, d))
        tokens = np.concatenate([cls, tokens], axis=1)
    if spec.pos_embed == "learned" and spec.pos_embed_class_slot:
        tokens = tokens + w["pos_embed"]
    keep("embed", tokens)

    n = tokens.shape[1]
    scale = dt.type(1.0 / math.sqrt(hd))
    for i in range(spec.depth):
        p = f"blocks.{i}"
        h = layer_norm(tokens, w[f"{p}.norm1.scale"], w[f"{p}.norm1.bias"], spec.norm_eps)

        def project(part: str, h: np.ndarray = h, p: str = p) -> np.ndarray:
            y = h @ w[f"{p}.attn.{part}.kernel"]
            if spec.qkv_bias:
                y = y + w[f"{p}.attn.{part}.bias"]
            return y.reshape(b, n, heads, hd).transpose(0, 2, 1, 3)

        q, k, v = project("query"), project("key"), project("value")
        probs = softmax((q @ k.transpose(0, 1, 3, 2)) * scale)
        keep(f"{p}.attn_probs", probs)
        per_head = probs @ v
        keep(f"{p}.attn_heads", per_head)
        attn = (
            per_head.transpose(0, 2, 1, 3).reshape(b, n, d) @ w[f"{p}.attn.out.kernel"]
            + w[f"{p}.attn.out.bias"]
        )
        keep(f"{p}.attn", attn)
        tokens = tokens + attn

        h = layer_norm(tokens, w[f"{p}.norm2.scale"], w[f"{p}.norm2.bias"], spec.norm_eps)
        hidden = gelu(h @ w[f"{p}.mlp.fc1.kernel"] + w[f"{p}.mlp.fc1.bias"], spec.gelu)
        mlp = hidden @ w[f"{p}.mlp.fc2.kernel"] + w[f"{p}.mlp.fc2.bias"]
        keep(f"{p}.mlp", mlp)
        tokens = tokens + mlp
        keep(p, tokens)

    if spec.final_norm == "before_pool":
        tokens = layer_norm(tokens, w["norm.scale"], w["norm.bias"], spec.norm_eps)
    keep("encoded", tokens)
    pooled = (
        tokens[:, 0] if spec.pooling == "token" else tokens[:, spec.n_prefix_tokens :].mean(axis=1)
    )
    if spec.final_norm == "after_pool":
        pooled = layer_norm(pooled, w["norm.scale"], w["norm.bias"], spec.norm_eps)
    keep("pooled", pooled)
    features = pooled
    if spec.pre_logits_dim:
        features = np.tanh(pooled @ w["pre_logits.kernel"] + w["pre_logits.bias"])
        keep("pre_logits", features)
    out["output"] = features @ w["head.kernel"] + w["head.bias"] if spec.n_classes else features
    return out
