"""Model zoo: named checkpoints, downloads through pooch, device choice, loading.

``load_model()`` with no argument loads the small model embedded in the package
(``napari_sam/weights/default.safetensors``). The official checkpoints are
downloaded on first use with ``pooch.retrieve`` into :func:`cache_dir`
(``$NAPARI_SAM_CACHE``, else the user cache folder).

The cache only ever holds verified files:

* A download runs in a staging folder of its own process
  (``.<file>.download-<pid>``): pooch streams it into a temporary file, checks
  the published hash, and unpacks archives (``pooch.Unzip``); only then is the
  checkpoint renamed into place. An interrupted or wrong download leaves
  nothing; the next call starts over.
* Processes that share the cache take turns: the download holds an exclusive
  lock on ``<file>.lock`` (released by the operating system if the process
  dies; the file is deleted when the download ends); another process wanting
  the same file says that it waits, then uses the finished file (or downloads
  it itself if the first one failed). A waiter gives up with DownloadError when
  the download it waits for makes no progress for ``LOCK_STALL_TIMEOUT_S``.
* A cached file is verified once: after a successful hash check,
  ``<file>.verified`` records its size, modification time and hash. Later
  calls compare only size and time with that stamp (cheap, even for the 2.4 GB
  ViT-H) and hash the file again when they differ or the stamp is missing (a
  file put there by hand). A cached file whose hash is wrong raises
  DownloadError and is left for the user to delete.
* Models without a published hash (EfficientSAM) are "trusted on first use":
  ``<file>.verified`` records the sha256 of the first download (or of a file
  found in the cache without a record), and every later load, and every later
  download while the record exists, must match it.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DownloadError, InvalidInputError, ModelNotFoundError
from . import DEFAULT_MODEL  # its one definition (torch-free, for the widgets)
from .build import MODEL_CONFIGS
from .checkpoint import model_from_checkpoint
from .sam import Sam

CACHE_ENV = "NAPARI_SAM_CACHE"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelInfo:
    """A named checkpoint.

    ``hash`` is ``"<algorithm>:<hex digest>"`` (sha256 or md5) of the file, or ""
    for a download without a published hash (trusted on first use: the sha256 of
    the first download is recorded and checked from then on); ``url`` is "" for
    the embedded model. ``config_name`` is a key of ``MODEL_CONFIGS`` ("" when the
    file stores its own config, as the embedded default model does; EfficientSAM
    entries name their builder, ``efficientsam_ti`` / ``efficientsam_s``).
    ``unzip``: the URL is a zip archive that holds ``filename``. ``everything`` holds the
    everything-mode settings recommended for the model where they differ from
    the official defaults (the CLI and the widget start from them; the
    ``AutomaticMaskGenerator`` class keeps the official defaults).
    """

    name: str
    config_name: str
    url: str
    hash: str
    filename: str
    size_mb: float
    description: str
    everything: tuple[tuple[str, float], ...] = ()
    unzip: bool = False


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_EFFICIENT_SAM_URL = "https://github.com/yformer/EfficientSAM/raw/main/weights/"

ZOO: dict[str, ModelInfo] = {
    DEFAULT_MODEL: ModelInfo(
        name=DEFAULT_MODEL,
        config_name="",
        url="",
        hash="",
        filename="default.safetensors",
        size_mb=0.0,
        description="Small SAM (ViT, 3M parameters) trained on DSB2018 nuclei by napari-sam; "
        "embedded (no download), fast on CPU.",
        # its predicted IoUs and stability scores run lower than SAM's (softer logits):
        # the official 0.88 / 0.95 keep no mask; tuned on 8 training images (docs/training.md)
        everything=(("pred_iou_thresh", 0.6), ("stability_score_thresh", 0.85)),
    ),
    "vit_b": ModelInfo(
        name="vit_b",
        config_name="vit_b",
        url=_SAM_URL + "sam_vit_b_01ec64.pth",
        hash="sha256:ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        filename="sam_vit_b_01ec64.pth",
        size_mb=357.7,
        description="Segment Anything ViT-B (91M parameters), Meta AI, Apache-2.0.",
    ),
    "vit_l": ModelInfo(
        name="vit_l",
        config_name="vit_l",
        url=_SAM_URL + "sam_vit_l_0b3195.pth",
        hash="sha256:3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        filename="sam_vit_l_0b3195.pth",
        size_mb=1191.6,
        description="Segment Anything ViT-L (308M parameters), Meta AI, Apache-2.0.",
    ),
    "vit_h": ModelInfo(
        name="vit_h",
        config_name="vit_h",
        url=_SAM_URL + "sam_vit_h_4b8939.pth",
        hash="sha256:a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        filename="sam_vit_h_4b8939.pth",
        size_mb=2445.7,
        description="Segment Anything ViT-H (636M parameters), Meta AI, Apache-2.0.",
    ),
    "vit_t": ModelInfo(
        name="vit_t",
        config_name="vit_t",
        url="https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/master/weights/mobile_sam.pt",
        hash="sha256:6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        filename="mobile_sam.pt",
        size_mb=38.8,
        description="MobileSAM, TinyViT encoder (10M parameters), Apache-2.0.",
    ),
    # EfficientSAM publishes no hashes: trusted on first use (see the module docstring).
    # Sizes are estimated from the parameter counts (float32).
    "efficientsam_ti": ModelInfo(
        name="efficientsam_ti",
        config_name="efficientsam_ti",
        url=_EFFICIENT_SAM_URL + "efficient_sam_vitt.pt",
        hash="",
        filename="efficient_sam_vitt.pt",
        size_mb=39.0,
        description="EfficientSAM ViT-Tiny (10M parameters), Yunyang Xiong et al., Apache-2.0.",
    ),
    "efficientsam_s": ModelInfo(
        name="efficientsam_s",
        config_name="efficientsam_s",
        url=_EFFICIENT_SAM_URL + "efficient_sam_vits.pt.zip",
        hash="",
        filename="efficient_sam_vits.pt",
        size_mb=100.7,
        description="EfficientSAM ViT-Small (26M parameters), Yunyang Xiong et al., Apache-2.0.",
        unzip=True,
    ),
}


def list_models() -> list[str]:
    """Names accepted by :func:`load_model` ("default" first)."""
    return list(ZOO)


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a zoo model; ModelNotFoundError for unknown names."""
    try:
        return ZOO[name]
    except (KeyError, TypeError):
        raise ModelNotFoundError(
            f"unknown model {name!r}; valid names: {', '.join(list_models())}"
        ) from None


