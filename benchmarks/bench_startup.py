"""Start-up time of the `vitspec` command, against a bare Python start in the same run.

    python benchmarks/bench_startup.py [--runs 21]

Prints the median and quartiles of wall time for each command; the goal for `vitspec --help`
is under 0.3 s median. Commands alternate so that machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    vitspec = shutil.which("vitspec") or str(Path(sys.executable).with_name("vitspec"))
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "vitspec --help": [vitspec, "--help"],
        "vitspec --version": [vitspec, "--version"],
        "vitspec validate B/16": [vitspec, "validate", "B/16"],
        "python -c 'import vitspec'": [sys.executable, "-c", "import vitspec"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["python -c pass"])
    print(f"{'command':32} {'median s':>9} {'q1 s':>7} {'q3 s':>7} {'vs python':>10}")
    for name, ts in times.items():
        q1, med, q3 = statistics.quantiles(ts, n=4)
        print(f"{name:32} {med:9.3f} {q1:7.3f} {q3:7.3f} {med / base:9.1f}x")
    goal = statistics.median(times["vitspec --help"])
    print(
        f"\nvitspec --help median {goal:.3f}s: {'meets' if goal < 0.3 else 'MISSES'} the 0.3 s goal ({args.runs} runs)"
    )


if __name__ == "__main__":
    main()
