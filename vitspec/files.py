"""Writing outputs safely: atomically, never over an existing file without ``overwrite``.

A file is written to a staging file beside it and moved into place when complete, so an
interrupted run (an exception, Ctrl-C) leaves the destination as it was and no partial file.
The faults of the machine are handled too (docs/reliability.md):

- **Two writers at once.** Without ``overwrite`` the final step itself refuses to replace an
  existing output: ``renameat2(RENAME_NOREPLACE)`` where the kernel and filesystem have it, else
  ``link`` then ``unlink`` for a file. A check made earlier (``check_destination``) only saves work.
- **A killed writer.** Staging files are named ``.NAME.vitspec-PID-TAG.partial``: vitspec knows
  its own, and the next write into that folder removes those whose process is gone (or whose pid
  now belongs to a process started after the file was last written), telling ``notify``.
- **A full disk.** ``check_free_space`` refuses, before anything is written, an output larger than
  the free space of its folder's filesystem; a write that fills the disk anyway (``ENOSPC``,
  ``EDQUOT``, ``EFBIG``) ends in :class:`NoSpaceError` naming the file, its staging file removed.

Fault injection for the tests: with ``VITSPEC_TEST_HOOK=EVENT:N`` and ``VITSPEC_TEST_HOOK_DIR=DIR``
in the environment, the N-th time the process reaches EVENT (``tensor``: a tensor's bytes written
to a staging file; ``read``: a source tensor about to be read; ``commit``: an output about to be
moved into place) it creates ``DIR/ready.PID`` and waits until ``DIR/go`` exists. Without those
variables :func:`hook` does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vitspec.errors import VitspecError


class OutputExistsError(VitspecError, FileExistsError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists; pass --force (overwrite=True) to replace it")


class OutputNotWritableError(VitspecError, PermissionError):
    pass


class NoSpaceError(VitspecError, OSError):
    """An output the disk has no room for (refused before writing, or the disk filled while writing)."""


# ---- notes -----------------------------------------------------------------------------------

_notifier: Callable[[str], None] | None = None


def set_notifier(notifier: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Where notes go (the CLI prints them on stderr); returns the previous notifier."""
    global _notifier
    previous, _notifier = _notifier, notifier
    return previous


def notify(message: str) -> None:
    if _notifier is not None:
        _notifier(message)
    else:
        import logging

        logging.getLogger("vitspec").warning(message)


# ---- fault injection (tests only) --------------------------------------------------------------

_hook_counts: dict[str, int] = {}


def hook(event: str) -> None:
    """Pause at a chosen point when the environment asks for it (see the module's docstring)."""
    wanted = os.environ.get("VITSPEC_TEST_HOOK")
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name != event:
        return
    _hook_counts[event] = _hook_counts.get(event, 0) + 1
    if _hook_counts[event] != int(count or 1):
        return
    folder = Path(os.environ["VITSPEC_TEST_HOOK_DIR"])
    (folder / f"ready.{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not (folder / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.005)


# ---- checks before writing -------------------------------------------------------------------


def check_destination(path: Path, overwrite: bool) -> None:
    """Refuse an existing path (unless overwrite) and a missing or read-only folder, before any work."""
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    parent = _folder_of(path)
    if not parent.is_dir():
        raise OutputNotWritableError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputNotWritableError(f"cannot write {path}: folder {parent} is not writable")


def _folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_free_space(path: str | os.PathLike[str], nbytes: int) -> None:
    """Refuse, before writing, an output of ``nbytes`` that the destination's filesystem has no room for.

    ``path`` is the output; an existing folder output is measured where it is, anything else in its
    folder. The old output (with --force) is replaced only after the new one is complete, so both
    must fit: the whole new size is needed whatever is there now.
    """
    path = Path(path)
    where = path if path.is_dir() else _folder_of(path)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # the folder checks say what is wrong with it
    if nbytes > free:
        raise NoSpaceError(
            f"cannot write {path}: it needs {_size(nbytes)} and the filesystem of {where} has "
            f"{_size(free)} free; free some space or write elsewhere"
        )


def _size(n: int) -> str:
    for factor, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= factor:
            return f"{n / factor:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


# What an output holds beyond its tensors' bytes, at most (measured: about 1.9 KiB per dataset in a
# Keras .weights.h5, under 1 KiB per tensor in safetensors and .npz).
RESERVE_BASE = 64 * 1024
RESERVE_PER_TENSOR = 4096
_FALLOC_FL_KEEP_SIZE = 1


def reserve(path: Path, nbytes: int) -> None:
    """Reserve ``nbytes`` of disk for the file ``path`` (fallocate, keeping its size), so that a
    library that crashes when the disk fills under it (HDF5 does) never meets a full disk within
    that size; a disk without the room refuses here, with an OSError (ENOSPC, EFBIG) atomic_file
    reports. Best effort: a filesystem or OS without fallocate reserves nothing."""
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(path, os.O_WRONLY)
    try:
        if fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, nbytes) != 0:
            code = ctypes.get_errno()
            if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def release_reserve(path: Path) -> None:
    """Give back the reserved blocks past the end of ``path`` (truncating it to its own size)."""
    os.truncate(path, os.stat(path).st_size)


