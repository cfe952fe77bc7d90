"""Faults of the machine, reproduced for real (docs/reliability.md): a full disk, a killed writer,
two writers racing for one output, and a source truncated or deleted while it is read.

The processes that must really die or race run as subprocesses of the CLI; they stop at a chosen
point through ``VITSPEC_TEST_HOOK`` (``vitspec.files.hook``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import vitspec
from vitspec import files, formats
from vitspec.cli.main import main
from vitspec.families import family

SPEC = family("vit_paper")
STAGING = re.compile(r"^\.(.+)\.vitspec-(\d+)-[0-9a-f]{8}\.partial$")


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.fixture
def canonical(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    path = src / "c.safetensors"
    vitspec.save_weights(path, vitspec.init_weights(SPEC, seed=0, scheme="random"), SPEC)
    return path


def spawn(
    *args: str, hook: str | None = None, hook_dir: Path | None = None, **extra: str
) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **extra}
    if hook is not None:
        env["VITSPEC_TEST_HOOK"], env["VITSPEC_TEST_HOOK_DIR"] = hook, str(hook_dir)
    return subprocess.Popen(
        [sys.executable, "-m", "vitspec.cli.main", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(hook_dir: Path, n: int, procs: list[subprocess.Popen[str]]) -> list[int]:
    """The pids of the ``n`` processes paused at their hook (fails if one exits first)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready = [int(p.name.split(".")[1]) for p in hook_dir.glob("ready.*")]
        if len(ready) >= n:
            return ready
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"a writer ended before its hook: {proc.communicate()}")
        time.sleep(0.02)
    pytest.fail("the writers never reached their hook")


def staged(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if STAGING.match(p.name)]


# ---- a full disk -------------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["timm", "google", "hf"])
def test_an_output_larger_than_the_free_space_is_refused_before_writing(
    capsys, tmp_path: Path, canonical: Path, monkeypatch, to: str
) -> None:
    written: list[str] = []
    real_open = files._make_staging
    monkeypatch.setattr(
        files, "_make_staging", lambda *a, **k: written.append("x") or real_open(*a, **k)
    )
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: _Usage(1000))
    out = tmp_path / {"timm": "o.safetensors", "google": "o.npz", "hf": "o"}[to]
    code, _, err = cli(capsys, "convert", str(canonical), str(out), "--to", to)
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1, err
    assert re.fullmatch(
        rf"error: cannot write {re.escape(str(out))}: it needs [\d.]+ KiB \([\d,]+ bytes\) and the "
        rf"filesystem of {re.escape(str(out.parent))} has 1,000 bytes free; free some space or write elsewhere",
        lines[0],
    ), lines[0]
    need = int(re.search(r"\(([\d,]+) bytes\)", lines[0])[1].replace(",", ""))
    assert need >= canonical.stat().st_size - 4096  # the tensors' bytes, at least
    assert written == [] and not out.exists()  # refused before anything was staged


def test_saving_weights_checks_the_exact_size_first(tmp_path: Path, monkeypatch) -> None:
    weights = vitspec.init_weights(SPEC, seed=0)
    probe = tmp_path / "probe.safetensors"
    vitspec.save_weights(probe, weights, SPEC)
    size = probe.stat().st_size
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: _Usage(size - 1))
    with pytest.raises(files.NoSpaceError, match=re.escape(f"({size - 1:,} bytes) free")):
        vitspec.save_weights(tmp_path / "w.safetensors", weights, SPEC)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: _Usage(size))
    vitspec.save_weights(tmp_path / "w.safetensors", weights, SPEC)  # exactly enough is enough
    assert (tmp_path / "w.safetensors").read_bytes() == probe.read_bytes()


class _Usage:
    def __init__(self, free: int) -> None:
        self.total, self.used, self.free = 1 << 40, 0, free


