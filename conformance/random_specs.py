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
# every LayerNorm input of the float64 run stays under this ratio (a pure float64 test: the same
# cases on every machine); past MAX_DRAWS the best-conditioned draw is kept.
MAX_NORM_CONDITION = 10.0
MAX_DRAWS = 20


def random_spec(rng: np.random.Generator) -> Spec:
    """A small valid spec with every field drawn at random (cross-field rules respected)."""
    ph, pw = (int(x) for x in rng.integers(1, MAX_PATCH + 1, size=2))
    gh, gw = (int(x) for x in rng.integers(1, MAX_GRID + 1, size=2))
    heads = int(rng.integers(1, MAX_HEADS + 1))
    pos_embed = str(rng.choice(["learned", "sincos2d", "none"]))
    head_dim = int(rng.choice(HEAD_DIMS))
    if pos_embed == "sincos2d":  # needs a width divisible by 4 and at least 8
        head_dim = 8 if heads == 1 else int(rng.choice([4, 8]))
    hidden = heads * head_dim
    class_token = bool(rng.integers(2))
    data = {
        "image_size": [gh * ph, gw * pw],
        "patch_size": [ph, pw],
        "hidden_dim": hidden,
        # Any whole MLP width from 1 to 4 x hidden: mlp_ratio need not be a round number.
        "mlp_ratio": int(rng.integers(1, 4 * hidden + 1)) / hidden,
        "n_heads": heads,
        "depth": int(rng.integers(1, MAX_DEPTH + 1)),
        "in_channels": int(rng.integers(1, MAX_CHANNELS + 1)),
        "n_classes": int(rng.integers(0, MAX_CLASSES + 1)),
        "pooling": str(rng.choice(["token", "avg"])) if class_token else "avg",
        "class_token": class_token,
        "pos_embed": pos_embed,
        "qkv_bias": bool(rng.integers(2)),
        "norm_eps": float(10.0 ** rng.uniform(-12, -3)),
        "gelu": str(rng.choice(["exact", "tanh"])),
        "final_norm": str(rng.choice(["before_pool", "after_pool"])),
        "pre_logits_dim": int(rng.choice([0, int(rng.integers(1, MAX_PRE_LOGITS + 1))])),
        "dropout": round(float(rng.uniform(0, MAX_RATE)), 2) * int(rng.integers(2)),
        "attn_dropout": round(float(rng.uniform(0, MAX_RATE)), 2) * int(rng.integers(2)),
        "drop_path": round(float(rng.uniform(0, MAX_RATE)), 2) * int(rng.integers(2)),
    }
    if class_token and pos_embed == "learned":
        data["pos_embed_class_slot"] = bool(rng.integers(2))
    return Spec.from_dict(data)


def norm_condition(spec: Spec, expected: dict[str, np.ndarray]) -> float:
    """The largest ``max|x| / std(x)`` over the tokens entering any LayerNorm of a float64 run."""
    inputs = [expected["embed"]]
    for i in range(spec.depth):
        before = expected[f"blocks.{i - 1}"] if i else expected["embed"]
        inputs += [before + expected[f"blocks.{i}.attn"], expected[f"blocks.{i}"]]
    last = expected[f"blocks.{spec.depth - 1}"]
    if spec.final_norm == "after_pool":
        inputs.append(
            last[:, 0] if spec.pooling == "token" else last[:, spec.n_prefix_tokens :].mean(axis=1)
        )
    worst = 0.0
    for x in inputs:
        spread = np.sqrt(x.var(axis=-1) + spec.norm_eps)
        worst = max(worst, float((np.abs(x).max(axis=-1) / spread).max()))
    return worst


def random_case(seed: int, index: int) -> Case:
    """Random case ``index`` of ``seed``: its spec, batch, weights and images come from ``(seed, index)``.

    The data are drawn again (up to ``MAX_DRAWS`` times) while a LayerNorm input is badly
    conditioned for float32 (``norm_condition`` above ``MAX_NORM_CONDITION``).
    """
    rng = np.random.default_rng([seed, index])
    spec = random_spec(rng)
    batch = int(rng.integers(1, MAX_BATCH + 1))
    best: tuple[float, Case] | None = None
    for draw in range(MAX_DRAWS):
        data_seed = int(rng.integers(0, 2**31 - 1))
        case = make_case(
            spec,
            name=f"random-{seed}-{index}",
            batch=batch,
            seed=data_seed,
            description=f"random case {index} of seed {seed} (vitspec conformance --random N --seed {seed})",
            provenance={"random": {"seed": seed, "index": index, "draw": draw}},
        )
        condition = norm_condition(spec, case.expected)
        if condition <= MAX_NORM_CONDITION:
            return case
        if best is None or condition < best[0]:
            best = (condition, case)
    assert best is not None
    return best[1]


def random_cases(n: int, seed: int) -> list[Case]:
    """``n`` random cases of ``seed`` (the first ``n`` of that seed: a larger ``n`` extends the list)."""
    return [random_case(seed, i) for i in range(n)]
