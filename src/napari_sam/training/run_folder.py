"""The run folder of a training run: checking it before training, resuming, checkpoints.

Files (in ``config.output_dir``): ``last.safetensors`` (model, with its config
and the step in the metadata), ``last_state.pt`` (optimizer state and step;
loaded with ``weights_only=True``), ``best.safetensors`` (best validation IoU),
``config.json`` and ``log.jsonl``. The AIS head, when the model has one, is
inside the model files; runs written before that kept the ``aux_dense`` head
in ``aux_head.pt``, which is read once on resume and then removed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from napari_sam._files import atomic_path
from napari_sam.errors import CheckpointError, InvalidInputError

from .config import RESUMABLE_CHANGES, SECTIONS, TrainConfig, _is_int, flat_settings
from .datasets import _short
from .dense_targets import add_ais_head

__all__ = ["AUX_HEAD_FILE", "append_log", "load_state", "load_weights", "prepare_output_dir",
           "save_model", "save_state"]

log = logging.getLogger("napari_sam.training")


def save_model(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write ``model`` to ``path`` (safetensors with its config; atomic)."""
    from napari_sam.models import checkpoint

    checkpoint.save_model(model, path, extra_metadata=metadata)


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`napari_sam._files.atomic_path`):
    ``path`` holds the previous file or the new one, never a partial one."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_state(state: dict[str, Any], path: Path) -> None:
    """Write a ``last_state.pt`` (step, best score, optimizer state; atomic)."""
    save_torch(state, path)


def _names(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(sorted(keys)[:n])
    return shown + (", ..." if len(keys) > n else "")


def _state_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]
                    ) -> str:
    """One short line on how ``found`` tensor shapes differ from ``expected`` ("" if they fit)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (e.g. {_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {_names(unexpected)})")
    if reshaped:
        k = sorted(reshaped)[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {k}: {tuple(found[k])} in the "
                     f"file, {tuple(expected[k])} in the model)")
    return "; ".join(parts)


def load_weights(model: torch.nn.Module, path: Path, legacy_head: Path | None = None
                 ) -> dict[str, str]:
    """Load a ``last.safetensors`` written by this loop; returns its metadata.

    The tensors' names and shapes are compared with the model's first, so a
    file of another architecture gives a one-line summary, not a list of
    every parameter. ``legacy_head`` (given when the run trains the model's AIS
    head): an older run's ``aux_head.pt``, read as the ``ais_head.*`` tensors
    when the file has none.

    Raises:
      CheckpointError: the file is unreadable or of another architecture.
      InvalidInputError: the run trains a head, but neither the file nor
        ``legacy_head`` has one (it was trained without).
    """
    from napari_sam.models import checkpoint

    advice = "pass --overwrite to start over there, or choose another output folder."
    try:  # truncated or not a safetensors file
        meta = checkpoint.read_metadata(path)
        state_dict, _ = checkpoint.load_state_dict(path)
    except CheckpointError:
        raise CheckpointError(f"Cannot resume from {path}: unreadable (truncated, or not a "
                              f"safetensors file); {advice}") from None
    has_head = any(k.startswith("ais_head.") for k in state_dict)
    if legacy_head is not None and not has_head:
        if not legacy_head.is_file():
            raise InvalidInputError(
                f"Cannot resume the run in {path.parent}: it was trained without --aux-dense "
                f"or --head-only ({path.name} has no AIS head and there is no "
                f"{legacy_head.name}): leave --aux-dense out (or 0), or pass --overwrite to "
                "start over there.")
        state_dict.update(_legacy_head_tensors(legacy_head))
    elif has_head and getattr(model, "ais_head", None) is None:
        # a head this run does not train (e.g. config.json from another run): keep it frozen,
        # so that the optimizer-state check below names the real difference
        hidden = _head_width(meta)
        if hidden:
            add_ais_head(model, hidden).requires_grad_(False)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatch = _state_mismatch(expected, {k: tuple(v.shape) for k, v in state_dict.items()})
    if mismatch:
        raise CheckpointError(
            f"Cannot resume from {path}: its weights do not fit the model of this run "
            f"({mismatch}); {advice}"
        )
    checkpoint.load_weights(model, state_dict, source=str(path))
    return meta


def _head_width(meta: dict[str, str]) -> int:
    """``ais_head_hidden`` of the model config in a checkpoint's metadata (0: none or unknown)."""
    from napari_sam.models.checkpoint import CONFIG_METADATA_KEY

    try:
        return int(json.loads(meta[CONFIG_METADATA_KEY]).get("ais_head_hidden", 0))
    except (KeyError, ValueError, TypeError, AttributeError):
        return 0


