"""Checkpoint downloads through pooch, the lock between processes, cached-file checks.

:func:`fetch` puts a zoo checkpoint (a :class:`~napari_sam.models.zoo.ModelInfo`)
at its place in the cache; :func:`napari_sam.models.zoo.download_checkpoint`
and ``load_model`` call it. The cache only ever holds verified files:

* A download runs in a staging folder of its own process
  (``.<file>.download-<pid>``): ``pooch.retrieve`` streams it into a temporary
  file, checks the published hash, and unpacks archives (``pooch.Unzip``); only
  then is the checkpoint renamed into place. An interrupted or wrong download
  leaves nothing; the next call starts over (pooch does not resume).
* Processes that share the cache take turns: the download holds an exclusive
  lock on ``<file>.lock`` (released by the operating system if the process
  dies, so a stale lock never blocks; the file is deleted when the download
  ends); another process wanting the same file says that it waits, then uses
  the finished file (or downloads it itself if the first one failed). A waiter
  gives up with DownloadError when the download it waits for makes no progress
  for ``LOCK_STALL_TIMEOUT_S``. Where the file system has no locks, downloads
  run uncoordinated and stay correct (each in its own staging folder).
* A cached file is verified once: after a successful hash check,
  ``<file>.verified`` records its size, modification time and hash. Later
  calls compare only size and time with that stamp (cheap, even for the 2.4 GB
  ViT-H) and hash the file again when they differ or the stamp is missing (a
  file put there by hand). A cached file whose hash is wrong raises
  DownloadError and is left for the user to delete.
* Models without a published hash (EfficientSAM) are trusted on first use:
  ``<file>.verified`` records the sha256 of the first download (or of a file
  found in the cache without a record), and every later load, and every later
  download while the record exists, must match it; a changed file is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DownloadError, InvalidInputError

if TYPE_CHECKING:
    from .zoo import ModelInfo

CACHE_ENV = "NAPARI_SAM_CACHE"
_CHUNK = 1 << 20


def _hasher(expected: str):
    algo, sep, digest = expected.partition(":")
    if not sep or algo not in ("sha256", "md5") or not digest:
        raise InvalidInputError(
            f"hash must look like 'sha256:<hex>' or 'md5:<hex>', got {expected!r}"
        )
    return hashlib.new(algo), digest.lower()


def _hash_file(path: Path, h: Any) -> str:
    """Feed the file ``path`` to the hashlib object ``h``; its hex digest."""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_digest(path: Path, expected: str) -> tuple[str, str]:
    """(hex digest of ``path``, expected hex digest) with the algorithm of ``expected``."""
    h, digest = _hasher(expected)
    return _hash_file(path, h), digest


def _sha256(path: Path) -> str:
    """``"sha256:<hex>"`` of the file ``path``."""
    return "sha256:" + _hash_file(path, hashlib.sha256())


def _short(text: object, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _by_hand(info: ModelInfo, dest: Path) -> str:
    """How to put ``info``'s checkpoint at ``dest`` without napari-sam's download."""
    if info.unzip:
        return f"download {info.url} by hand, unzip it and put {info.filename} at {dest}"
    return f"download {info.url} by hand and put it at {dest}"


def _download_error(info: ModelInfo, dest: Path, reason: object) -> DownloadError:
    return DownloadError(
        f"Could not download {info.filename} from {info.url}: {_short(reason)}. Check the "
        f"network connection and try again, or {_by_hand(info, dest)} (set {CACHE_ENV} to use "
        "another folder)."
    )


def _folder_error(folder: Path, action: str, exc: OSError) -> DownloadError:
    return DownloadError(
        f"The cache folder {folder} is not writable ({action}: "
        f"{exc.strerror or type(exc).__name__}). Set {CACHE_ENV} to a writable folder, or "
        "download the file by hand and put it there."
    )


_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\][^'\")]*")
_SHORT_READ = re.compile(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)")
_OS_ERROR_REPR = re.compile(r"\w+Error\((\d+), '([^']*)'\)")  # ConnectionResetError(104, '...')


def _network_reason(exc: BaseException) -> str:
    """The useful part of a requests error ("[Errno 111] Connection refused"), else all of it."""
    text = str(exc)
    short = _SHORT_READ.search(text)
    if short:
        have, missing = int(short[1]), int(short[2])
        return f"the connection closed after {have:,} of {have + missing:,} bytes"
    found = _ERRNO_TEXT.findall(text)
    if found:
        return found[-1].strip()
    os_error = _OS_ERROR_REPR.search(text)
    return f"[Errno {os_error[1]}] {os_error[2]}" if os_error else text


# ------------------------------------------------------------------ cache verification

_VERIFIED_SUFFIX = ".verified"
_STAMP_KEYS = ("hash", "size", "mtime_ns")
# (path, size, mtime_ns, hash) of files verified by this process, for folders where a
# stamp cannot be written (e.g. a read-only shared cache)
_verified_here: set[tuple[str, int, int, str]] = set()
_verified_lock = threading.Lock()


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(dest.name + _VERIFIED_SUFFIX)


def _signature(dest: Path, expected: str, file: Path | None = None) -> tuple[str, int, int, str]:
    """(dest, size, mtime_ns, hash) of ``file`` (default: ``dest``), for the stamp of ``dest``."""
    st = (file or dest).stat()
    return (str(dest), st.st_size, st.st_mtime_ns, expected.lower())


def _read_stamp(dest: Path) -> dict[str, Any] | None:
    """The JSON record ``<file>.verified`` beside ``dest``; None if missing or unreadable."""
    try:
        stamp = json.loads(_stamp_path(dest).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _stamp_matches(dest: Path, expected: str, stamp: dict[str, Any] | None) -> bool:
    """Whether ``dest`` was verified against ``expected`` and is unchanged since (cheap)."""
    sig = _signature(dest, expected)
    with _verified_lock:
        if sig in _verified_here:
            return True
    ok = (
        stamp is not None
        and stamp.get("hash") == sig[3]
        and stamp.get("size") == sig[1]
        and stamp.get("mtime_ns") == sig[2]
    )
    if ok:
        with _verified_lock:
            _verified_here.add(sig)
    return ok


def _write_stamp(
    dest: Path, expected: str, extra: dict[str, Any] | None = None, file: Path | None = None
) -> None:
    """Record that ``dest`` matches ``expected`` (atomic; skipped where not writable).

    ``extra`` holds the trust-on-first-use fields kept from one stamp to the next.
    ``file``: the verified file that is about to be renamed to ``dest`` (a rename
    keeps size and modification time), so that the stamp exists before the file.
    """
    sig = _signature(dest, expected, file)
    with _verified_lock:
        _verified_here.add(sig)
    stamp = {**(extra or {}), "hash": sig[3], "size": sig[1], "mtime_ns": sig[2]}
    try:
        fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(stamp, f, indent=1)
            os.replace(tmp, _stamp_path(dest))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # read-only cache: this process remembers it; others hash the file again


def _trust_record(dest: Path) -> dict[str, Any] | None:
    """The recorded first-download hash of a model without a published hash (None: none yet).

    Raises DownloadError when ``<file>.verified`` exists but is not a valid record
    (edited by hand): without it a changed file could not be told apart.
    """
    stamp_file = _stamp_path(dest)
    stamp = _read_stamp(dest)
    if stamp is None and not stamp_file.exists():
        return None
    recorded = (stamp or {}).get("hash")
    if not (isinstance(recorded, str) and recorded.startswith("sha256:") and len(recorded) == 71):
        raise DownloadError(
            f"The trust record {stamp_file} is unreadable, so {dest.name} cannot be checked. "
            f"Delete {stamp_file} to trust the file now in the cache, or delete both files to "
            "download it again."
        )
    return stamp


def _tofu_fields(info: ModelInfo, how: str) -> dict[str, Any]:
    """What a trust-on-first-use record says besides the hash: where the file came from."""
    return {
        "trust_on_first_use": True,
        "model": info.name,
        "source": how,
        "recorded_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _changed_since_first_use(dest: Path, got: str, recorded: dict[str, Any]) -> DownloadError:
    return DownloadError(
        f"{dest} is not the file first downloaded for this model (sha256 {got[:16]}..., "
        f"recorded {recorded['hash'][7:23]}... on {recorded.get('recorded_utc', '?')} in "
        f"{_stamp_path(dest).name}): it is damaged or was replaced. Delete it to download it "
        f"again; if you replaced it on purpose with a file you trust, delete "
        f"{_stamp_path(dest)} instead to record the new one."
    )


def _verify_cached(info: ModelInfo, dest: Path, progress: bool) -> Path:
    """Return ``dest`` if it is the published (or first-downloaded) file; DownloadError if not.

    A model without a published hash is checked against the sha256 recorded at its
    first download; a file found without a record (put there by hand) is trusted
    and its hash recorded now.
    """
    try:
        extra: dict[str, Any] | None = None
        if info.hash:
            expected, stamp = info.hash, _read_stamp(dest)
        else:
            stamp = _trust_record(dest)
            if stamp is None:
                if progress:
                    _note(f"Recording the sha256 of {dest} (first use) ...")
                _write_stamp(dest, _sha256(dest),
                             _tofu_fields(info, f"found in the cache as {dest.name}"))
                return dest
            expected = stamp["hash"]
            extra = {k: v for k, v in stamp.items() if k not in _STAMP_KEYS}
        if _stamp_matches(dest, expected, stamp):
            return dest
        if progress:
            _note(f"Verifying {dest} (once) ...")
        got, want = _file_digest(dest, expected)
    except OSError as exc:
        if isinstance(exc, DownloadError):
            raise
        raise DownloadError(
            f"Cannot read the cached file {dest}: {exc.strerror or exc}. Check its permissions, "
            f"or set {CACHE_ENV} to another folder."
        ) from None
    if got != want:
        if stamp is not None and not info.hash:
            raise _changed_since_first_use(dest, got, stamp)
        algo = info.hash.partition(":")[0]
        raise DownloadError(
            f"The cached file {dest} is not the published {info.name} checkpoint "
            f"({dest.stat().st_size:,} bytes, {algo} {got[:16]}..., expected {want[:16]}...): "
            "it is damaged or incomplete. Delete it and try again to download a fresh copy."
        )
    _write_stamp(dest, expected, extra)
    return dest


def _note(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# ------------------------------------------------------------------ processes take turns

# a waiting process gives up when the download it waits for shows no progress this long
LOCK_STALL_TIMEOUT_S = 300.0


@contextlib.contextmanager
def _exclusive(dest: Path, what: str, progress: bool) -> Iterator[bool]:
    """Hold an exclusive lock on ``<dest>.lock`` while downloading ``dest``.

    Yields True with the lock held, False where the file system cannot lock (the
    download then runs uncoordinated: still correct, as each process downloads
    into its own staging folder, but perhaps twice). While another process holds
    the lock this one waits, saying so; it raises DownloadError when the holder's
    staging folder shows no progress for ``LOCK_STALL_TIMEOUT_S`` (a hung process).

    The operating system releases the lock when its holder exits, even by a crash,
    so a left-over lock file never blocks (no stale locks). The holder deletes the
    file before it lets go; a waiter that then holds the lock of a deleted file
    opens it anew.
    """
    lock_path = dest.with_name(dest.name + ".lock")
    fd = _acquire(dest, lock_path, what, progress)
    if fd is None:  # no locks on this file system
        if progress:
            _note(f"Cannot lock {lock_path} (no file locks here); downloading without waiting "
                  "for other processes.")
        yield False
        return
    with contextlib.suppress(OSError):  # who holds it, for a waiter's message
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):  # Windows cannot delete an open file: left in place
            lock_path.unlink()
        os.close(fd)  # closing the descriptor releases the lock


def _acquire(dest: Path, lock_path: Path, what: str, progress: bool) -> int | None:
    """Open and lock ``lock_path`` (waiting while another process holds it); its descriptor.

    None where the file system cannot lock. See :func:`_exclusive`.
    """
    told = False
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise _folder_error(dest.parent, f"cannot create {lock_path.name}", exc) from None
        try:
            locked = _try_lock(fd)
            if locked is None:
                os.close(fd)
                return None
            if not locked:
                if progress and not told:
                    _note(f"Another process is downloading {what} into {dest.parent}; waiting "
                          f"for it to finish (lock file {lock_path.name}) ...")
                    told = True
                _wait_for_lock(fd, dest, lock_path)
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except OSError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            return fd
        os.close(fd)  # the holder deleted this lock file: take the new one


def _wait_for_lock(fd: int, dest: Path, lock_path: Path) -> None:
    """Block until ``fd`` is locked; DownloadError if the holder stalls (see ``_exclusive``)."""
    last_state, last_change = None, time.monotonic()
    while not _try_lock(fd):
        state = _staging_state(dest)
        now = time.monotonic()
        if state != last_state:
            last_state, last_change = state, now
        elif now - last_change > LOCK_STALL_TIMEOUT_S:
            try:
                holder = " (" + lock_path.read_text().strip() + ")"
            except OSError:
                holder = ""
            raise DownloadError(
                f"Another process{holder} holds {lock_path} but its download of {dest.name} "
                f"made no progress for {LOCK_STALL_TIMEOUT_S:.0f} s. If that process hung, end "
                f"it (or delete {lock_path}) and try again."
            )
        time.sleep(0.2)


def _try_lock(fd: int) -> bool | None:
    """Try once to take an exclusive lock on open file ``fd``.

    True: taken; False: another process holds it; None: this file system has no locks.
    """
    try:
        if sys.platform.startswith("win"):
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if sys.platform.startswith("win") or exc.errno in (
            errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK
        ):
            return False
        return None
    return True


# ------------------------------------------------------------------ downloads (pooch)

_STAGING = ".{name}.download-"


def _staging_dirs(dest: Path) -> list[Path]:
    """The staging folders of ``dest``'s downloads (this process's and killed ones')."""
    prefix = _STAGING.format(name=dest.name)
    try:
        return [p for p in dest.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return []


def _staging_state(dest: Path) -> tuple[tuple[str, int], ...]:
    """Names and sizes of the files being downloaded for ``dest`` (to see progress)."""
    state = []
    for folder in _staging_dirs(dest):
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                with contextlib.suppress(OSError):
                    state.append((path, os.path.getsize(path)))
    return tuple(sorted(state))


def _have_tqdm() -> bool:
    return importlib.util.find_spec("tqdm") is not None


def _file_url_downloader(info: ModelInfo, dest: Path):
    """A pooch downloader for ``file://`` URLs (a local mirror): copies the file."""

    def copy(url: str, output_file: str, _pooch: object) -> None:
        source = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        try:
            shutil.copyfile(source, output_file)
        except OSError as exc:
            raise _download_error(info, dest, f"{source}: {exc.strerror or exc}") from None

    return copy


def _retrieve(info: ModelInfo, staging: Path, dest: Path, progress: bool) -> Path:
    """Download ``info.url`` into ``staging`` with ``pooch.retrieve``; the checkpoint's path.

    pooch streams into a temporary file, checks the published hash (none for
    trust-on-first-use models) and only then gives the file its name; an archive
    (``info.unzip``) is unpacked with ``pooch.Unzip``. Every failure becomes a
    DownloadError that names the file and where to put it by hand.
    """
    import pooch
    import requests

    scheme = urllib.parse.urlsplit(info.url).scheme
    if scheme == "file":
        downloader = _file_url_downloader(info, dest)
    elif scheme in ("http", "https"):
        downloader = pooch.HTTPDownloader(
            progressbar=progress and _have_tqdm(), chunk_size=_CHUNK, timeout=60,
            headers={"User-Agent": "napari-sam"},
        )
    else:
        raise _download_error(info, dest, f"unsupported URL scheme {scheme!r}")
    archive = Path(urllib.parse.urlsplit(info.url).path).name or info.filename + ".zip"
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)  # napari-sam says what it does itself
    try:
        got = pooch.retrieve(
            info.url, known_hash=info.hash or None,
            fname=archive if info.unzip else info.filename, path=staging,
            processor=pooch.Unzip() if info.unzip else None, downloader=downloader,
        )
    except DownloadError:
        raise
    except requests.exceptions.HTTPError as exc:
        response = exc.response
        reason = f"HTTP {response.status_code} {response.reason}" if response is not None else exc
        raise _download_error(info, dest, reason) from None
    except (requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError) as exc:
        raise DownloadError(
            f"The download of {info.filename} from {info.url} was interrupted "
            f"({_short(_network_reason(exc))}); nothing was kept. Try again, or "
            f"{_by_hand(info, dest)}."
        ) from None
    except requests.exceptions.RequestException as exc:
        raise _download_error(info, dest, _network_reason(exc)) from None
    except ValueError:  # pooch: the downloaded file does not have the known hash
        raise DownloadError(
            f"{info.filename} downloaded from {info.url} does not have the published hash "
            f"({info.hash}); the download was deleted. Try again, or {_by_hand(info, dest)}."
        ) from None
    except zipfile.BadZipFile as exc:
        raise DownloadError(
            f"{archive} downloaded from {info.url} is not a valid zip archive ({_short(exc)}); "
            f"the download was deleted. Try again, or {_by_hand(info, dest)}."
        ) from None
    except OSError as exc:
        raise DownloadError(
            f"Could not write the download of {info.filename} into {staging.parent}: "
            f"{exc.strerror or exc}. Free some disk space or set {CACHE_ENV} to another "
            "folder, then try again."
        ) from None
    finally:
        logger.setLevel(level)
    if not info.unzip:
        return Path(got)
    found = [Path(p) for p in got if Path(p).name == info.filename]
    if not found:
        raise DownloadError(
            f"The archive {archive} from {info.url} holds no {info.filename} (it holds "
            f"{_short(', '.join(Path(p).name for p in got) or 'nothing', 120)}). Report this to "
            f"napari-sam; meanwhile, put a copy of {info.filename} at {dest}."
        )
    return found[0]


