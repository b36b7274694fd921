"""Outputs that are either the old version or the complete new one, whenever the writer dies.

Every file or directory slimc writes goes to a temporary name beside the destination (same
folder, so the same file system), is flushed to disk (``fsync``), and is then renamed over the
destination in one step. A process killed at any instant (``kill -9``, out of memory, power
loss after the rename) leaves the destination as it was or as it is meant to be, never half
written.

Temporary names are hidden and carry the writer's process id,
``.<name>.slimc-<pid>-<random>.tmp``, so nothing reading the folder mistakes them for outputs, and
the next write to the same destination deletes the ones whose writer is dead
(:func:`remove_stale`); a live writer's are left alone.

Directories (artifacts) are swapped with the destination by ``renameat2(RENAME_EXCHANGE)``
(Linux ≥ 3.15): the old directory stays in place until the new one takes its name in the same
step. Where the file system or OS lacks it, two renames are used and a kill between them leaves
the old directory under a temporary name (documented in :func:`replace_dir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

_TAG = "slimc-"


def _prefix(path: Path) -> str:
    return f".{path.name}.{_TAG}{os.getpid()}-"


def temp_file(path) -> Path:
    """An empty temporary file beside ``path`` (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def temp_dir(path) -> Path:
    """An empty temporary directory beside ``path`` (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    return Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):   # some file systems refuse to fsync a directory
        _fsync(path)


def replace_file(tmp, path) -> None:
    """Flush the finished file ``tmp`` to disk and rename it over ``path``."""
    tmp, path = Path(tmp), Path(path)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_bytes(path, data: bytes) -> None:
    """``path.write_bytes(data)``, atomically."""
    tmp = temp_file(path)
    try:
        tmp.write_bytes(data)
        replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    """``path.write_text(text)``, atomically."""
    write_bytes(path, text.encode())


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step; False when this OS / file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):   # not Linux, or a libc older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def exchange(a, b) -> bool:
    """Atomically swap the directories ``a`` and ``b`` (both exist); False when unsupported."""
    return _renameat2_exchange(Path(a), Path(b))


def replace_dir(tmp, path) -> None:
    """Flush the finished directory ``tmp`` and move it to ``path``, replacing the directory
    there. The old directory is removed after the swap. Without ``renameat2`` (non-Linux, some
    network file systems) the old directory is first renamed aside: a kill between that rename
    and the next leaves no directory at ``path`` (the old one survives under a temporary name
    until the next write to ``path`` removes it)."""
    tmp, path = Path(tmp), Path(path)
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync(f)
    _fsync_dir(tmp)
    if not path.exists():
        os.rename(tmp, path)
    elif exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)   # tmp now holds the previous directory
    else:
        aside = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
        os.rename(path, aside / "previous")
        try:
            os.rename(tmp, path)
        except OSError:
            os.rename(aside / "previous", path)
            raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(path.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def remove_stale(path) -> list[Path]:
    """Delete the temporary files and directories left beside ``path`` by slimc writers that
    died (killed mid-write); returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_TAG}(\d+)-.*\.tmp")
    removed = []
    for p in path.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
