"""Forward-pass speed of each vitspec backend against the best public implementation in its framework.

    python benchmarks/bench_forward.py [--specs S/16 B/16] [--batches 1 8] [--rounds 3] [--iters 10] [--paired]

A spec is a preset name or one of FAMILY_SPECS (``SigLIP-B/16``: MAP pooling, no class token, tanh
GELU), which only the torch backend and timm run.

Contenders, each run in its own process (Keras fixes its backend once per process), in
alternating rounds so that machine noise hits all alike. With ``--paired``, vitspec and its peer
share one process per framework (keras-hub on JAX and on TensorFlow still never share one) and
alternate call by call, so that each call of one is timed next to a call of the other; the
ratio is then the median of those call-by-call ratios. Contenders:

    torch          vitspec's PyTorch backend          vs  timm   VisionTransformer (F.sdpa attention)
    tensorflow     vitspec's TensorFlow/Keras backend vs  keras-hub ViTBackbone on TensorFlow
    jax            vitspec's JAX/Flax backend         vs  keras-hub ViTBackbone on JAX

Same architecture, float32, same batch, same threads (all the machine's cores), random weights.
vitspec is timed through ``backend.forward`` (NumPy in, NumPy out: what users call). Each peer is
timed on its fastest public path: timm's module under ``torch.inference_mode``; keras-hub through
``predict_on_batch`` and through its compiled stateless call, the faster of the two. keras-hub's
backbone has no pooling and no head, so the keras-hub comparisons use ``n_classes: 0`` for
vitspec (its pooling, picking the class token after the final norm, costs nothing measurable). Prints a table of
median images/s and the ratio vitspec / peer (goal: >= 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

CONTENDERS = {
    "torch": ("vitspec-torch", "timm"),
    "tensorflow": ("vitspec-tensorflow", "keras-hub-tf"),
    "jax": ("vitspec-jax", "keras-hub-jax"),
}


# Modern families, built from a spec dict: timm (the torch backend's peer) builds each with the
# same switches; keras-hub's ViTBackbone cannot, so the other backends skip them.
FAMILY_SPECS: dict[str, dict] = {
    # timm vit_base_patch16_siglip_224: no class token, MAP pooling, tanh GELU, no head.
    "SigLIP-B/16": {
        "image_size": 224,
        "patch_size": 16,
        "hidden_dim": 768,
        "n_heads": 12,
        "depth": 12,
        "n_classes": 0,
        "class_token": False,
        "pooling": "map",
        "gelu": "tanh",
    },
}
BACKEND_OF = {c: b for b, pair in CONTENDERS.items() for c in pair}


def _spec(name: str, head: bool):
    import vitspec

    if name in FAMILY_SPECS:
        spec = vitspec.Spec.from_dict(FAMILY_SPECS[name], source=name)
    else:
        spec = vitspec.load_spec(name)
    return spec if head else spec.replace(n_classes=0)


def _specs_for(backend: str, specs: list[str]) -> list[str]:
    """The specs a backend's contenders can all build (the family specs: torch and timm only)."""
    return [s for s in specs if backend == "torch" or s not in FAMILY_SPECS]


def _timm_kwargs(s) -> dict:
    """timm VisionTransformer switches for a spec (the ones the benchmark's specs use; every
    norm is timm's default LayerNorm, eps 1e-6)."""
    assert s.norm == "layer" and s.norm_eps == 1e-6, "the benchmark's specs use timm's LayerNorm"
    act = {"exact": "gelu", "tanh": "gelu_tanh", "quick": "quick_gelu"}[s.gelu]
    return {
        "class_token": s.class_token,
        "global_pool": s.pooling,
        "reg_tokens": s.reg_tokens,
        "no_embed_class": not s.pos_embed_class_slot,
        "init_values": s.layer_scale,
        "pre_norm": s.pre_norm,
        "qkv_bias": s.qkv_bias,
        "qk_norm": s.qk_norm,
        "act_layer": act,
        # timm's MAP pools the patches only unless told; vitspec's attends over every token
        "pool_include_prefix": s.pool_include_prefix or s.pooling == "map",
    }


