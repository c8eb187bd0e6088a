"""Model zoo: named checkpoints, hash-checked downloads, device choice, loading.

``load_model()`` with no argument loads the small model embedded in the package
(``napari_sam/weights/default.safetensors``). The official checkpoints are
downloaded on first use into :func:`cache_dir` (``$NAPARI_SAM_CACHE``, else the
user cache folder).

The cache only ever holds hash-valid files:

* A download streams into ``<file>.part`` (resumed with an HTTP Range request
  if interrupted), is checked against the published hash, then renamed into
  place. A response that ends before its Content-Length is an interrupted
  download: the ``.part`` file is kept for the next try.
* Processes that share the cache take turns: the download holds an exclusive
  lock on ``<file>.lock`` (released by the operating system if the process
  dies; the file is deleted when the download ends); another process wanting
  the same file says that it waits, then uses the finished file (or resumes the
  download if the first one failed).
* A cached file is verified once: after a successful hash check,
  ``<file>.verified`` records its size, modification time and hash. Later
  calls compare only size and time with that stamp (cheap, even for the 2.4 GB
  ViT-H) and hash the file again when they differ or the stamp is missing (a
  file put there by hand). A cached file whose hash is wrong raises
  DownloadError and is left for the user to delete.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
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

    ``hash`` is ``"<algorithm>:<hex digest>"`` (sha256 or md5) of the file;
    ``config_name`` is a key of ``MODEL_CONFIGS`` ("" when the file stores its
    own config, as the embedded default model does). ``everything`` holds the
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


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

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


class _Progress:
    """tqdm progress bar on stderr if tqdm is installed, else a simple text line."""

    def __init__(self, enabled: bool, total: int | None, initial: int, desc: str) -> None:
        self.enabled = enabled
        self.total = total
        self.done = initial
        self.desc = desc
        self._bar = None
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(
            total=total, initial=initial, unit="B", unit_scale=True, desc=desc, file=sys.stderr
        )

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last < 0.5:
            return
        self._last = now
        mb = self.done / 2**20
        if self.total:
            pct = 100.0 * self.done / self.total
            line = f"\r{self.desc}: {mb:.1f} / {self.total / 2**20:.1f} MB ({pct:.0f}%)"
        else:
            line = f"\r{self.desc}: {mb:.1f} MB"
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _hasher(expected: str):
    algo, sep, digest = expected.partition(":")
    if not sep or algo not in ("sha256", "md5") or not digest:
        raise InvalidInputError(
            f"hash must look like 'sha256:<hex>' or 'md5:<hex>', got {expected!r}"
        )
    return hashlib.new(algo), digest.lower()


def _download_error(info: ModelInfo, folder: Path, reason: object) -> DownloadError:
    return DownloadError(
        f"Could not download {info.filename} from {info.url}: {_short(reason)}. Check the "
        f"network connection and try again, or download the file by hand and put it in "
        f"{folder} (set {CACHE_ENV} to use another folder)."
    )


def _short(text: object, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _folder_error(folder: Path, action: str, exc: OSError) -> DownloadError:
    return DownloadError(
        f"The cache folder {folder} is not writable ({action}: "
        f"{exc.strerror or type(exc).__name__}). Set {CACHE_ENV} to a writable folder, or "
        "download the file by hand and put it there."
    )


def _fetch(info: ModelInfo, part: Path, folder: Path, progress: bool) -> None:
    """Stream ``info.url`` into ``part``, resuming from its current size if possible.

    Raises DownloadError for network and HTTP errors and when the response ends
    before its Content-Length (``part`` is kept, so the next call resumes), and
    a DownloadError naming the folder when ``part`` cannot be written.
    """
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(info.url, headers={"User-Agent": "napari-sam"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part file already holds the whole file
            return
        raise _download_error(info, folder, f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise _download_error(info, folder, reason) from None
    with response:
        status = getattr(response, "status", None) or response.getcode() or 200
        if offset and (status != 206 or not _range_starts_at(response, offset)):
            offset = 0  # server ignored the Range request: start over
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        bar = _Progress(progress, None if expected is None else expected + offset, offset,
                        info.filename)
        received = 0
        try:
            try:
                f = open(part, "ab" if offset else "wb")  # noqa: SIM115 (closed by the with below)
            except OSError as exc:
                raise _folder_error(folder, f"cannot write {part.name}", exc) from None
            with f:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                        raise _interrupted(info, part, offset + received, expected, offset,
                                           getattr(exc, "reason", exc)) from None
                    if not chunk:
                        break
                    try:
                        f.write(chunk)
                    except OSError as exc:
                        raise DownloadError(
                            f"Could not write {part}: {exc.strerror or exc}. Free some disk "
                            f"space or set {CACHE_ENV} to another folder, then try again (the "
                            "download resumes)."
                        ) from None
                    received += len(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
        if expected is not None and received < expected:
            raise _interrupted(info, part, offset + received, expected, offset,
                               "the server closed the connection early")


def _range_starts_at(response: Any, offset: int) -> bool:
    """Whether a 206 response's Content-Range starts at ``offset`` (True if not stated)."""
    rng = response.headers.get("Content-Range", "")
    if not rng.startswith("bytes "):
        return True
    start = rng[len("bytes "):].split("-", 1)[0].strip()
    return not start.isdigit() or int(start) == offset


def _interrupted(
    info: ModelInfo, part: Path, have: int, expected: int | None, offset: int, reason: object
) -> DownloadError:
    total = f" of {expected + offset:,}" if expected is not None else ""
    return DownloadError(
        f"The download of {info.filename} from {info.url} was interrupted after {have:,}"
        f"{total} bytes ({_short(reason)}). The partial file {part} is kept: call again (or "
        "load the model again) to resume."
    )


