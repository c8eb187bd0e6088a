"""Model zoo: named checkpoints, downloads through pooch, device choice, loading.

``load_model()`` with no argument loads the small model embedded in the package
(``napari_sam/weights/default.safetensors``). The official checkpoints are
downloaded on first use with ``pooch.retrieve`` into :func:`cache_dir`
(``$NAPARI_SAM_CACHE``, else the user cache folder).

Downloads, the lock between processes and the verification of cached files
(published hashes, or trust on first use for EfficientSAM) live in
:mod:`napari_sam.models.download`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidInputError, ModelNotFoundError
from . import DEFAULT_MODEL  # its one definition (torch-free, for the widgets)
from .build import MODEL_CONFIGS
from .checkpoint import model_from_checkpoint
from .download import CACHE_ENV, _short, fetch
from .sam import Sam


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
    ``progress`` writes a progress bar (with tqdm) and the notes to stderr. See
    :mod:`napari_sam.models.download`.

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
    origin = "" if cache_dir is not None or not os.environ.get(CACHE_ENV) else (
        f" (from {CACHE_ENV})"
    )
    return fetch(info, folder / info.filename, progress, folder_origin=origin)


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