def recommended_everything_settings(name: str | None) -> dict[str, float]:
    """Everything-mode settings recommended for zoo model ``name`` (None: the default model).

    Empty for file paths and for models that use the official defaults.
    """
    info = ZOO.get(DEFAULT_MODEL if name is None else str(name))
    return dict(info.everything) if info is not None else {}


def embedded_weights_path() -> Path:
    """Location of the embedded default model inside the package."""
    return Path(__file__).resolve().parent.parent / "weights" / ZOO[DEFAULT_MODEL].filename


def cache_dir() -> Path:
    """Folder for downloaded checkpoints: ``$NAPARI_SAM_CACHE`` or the user cache folder.

    Raises InvalidInputError when ``$NAPARI_SAM_CACHE`` cannot be a path (e.g.
    ``~user/x`` for an unknown user) or no home folder can be determined.
    """
    return _user_cache_dir()


def _expand_folder(value: str | os.PathLike, what: str) -> Path:
    """``value`` as a Path with ``~`` expanded; InvalidInputError naming ``what`` if it can't be."""
    try:
        text = os.fspath(value)
    except TypeError:
        raise InvalidInputError(
            f"{what} must be a folder path, got {type(value).__name__} {_short(repr(value), 80)}."
        ) from None
    if isinstance(text, bytes) or "\0" in text:
        raise InvalidInputError(f"{what} must be a folder path (text without NUL), got {text!r}.")
    try:
        return Path(text).expanduser()
    except RuntimeError as exc:  # "~nouser/x": no such user, or no home folder
        raise InvalidInputError(
            f"{what}={text!r} cannot be used: {exc} (a leading '~' names a user's home folder); "
            "give a folder path that exists or can be created."
        ) from None


def _user_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return _expand_folder(env, CACHE_ENV)
    try:
        if sys.platform.startswith("win"):
            base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
            return base / "napari-sam" / "Cache"
        if sys.platform == "darwin":
            return Path.home() / "Library" / "Caches" / "napari-sam"
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError as exc:
        raise InvalidInputError(
            f"cannot find the user cache folder ({exc}); set {CACHE_ENV} to a writable folder."
        ) from None
    return base / "napari-sam"


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


def _signature(dest: Path, expected: str) -> tuple[str, int, int, str]:
    st = dest.stat()
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