# ---- staging files -----------------------------------------------------------------------------

_STAGING = re.compile(r"^\.(?P<name>.+)\.vitspec-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})\.partial$")


def _staging_path(path: Path) -> Path:
    tag = secrets.token_hex(4)
    return _folder_of(path) / f".{path.name}.vitspec-{os.getpid()}-{tag}.partial"


def _make_staging(path: Path, folder: bool) -> Path:
    while True:
        staging = _staging_path(path)
        try:
            if folder:
                os.mkdir(staging, 0o700)
            else:
                os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return staging
        except FileExistsError:  # pragma: no cover - a 32-bit random tag met its twin
            continue


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where /proc says; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    boot = _boot_time()
    if boot is None:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _writer_gone(pid: int, mtime: float) -> bool:
    """True if the process that wrote a staging file last modified at ``mtime`` no longer runs."""
    if pid == os.getpid():
        return False  # ours: another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, under another user
    started = _process_start(pid)
    # A process started after the file was last written cannot have written it: the pid was reused.
    # (btime and the start tick are rounded; a second of slack keeps a live writer safe.)
    return started is not None and started > mtime + 1.0


def remove_stale_staging(folder: str | os.PathLike[str]) -> list[str]:
    """Remove the staging files and folders in ``folder`` whose writer is gone; say what went."""
    folder = Path(folder)
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _STAGING.match(name)
        if match is None:
            continue
        stale = folder / name
        try:
            info = os.lstat(stale)
        except OSError:
            continue
        pid = int(match["pid"])
        if not _writer_gone(pid, info.st_mtime):
            continue
        try:
            if stale.is_dir() and not stale.is_symlink():
                size = sum(p.stat().st_size for p in stale.rglob("*") if p.is_file())
                shutil.rmtree(stale)
            else:
                size = info.st_size
                stale.unlink()
        except OSError:
            continue  # another run removed it first, or it is not ours to remove
        message = (
            f"removed {stale} ({_size(size)}), a partial output left by vitspec process {pid}, "
            "which is no longer running"
        )
        removed.append(message)
        notify(message)
    return removed


# ---- the final step ----------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2: Callable[..., int] | None = None
_HAVE_RENAMEAT2 = True


