"""Reading and writing model checkpoints safely.

* ``.safetensors`` files are read with safetensors; the architecture is stored as
  JSON in the file metadata under ``"napari_sam_config"`` (optional).
* ``.pth`` / ``.pt`` files (official SAM / MobileSAM checkpoints) are read with
  ``torch.load(weights_only=True)``: a pickle that references anything but
  tensors and plain containers is refused, nothing in it is executed.
"""

from __future__ import annotations

import json
import os
import pickletools
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, InvalidInputError
from .build import SamConfig, build_sam, config_from_state_dict
from .sam import Sam

CONFIG_METADATA_KEY = "napari_sam_config"

# modules whose globals a plain torch state-dict pickle may reference
_SAFE_GLOBAL_PREFIXES = ("torch", "collections.OrderedDict", "builtins.set", "_codecs.encode")


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
    strings: list[str] = []
    pos = 0
    complete = True
    # legacy torch files are several pickles in a row; scan until the data runs out
    while pos < len(data):
        try:
            last = 0
            for op, arg, at in pickletools.genops(data[pos:]):
                last = at
                if op.name == "GLOBAL":
                    found.add(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.add(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    strings.append("<memo>")
                elif isinstance(arg, str):
                    strings.append(arg)
                if op.name == "STOP":
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


def _unsafe_globals(globs: set[str]) -> list[str]:
    return sorted(g for g in globs if not g.startswith(_SAFE_GLOBAL_PREFIXES))


def _load_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc)
        if "Weights only load failed" in msg:
            globs, _complete = _pickle_globals(path)
            bad = _unsafe_globals(globs)
            if bad:
                raise CheckpointError(
                    f"Refused to load {path}: it is unsafe. The pickle references "
                    f"{', '.join(bad[:5])}, "
                    "which would run code when loaded. napari-sam only loads plain weights "
                    "(tensors); use a trusted checkpoint or a .safetensors file."
                ) from None
        raise CheckpointError(
            f"{_redownload_hint(path)} ({type(exc).__name__}: {msg[:200]})"
        ) from None


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], SamConfig | None]:
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


def _parse_config(raw: Any, path: Path) -> SamConfig:
    try:
        if isinstance(raw, str):
            raw = json.loads(raw)
        return SamConfig.from_dict(raw)
    except (ValueError, InvalidInputError) as exc:
        raise CheckpointError(f"invalid model configuration stored in {path}: {exc}") from None


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], SamConfig | None]:
    """Read a checkpoint file.

    Returns the state dict (CPU tensors, ``module.`` prefixes stripped, a
    ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper removed) and the stored
    :class:`SamConfig` if the file has one. Raises CheckpointError for missing,
    corrupt or unsafe files.
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
                f"{_redownload_hint(path)} ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
        config = None
        if CONFIG_METADATA_KEY in metadata:
            config = _parse_config(metadata[CONFIG_METADATA_KEY], path)
        return _unwrap(sd, path)[0], config
    return _unwrap(_load_torch(path), path)


def load_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = ""
) -> None:
    """Copy ``state_dict`` into ``model`` strictly; CheckpointError lists bad keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        where = f" {source}" if source else ""
        raise CheckpointError(f"checkpoint{where} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def model_from_checkpoint(path: str | os.PathLike, config: SamConfig | None = None) -> Sam:
    """Build a :class:`Sam` for a checkpoint and load its weights (CPU, eval mode).

    The architecture comes from ``config`` if given, else from the file's metadata,
    else it is inferred from parameter shapes.
    """
    sd, stored = load_state_dict(path)
    cfg = config or stored or config_from_state_dict(sd)
    model = build_sam(cfg)
    load_weights(model, sd, source=str(path))
    return model.eval()


def save_model(
    model: Sam, path: str | os.PathLike, extra_metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``model`` as ``.safetensors`` with its config in the metadata (atomic)."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = getattr(model, "config", None) or config_from_state_dict(sd)
    metadata = {str(k): str(v) for k, v in (extra_metadata or {}).items()}
    metadata[CONFIG_METADATA_KEY] = json.dumps(config.to_dict())
    metadata.setdefault("format", "pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; use normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