def _write_stamp(dest: Path, expected: str, extra: dict[str, Any] | None = None) -> None:
    """Record that ``dest`` matches ``expected`` (atomic; skipped where not writable).

    ``extra`` holds the trust-on-first-use fields kept from one stamp to the next.
    """
    sig = _signature(dest, expected)
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
        os.replace(fetched, dest)
        _write_stamp(dest, expected, extra)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_checkpoint(
    name: str, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Return the local path of zoo checkpoint ``name``, downloading it if needed.

    The download goes through ``pooch.retrieve`` into a staging folder of this
    process, is hash-checked and only then renamed into place, so no partial or
    wrong file is ever in the cache (an interrupted download leaves nothing and
    the next call starts over). Processes sharing the cache folder take turns
    (lock file ``<file>.lock``): a second one waits for the first and returns its
    file. A cached file is verified (hash) once and then recognised by the size
    and modification time recorded in ``<file>.verified``; for models without a
    published hash (EfficientSAM) that file records the sha256 of the first
    download, and a later file that differs is refused ("trust on first use").
    ``progress`` writes a progress bar (with tqdm) and the notes to stderr.

    Raises DownloadError (no network, HTTP error, interrupted download, hash
    mismatch of the download or of the cached file, a file changed since its first
    download, cache folder not writable) naming the file and where to put it by
    hand, and InvalidInputError for an unusable ``cache_dir`` / ``$NAPARI_SAM_CACHE``.
    """
    info = model_info(name)
    if not info.url:
        path = embedded_weights_path()
        if not path.is_file():
            raise _missing_embedded(path)
        return path
    folder = _expand_folder(cache_dir, "cache_dir") if cache_dir is not None else _user_cache_dir()
    dest = folder / info.filename
    if dest.is_file():
        return _verify_cached(info, dest, progress)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        origin = "" if cache_dir is not None or not os.environ.get(CACHE_ENV) else (
            f" (from {CACHE_ENV})"
        )
        raise DownloadError(
            f"cannot create the cache folder {folder}{origin}: {exc.strerror or exc}. Set "
            f"{CACHE_ENV} to a writable folder."
        ) from None
    with _exclusive(dest, info.filename, progress) as locked:
        if dest.is_file():  # another process finished it while this one waited
            return _verify_cached(info, dest, progress)
        _download(info, dest, progress, locked)
    return dest


def _missing_embedded(path: Path) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"the embedded default model weights are missing ({path}); reinstall napari-sam-kit, "
        f"or load a zoo model instead, e.g. load_model('vit_t') (choices: "
        f"{', '.join(n for n in list_models() if n != DEFAULT_MODEL)})"
    )


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def available_devices() -> list[str]:
    """Device names usable here, for pickers: ``cpu``, then ``cuda`` and ``mps`` if available."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if _mps_available():
        devices.append("mps")
    return devices


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Pick a torch device: the given one, or CUDA > MPS > CPU when None."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidInputError(
            f"invalid device {device!r}; use 'cpu', 'cuda', 'cuda:0', 'mps' or None (automatic)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    if dev.type == "mps" and not _mps_available():
        raise InvalidInputError(f"device {device!r} requested but MPS is not available")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InvalidInputError(f"unsupported device {device!r}; use 'cpu', 'cuda' or 'mps'")
    return dev


def load_model(
    name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = None
) -> Sam:
    """Load a SAM model in eval mode on ``device`` (see :func:`resolve_device`).

    ``name_or_path``: None or "default" (embedded model), a zoo name
    (:func:`list_models`, downloaded on first use) or a checkpoint file
    (``.safetensors``/``.pth``/``.pt``; architecture from the file metadata or
    inferred from the weights).

    Raises InvalidInputError (not a str/path, bad device), ModelNotFoundError
    (neither a name nor a file), DownloadError and CheckpointError (see
    :func:`download_checkpoint` and :func:`~napari_sam.models.checkpoint.model_from_checkpoint`).
    """
    if not isinstance(name_or_path, str | os.PathLike | type(None)):
        raise InvalidInputError(
            f"load_model takes a model name ({', '.join(list_models())}), a checkpoint path or "
            f"None, got {type(name_or_path).__name__} {_short(repr(name_or_path), 80)}."
        )
    dev = resolve_device(device)
    key = DEFAULT_MODEL if name_or_path is None else name_or_path
    config = None
    trusted = False  # the package's own file and hash-verified downloads are known to be good
    if isinstance(key, str) and key in ZOO:
        info = ZOO[key]
        if key == DEFAULT_MODEL:
            path = embedded_weights_path()
            if not path.is_file():
                raise _missing_embedded(path)
        else:
            path = download_checkpoint(key)
            # EfficientSAM builders ("efficientsam_ti"/"efficientsam_s") may live outside
            # MODEL_CONFIGS: then the file's keys say what it is, as for a path
            config = MODEL_CONFIGS.get(info.config_name)
        # files checked against a published hash fit their config; a model trusted on
        # first use gets the full checks (its first download was not verified)
        trusted = key == DEFAULT_MODEL or bool(info.hash)
    else:
        try:
            path = Path(key).expanduser()
        except (RuntimeError, TypeError):  # "~nouser/x"; os.PathLike returning bytes
            path = None
        if path is None or not path.is_file():
            shown = os.fspath(key) if isinstance(key, os.PathLike) else key
            raise ModelNotFoundError(
                f"{_short(repr(shown), 300)} is neither a model name nor an existing checkpoint "
                f"file; valid names: {', '.join(list_models())}"
            )
    model = model_from_checkpoint(path, config=config, trusted=trusted)
    return model.to(dev).eval()