def _time(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _images(spec, batch: int):
    import numpy as np

    return (
        np.random.default_rng(0)
        .standard_normal((batch, *spec.image_size, spec.in_channels))
        .astype(np.float32)
    )


def _vitspec_runner(backend_name: str, head: bool):
    import vitspec

    backend = vitspec.backend(backend_name)

    def make(spec_name: str, batch: int):
        spec = _spec(spec_name, head)
        model = backend.build(spec, vitspec.init_weights(spec, seed=0))
        x = _images(spec, batch)
        return lambda: backend.forward(model, x)["output"]

    return make


def _timm_runner():
    import timm.models.vision_transformer as tvit
    import torch

    def make(spec_name: str, batch: int):
        s = _spec(spec_name, head=True)
        model = tvit.VisionTransformer(
            img_size=s.image_size,
            patch_size=s.patch_size,
            embed_dim=s.hidden_dim,
            depth=s.depth,
            num_heads=s.n_heads,
            mlp_ratio=s.mlp_ratio,
            num_classes=s.n_classes,
            **_timm_kwargs(s),
        ).eval()
        x = torch.from_numpy(_images(s, batch)).permute(0, 3, 1, 2).contiguous()

        def run():
            with torch.inference_mode():
                return model(x)

        return run

    return make


def _keras_hub_runner():
    import keras
    import keras_hub

    def make(spec_name: str, batch: int):
        s = _spec(spec_name, head=False)
        model = keras_hub.models.ViTBackbone(
            image_shape=(*s.image_size, s.in_channels),
            patch_size=s.patch_size,
            num_layers=s.depth,
            num_heads=s.n_heads,
            hidden_dim=s.hidden_dim,
            mlp_dim=s.mlp_dim,
            dropout_rate=0.0,
            attention_dropout=0.0,
            layer_norm_epsilon=s.norm_eps,
            use_mha_bias=True,
            use_mlp_bias=True,
            use_class_token=True,
            use_patch_bias=True,
        )
        x = _images(s, batch)
        predict = lambda: model.predict_on_batch(x)  # noqa: E731
        if keras.backend.backend() == "jax":
            import jax

            fn = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
            xj = jax.device_put(x)

            def compiled():
                # Read the variables at call time: predict_on_batch may replace their buffers.
                tv = [v.value for v in model.trainable_variables]
                ntv = [v.value for v in model.non_trainable_variables]
                return fn(tv, ntv, xj).block_until_ready()

        else:
            import tensorflow as tf

            fn = tf.function(lambda x: model(x, training=False), jit_compile=True)
            xt = tf.constant(x)
            compiled = lambda: fn(xt).numpy()  # noqa: E731
        return {"predict_on_batch": predict, "compiled call": compiled}

    return make


def _runner(contender: str):
    """The factory (spec name, batch) -> callable, or {path: callable}, of one contender."""
    if contender == "keras-hub-jax":
        os.environ["KERAS_BACKEND"] = "jax"
    elif contender in ("keras-hub-tf", "vitspec-tensorflow"):
        os.environ["KERAS_BACKEND"] = "tensorflow"
    if contender.startswith("vitspec-"):
        name = contender.removeprefix("vitspec-")
        return _vitspec_runner(name, head=(name == "torch"))
    if contender == "timm":
        return _timm_runner()
    return _keras_hub_runner()


def _paths(runs) -> dict[str, Callable[[], object]]:
    return runs if isinstance(runs, dict) else {"": runs}


def _best(timed: dict[str, list[float]]) -> tuple[str, list[float]]:
    """The fastest path (by median) and its times."""
    return min(timed.items(), key=lambda item: statistics.median(item[1]))


def worker(contenders: list[str], specs: list[str], batches: list[int], iters: int) -> None:
    """Time the contenders on every (spec, batch), call by call in turn; print one JSON line.

    With one contender this is a plain timing loop; with two (vitspec and its peer, --paired),
    their calls alternate, the order flipping every iteration.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax" if "keras-hub-jax" in contenders else "tensorflow")
    makers = {c: _runner(c) for c in contenders}
    results: dict[str, dict[str, dict]] = {c: {} for c in contenders}
    for spec_name in _specs_for(BACKEND_OF[contenders[0]], specs):
        for batch in batches:
            fns = {
                (c, path): fn
                for c in contenders
                for path, fn in _paths(makers[c](spec_name, batch)).items()
            }
            for fn in fns.values():
                _time(fn, warmup=2, iters=0)
            timed: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
            for i in range(iters):
                for k in list(fns) if i % 2 == 0 else list(fns)[::-1]:
                    timed[k].extend(_time(fns[k], warmup=0, iters=1))
            for c in contenders:
                path, times = _best({p: t for (cc, p), t in timed.items() if cc == c})
                results[c][f"{spec_name}|{batch}"] = {"path": path, "times": times}
    print("RESULT " + json.dumps(results), flush=True)


def _spread(ratios: list[float], quartiles: bool) -> str:
    low, high = (
        (statistics.quantiles(ratios, n=4)[::2])
        if quartiles and len(ratios) > 1
        else (min(ratios), max(ratios))
    )
    return f"{low:.2f}-{high:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--specs", nargs="+", default=["S/16", "B/16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--backends", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument(
        "--paired", action="store_true", help="vitspec and its peer in one process, call by call"
    )
    parser.add_argument("--json", help="also write the raw timings here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.specs, args.batches, args.iters)
        return

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
    contenders = [c for b in args.backends for c in CONTENDERS[b]]
    # One process a contender, or (--paired) one a framework holding vitspec and its peer.
    groups = (
        [list(CONTENDERS[b]) for b in args.backends] if args.paired else [[c] for c in contenders]
    )
    times: dict[str, dict[str, list[float]]] = {c: {} for c in contenders}
    per_round: dict[str, dict[str, list[float]]] = {c: {} for c in contenders}  # one median a round
    paths: dict[str, dict[str, str]] = {c: {} for c in contenders}
    for r in range(args.rounds):
        for group in groups if r % 2 == 0 else groups[::-1]:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                *group,
                "--iters",
                str(args.iters),
                "--specs",
                *args.specs,
                "--batches",
                *map(str, args.batches),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(
                    f"{' + '.join(group)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
                )
            for contender, results in json.loads(line[7:]).items():
                for key, res in results.items():
                    times[contender].setdefault(key, []).extend(res["times"])
                    per_round[contender].setdefault(key, []).append(statistics.median(res["times"]))
                    paths[contender][key] = res["path"]
            print(
                f"round {r + 1}/{args.rounds}: {' + '.join(group)} done",
                file=sys.stderr,
                flush=True,
            )

    cores = os.cpu_count()
    print(
        f"\nimages/s, median over {args.rounds} rounds x {args.iters} iterations; float32; {cores} CPU cores; batch as shown"
    )
    if args.paired:
        print(
            "ratio: vitspec / peer images/s, the median of call-by-call ratios (the two alternate call by call"
        )
        print(
            "in one process, so load that drifts cancels); range: the quartiles of those ratios\n"
        )
    else:
        print(
            "ratio: vitspec / peer images/s, the median over rounds of the ratio within a round (the two run"
        )
        print(
            "back to back in every round, so load that drifts between rounds cancels); range: lowest-highest round\n"
        )
    print("| backend | spec | batch | vitspec img/s | peer | peer img/s | ratio | range |")
    print("|---|---|---:|---:|---|---:|---:|---|")
    for backend in args.backends:
        ours, peer = CONTENDERS[backend]
        for spec_name in _specs_for(backend, args.specs):
            for batch in args.batches:
                key = f"{spec_name}|{batch}"
                a = batch / statistics.median(times[ours][key])
                b = batch / statistics.median(times[peer][key])
                # --paired: call by call (adjacent calls); otherwise round by round (adjacent processes).
                series = times if args.paired else per_round
                paired = [p / o for o, p in zip(series[ours][key], series[peer][key], strict=True)]
                path = f" ({paths[peer][key]})" if paths[peer][key] else ""
                print(
                    f"| {backend} | {spec_name} | {batch} | {a:.2f} | {peer}{path} | {b:.2f} "
                    f"| {statistics.median(paired):.2f} | {_spread(paired, args.paired)} |"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"times": times, "per_round": per_round, "paths": paths}, f)


if __name__ == "__main__":
    main()