def _load_renameat2() -> Callable[..., int] | None:
    global _renameat2, _HAVE_RENAMEAT2
    if _renameat2 is None and _HAVE_RENAMEAT2:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _renameat2 = libc.renameat2
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
            _renameat2.argtypes += [ctypes.c_uint]
            _renameat2.restype = ctypes.c_int
        except (OSError, AttributeError):
            _HAVE_RENAMEAT2 = False
    return _renameat2


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` in one step that fails with FileExistsError if ``dst`` exists.

    ``renameat2(RENAME_NOREPLACE)`` where the C library and the filesystem have it (Linux 3.15+,
    glibc 2.28+); else, for a file, ``link`` (which never replaces) then ``unlink``; for a folder,
    ``rename``, which replaces nothing but an empty folder.
    """
    renameat2 = _load_renameat2()
    if renameat2 is not None:
        if (
            renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
            == 0
        ):
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(dst))
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(dst))
    if src.is_dir():
        if dst.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
            raise
        return
    os.link(src, dst)  # FileExistsError if dst exists, whatever it is
    os.unlink(src)


def _commit(staging: Path, path: Path, overwrite: bool) -> None:
    hook("commit")
    if overwrite:
        os.replace(staging, path)
        return
    try:
        rename_noreplace(staging, path)
    except FileExistsError:
        raise OutputExistsError(path) from None


# ---- a full disk -------------------------------------------------------------------------------

_NO_SPACE = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file grew past the largest file allowed here (ulimit -f or the filesystem's limit)",
}
_NO_SPACE_WORDS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "File too large": errno.EFBIG,
}


def _no_space(exc: BaseException, path: Path, staging: Path) -> NoSpaceError | None:
    """A NoSpaceError for an exception that says the disk filled (by errno, or in its words, as
    h5py does), or a write error that says nothing (torch.save: "unexpected pos") when the disk
    is in fact full or the staging file reached the file-size limit; None for any other."""
    if isinstance(exc, VitspecError) or not isinstance(exc, OSError | RuntimeError):
        return None
    code = exc.errno if isinstance(exc, OSError) else None
    if code not in _NO_SPACE:
        text = str(exc)
        code = next((c for words, c in _NO_SPACE_WORDS.items() if words in text), None)
    if code is None:
        code = _disk_state(staging)
    if code is None:
        return None
    return NoSpaceError(
        f"cannot write {path}: {_NO_SPACE[code]} ({os.strerror(code)}) while writing it; "
        "the partial output was removed"
    )


def _disk_state(staging: Path) -> int | None:
    """ENOSPC if the staging file's filesystem has under 1 MiB free, EFBIG if it reached the
    file-size limit (ulimit -f), else None."""
    import resource

    try:
        info = os.statvfs(staging.parent)
        if info.f_bavail * info.f_frsize < 1 << 20:
            return errno.ENOSPC
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            files = (
                [staging] if staging.is_file() else [p for p in staging.rglob("*") if p.is_file()]
            )
            if any(p.stat().st_size >= limit - (1 << 16) for p in files):
                return errno.EFBIG
    except OSError:
        pass
    return None


# ---- atomic outputs ----------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], overwrite: bool = False, *, size: int | None = None
) -> Iterator[Path]:
    """Yield a staging path next to ``path``; move it to ``path`` only if the block succeeds.

    ``size``, when known, is checked against the free space first.
    """
    path = Path(path)
    check_destination(path, overwrite)
    if size is not None:
        check_free_space(path, size)
    remove_stale_staging(_folder_of(path))
    tmp_path = _make_staging(path, folder=False)
    try:
        yield tmp_path
        if path.is_dir():
            raise OutputExistsError(path)
        # Staging files are made 0600; give the file the mode open() would have given it.
        os.chmod(tmp_path, _mode_of(path))
        _commit(tmp_path, path, overwrite)
    except BaseException as exc:
        full = _no_space(exc, path, tmp_path)
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if full is not None:
            raise full from None
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
def atomic_dir(
    path: str | os.PathLike[str], overwrite: bool = False, *, size: int | None = None
) -> Iterator[Path]:
    """Yield a staging folder next to ``path``; move it into place only if the block succeeds."""
    with atomic_output(path, overwrite, size=size) as made:
        made.mkdir()
        yield made


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], overwrite: bool = False, *, size: int | None = None
) -> Iterator[Path]:
    """Yield a path inside a staging folder next to ``path`` for a writer that makes a file or a
    folder there (a framework's artifact); move what it made to ``path`` only if the block succeeds."""
    path = Path(path)
    check_destination(path, overwrite)
    if size is not None:
        check_free_space(path, size)
    remove_stale_staging(_folder_of(path))
    staging = _make_staging(path, folder=True)
    try:
        made = staging / path.name
        yield made
        if not made.exists():
            raise OutputNotWritableError(f"cannot write {path}: the writer left nothing at {made}")
        if overwrite:
            _swap_into_place(made, path)
        else:
            _commit(made, path, overwrite=False)
    except BaseException as exc:
        full = _no_space(exc, path, staging)
        if full is not None:
            shutil.rmtree(staging, ignore_errors=True)
            raise full from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(made: Path, path: Path) -> None:
    """Move ``made`` to ``path``; an existing ``path`` (file or folder) is moved aside first."""
    hook("commit")
    try:
        rename_noreplace(made, path)
        return
    except FileExistsError:
        pass
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(made, path)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