@contextlib.contextmanager
def small_tmpfs(folder: Path, kib: int) -> Iterator[bool]:
    """A ``kib`` KiB tmpfs at ``folder`` (True), or an ordinary folder where mounting is refused (False)."""
    folder.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def _limited(args: list[str], limit: int) -> subprocess.CompletedProcess[str]:
    """The CLI under a file-size limit (ulimit -f): a write past it fails with EFBIG (SIGXFSZ ignored)."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from vitspec.cli.main import main\n"
        f"sys.argv = ['vitspec', *{args!r}]\n"
        "main()\n"
    )
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_a_file_size_limit_hit_while_writing_is_one_user_error(
    tmp_path: Path, canonical: Path
) -> None:
    out = tmp_path / "o.safetensors"
    limit = canonical.stat().st_size // 2
    res = _limited(["convert", str(canonical), str(out), "--to", "timm"], limit)
    lines = error_lines(res.stderr)
    assert res.returncode == 1 and lines == [
        f"error: cannot write {out}: the file grew past the largest file allowed here (ulimit -f or "
        "the filesystem's limit) (File too large) while writing it; the partial output was removed"
    ], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no staging file


@pytest.mark.parametrize(
    "to",
    [
        "timm",
        pytest.param("timm.pth", marks=pytest.mark.needs("torch")),
        "google",
        pytest.param("keras", marks=pytest.mark.needs("h5py")),
    ],
)
def test_a_disk_that_fills_while_writing_is_one_user_error(
    capsys, tmp_path: Path, canonical: Path, monkeypatch, to: str
) -> None:
    """On a small tmpfs (root, where mount works): the free-space check is told there is room (another
    writer fills the disk after it), and the write itself meets ENOSPC. Without mount, the same
    write under a file-size limit (EFBIG)."""
    name = {
        "timm": "o.safetensors",
        "timm.pth": "o.pth",
        "google": "o.npz",
        "keras": "o.weights.h5",
    }[to]
    kib = max(8, canonical.stat().st_size // 2048)
    with small_tmpfs(tmp_path / "small", kib) as mounted:
        out = tmp_path / "small" / name
        args = ["convert", str(canonical), str(out), "--to", to.split(".")[0]]
        if mounted:
            monkeypatch.setattr(files.shutil, "disk_usage", lambda p: _Usage(1 << 40))
            code, _, err = cli(capsys, *args)
            cause = "the disk is full (No space left on device)"
        else:
            res = _limited(args, kib * 1024)
            code, err = res.returncode, res.stderr
            cause = "the file grew past the largest file allowed here (ulimit -f or the filesystem's limit) (File too large)"
        assert code == 1 and error_lines(err) == [
            f"error: cannot write {out}: {cause} while writing it; the partial output was removed"
        ], err
        assert list((tmp_path / "small").iterdir()) == []


# ---- a killed writer ---------------------------------------------------------------------------


def test_a_killed_writers_staging_file_is_removed_by_the_next_write(
    capsys, tmp_path: Path, canonical: Path
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    proc = spawn(
        "convert",
        str(canonical),
        str(out_dir / "a.safetensors"),
        "--to",
        "timm",
        hook="tensor:3",
        hook_dir=hooks,
    )
    (pid,) = wait_ready(hooks, 1, [proc])
    os.kill(pid, signal.SIGKILL)  # kill -9 with three tensors written
    assert proc.wait(timeout=60) == -signal.SIGKILL
    (left,) = staged(out_dir)
    assert left.name.startswith(f".a.safetensors.vitspec-{pid}-") and left.stat().st_size > 0
    assert not (out_dir / "a.safetensors").exists()

    # a stranger's file that merely looks similar, and a file of the old naming, are not ours
    (out_dir / ".notes.txt.partial").write_text("mine")
    code, _, err = cli(
        capsys, "convert", str(canonical), str(out_dir / "b.safetensors"), "--to", "timm"
    )
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: removed {left} ({left_size(err)}), a partial output left by vitspec process {pid}, "
        "which is no longer running"
    ]
    assert sorted(p.name for p in out_dir.iterdir()) == [".notes.txt.partial", "b.safetensors"]


def left_size(err: str) -> str:
    found = re.search(r"\(([^()]*\([\d,]+ bytes\)|[\d,]+ bytes)\), a partial output", err)
    assert found, err
    return found[1]


def test_staging_files_of_live_writers_are_kept_and_reused_pids_are_seen(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / f".x.vitspec-{sleeper.pid}-0123abcd.partial"
        live.write_bytes(b"being written")
        reused = tmp_path / f".y.vitspec-{sleeper.pid}-89abcdef.partial"
        reused.write_bytes(b"left long ago")
        hour_ago = time.time() - 3600  # before the sleeper started: its pid was reused since
        os.utime(reused, (hour_ago, hour_ago))
        mine = tmp_path / f".z.vitspec-{os.getpid()}-00000000.partial"
        mine.mkdir()  # this process's own (another thread's output in progress)
        removed = files.remove_stale_staging(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert len(removed) == 1 and str(reused) in removed[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name])
    # once the sleeper is gone, its live file is stale too
    assert len(files.remove_stale_staging(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [mine.name]


# ---- two writers at once -----------------------------------------------------------------------


@pytest.mark.parametrize(("to", "name"), [("timm", "o.safetensors"), ("hf", "o_hf")])
def test_racing_writers_one_wins_the_others_are_refused(
    tmp_path: Path, canonical: Path, to: str, name: str
) -> None:
    """Every writer passes the early "exists" check, then all move their output into place together."""
    reference = tmp_path / f"ref_{name}"
    formats.convert(canonical, reference, to_format=to)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / name
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    n = 3
    procs = [
        spawn("convert", str(canonical), str(out), "--to", to, hook="commit:1", hook_dir=hooks)
        for _ in range(n)
    ]
    wait_ready(hooks, n, procs)
    (hooks / "go").touch()
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0] + [1] * (n - 1), results
    for code, _, err in results:
        if code == 1:
            assert error_lines(err) == [
                f"error: {out} already exists; pass --force (overwrite=True) to replace it"
            ], err
    if to == "hf":
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        for part in ("config.json", "model.safetensors"):
            assert (out / part).read_bytes() == (reference / part).read_bytes()
    else:
        assert out.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in out_dir.iterdir()) == [name]  # no staging file left


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_the_no_replace_move_without_renameat2(tmp_path: Path, monkeypatch, kind: str) -> None:
    """Where renameat2 is missing: link-then-unlink for a file, rename for a folder."""
    monkeypatch.setattr(files, "_renameat2", None)
    monkeypatch.setattr(files, "_HAVE_RENAMEAT2", False)
    src, dst = tmp_path / "new", tmp_path / "old"
    for path, text in ((src, "new"), (dst, "old")):
        if kind == "file":
            path.write_text(text)
        else:
            path.mkdir()
            (path / "f").write_text(text)
    with pytest.raises(FileExistsError):
        files.rename_noreplace(src, dst)
    read = (lambda p: p.read_text()) if kind == "file" else (lambda p: (p / "f").read_text())
    assert read(dst) == "old" and read(src) == "new"
    free = tmp_path / "free"
    files.rename_noreplace(src, free)
    assert read(free) == "new" and not src.exists()


# ---- a source changed while it is read ---------------------------------------------------------


def _pause_at_read(monkeypatch, n: int, action) -> None:
    """Run ``action`` when the conversion is about to read its ``n``-th source tensor."""
    import vitspec.containers.source as source

    seen = [0]

    def hook(event: str) -> None:
        if event == "read":
            seen[0] += 1
            if seen[0] == n:
                action()

    monkeypatch.setattr(source, "hook", hook)


@pytest.mark.parametrize("kind", ["safetensors", "npz"])
def test_a_source_truncated_mid_conversion_is_one_line_not_sigbus(
    capsys, tmp_path: Path, canonical: Path, monkeypatch, kind: str
) -> None:
    src = canonical
    if kind == "npz":
        src = tmp_path / "g.npz"
        formats.convert(canonical, src, to_format="google")
    size = src.stat().st_size
    _pause_at_read(monkeypatch, 5, lambda: os.truncate(src, size // 2))
    out = tmp_path / "o.safetensors"
    code, _, err = cli(capsys, "convert", str(src), str(out), "--to", "timm")
    assert code == 1 and error_lines(err) == [
        f"error: {src}: the file changed while it was being read (it was {size} bytes, now {size // 2}): "
        "another program truncated or rewrote it; read it again once it is complete"
    ], err
    assert not out.exists() and staged(tmp_path) == []


def test_a_source_rewritten_in_place_mid_conversion_is_refused(
    capsys, tmp_path: Path, canonical: Path, monkeypatch
) -> None:
    def rewrite() -> None:
        data = canonical.read_bytes()
        with open(canonical, "r+b") as f:  # same size, other bytes
            f.seek(len(data) - 64)
            f.write(bytes(64))
        later = time.time() + 5
        os.utime(canonical, (later, later))

    _pause_at_read(monkeypatch, 3, rewrite)
    out = tmp_path / "o.safetensors"
    code, _, err = cli(capsys, "convert", str(canonical), str(out), "--to", "timm")
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "the file changed while it was being read" in lines[0]
    assert not out.exists()


def test_a_source_deleted_mid_conversion_is_read_as_it_was(
    tmp_path: Path, canonical: Path, monkeypatch
) -> None:
    reference = tmp_path / "ref.safetensors"
    formats.convert(canonical, reference, to_format="timm")
    _pause_at_read(monkeypatch, 5, canonical.unlink)
    out = tmp_path / "o.safetensors"
    formats.convert(canonical, out, to_format="timm")
    assert not canonical.exists() and out.read_bytes() == reference.read_bytes()


def test_reads_never_map_the_file(tmp_path: Path, canonical: Path) -> None:
    """What makes the truncation safe: no tensor handed out is backed by a map of the file."""
    from vitspec.containers import open_container

    with open_container(canonical) as source:
        for name in source:
            array = source[name]
            while array is not None:
                assert not isinstance(array, np.memmap), name
                array = array.base if isinstance(array.base, np.ndarray) else None
        maps = Path(f"/proc/{os.getpid()}/maps")
        assert str(canonical) not in maps.read_text()
