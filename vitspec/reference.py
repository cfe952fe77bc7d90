"""The reference forward pass: plain NumPy, the definition of the numbers.

Run it in float64 to get the numbers every backend is compared against. Images are NHWC.
Every capture point of ``vitspec.capture_points(spec)`` can be returned by name; the names and
shapes are the same in every backend (see ``vitspec.layout.capture_shapes``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from vitspec.errors import InputError
from vitspec.layout import check_capture, grid_of
from vitspec.resample import grid_matrices
from vitspec.spec import Spec
from vitspec.weights import check_weights

# math.erf is correctly rounded in double precision; NumPy has no erf of its own.
_erf = np.frompyfunc(math.erf, 1, 1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), without overflow for large |x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype)


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def gelu(x: np.ndarray, kind: str = "exact") -> np.ndarray:
    """GELU: ``x * Phi(x)`` exactly (erf), Hendrycks & Gimpel's tanh approximation, or QuickGELU
    (``x * sigmoid(1.702 x)``, OpenAI CLIP's)."""
    if kind == "quick":
        return x * sigmoid(x.dtype.type(1.702) * x)
    if kind == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    phi = 0.5 * (1.0 + np.asarray(_erf(x.astype(np.float64) / math.sqrt(2.0)), dtype=np.float64))
    return (x * phi.astype(x.dtype)).astype(x.dtype)


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis with the biased variance, as every framework computes it."""
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + x.dtype.type(eps)) * scale + bias


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * scale`` (no centring, no bias)."""
    ms = np.square(x).mean(axis=-1, keepdims=True)
    return x / np.sqrt(ms + x.dtype.type(eps)) * scale


def norm(spec: Spec, w: Mapping[str, np.ndarray], name: str, x: np.ndarray) -> np.ndarray:
    """The spec's norm kind with the tensors under ``name`` (``name.scale``, ``name.bias``)."""
    if spec.norm == "rms":
        return rms_norm(x, w[f"{name}.scale"], spec.norm_eps)
    return layer_norm(x, w[f"{name}.scale"], w[f"{name}.bias"], spec.norm_eps)


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
    (ph, pw), c = spec.patch_size, spec.in_channels
    gh, gw = images.shape[1] // ph, images.shape[2] // pw
    x = images.reshape(b, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, ph * pw * c)


def check_images(spec: Spec, images: object) -> np.ndarray:
    """Images as a float array of shape (B, H, W, C), or an InputError naming the problem.

    With ``dynamic_image_size`` any height and width that are positive multiples of the patch size
    are accepted; otherwise they must be the spec's.
    """
    arr = np.asarray(images)
    want = (*spec.image_size, spec.in_channels)
    if spec.dynamic_image_size:
        (ph, pw), c = spec.patch_size, spec.in_channels
        if (
            arr.ndim != 4
            or arr.shape[3] != c
            or arr.shape[1] < ph
            or arr.shape[2] < pw
            or arr.shape[1] % ph
            or arr.shape[2] % pw
        ):
            raise InputError(
                f"images: expected shape (batch, height, width, {c}) NHWC with height a multiple of "
                f"{ph} and width a multiple of {pw} (dynamic_image_size), found {arr.shape}"
            )
    elif arr.ndim != 4 or arr.shape[1:] != want:
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

    b, d = x.shape[0], spec.hidden_dim
    grid = grid_of(spec, x.shape[1:3])
    tokens = patchify(spec, x) @ w["patch_embed.kernel"].reshape(-1, d)
    if spec.patch_bias:
        tokens = tokens + w["patch_embed.bias"]
    if spec.patch_norm:
        tokens = norm(spec, w, "patch_norm", tokens)
    keep("patch_embed", tokens)

    pos = position_embedding(spec, w, grid, dt)
    lead = spec.n_position_prefix
    if pos is not None:
        tokens = tokens + pos[lead:]
    prefix = []
    if spec.class_token:
        prefix.append(np.broadcast_to(w["class_token"], (b, 1, d)))
    if spec.distillation_token:
        prefix.append(np.broadcast_to(w["dist_token"], (b, 1, d)))
    if spec.reg_tokens:
        prefix.append(np.broadcast_to(w["reg_tokens"], (b, spec.reg_tokens, d)))
    if prefix:
        if pos is not None and lead:
            prefix = [np.concatenate(prefix, axis=1) + pos[:lead]]
        tokens = np.concatenate([*prefix, tokens], axis=1)
    keep("embed", tokens)
    if spec.pre_norm:
        tokens = norm(spec, w, "norm_pre", tokens)
        keep("embed_norm", tokens)

    for i in range(spec.depth):
        p = f"blocks.{i}"
        attn = attention(spec, w, f"{p}.attn", norm(spec, w, f"{p}.norm1", tokens), keep)
        if spec.layer_scale is not None:
            attn = attn * w[f"{p}.ls1.scale"]
        keep(f"{p}.attn", attn)
        tokens = tokens + attn
        mlp = feed_forward(spec, w, f"{p}.mlp", norm(spec, w, f"{p}.norm2", tokens))
        if spec.layer_scale is not None:
            mlp = mlp * w[f"{p}.ls2.scale"]
        keep(f"{p}.mlp", mlp)
        tokens = tokens + mlp
        keep(p, tokens)

    if spec.final_norm == "before_pool":
        tokens = norm(spec, w, "norm", tokens)
    keep("encoded", tokens)
    pooled = pool(spec, w, tokens, keep)
    if spec.final_norm == "after_pool":
        pooled = norm(spec, w, "norm", pooled)
    keep("pooled", pooled)
    if spec.distillation_token:
        pooled_dist = tokens[:, 1]
        keep("pooled_dist", pooled_dist)
        if not spec.n_classes:
            out["output"] = (pooled + pooled_dist) / dt.type(2)
            return out
        head = dense(w, "head", pooled)
        head_dist = dense(w, "head_dist", pooled_dist)
        keep("head", head)
        keep("head_dist", head_dist)
        out["output"] = (head + head_dist) / dt.type(2)
        return out
    features = pooled
    if spec.pre_logits_dim:
        features = np.tanh(dense(w, "pre_logits", pooled))
        keep("pre_logits", features)
    out["output"] = dense(w, "head", features) if spec.n_classes else features
    return out


Keep = Callable[[str, np.ndarray], None]


def dense(w: Mapping[str, np.ndarray], name: str, x: np.ndarray) -> np.ndarray:
    """``x @ name.kernel (+ name.bias when the layer has one)``."""
    y = x @ w[f"{name}.kernel"]
    bias = w.get(f"{name}.bias")
    return y if bias is None else y + bias


def position_embedding(
    spec: Spec, w: Mapping[str, np.ndarray], grid: tuple[int, int], dt: np.dtype
) -> np.ndarray | None:
    """The (rows, D) position table for ``grid``: prefix rows (if any) then the patches.

    On another grid than the spec's (``dynamic_image_size``), a learned table's patch rows are
    resampled with the spec's algorithm (``vitspec.resample``: float64 matrices, cast to ``dt``,
    applied rows then columns) and a sin-cos table is computed for the new grid.
    """
    if spec.pos_embed == "none":
        return None
    if spec.pos_embed == "sincos2d":
        return sincos2d(grid, spec.hidden_dim).astype(dt)
    table = w["pos_embed"]
    if grid == spec.grid:
        return table
    lead = spec.n_position_prefix
    rows, cols = grid_matrices(spec.grid, grid, spec.pos_embed_resample)
    patches = table[lead:].reshape(*spec.grid, spec.hidden_dim)
    patches = np.einsum("ab,bcd->acd", rows.astype(dt), patches)
    patches = np.einsum("ab,cbd->cad", cols.astype(dt), patches)
    return np.concatenate([table[:lead], patches.reshape(-1, spec.hidden_dim)], axis=0)


def attention(
    spec: Spec, w: Mapping[str, np.ndarray], p: str, h: np.ndarray, keep: Keep
) -> np.ndarray:
    """Multi-head self-attention of block ``p`` (``blocks.i.attn``) on normed tokens ``h``."""
    b, n, d = h.shape
    heads, hd = spec.n_heads, spec.head_dim

    def project(part: str) -> np.ndarray:
        return dense(w, f"{p}.{part}", h).reshape(b, n, heads, hd).transpose(0, 2, 1, 3)

    q, k, v = project("query"), project("key"), project("value")
    if spec.qk_norm:
        q, k = norm(spec, w, f"{p}.q_norm", q), norm(spec, w, f"{p}.k_norm", k)
    scale = h.dtype.type(1.0 / math.sqrt(hd))
    probs = softmax((q @ k.transpose(0, 1, 3, 2)) * scale)
    block = p.removesuffix(".attn")
    keep(f"{block}.attn_probs", probs)
    per_head = probs @ v
    keep(f"{block}.attn_heads", per_head)
    return dense(w, f"{p}.out", per_head.transpose(0, 2, 1, 3).reshape(b, n, d))


def feed_forward(spec: Spec, w: Mapping[str, np.ndarray], p: str, h: np.ndarray) -> np.ndarray:
    """The MLP under ``p``: standard (fc1, activation, fc2) or SwiGLU (silu(gate) * fc1, fc2)."""
    if f"{p}.gate.kernel" in w:
        hidden = silu(dense(w, f"{p}.gate", h)) * dense(w, f"{p}.fc1", h)
    else:
        hidden = gelu(dense(w, f"{p}.fc1", h), spec.gelu)
    if f"{p}.norm.scale" in w:
        hidden = norm(spec, w, f"{p}.norm", hidden)
    return dense(w, f"{p}.fc2", hidden)


def pool(spec: Spec, w: Mapping[str, np.ndarray], tokens: np.ndarray, keep: Keep) -> np.ndarray:
    """(B, N, D) -> (B, D) by the spec's pooling."""
    if spec.pooling == "token":
        return tokens[:, 0]
    x = tokens if spec.pool_include_prefix else tokens[:, spec.n_prefix_tokens :]
    if spec.pooling == "map":
        return attention_pool(spec, w, x, keep)
    if spec.pooling == "avg":
        return x.mean(axis=1)
    if spec.pooling == "max":
        return x.max(axis=1)
    return (x.mean(axis=1) + x.max(axis=1)) * x.dtype.type(0.5)  # avgmax


def attention_pool(
    spec: Spec, w: Mapping[str, np.ndarray], tokens: np.ndarray, keep: Keep
) -> np.ndarray:
    """Multi-head attention pooling (timm AttentionPoolLatent, SigLIP's MAP head): a learned probe
    attends over ``tokens`` (the patch tokens, and the prefix tokens with pool_include_prefix, as
    timm's ``pool``), then ``x + mlp(norm(x))``; the probe's output is the pooled vector."""
    b, n, d = tokens.shape
    heads, hd = spec.n_heads, spec.head_dim
    q = dense(w, "pool.query", w["pool.probe"]).reshape(heads, 1, hd)
    k = dense(w, "pool.key", tokens).reshape(b, n, heads, hd).transpose(0, 2, 1, 3)
    v = dense(w, "pool.value", tokens).reshape(b, n, heads, hd).transpose(0, 2, 1, 3)
    scale = tokens.dtype.type(1.0 / math.sqrt(hd))
    probs = softmax((q[None] @ k.transpose(0, 1, 3, 2)) * scale)  # (B, heads, 1, N)
    keep("pool.attn_probs", probs)
    x = dense(w, "pool.out", (probs @ v).reshape(b, d))
    keep("pool.attn", x)
    mlp = feed_forward(spec, w, "pool.mlp", norm(spec, w, "pool.norm", x))
    keep("pool.mlp", mlp)
    return x + mlp
