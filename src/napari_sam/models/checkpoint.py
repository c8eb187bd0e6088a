"""Reading and writing model checkpoints safely.

* ``.safetensors`` files are read with safetensors; the architecture is stored as
  JSON in the file metadata under ``"napari_sam_config"`` (optional).
* ``.pth`` / ``.pt`` files (official SAM / MobileSAM / EfficientSAM checkpoints, the
  latter ``{"model": state_dict}``) are read with
  ``torch.load(weights_only=True)``: a pickle that references anything but
  tensors and plain containers is refused, nothing in it is executed.
* Before a model is built, the tensors (names and shapes) are compared with the
  architecture on a bodiless (``meta`` device) model, so a small file cannot make
  the loader allocate the memory of a large architecture it only declares; a
  file whose tensors hold NaN or inf is refused.
"""

from __future__ import annotations

import functools
import json
import os
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_sam._files import atomic_path

from ..errors import CheckpointError, InvalidInputError
from .build import (
    EfficientSamConfig,
    ModelConfig,
    TinyViTEncoderConfig,
    ViTEncoderConfig,
    build_sam,
    config_from_dict,
    config_from_state_dict,
)
from .efficient_sam import EfficientSam
from .sam import Sam

CONFIG_METADATA_KEY = "napari_sam_config"

# error messages stay one line of bounded length: lists of keys and quoted
# exception texts are cut to these sizes
_MAX_LISTED = 5
_MAX_QUOTED = 200

# globals a plain state-dict pickle references, used when torch's own list is not available
_FALLBACK_SAFE_GLOBALS = frozenset({
    "collections.OrderedDict", "builtins.set", "_codecs.encode", "torch.Size", "torch.device",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2", "torch.nn.parameter.Parameter",
    "torch.storage.TypedStorage", "torch.storage.UntypedStorage",
    "torch.serialization._get_layout",
})
_FALLBACK_SAFE_CLASSES = re.compile(
    r"torch\.(cuda\.|sparse\.|cuda\.sparse\.)?[A-Za-z0-9]+(Storage|Tensor)"
)


