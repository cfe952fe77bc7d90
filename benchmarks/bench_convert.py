"""Benchmark: converting a ViT-L/16 timm checkpoint (~1.2 GB float32) to canonical and to each backend's format.

Usage::

    .venv/bin/python benchmarks/bench_convert.py [--workdir /tmp/vitspec-bench] [--repeat 3]

The checkpoint is made here (timm ``vit_large_patch16_224``, random init, saved with
``safetensors.torch.save_file``) and kept in the work folder for the next run; it is never committed.
Every measurement runs in a fresh subprocess that reports its own wall time (around the call only,
not interpreter start-up) and its own peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``).
The source file is read once before each run so every run reads from the page cache; a plain
``shutil.copyfile`` and a copy followed by ``fsync`` (vitspec's writers fsync) are measured in the
same run as the baselines. The best of ``--repeat`` runs is reported, since the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

PYTHON = sys.executable

TARGETS = [  # (label, output name, --to)
    ("timm -> canonical", "vit_l16.canonical.safetensors", "canonical"),
    ("timm -> torch", "vit_l16.torch.safetensors", "torch"),
    ("timm -> keras", "vit_l16.weights.h5", "keras"),
    ("timm -> flax", "vit_l16.flax.safetensors", "flax"),
    ("timm -> hf", "vit_l16_hf", "hf"),
    ("timm -> google", "vit_l16.google.npz", "google"),
]

_REPORT = """
import json, resource, time
def report(seconds, **extra):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak": peak, **extra}))
"""


def run_child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line with seconds and peak bytes."""
    res = subprocess.run(
        [PYTHON, "-c", _REPORT + textwrap.dedent(code)], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def make_checkpoint(path: Path) -> None:
    if path.exists():
        return
    print(f"making {path} (timm vit_large_patch16_224, random weights) ...", file=sys.stderr)
    run_child(f"""
        import timm, torch
        from safetensors.torch import save_file
        torch.manual_seed(0)
        model = timm.create_model("vit_large_patch16_224", pretrained=False)
        start = time.perf_counter()
        save_file(model.state_dict(), {str(path)!r})
        report(time.perf_counter() - start)
    """)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def remove(path: Path) -> None:
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def bench_copy(src: Path, dst: Path, fsync: bool) -> dict:
    remove(dst)
    warm(src)
    result = run_child(f"""
        import os, shutil
        start = time.perf_counter()
        shutil.copyfile({str(src)!r}, {str(dst)!r})
        if {fsync}:
            fd = os.open({str(dst)!r}, os.O_RDONLY); os.fsync(fd); os.close(fd)
        report(time.perf_counter() - start)
    """)
    remove(dst)
    return result


def bench_convert(src: Path, dst: Path, to: str) -> dict:
    remove(dst)
    warm(src)
    module = {"google": "flax_npz", "big_vision": "flax_npz"}.get(
        to, to
    )  # the module of each format
    preload = f"import vitspec.formats.{module}" + ("; import h5py" if to == "keras" else "")
    result = run_child(f"""
        from vitspec.formats import convert
        import vitspec.formats.timm
        {preload}
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        convert({str(src)!r}, {str(dst)!r}, to_format={to!r})
        report(time.perf_counter() - start, base=base)
    """)
    remove(dst)
    return result


def bench_naive(src: Path, dst: Path) -> dict:
    """What a one-off script does: load every tensor, rename/transpose into a dict, save it."""
    remove(dst)
    warm(src)
    result = run_child(f"""
        import numpy as np
        from safetensors.numpy import load_file, save_file
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        state = load_file({str(src)!r})
        out = {{}}
        for name, value in state.items():
            out[name] = np.ascontiguousarray(value.T) if value.ndim == 2 else value
        save_file(out, {str(dst)!r})
        report(time.perf_counter() - start, base=base)
    """)
    remove(dst)
    return result


def best(fn, repeat: int) -> dict:
    runs = [fn() for _ in range(repeat)]
    return min(runs, key=lambda r: r["seconds"]) | {
        "all_seconds": [round(r["seconds"], 3) for r in runs]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vitspec-bench"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / "vit_large_patch16_224.timm.safetensors"
    make_checkpoint(src)
    size = src.stat().st_size
    load_before = os.getloadavg()
    started = time.time()

    copy = best(
        lambda: bench_copy(src, args.workdir / "copy.safetensors", fsync=False), args.repeat
    )
    copy_fsync = best(
        lambda: bench_copy(src, args.workdir / "copy.safetensors", fsync=True), args.repeat
    )
    rows = []
    for label, name, to in TARGETS:
        rows.append(
            (
                label,
                best(
                    lambda name=name, to=to: bench_convert(src, args.workdir / name, to),
                    args.repeat,
                ),
            )
        )
    naive = best(lambda: bench_naive(src, args.workdir / "naive.safetensors"), args.repeat)

    mb = 1 << 20
    print(f"ViT-L/16 timm checkpoint: {size / mb:,.0f} MiB float32 ({src.name})")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after ({time.time() - started:.0f} s); best of {args.repeat}"
    )
    print()
    print(
        "| run | wall s | / copy | / copy+fsync | peak RSS MiB | / file size | RSS above start-up MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| shutil.copyfile | {copy['seconds']:.2f} | 1.00 | | {copy['peak'] / mb:,.0f} | {copy['peak'] / size:.2f} | |"
    )
    print(
        f"| copyfile + fsync | {copy_fsync['seconds']:.2f} | {copy_fsync['seconds'] / copy['seconds']:.2f} | 1.00 | {copy_fsync['peak'] / mb:,.0f} | {copy_fsync['peak'] / size:.2f} | |"
    )
    for label, r in [*rows, ("naive: load_file + transpose + save_file", naive)]:
        print(
            f"| {label} | {r['seconds']:.2f} | {r['seconds'] / copy['seconds']:.2f} | {r['seconds'] / copy_fsync['seconds']:.2f} "
            f"| {r['peak'] / mb:,.0f} | {r['peak'] / size:.2f} | {(r['peak'] - r['base']) / mb:,.0f} |"
        )
    print()
    print(
        "all wall times (s):",
        json.dumps(
            {
                label: r["all_seconds"]
                for label, r in [
                    ("copy", copy),
                    ("copy+fsync", copy_fsync),
                    *rows,
                    ("naive", naive),
                ]
            }
        ),
    )


if __name__ == "__main__":
    main()
