"""Float32 error of each backend against the float64 reference, at every capture point of one spec.

    python benchmarks/accuracy.py [--spec B/16] [--batch 2] [--backends torch tensorflow jax]

For each backend and each init scheme ("default": vitspec's truncated-normal / xavier init;
"random": every tensor standard normal, scaled by fan-in), builds the spec, runs standard normal
NHWC images through ``backend.forward(..., capture="all")`` and prints, as a Markdown table,
``max |backend - ref| / max |ref|`` for ``output`` and ``encoded``, the worst capture point and
whether the output's argmax agrees with the reference. The figures recorded in
docs/backends/*.md come from this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# triton's native library must load before TensorFlow's (see docs/backends/tensorflow.md).
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401

import numpy as np

import vitspec


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|, in float64."""
    a64, r64 = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a64 - r64).max()) / (float(np.abs(r64).max()) or 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", default="B/16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["torch", "tensorflow", "jax"])
    args = parser.parse_args()

    spec = vitspec.load_spec(args.spec)
    images = np.random.default_rng(0).standard_normal(
        (args.batch, *spec.image_size, spec.in_channels)
    )
    print(f"{args.spec}, batch {args.batch}: max |backend - float64 reference| / max |reference|\n")
    print("| backend | weights | `output` | `encoded` | worst capture point | argmax agrees |")
    print("|---|---|---:|---:|---|---|")
    for scheme in ("default", "random"):
        weights = vitspec.init_weights(spec, seed=0, scheme=scheme)
        ref = vitspec.reference.forward(spec, weights, images, dtype=np.float64, capture="all")
        for name in args.backends:
            backend = vitspec.backend(name)
            model = backend.build(spec, weights)
            out = backend.forward(model, images.astype(np.float32), capture="all")
            errors = {point: rel_err(out[point], ref[point]) for point in ref}
            worst = max(errors, key=errors.__getitem__)
            agrees = bool((out["output"].argmax(-1) == ref["output"].argmax(-1)).all())
            print(
                f"| {name} {backend.version} | {scheme} | {errors['output']:.1e} | {errors['encoded']:.1e} "
                f"| `{worst}`, {errors[worst]:.1e} | {'yes' if agrees else 'NO'} |"
            )


if __name__ == "__main__":
    main()
