"""Model zoo: named checkpoints, hash-checked downloads, device choice, loading.

``load_model()`` with no argument loads the small model embedded in the package
(``napari_sam/weights/default.safetensors``). The official checkpoints are
downloaded on first use into :func:`cache_dir` (``$NAPARI_SAM_CACHE``, else the
user cache folder); a download streams into ``<file>.part`` (resumed with an HTTP
Range request if interrupted), is checked against the published hash, then
renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DownloadError, InvalidInputError, ModelNotFoundError
from .build import MODEL_CONFIGS
from .checkpoint import model_from_checkpoint
from .sam import Sam

CACHE_ENV = "NAPARI_SAM_CACHE"
DEFAULT_MODEL = "default"
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
    """Folder for downloaded checkpoints: ``$NAPARI_SAM_CACHE`` or the user cache folder."""
    return _user_cache_dir()


def _user_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "napari-sam" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "napari-sam"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
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
        f"Could not download {info.filename} from {info.url}: {reason}. Check the network "
        f"connection and try again, or download the file by hand and put it in {folder} "
        f"(set {CACHE_ENV} to use another folder)."
    )


def _fetch(info: ModelInfo, part: Path, folder: Path, progress: bool) -> None:
    """Stream ``info.url`` into ``part``, resuming from its current size if possible."""
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
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _download_error(info, folder, reason) from None
    with response:
        status = getattr(response, "status", None) or response.getcode() or 200
        if offset and status != 206:
            offset = 0  # server ignored the Range request: start over
        length = response.headers.get("Content-Length")
        total = int(length) + offset if length and length.isdigit() else None
        bar = _Progress(progress, total, offset, info.filename)
        try:
            with open(part, "ab" if offset else "wb") as f:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as exc:
            raise _download_error(info, folder, getattr(exc, "reason", exc)) from None
        finally:
            bar.close()


def _file_digest(path: Path, expected: str) -> tuple[str, str]:
    h, digest = _hasher(expected)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest(), digest


def download_checkpoint(
    name: str, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Return the local path of zoo checkpoint ``name``, downloading it if needed.

    The download is hash-checked and atomic (``<file>.part`` renamed on success);
    an interrupted download resumes from the ``.part`` file. Raises DownloadError
    (no network, HTTP error, hash mismatch) with the URL and the folder where the
    file can be put by hand.
    """
    info = model_info(name)
    if not info.url:
        path = embedded_weights_path()
        if not path.is_file():
            raise _missing_embedded(path)
        return path
    folder = Path(cache_dir).expanduser() if cache_dir is not None else _user_cache_dir()
    dest = folder / info.filename
    if dest.is_file():
        return dest
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the cache folder {folder}: {exc}") from None
    part = dest.with_name(dest.name + ".part")
    _fetch(info, part, folder, progress)
    got, want = _file_digest(part, info.hash)
    if got != want:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{info.filename} downloaded from {info.url} has the wrong hash (expected {want}, "
            f"got {got}); the partial file was deleted. Try again, or download the file by "
            f"hand and put it in {folder}."
        )
    os.replace(part, dest)
    return dest


def _missing_embedded(path: Path) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"the embedded default model weights are missing ({path}); reinstall napari-sam, "
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
    """
    dev = resolve_device(device)
    key = DEFAULT_MODEL if name_or_path is None else name_or_path
    config = None
    if isinstance(key, str) and key in ZOO:
        info = ZOO[key]
        if key == DEFAULT_MODEL:
            path = embedded_weights_path()
            if not path.is_file():
                raise _missing_embedded(path)
        else:
            path = download_checkpoint(key)
            config = MODEL_CONFIGS.get(info.config_name)
    else:
        path = Path(key).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(
                f"{str(key)!r} is neither a model name nor an existing checkpoint file; "
                f"valid names: {', '.join(list_models())}"
            )
    model = model_from_checkpoint(path, config=config)
    return model.to(dev).eval()
