"""Fresh cases: random valid specs, weights and images, with expected values from the float64 reference.

The shipped corpus is fixed, so a backend could be tuned to it; ``vitspec conformance --random N
--seed S`` (and ``pytest --vitspec-random N --vitspec-seed S``) adds N cases drawn now. Every field
of the spec varies (``random_spec``); sizes stay small so that a case costs milliseconds. Case
``i`` of seed ``S`` depends on ``(S, i)`` only: the same command draws the same cases on every
machine, and ``random-S-i`` names it in every report (``--save-case`` writes a failing one out).
"""

from __future__ import annotations

import numpy as np

from vitspec.conformance.case import Case, make_case
from vitspec.spec import Spec

# Each field's values, small enough that the float64 reference runs a case in milliseconds.
MAX_GRID = 3  # patches per side
MAX_PATCH = 4  # pixels per patch side
MAX_HEADS = 4
HEAD_DIMS = (2, 4, 6, 8)
MAX_DEPTH = 3
MAX_CHANNELS = 4
MAX_CLASSES = 6
MAX_PRE_LOGITS = 8
MAX_BATCH = 3
MAX_RATE = 0.5
# A LayerNorm divides by its input's standard deviation, so a token whose values are large next to
# their spread magnifies float32 rounding by max|x| / std. Weights and images are drawn again until
# every norm input of the float64 run stays under this ratio (a pure float64 test: the same cases
# on every machine); past MAX_DRAWS the best-conditioned draw is kept. An RMSNorm divides by the
# root mean square instead, for which the ratio is at most sqrt(width): it never amplifies rounding
# much, and is held to the same bound.
MAX_NORM_CONDITION = 10.0
MAX_DRAWS = 20


def random_spec(rng: np.random.Generator) -> Spec:
    """A small valid spec with every field drawn at random (cross-field rules respected)."""
    ph, pw = (int(x) for x in rng.integers(1, MAX_PATCH + 1, size=2))
    gh, gw = (int(x) for x in rng.integers(1, MAX_GRID + 1, size=2))
    heads = int(rng.integers(1, MAX_HEADS + 1))
    pos_embed = str(rng.choice(["learned", "sincos2d", "none"]))
    norm = str(rng.choice(["layer", "rms"]))
    qk_norm = bool(rng.integers(2))
    # A LayerNorm over a head of width 2 outputs +-scale + bias: the sign of a difference of two
    # nearly equal numbers, hopelessly conditioned for float32. No model has one; heads are wider.
    narrow = qk_norm and norm == "layer"
    head_dim = int(rng.choice([d for d in HEAD_DIMS if d > 2] if narrow else HEAD_DIMS))
    if pos_embed == "sincos2d":  # needs a width divisible by 4 and at least 8
        head_dim = 8 if heads == 1 else int(rng.choice([4, 8]))
    hidden = heads * head_dim
    class_token = bool(rng.integers(2))
    # DeiT's distillation token needs a class token, token pooling, no pre-logits layer and no
    # final norm after pooling.
    distillation = class_token and not rng.integers(4)
    reg_tokens = int(rng.choice([0, 0, 1, 2]))
    prefix = int(class_token) + int(distillation) + reg_tokens
    poolings = ["avg", "max", "avgmax", "map", *(["token"] if class_token else [])]
    pooling = "token" if distillation else str(rng.choice(poolings))
    mlp = str(rng.choice(["standard", "swiglu"]))
    # Any whole MLP width from 1 to 4 x hidden (SwiGLU, with a third layer: 8/3 x hidden), so
    # mlp_ratio need not be a round number.
    widest = 4 * hidden if mlp == "standard" else 8 * hidden // 3
    finals = ["before_pool", "none", *([] if distillation else ["after_pool"])]
    data = {
        "image_size": [gh * ph, gw * pw],
        "patch_size": [ph, pw],
        "hidden_dim": hidden,
        "mlp_ratio": int(rng.integers(1, widest + 1)) / hidden,
        "n_heads": heads,
        "depth": int(rng.integers(1, MAX_DEPTH + 1)),
        "in_channels": int(rng.integers(1, MAX_CHANNELS + 1)),
        "n_classes": int(rng.integers(0, MAX_CLASSES + 1)),
        "pooling": pooling,
        "class_token": class_token,
        "distillation_token": distillation,
        "reg_tokens": reg_tokens,
        "pos_embed": pos_embed,
        "dynamic_image_size": not rng.integers(3),
        "patch_bias": bool(rng.integers(2)),
        "patch_norm": bool(rng.integers(2)),
        "pre_norm": bool(rng.integers(2)),
        "qkv_bias": bool(rng.integers(2)),
        "qk_norm": qk_norm,
        "proj_bias": bool(rng.integers(2)),
        "layer_scale": None if rng.integers(2) else float(10.0 ** rng.integers(-6, 1)),
        "mlp": mlp,
        "mlp_bias": bool(rng.integers(2)),
        "mlp_norm": bool(rng.integers(2)),
        "norm": norm,
        "norm_eps": float(10.0 ** rng.uniform(-12, -3)),
        "gelu": str(rng.choice(["exact", "tanh", "quick"])),
        "final_norm": str(rng.choice(finals)),
        "pre_logits_dim": 0
        if distillation
        else int(rng.choice([0, int(rng.integers(1, MAX_PRE_LOGITS + 1))])),
        "dropout": round(float(rng.uniform(0, MAX_RATE)), 2) * int(rng.integers(2)),
        "attn_dropout": round(float(rng.uniform(0, MAX_RATE)), 2) * int(rng.integers(2)),
        "drop_path": round(float(rng.uniform(0, MAX_RATE)), 2) * int(rng.integers(2)),
        "head_bias": bool(rng.integers(2)),
    }
    if data["dynamic_image_size"]:
        data["pos_embed_resample"] = str(rng.choice(["bicubic-antialias", "bicubic"]))
    if prefix and pooling in ("avg", "max", "avgmax"):
        data["pool_include_prefix"] = bool(rng.integers(2))
    if prefix and pos_embed == "learned":
        data["pos_embed_class_slot"] = bool(rng.integers(2))
    return Spec.from_dict(data)