def _legacy_head_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The ``ais_head.*`` tensors of an older run's ``aux_head.pt`` (the head's state dict)."""
    from napari_sam.models.checkpoint import load_torch_file

    try:
        head = load_torch_file(path)
    except CheckpointError as err:
        raise CheckpointError(f"Cannot resume: {path} (the AIS head of this run) is unreadable "
                              f"({_short(str(err), 200)}); pass --overwrite to start over "
                              "there.") from None
    if not isinstance(head, dict) or not all(isinstance(v, torch.Tensor) for v in head.values()):
        raise CheckpointError(f"Cannot resume: {path} is not the head state that napari-sam "
                              "train wrote; pass --overwrite to start over there.")
    return {f"ais_head.{k}": v for k, v in head.items()}


def load_state(path: Path) -> dict[str, Any]:
    """Load a ``last_state.pt`` safely (tensors and plain containers only) and check its keys."""
    from napari_sam.models.checkpoint import load_torch_file

    try:
        state = load_torch_file(path)  # weights_only, with napari-sam's messages
    except CheckpointError as err:  # a refused pickle (nothing ran), or a damaged file
        raise CheckpointError(
            f"Cannot resume: {path} is not an optimizer state written by napari-sam train "
            f"({_short(str(err), 300)}); pass --overwrite to start over there, or choose "
            "another output folder."
        ) from None
    if not (isinstance(state, dict) and _is_int(state.get("step"))
            and isinstance(state.get("optimizer"), dict)):
        raise CheckpointError(
            f"Cannot resume from {path}: it lacks the step and optimizer state that napari-sam "
            "train writes; pass --overwrite to start over there, or choose another output folder."
        )
    return state

#: files a run writes into its folder
_RUN_FILES = ("config.json", "log.jsonl", "last.safetensors", "last_state.pt",
              "last_state.pt.tmp", "best.safetensors", "aux_head.pt", "aux_head.pt.tmp")


def _comparable(key: str, value: Any) -> Any:
    """A value of config.json in a form that compares equal across runs (paths resolved)."""
    value = json.loads(json.dumps(value))  # tuples -> lists, as in config.json
    if key in ("data", "init", "val_ids", "model") and isinstance(value, str):
        path = Path(value).expanduser()
        if path.exists():
            return str(path.resolve())
    return value


def _setting_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"name: old -> new"`` for settings that differ and may not change on resume."""
    defaults = TrainConfig().to_dict()
    changes = []
    for key in sorted(set(saved) | set(new)):
        if key in RESUMABLE_CHANGES:
            continue
        if key == "model" and saved.get("init") and new.get("init"):
            continue  # the architecture comes from the init checkpoint
        old, now = saved.get(key, defaults.get(key)), new.get(key, defaults.get(key))
        if _comparable(key, old) != _comparable(key, now):
            changes.append(f"{key}: {_short(old, 40)} -> {_short(now, 40)}")
    return changes


def _read_run_config(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and set(saved) & set(SECTIONS):  # nested: flatten
        try:
            saved = flat_settings(saved)
        except InvalidInputError:
            saved = None
    if not isinstance(saved, dict) or not {"data", "steps", "lr"} <= set(saved):
        raise InvalidInputError(
            f"{path} exists and is not a napari-sam training config; choose another output "
            "folder (or pass --overwrite to replace the files of a run there)."
        )
    return saved


def prepare_output_dir(config: TrainConfig, overwrite: bool) -> bool:
    """Check (or clear) ``config.output_dir`` before training; True if a run resumes there.

    Raises:
      InvalidInputError: the folder holds a run with other settings, or files
        of a run that are not napari-sam's, and ``overwrite`` is False.
      CheckpointError: the folder's checkpoint is incomplete.
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"output folder {out} is a file; choose another output folder.")
    present = [name for name in _RUN_FILES if (out / name).exists()]
    if overwrite:
        for name in present:
            (out / name).unlink()
        if present:
            log.info("starting over in %s (--overwrite: removed %s)", out, ", ".join(present))
        return False
    if not present:
        return False
    if not (out / "config.json").is_file():
        raise InvalidInputError(
            f"{out} holds {', '.join(present)} but no config.json, so it cannot be resumed "
            "safely; choose another output folder, or pass --overwrite to start over there."
        )
    saved = _read_run_config(out / "config.json")
    changes = _setting_changes(saved, config.to_dict())
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4
                                          else "")
        raise InvalidInputError(
            f"{out} holds a run with other settings ({shown}); rerun with its settings to "
            "resume it, choose another output folder, or pass --overwrite to start over there."
        )
    last, state = out / "last.safetensors", out / "last_state.pt"
    if last.is_file() != state.is_file():
        have, lack = (last, state) if last.is_file() else (state, last)
        raise CheckpointError(
            f"{out} has {have.name} but no {lack.name}, so the run cannot be resumed; pass "
            "--overwrite to start over there (or copy the weights elsewhere first)."
        )
    if not last.is_file():  # ended before its first checkpoint: nothing to keep
        (out / "log.jsonl").unlink(missing_ok=True)
        return False
    return True


AUX_HEAD_FILE = "aux_head.pt"


def append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")