def _shorten(text: str, limit: int = _MAX_QUOTED) -> str:
    """``text`` on one line, cut to ``limit`` characters (``...`` marks a cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listing(items: list[str], limit: int = _MAX_LISTED) -> str:
    """The first ``limit`` items, comma-separated, with a count of the rest."""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(_shorten(i, 120) for i in items[:limit]) + more


def _redownload_hint(path: Path) -> str:
    return (
        f"The file {path} is truncated or corrupt (an interrupted download?). Delete it and "
        "download it again (load_model / download_checkpoint fetch zoo models automatically)."
    )


def _pickle_globals(path: Path) -> tuple[set[str], bool]:
    """Globals referenced by the pickle(s) in a torch file, without unpickling.

    Returns (globals as "module.name", complete); ``complete`` is False when a
    pickle stream ends early (truncated file).
    """
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return set(), False
                data = zf.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return set(), False
    else:
        data = path.read_bytes()
    found: set[str] = set()
    pos = 0
    complete = True
    # legacy torch files are several pickles in a row; scan until the data runs out
    while pos < len(data):
        # the values pushed last (a string, or None for anything else) and the memo, enough
        # to name the (module, name) pair a STACK_GLOBAL takes from the stack
        pushed: list[str | None] = []
        memo: dict[int, str | None] = {}
        try:
            last = 0
            for op, arg, at in pickletools.genops(data[pos:]):
                last = at
                name = op.name
                if name == "GLOBAL":
                    found.add(str(arg).replace(" ", "."))
                    pushed.append(None)
                elif name == "STACK_GLOBAL":
                    module, attr = (pushed[-2:] if len(pushed) >= 2 else [None, None])
                    found.add(f"{module}.{attr}" if module and attr else "<unknown>")
                    pushed.append(None)
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(int(arg)))
                elif name not in ("FRAME", "PROTO"):
                    pushed.append(arg if isinstance(arg, str) else None)
                del pushed[:-4]
                if name == "STOP":
                    break
            else:
                complete = False
                break
            pos += last + 1
        except Exception:  # pickletools raises ValueError on truncated/garbage data
            if pos == 0:
                complete = False
            break  # trailing raw tensor bytes of a legacy file are not a pickle
    return found, complete


@functools.cache
def _torch_safe_globals() -> frozenset[str]:
    """"module.name" of every global ``torch.load(weights_only=True)`` accepts."""
    names: set[str] = set()
    try:  # torch's own list (private API; the fallback below covers its absence)
        from torch import _weights_only_unpickler

        names.update(_weights_only_unpickler._get_allowed_globals())
    except Exception:
        names.update(_FALLBACK_SAFE_GLOBALS)
    try:
        for obj in torch.serialization.get_safe_globals():
            obj = obj[0] if isinstance(obj, tuple) else obj
            names.add(f"{obj.__module__}.{obj.__qualname__}")
    except Exception:
        pass
    return frozenset(names)


def _is_safe_global(name: str) -> bool:
    if name in _torch_safe_globals() or name in _FALLBACK_SAFE_GLOBALS:
        return True
    if _FALLBACK_SAFE_CLASSES.fullmatch(name):
        return True
    module, _, attr = name.rpartition(".")
    # dtypes and quantisation schemes, e.g. torch.bfloat16 (pickled as globals)
    return module == "torch" and isinstance(
        getattr(torch, attr, None), torch.dtype | torch.qscheme
    )


def _unsafe_globals(globs: set[str]) -> list[str]:
    """The globals of a pickle that weights-only loading does not allow, sorted."""
    return sorted(g for g in globs if not _is_safe_global(g))


def _torch_refusal_reason(msg: str) -> str:
    """The one line of torch's weights-only refusal that says what was found.

    torch's full text also suggests ``weights_only=False``, which would run the
    file's code: that advice is never passed on.
    """
    for line in msg.splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            return _shorten(line[len("WeightsUnpickler error:") :].strip())
    return "it holds objects other than tensors and plain containers"


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with napari-sam's error messages.

    For any torch file napari-sam reads (checkpoints, a training run's optimizer
    state): CheckpointError says "unsafe" and names the globals when the pickle
    references anything beyond tensors and plain containers (nothing is run), or
    that the file is truncated or corrupt; never torch's advice to retry with
    ``weights_only=False``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    return _load_torch(path)


def _load_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc)
        if "Weights only load failed" in msg:
            globs, complete = _pickle_globals(path)
            bad = _unsafe_globals(globs)
            if bad:
                raise CheckpointError(
                    f"Refused to load {path}: it is unsafe. The pickle references "
                    f"{_listing(bad)}, which is not a tensor or plain container and could run "
                    "code when loaded; nothing was run. napari-sam only loads plain weights: "
                    "use a trusted checkpoint or a .safetensors file."
                ) from None
            if complete:
                raise CheckpointError(
                    f"Refused to load {path}: it is not a plain weights file "
                    f"({_torch_refusal_reason(msg)}); nothing was run. napari-sam only loads "
                    "plain weights: use a trusted checkpoint or a .safetensors file."
                ) from None
        raise CheckpointError(
            f"{_redownload_hint(path)} ({type(exc).__name__}: {_shorten(msg)})"
        ) from None


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    config = None
    if isinstance(obj, Mapping):
        raw_cfg = obj.get(CONFIG_METADATA_KEY)
        if isinstance(raw_cfg, Mapping):
            config = _parse_config(raw_cfg, path)
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not contain a state dict (found {type(obj).__name__})")
    sd = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            key = str(key)
            sd[key[len("module.") :] if key.startswith("module.") else key] = value
    if not sd:
        raise CheckpointError(f"{path} contains no tensors; it is not a model checkpoint")
    return sd, config


def _parse_config(raw: Any, path: Path) -> ModelConfig:
    try:
        if isinstance(raw, str):
            raw = json.loads(raw)
        return config_from_dict(raw)
    except (ValueError, InvalidInputError) as exc:
        raise CheckpointError(
            f"invalid model configuration stored in {path}: {_shorten(str(exc))}"
        ) from None


def load_state_dict(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    """Read a checkpoint file.

    Returns the state dict (CPU tensors, ``module.`` prefixes stripped, a
    ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper removed) and the stored
    config (SamConfig / EfficientSamConfig) if the file has one. Raises CheckpointError
    for missing, corrupt or unsafe files.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:
            raise CheckpointError(
                f"{_redownload_hint(path)} ({type(exc).__name__}: {_shorten(str(exc))})"
            ) from None
        config = None
        if CONFIG_METADATA_KEY in metadata:
            config = _parse_config(metadata[CONFIG_METADATA_KEY], path)
        return _unwrap(sd, path)[0], config
    return _unwrap(_load_torch(path), path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (``{}`` when it has none).

    Raises:
      CheckpointError: the file is missing, or not a readable safetensors file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: "
            f"{_shorten(str(exc))})"
        ) from None


def _fit_problems(own: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Differences between a model's state dict ``own`` and ``state_dict`` (names, shapes)."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    for label, keys in (
        ("shape mismatches", mismatched),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
    ):
        if keys:
            parts.append(f"{label}: {_listing(keys)}")
    return parts


