"""Atomic file writes, shared by every writer in the package (label images, JSON,
overlays, model checkpoints).

It sits at the top of the package (not in ``engine``) because ``models`` must
not import ``engine``. Nothing here touches the process at import time: the
umask is read when a file is published (:func:`current_umask`).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = ["atomic_path", "current_umask"]

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's file-creation mask, read now.

    Linux reports it in ``/proc/self/status`` (read-only, safe from any
    thread); elsewhere it is read by setting and restoring it, under a lock so
    that two writers here do not race.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Context manager yielding a temporary path that becomes ``path`` on success.

    The temporary file is created in ``path``'s folder (so the final rename is
    atomic on the same file system), named ``.<name>.<random>.tmp``. If the
    block raises (or is interrupted), the temporary file is deleted and
    ``path`` is left untouched. Parent folders are created. The published file
    gets the permissions of a normally created file (``0o666`` less the umask;
    ``mkstemp`` alone would make it owner-only).

    With ``replace=False`` an existing ``path`` is never replaced: the file is
    published with :func:`os.link`, which fails if the name exists (also when
    another process created it meanwhile), and :class:`FileExistsError` is
    raised. On file systems without hard links the check is a plain existence
    test just before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not replace and path.exists():
        raise _exists_error(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        _publish(tmp, path, replace)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


def _exists_error(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} exists and was not replaced (pass --overwrite to replace it).")


def _publish(tmp: Path, path: Path, replace: bool) -> None:
    """Move ``tmp`` to ``path``; without ``replace``, fail if ``path`` exists."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:  # no hard links on this file system (FAT, some network shares)
        if path.exists():
            raise _exists_error(path) from None
        os.replace(tmp, path)
        return
    tmp.unlink()