def _file_digest(path: Path, expected: str) -> tuple[str, str]:
    h, digest = _hasher(expected)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest(), digest


# ------------------------------------------------------------------ cache verification

_VERIFIED_SUFFIX = ".verified"
# (path, size, mtime_ns, hash) of files verified by this process, for folders where a
# stamp cannot be written (e.g. a read-only shared cache)
_verified_here: set[tuple[str, int, int, str]] = set()
_verified_lock = threading.Lock()


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(dest.name + _VERIFIED_SUFFIX)


def _signature(dest: Path, expected: str) -> tuple[str, int, int, str]:
    st = dest.stat()
    return (str(dest), st.st_size, st.st_mtime_ns, expected.lower())


def _stamp_matches(dest: Path, expected: str) -> bool:
    """Whether ``dest`` was verified against ``expected`` and is unchanged since (cheap)."""
    sig = _signature(dest, expected)
    with _verified_lock:
        if sig in _verified_here:
            return True
    try:
        stamp = json.loads(_stamp_path(dest).read_text())
        ok = (
            isinstance(stamp, dict)
            and stamp.get("hash") == sig[3]
            and stamp.get("size") == sig[1]
            and stamp.get("mtime_ns") == sig[2]
        )
    except (OSError, ValueError):
        return False
    if ok:
        with _verified_lock:
            _verified_here.add(sig)
    return ok


def _write_stamp(dest: Path, expected: str) -> None:
    """Record that ``dest`` matches ``expected`` (atomic; skipped where not writable)."""
    sig = _signature(dest, expected)
    with _verified_lock:
        _verified_here.add(sig)
    stamp = {"hash": sig[3], "size": sig[1], "mtime_ns": sig[2]}
    try:
        fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(stamp, f)
            os.replace(tmp, _stamp_path(dest))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # read-only cache: this process remembers it; others hash the file again


def _verify_cached(info: ModelInfo, dest: Path, progress: bool) -> Path:
    """Return ``dest`` if it is the published file; DownloadError if it is not."""
    try:
        if _stamp_matches(dest, info.hash):
            return dest
        if progress:
            sys.stderr.write(f"Verifying {dest} (once) ...\n")
            sys.stderr.flush()
        got, want = _file_digest(dest, info.hash)
    except OSError as exc:
        raise DownloadError(
            f"Cannot read the cached file {dest}: {exc.strerror or exc}. Check its permissions, "
            f"or set {CACHE_ENV} to another folder."
        ) from None
    if got != want:
        algo = info.hash.partition(":")[0]
        raise DownloadError(
            f"The cached file {dest} is not the published {info.name} checkpoint "
            f"({dest.stat().st_size:,} bytes, {algo} {got[:16]}..., expected {want[:16]}...): "
            "it is damaged or incomplete. Delete it and try again to download a fresh copy."
        )
    _write_stamp(dest, info.hash)
    return dest


@contextlib.contextmanager
def _exclusive(lock_path: Path, folder: Path, what: str, progress: bool) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (waits, saying so, while another process has it).

    The operating system releases the lock when its holder exits, even by a crash,
    so a left-over lock file never blocks. The holder deletes the file before it
    lets go; a waiter that then holds the lock of a deleted file opens it anew.
    """
    told = False
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise _folder_error(folder, f"cannot create {lock_path.name}", exc) from None
        try:
            if not _try_lock(fd):
                if progress and not told:
                    sys.stderr.write(
                        f"Another process is downloading {what} into {folder}; waiting for it "
                        f"to finish (lock file {lock_path.name}) ...\n"
                    )
                    sys.stderr.flush()
                    told = True
                while not _try_lock(fd):
                    time.sleep(0.2)
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except OSError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)  # the holder deleted this lock file: take the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # Windows cannot delete an open file: left in place
            lock_path.unlink()
        os.close(fd)  # closing the descriptor releases the lock


def _try_lock(fd: int) -> bool:
    """Try once to take an exclusive lock on open file ``fd``."""
    try:
        if sys.platform.startswith("win"):
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def download_checkpoint(
    name: str, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Return the local path of zoo checkpoint ``name``, downloading it if needed.

    The download is hash-checked and atomic (``<file>.part`` renamed on success);
    an interrupted download resumes from the ``.part`` file. Processes sharing the
    cache folder take turns (lock file ``<file>.lock``): a second one waits for the
    first and returns its file. A cached file is verified (hash) once and then
    recognised by the size and modification time recorded in ``<file>.verified``.
    ``progress`` writes a progress bar and the waiting/verifying notes to stderr.

    Raises DownloadError (no network, HTTP error, interrupted download, hash
    mismatch of the download or of the cached file, cache folder not writable)
    with the URL and the folder where the file can be put by hand, and
    InvalidInputError for an unusable ``cache_dir`` / ``$NAPARI_SAM_CACHE``.
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
    with _exclusive(dest.with_name(dest.name + ".lock"), folder, info.filename, progress):
        if dest.is_file():  # another process finished it while this one waited
            return _verify_cached(info, dest, progress)
        part = dest.with_name(dest.name + ".part")
        _fetch(info, part, folder, progress)
        got, want = _file_digest(part, info.hash)
        if got != want:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{info.filename} downloaded from {info.url} has the wrong hash (expected "
                f"{want}, got {got}); the partial file was deleted. Try again, or download the "
                f"file by hand and put it in {folder}."
            )
        os.replace(part, dest)
        _write_stamp(dest, info.hash)
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
            config = MODEL_CONFIGS.get(info.config_name)
        trusted = True
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