def load_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = ""
) -> None:
    """Copy ``state_dict`` into ``model`` strictly; CheckpointError lists bad keys.

    The message names at most five keys of each kind (mis-shaped ones with both
    shapes) and counts the rest.
    """
    problems = _fit_problems(model.state_dict(), state_dict)
    if problems:
        where = f" {source}" if source else ""
        raise CheckpointError(f"checkpoint{where} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def _repeated_layers(cfg: ModelConfig) -> list[tuple[str, str, int]]:
    """(description, key pattern with the layer index as group 1, count) of each layer list."""
    if isinstance(cfg, EfficientSamConfig):
        return [
            ("image encoder blocks", r"image_encoder\.blocks\.(\d+)\.", cfg.depth),
            ("mask decoder layers", r"mask_decoder\.transformer\.layers\.(\d+)\.",
             cfg.decoder_depth),
            ("IoU head layers", r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.",
             cfg.iou_head_depth - 1),
            ("mask output heads", r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\.",
             cfg.num_multimask_outputs + 1),
            ("upscaling stages", r"mask_decoder\.final_output_upscaling_layers\.(\d+)\.",
             len(cfg.upscaling_dims)),
        ]
    enc = cfg.encoder
    layers: list[tuple[str, str, int]] = []
    if isinstance(enc, ViTEncoderConfig):
        layers.append(("image encoder blocks", r"image_encoder\.blocks\.(\d+)\.", enc.depth))
    elif isinstance(enc, TinyViTEncoderConfig):
        for i, depth in enumerate(enc.depths):
            layers.append(
                (f"blocks in TinyViT stage {i}", rf"image_encoder\.layers\.{i}\.blocks\.(\d+)\.",
                 depth)
            )
    layers += [
        ("mask decoder layers", r"mask_decoder\.transformer\.layers\.(\d+)\.", cfg.decoder_depth),
        ("IoU head layers", r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.",
         cfg.iou_head_depth),
        ("mask output heads", r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\.",
         cfg.num_multimask_outputs + 1),
    ]
    return layers


def check_fits(
    config: ModelConfig, state_dict: Mapping[str, torch.Tensor], source: str = "",
    config_origin: str = "the model",
) -> None:
    """Raise CheckpointError unless ``state_dict`` has exactly the tensors of ``config``.

    Nothing of the model's size is allocated: first the number of blocks/layers the
    config declares is compared with the layer indices among the keys (so building
    cannot take time in proportion to a declared depth), then the model is built on
    the ``meta`` device (shapes only, no memory) and its tensor names and shapes are
    compared with ``state_dict``. ``config_origin`` names where ``config`` came from
    in the message (e.g. "the architecture stored in its metadata").
    """
    where = f"checkpoint {source}" if source else "the checkpoint"
    for label, pattern, declared in _repeated_layers(config):
        rx = re.compile(pattern)
        found = {int(m.group(1)) for k in state_dict if (m := rx.match(k))}
        if found != set(range(declared)):
            held = str(len(found)) if found == set(range(len(found))) else (
                f"{len(found)} (indices {_listing([str(i) for i in sorted(found)])})"
            )
            raise CheckpointError(
                f"{where} does not fit {config_origin}: that declares {declared} {label}, "
                f"the file holds tensors for {held}. The file is damaged or its config does "
                "not describe its weights; use another checkpoint."
            )
    with torch.device("meta"):
        skeleton = build_sam(config)
    problems = _fit_problems(skeleton.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"{where} does not fit {config_origin}: " + "; ".join(problems))


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Raise CheckpointError if a floating-point tensor holds NaN or inf.

    Such weights make every prediction NaN (empty masks, NaN scores): the file is
    damaged, or the training that wrote it diverged.
    """
    bad = [
        k for k, t in state_dict.items()
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        where = f"checkpoint {source}" if source else "the checkpoint"
        raise CheckpointError(
            f"{where} holds NaN or infinite weights in {len(bad)} tensor(s): {_listing(bad)}. "
            "The file is damaged or its training diverged; use another checkpoint (e.g. an "
            "earlier one of the run)."
        )


def model_from_checkpoint(
    path: str | os.PathLike, config: ModelConfig | None = None, trusted: bool = False
) -> Sam | EfficientSam:
    """Build a :class:`Sam` / EfficientSam for a checkpoint and load its weights (CPU, eval).

    The architecture comes from ``config`` if given, else from the file's metadata,
    else it is inferred from parameter shapes. The tensors are checked against it
    (:func:`check_fits`, :func:`check_finite`) before the model is built, so a bad
    file raises CheckpointError without allocating the architecture's memory.

    ``trusted=True`` skips those two checks for files known to fit ``config`` (the
    embedded model, a hash-verified zoo download): the first :func:`check_fits` of
    a process costs one to a few seconds of CPU while torch loads its meta-device
    kernels. The weights are still loaded strictly (names and shapes).
    """
    sd, stored = load_state_dict(path)
    if config is not None:
        cfg, origin = config, "the model's architecture"
    elif stored is not None:
        cfg, origin = stored, f"the architecture stored in its metadata ({CONFIG_METADATA_KEY})"
    else:
        cfg, origin = config_from_state_dict(sd), "the architecture inferred from its tensors"
    if not trusted:
        check_fits(cfg, sd, source=str(path), config_origin=origin)
        check_finite(sd, source=str(path))
    model = build_sam(cfg)
    load_weights(model, sd, source=str(path))
    return model.eval()


def save_model(
    model: Sam | EfficientSam,
    path: str | os.PathLike,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` as ``.safetensors`` with its config in the metadata (atomic)."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = getattr(model, "config", None) or config_from_state_dict(sd)
    metadata = {str(k): str(v) for k, v in (extra_metadata or {}).items()}
    metadata[CONFIG_METADATA_KEY] = json.dumps(config.to_dict())
    metadata.setdefault("format", "pt")
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
    return path