def _download(info: ModelInfo, dest: Path, progress: bool, locked: bool) -> None:
    """Download ``info``'s checkpoint to ``dest`` (atomic, verified); see download_checkpoint."""
    record = None if info.hash else _trust_record(dest)  # kept after the file was deleted
    if locked:  # no other download of dest runs: clear what killed ones left behind
        for old in _staging_dirs(dest):
            shutil.rmtree(old, ignore_errors=True)
        # the resumable partial file of the earlier downloader (pooch does not resume)
        dest.with_name(dest.name + ".part").unlink(missing_ok=True)
    staging = dest.with_name(_STAGING.format(name=dest.name) + str(os.getpid()))
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            staging.mkdir()
        except OSError as exc:
            raise _folder_error(dest.parent, f"cannot create {staging.name}", exc) from None
        if progress:
            _note(f"Downloading {info.filename} from {info.url} to {dest} ...")
        fetched = _retrieve(info, staging, dest, progress)
        extra = None
        if info.hash:
            expected = info.hash  # pooch checked it
        else:
            expected = _sha256(fetched)
            if record is not None and record["hash"] != expected:
                raise DownloadError(
                    f"{info.filename} downloaded from {info.url} is not the file first "
                    f"downloaded for {info.name} (sha256 {expected[7:23]}..., recorded "
                    f"{record['hash'][7:23]}... on {record.get('recorded_utc', '?')}); it was "
                    f"not kept. If the publisher released a new file on purpose, delete "
                    f"{_stamp_path(dest)} and try again."
                )
            extra = (
                {k: v for k, v in record.items() if k not in _STAMP_KEYS}
                if record is not None else _tofu_fields(info, f"first download from {info.url}")
            )
            if progress and record is None:
                _note(f"{info.filename} has no published hash: its sha256 {expected[7:23]}... "
                      f"is recorded in {_stamp_path(dest)} and checked from now on.")
        # the stamp first: a process that finds the file then also finds its stamp
        _write_stamp(dest, expected, extra, file=fetched)
        os.replace(fetched, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch(info: ModelInfo, dest: Path, progress: bool = True, folder_origin: str = "") -> Path:
    """Return ``dest`` holding ``info``'s verified checkpoint, downloading it if needed.

    See :func:`napari_sam.models.zoo.download_checkpoint` (which resolves the
    folder) and the module docstring. ``folder_origin`` says where the folder
    came from, for the error when it cannot be created.
    """
    if dest.is_file():
        return _verify_cached(info, dest, progress)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(
            f"cannot create the cache folder {dest.parent}{folder_origin}: "
            f"{exc.strerror or exc}. Set {CACHE_ENV} to a writable folder."
        ) from None
    with _exclusive(dest, info.filename, progress) as locked:
        if dest.is_file():  # another process finished it while this one waited
            return _verify_cached(info, dest, progress)
        _download(info, dest, progress, locked)
    return dest