def random_image_size(rng: np.random.Generator, spec: Spec) -> tuple[int, int]:
    """The spec's image size, or for a dynamic image size another grid of up to MAX_GRID a side."""
    if not spec.dynamic_image_size:
        return spec.image_size
    grid = tuple(int(x) for x in rng.integers(1, MAX_GRID + 1, size=2))
    if grid == spec.grid:  # another grid than the spec's, so the position embedding is resampled
        grid = (grid[0] % MAX_GRID + 1, grid[1])
    return grid[0] * spec.patch_size[0], grid[1] * spec.patch_size[1]


def norm_inputs(case: Case) -> list[tuple[str, np.ndarray]]:
    """Every norm's input in the float64 run of ``case``, by the norm's canonical name, each with
    the normalised axis last: patch, pre, block, q/k (per head), MLP, MAP pool and final norms."""
    from vitspec import reference

    spec, expected = case.spec, case.expected
    w = {k: np.asarray(v, np.float64) for k, v in case.weights.items()}
    found: list[tuple[str, np.ndarray]] = []
    if spec.patch_norm:
        x = reference.patchify(spec, np.asarray(case.images, np.float64))
        x = x @ w["patch_embed.kernel"].reshape(-1, spec.hidden_dim)
        found.append(("patch_norm", x + w["patch_embed.bias"] if spec.patch_bias else x))
    tokens = expected["embed"]
    if spec.pre_norm:
        found.append(("norm_pre", tokens))
        tokens = expected["embed_norm"]
    for i in range(spec.depth):
        p = f"blocks.{i}"
        found.append((f"{p}.norm1", tokens))
        if spec.qk_norm:
            h = reference.norm(spec, w, f"{p}.norm1", tokens)
            for part in ("query", "key"):
                per_head = reference.dense(w, f"{p}.attn.{part}", h)
                shape = (*per_head.shape[:-1], spec.n_heads, spec.head_dim)
                found.append((f"{p}.attn.{part[0]}_norm", per_head.reshape(shape)))
        tokens = tokens + expected[f"{p}.attn"]
        found.append((f"{p}.norm2", tokens))
        if spec.mlp_norm:
            h = reference.norm(spec, w, f"{p}.norm2", tokens)
            if spec.mlp == "swiglu":
                hidden = reference.silu(reference.dense(w, f"{p}.mlp.gate", h))
                hidden = hidden * reference.dense(w, f"{p}.mlp.fc1", h)
            else:
                hidden = reference.gelu(reference.dense(w, f"{p}.mlp.fc1", h), spec.gelu)
            found.append((f"{p}.mlp.norm", hidden))
        tokens = expected[p]
    if spec.final_norm == "before_pool":
        found.append(("norm", tokens))
    if spec.pooling == "map":
        found.append(("pool.norm", expected["pool.attn"]))
    if spec.final_norm == "after_pool":
        found.append(("norm", reference.pool(spec, w, tokens, lambda name, value: None)))
    return found


def norm_condition(case: Case) -> float:
    """The largest ``max|x| / divisor`` over the inputs of every norm of ``case``'s float64 run:
    the divisor is ``sqrt(var(x) + eps)`` for a LayerNorm, ``sqrt(mean(x^2) + eps)`` for an
    RMSNorm. A LayerNorm of width 1 is left out: its output is its bias, whatever the input."""
    spec = case.spec
    worst = 0.0
    for _, x in norm_inputs(case):
        if spec.norm == "layer":
            if x.shape[-1] < 2:
                continue
            spread = np.sqrt(x.var(axis=-1) + spec.norm_eps)
        else:
            spread = np.sqrt(np.square(x).mean(axis=-1) + spec.norm_eps)
        worst = max(worst, float((np.abs(x).max(axis=-1) / spread).max()))
    return worst


def random_case(seed: int, index: int) -> Case:
    """Random case ``index`` of ``seed``: its spec, batch, image size, weights and images come from
    ``(seed, index)``.

    The data are drawn again (up to ``MAX_DRAWS`` times) while a norm input is badly conditioned
    for float32 (``norm_condition`` above ``MAX_NORM_CONDITION``).
    """
    rng = np.random.default_rng([seed, index])
    spec = random_spec(rng)
    batch = int(rng.integers(1, MAX_BATCH + 1))
    image_size = random_image_size(rng, spec)
    best: tuple[float, Case] | None = None
    for draw in range(MAX_DRAWS):
        data_seed = int(rng.integers(0, 2**31 - 1))
        case = make_case(
            spec,
            name=f"random-{seed}-{index}",
            batch=batch,
            seed=data_seed,
            image_size=image_size,
            description=f"random case {index} of seed {seed} (vitspec conformance --random N --seed {seed})",
            provenance={"random": {"seed": seed, "index": index, "draw": draw}},
        )
        condition = norm_condition(case)
        if condition <= MAX_NORM_CONDITION:
            return case
        if best is None or condition < best[0]:
            best = (condition, case)
    assert best is not None
    return best[1]


def random_cases(n: int, seed: int) -> list[Case]:
    """``n`` random cases of ``seed`` (the first ``n`` of that seed: a larger ``n`` extends the list)."""
    return [random_case(seed, i) for i in range(n)]
