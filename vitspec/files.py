"""Writing outputs safely: atomically, never over an existing file without ``overwrite``.

A file is written to a temporary sibling and renamed into place when complete, so an
interrupted run (an exception, Ctrl-C) leaves the destination as it was and no partial file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vitspec.errors import VitspecError


class OutputExistsError(VitspecError, FileExistsError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists; pass --force (overwrite=True) to replace it")


class OutputNotWritableError(VitspecError, PermissionError):
    pass


def check_destination(path: Path, overwrite: bool) -> None:
    """Refuse an existing path (unless overwrite) and a missing or read-only folder, before any work."""
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputNotWritableError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputNotWritableError(f"cannot write {path}: folder {parent} is not writable")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    check_destination(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if path.is_dir():
            raise OutputExistsError(path)
        # mkstemp makes 0600 files; give the file the mode open() would have given it.
        os.chmod(tmp_path, _mode_of(path))
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _mode_of(path: Path) -> int:
    """What open(path, "w") leaves: an existing file's mode, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux states it; reading it changes nothing, unlike os.umask
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; swap it into place only if the block succeeds."""
    with atomic_output(path, overwrite) as made:
        made.mkdir()
        yield made


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a path inside a temporary folder next to ``path`` for a writer that makes a file or a
    folder there (a framework's artifact); move what it made to ``path`` only if the block succeeds."""
    path = Path(path)
    check_destination(path, overwrite)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
    )
    try:
        made = staging / path.name
        yield made
        if not made.exists():
            raise OutputNotWritableError(f"cannot write {path}: the writer left nothing at {made}")
        _swap_into_place(made, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(made: Path, path: Path) -> None:
    """Rename ``made`` to ``path``; an existing ``path`` (file or folder) is moved aside first."""
    if not path.exists():
        os.replace(made, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(made, path)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
