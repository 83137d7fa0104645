"""How commands publish what they write: whole or not at all, never over what moeprep did not
write, never losing the old output, and never leaving anything behind for long.

- An output is built under a temporary name in OUT's folder (``.moeprep-tmp-<random>``, short
  whatever OUT's length) and published by one rename. A file replaces an old one atomically; a
  directory is swapped with the old one in one step (``renameat2(RENAME_EXCHANGE)`` on Linux), so
  at every instant OUT is either the old or the new complete output.
- Where the file system cannot exchange, the swap takes two renames (OUT aside, the new one in).
  The folder set aside records which OUT it was; any later run on that OUT, finding OUT missing
  and that folder's run gone, puts it back.
- What is published is on disk first (every file and folder under the temporary synced before
  the rename, the folder holding OUT after it): a crash after publishing finds the whole new
  output, never a renamed folder of files the kernel had not written yet.
- Every temporary holds an exclusive ``flock`` for as long as its run lives. Leftovers of dead
  runs are the temporaries whose lock can be taken: they are removed (or restored) by the next run
  in that folder. The kernel drops a dead process's locks, whatever PID namespace it ran in.
- ``--overwrite`` replaces only an output that moeprep wrote (``is_ours``), unless ``--force``.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import signal
from pathlib import Path
from typing import Callable, Iterator

from ..errors import BadInputError

TMP = ".moeprep-tmp-"
OLD = ".moeprep-old-"
_OWNER = ".moeprep-was"  # inside a folder set aside: the name of the OUT it was
_RENAME_EXCHANGE = 2


def check_replaceable(out: Path, overwrite: bool, force: bool, is_ours: Callable[[Path], bool], kind: str) -> None:
    """Refuse, before any work, to replace an existing OUT without ``--overwrite``, or one that
    moeprep did not write without ``--force``."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite and not force:
        raise BadInputError("already exists (use --overwrite to replace it)", path=str(out))
    if out.is_symlink() or (kind == "dir") != out.is_dir():
        raise BadInputError(f"exists and is not a {'directory' if kind == 'dir' else 'file'}; moeprep replaces only "
                            f"what it wrote", path=str(out))
    if not force and not is_ours(out):
        raise BadInputError("exists and was not written by moeprep; --overwrite replaces only moeprep's outputs "
                            "(use --force to replace it anyway)", path=str(out))


@contextlib.contextmanager
def published(out: Path, kind: str) -> Iterator[Path]:
    """A locked temporary ``kind`` ("dir" or "file") beside ``out``, swapped onto it if the block
    completes and removed if it does not."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    tmp = out.parent / f"{TMP}{secrets.token_hex(8)}"
    if kind == "dir":
        tmp.mkdir()
    else:
        tmp.touch()
    lock = _locked(tmp)
    try:
        yield tmp
        _sync_tree(tmp)
        if kind == "file" or not out.exists():
            os.replace(tmp, out)  # atomic for a file; a directory lands where there is none
        elif not _exchange(tmp, out):
            _swap_by_renames(tmp, out)
        with contextlib.suppress(OSError):  # a folder that may be written but not read cannot be synced
            _sync_tree(out.parent, recurse=False)
        _remove(tmp)  # after an exchange: the old output
    except BaseException:
        _remove(tmp)
        raise
    finally:
        os.close(lock)


def _sync_tree(path: Path, recurse: bool = True) -> None:
    """fsync ``path`` and, with ``recurse``, everything under it (folders after their contents)."""
    paths = sorted(path.rglob("*"), reverse=True) if recurse and path.is_dir() else []
    for p in [*paths, path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clean_leftovers(out: Path) -> None:
    """Remove the temporaries of dead runs in ``out``'s folder, after putting back an OUT that a
    dead run had set aside."""
    parent = out.parent
    if not parent.is_dir():
        return
    for p in sorted(parent.glob(f"{OLD}*")):
        fd = _try_lock(p)
        if fd is None:
            continue
        try:
            was = parent / _owner(p)
            if _owner(p) and not (was.exists() or was.is_symlink()):
                os.rename(p, was)  # the interrupted swap, undone
                _forget_owner(was)
            else:
                _remove(p)
        finally:
            os.close(fd)
    for p in parent.glob(f"{TMP}*"):
        fd = _try_lock(p)
        if fd is not None:
            try:
                _remove(p)
            finally:
                os.close(fd)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the temporary output is removed."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _locked(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _try_lock(path: Path) -> int | None:
    """The lock of a dead run's temporary (an open descriptor), or None while its run lives."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_by_renames(tmp: Path, out: Path) -> None:
    """OUT aside (recording its name, locked by this run), the new one in, then the old one away;
    a run that dies between the renames leaves the old OUT for the next run to put back."""
    aside = out.parent / f"{OLD}{secrets.token_hex(8)}"
    (out / _OWNER).write_text(out.name)
    lock = _locked(out)
    try:
        os.rename(out, aside)
        os.rename(tmp, out)
        tmp.mkdir()  # the caller removes tmp: let it hold the old output's place
        os.rename(aside, tmp / "old")
    finally:
        os.close(lock)


def _owner(aside: Path) -> str:
    try:
        name = (aside / _OWNER).read_text()
    except OSError:
        return ""
    return name if name and "/" not in name and name not in (".", "..") else ""


def _forget_owner(restored: Path) -> None:
    with contextlib.suppress(OSError):
        (restored / _OWNER).unlink()


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
