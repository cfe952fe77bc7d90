"""`make mutants PART=...`: a cosmic-ray session over one part, then kill rates and survivors.

Each part is a module or two and the test files that guard them; one part runs in minutes.
cosmic-ray mutates the files in place (so the editable install, which maps vitspec.backends to
./backends, imports the mutant); the part's files are backed up first and put back afterwards,
also after an interrupted run. Mutants listed in tests/mutants/equivalent.txt do not count.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENT = ROOT / "tests" / "mutants" / "equivalent.txt"
WORK = ROOT / "build" / "mutants"

# part: (modules mutated, test files run against each mutant)
PARTS: dict[str, tuple[list[str], list[str]]] = {
    "spec": (["vitspec/spec.py", "vitspec/presets.py"], ["tests/test_spec.py"]),
    "layout": (["vitspec/layout.py"], ["tests/test_layouts.py", "tests/test_weights.py"]),
    "layouts": (["vitspec/layouts"], ["tests/test_layouts.py"]),
    "reference": (["vitspec/reference.py"], ["tests/test_reference.py"]),
    "weights": (["vitspec/weights.py"], ["tests/test_weights.py"]),
    "init": (["vitspec/init.py"], ["tests/test_weights.py"]),
    "check": (
        ["conformance/check.py"],
        ["tests/test_conformance.py", "tests/test_conformance_helpers.py"],
    ),
    "containers": (["vitspec/containers"], ["tests/test_containers.py", "tests/test_weights.py"]),
    "formats": (["vitspec/formats"], ["tests/test_formats.py", "tests/test_convert_native.py"]),
    "cli-build": (["cli/build.py"], ["tests/test_build_cli.py"]),
    "torch": (["backends/torch.py"], ["tests/test_backend_torch.py"]),
    "tensorflow": (["backends/tensorflow.py"], ["tests/test_backend_tensorflow.py"]),
    "jax": (["backends/jax.py"], ["tests/test_backend_jax.py"]),
}

# Operators left out: swaps to bit, shift, power, floor-division and modulo operators, and
# variable insertion, make many mutants that any test kills at once and cost minutes per part.
EXCLUDED_OPERATORS = [
    r"core/ReplaceBinaryOperator_\w+_(BitAnd|BitOr|BitXor|LShift|RShift|Pow|FloorDiv|Mod)$",
    r"core/ReplaceBinaryOperator_(BitAnd|BitOr|BitXor|LShift|RShift)_",
    r"core/ReplaceUnaryOperator_\w+_(Invert|UAdd)$",
    r"core/Variable(Inserter|Replacer)",
]


def _files(modules: list[str]) -> list[Path]:
    out = []
    for m in modules:
        p = ROOT / m
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def _config(part: str, modules: list[str], tests: list[str], timeout: float) -> str:
    pytest = Path(sys.executable).with_name("pytest")
    command = f"{pytest} -x -q -p no:cacheprovider {' '.join(tests)}"
    quoted = ", ".join(f'"{m}"' for m in modules)
    excluded = ", ".join(f"'{e}'" for e in EXCLUDED_OPERATORS)
    return (
        f"[cosmic-ray]\nmodule-path = [{quoted}]\ntimeout = {timeout}\nexcluded-modules = []\n"
        f'test-command = "{command}"\n\n[cosmic-ray.distributor]\nname = "local"\n\n'
        f"[cosmic-ray.filters.operators-filter]\nexclude-operators = [{excluded}]\n"
    )


def mutant_key(module: str, diff: str) -> str:
    """A mutant as the equivalent list writes it: the module, then its - and + lines."""
    lines = [
        line
        for line in diff.splitlines()
        if line[:1] in "-+" and not line.startswith(("---", "+++"))
    ]
    return "\n".join([module, *(f"  {line[0]} {line[1:].strip()}" for line in lines)])


def equivalent() -> dict[str, str]:
    """{mutant key: why it cannot change behaviour} from the checked-in list."""
    found = {}
    if EQUIVALENT.exists():
        for block in re.split(r"\n\s*\n", EQUIVALENT.read_text()):
            lines = [
                line for line in block.splitlines() if line.strip() and not line.startswith("#")
            ]
            if lines:
                why = [line for line in lines if line.startswith("  why: ")]
                found["\n".join(line for line in lines if not line.startswith("  why: "))] = (
                    why[0][7:] if why else ""
                )
    return found


def report(db: Path) -> int:
    """Print kill rates per module and the survivors; the number of survivors."""
    from cosmic_ray.work_db import WorkDB, use_db

    known = equivalent()
    rates: dict[str, list[int]] = {}
    survivors = []
    with use_db(str(db), WorkDB.Mode.open) as work_db:
        for item, result in work_db.completed_work_items:
            if result.worker_outcome == "skipped":
                continue
            module = str(item.mutations[0].module_path)
            key = mutant_key(module, result.diff or "")
            counts = rates.setdefault(module, [0, 0, 0])  # killed, counted, equivalent
            if key in known:
                counts[2] += 1
                continue
            counts[1] += 1
            if result.is_killed:
                counts[0] += 1
            else:
                survivors.append((key, item.mutations[0]))
    print(f"{'module':40} {'killed':>7} {'of':>5} {'rate':>7} {'equivalent':>11}")
    for module, (killed, counted, eq) in sorted(rates.items()):
        rate = f"{100 * killed / counted:.1f}%" if counted else "-"
        print(f"{module:40} {killed:7} {counted:5} {rate:>7} {eq:11}")
    for key, m in survivors:
        print(f"\nsurvived: {m.operator_name} at line {m.start_pos[0]}\n{key}")
    return len(survivors)


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # so `finally` puts the part's files back


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _stop)
    part = argv[0] if argv else ""
    if part not in PARTS:
        print(f"error: PART must be one of {', '.join(PARTS)}, found {part!r}", file=sys.stderr)
        return 2
    modules, tests = PARTS[part]
    work = WORK / part
    backup = work / "backup"
    if backup.exists():  # an interrupted run: put its files back before anything else
        for saved in backup.rglob("*.py"):
            shutil.copy2(saved, ROOT / saved.relative_to(backup))
        shutil.rmtree(backup)
    work.mkdir(parents=True, exist_ok=True)
    for f in _files(modules):
        (backup / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, backup / f.relative_to(ROOT))
    config, db = work / "config.toml", work / "session.sqlite"
    # The unmutated tests must pass; each mutant gets ten times their time (and at least 60 s).
    import time

    t0 = time.perf_counter()
    base = subprocess.run(
        [
            str(Path(sys.executable).with_name("pytest")),
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            *tests,
        ],
        cwd=ROOT,
    )
    if base.returncode != 0:
        print(
            f"error: the tests of part {part} fail without any mutant; fix them first",
            file=sys.stderr,
        )
        return 1
    config.write_text(_config(part, modules, tests, max(60.0, 10 * (time.perf_counter() - t0))))
    db.unlink(missing_ok=True)
    cr = Path(sys.executable).with_name("cosmic-ray")
    try:
        subprocess.run([str(cr), "init", str(config), str(db)], cwd=ROOT, check=True)
        subprocess.run(
            [str(Path(sys.executable).with_name("cr-filter-operators")), str(db), str(config)],
            cwd=ROOT,
            check=True,
        )
        subprocess.run([str(cr), "exec", str(config), str(db)], cwd=ROOT, check=True)
    finally:
        for saved in backup.rglob("*.py"):
            shutil.copy2(saved, ROOT / saved.relative_to(backup))
        shutil.rmtree(backup)
    report(db)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
