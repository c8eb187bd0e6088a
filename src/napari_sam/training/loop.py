"""SAM training loop: interactive prompt simulation on instance datasets.

One step:

1. draw ``batch_size`` images (order depends only on ``(seed, step)``), take a
   random view of each (:meth:`InstanceDataset.sample`) and encode them in one
   image-encoder call;
2. pick up to ``instances_per_image`` objects per image; each is prompted
   first with a point (multimask output, best-of-3 loss) or a noisy box, then
   ``rounds - 1`` correction rounds add a point in the error region and feed
   the previous low-res logits back as the mask prompt (the last
   ``mask_only_rounds`` add no point). Each round is one batched mask-decoder
   call over all objects of all images;
3. each round's loss is back-propagated right away into a detached copy of
   the image embeddings (so only one decoder graph is alive at a time), and
   the accumulated embedding gradient is back-propagated through the image
   encoder once at the end.

Checkpoints go to ``output_dir``: ``last.safetensors`` (model, with its config
and the step in the metadata), ``last_state.pt`` (optimizer state and step;
load with ``weights_only=True``), ``best.safetensors`` (best validation IoU),
``config.json`` and ``log.jsonl`` (one JSON object per logged step).

Resume: a run resumes from ``last.*`` when the folder holds a run with the
same settings (``config.json``; only :data:`RESUMABLE_CHANGES` such as
``steps`` may differ). A folder holding a run with other settings (another
``init`` or architecture, ...), or files that are not a run's, is refused
unless ``overwrite=True``, which deletes the run's files and starts over;
``config.json`` therefore always describes the weights in the folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.errors import CancelledError, CheckpointError, InvalidInputError

from .augment import AugmentConfig
from .datasets import InstanceDataset, Sample
from .losses import SamLoss, object_windows, sam_loss, soft_targets
from .prompts import (
    boxes_from_masks,
    correction_points,
    innermost_points,
    instance_masks,
    jitter_boxes,
    sample_instances,
    sample_points_in_masks,
)

__all__ = [
    "RESUMABLE_CHANGES",
    "TrainConfig",
    "build_model",
    "config_problems",
    "load_ids",
    "run_rounds",
    "train",
    "validate_config",
]

ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on (saved as ``config.json``).

    Model: ``init`` (a checkpoint path or zoo name) is fine-tuned when given;
    otherwise a randomly initialised model is built from ``model`` (a
    ``SamConfig``, its ``to_dict()``, a ``MODEL_CONFIGS`` name or a JSON file).
    """

    data: str = ""
    output_dir: str = "runs/sam"
    model: Any = "vit_t"
    init: str | None = None
    val_ids: str | None = None  # JSON file: list of ids, or {"train": [...], "val": [...]}
    train_ids: list[str] | None = None  # default: all ids of the data minus the val ids
    steps: int = 1000
    batch_size: int = 4  # images per step
    instances_per_image: int = 8
    rounds: int = 3  # 1 first prompt + (rounds - 1) correction rounds
    mask_only_rounds: int = 0  # of the correction rounds, the last ones add no point
    box_prob: float = 0.5  # probability that an object's first prompt is a box
    point_mode: str = "interior"  # correction clicks, see prompts.correction_points
    decoder_chunk: int = 8  # objects per mask-decoder call (small chunks are faster on CPU)
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    schedule: str = "cosine"  # "cosine", "step" (x0.1 at 2/3 and 8/9) or "constant"
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0  # max gradient norm, 0 disables
    freeze_encoder: bool = False
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float = 0.25  # weight of positive pixels in the focal loss (< 0: none)
    focal_gamma: float = 2.0
    # ramp the focal weight linearly from 0 over the first N steps (0: off). Small objects
    # (nuclei) otherwise push a model trained from scratch into predicting empty masks first.
    focal_ramp_steps: int = 0
    # curriculum for small objects trained from scratch: for the first
    # ``loss_window_steps`` steps the mask losses count only a window of
    # ``loss_window`` x each object's box (0: off, SAM's whole-map loss); with
    # ``loss_window_end`` > 0 the factor grows geometrically to it over those steps
    loss_window: float = 0.0
    loss_window_steps: int = 0
    loss_window_end: float = 0.0
    full_view_prob: float = 0.5
    scale_range: tuple[float, float] = (0.5, 2.0)
    augment: bool = True
    min_area: int = 8  # objects smaller than this (model pixels) are not prompted
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    val_every: int = 0  # 0: no validation during training
    val_images: int = 16
    num_threads: int | None = None
    cache_images: bool = False  # keep decoded images in memory (~1 GB for DSB 2018)
    # weight of the dense auxiliary loss on the image embedding (training/dense_targets.py;
    # 0: off). Its head is saved as aux_head.pt beside the checkpoints, not in the model.
    aux_dense: float = 0.0

    def loss_kwargs(self, step: int | None = None) -> dict[str, float]:
        """Keyword arguments of :func:`~napari_sam.training.losses.sam_loss` at ``step``."""
        ramp = 1.0
        if step is not None and self.focal_ramp_steps > 0:
            ramp = min(1.0, step / self.focal_ramp_steps)
        window = 0.0
        if step is not None and self.loss_window > 0 and step < self.loss_window_steps:
            window = self.loss_window
            if self.loss_window_end > 0:
                t = step / self.loss_window_steps
                window = self.loss_window * (self.loss_window_end / self.loss_window) ** t
        return {
            "focal_weight": self.focal_weight * ramp,
            "dice_weight": self.dice_weight,
            "iou_weight": self.iou_weight,
            "focal_alpha": self.focal_alpha,
            "focal_gamma": self.focal_gamma,
            "loss_window": window,
        }

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if hasattr(self.model, "to_dict"):
            d["model"] = self.model.to_dict()
        return d


#: integer settings and their smallest valid value
_MIN_INT = {
    "steps": 1, "batch_size": 1, "instances_per_image": 1, "rounds": 1, "mask_only_rounds": 0,
    "warmup_steps": 0, "seed": 0, "checkpoint_every": 1, "log_every": 1, "val_every": 0,
    "val_images": 1, "min_area": 0, "focal_ramp_steps": 0, "decoder_chunk": 1,
    "loss_window_steps": 0,
}
#: float settings: (lowest, highest, lowest excluded); None = unbounded
_FLOAT_RANGE: dict[str, tuple[float | None, float | None, bool]] = {
    "lr": (0.0, None, True), "weight_decay": (0.0, None, False), "box_prob": (0.0, 1.0, False),
    "grad_clip": (0.0, None, False), "min_lr_ratio": (0.0, 1.0, False),
    "full_view_prob": (0.0, 1.0, False), "focal_weight": (0.0, None, False),
    "dice_weight": (0.0, None, False), "iou_weight": (0.0, None, False),
    "focal_alpha": (None, 1.0, False), "focal_gamma": (0.0, None, False),
    "loss_window": (0.0, None, False), "loss_window_end": (0.0, None, False),
}
_CHOICES = {"schedule": ("cosine", "step", "constant"),
            "point_mode": ("uniform", "center", "interior")}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool) and math.isfinite(float(value))


def config_problems(config: TrainConfig) -> list[tuple[str, str]]:
    """Settings of ``config`` that cannot train: ``[(field, what is wrong), ...]``.

    Empty when every value is usable. Checked before anything is built or
    written, so that a bad value never produces a checkpoint.
    """
    out: list[tuple[str, str]] = []
    if not config.data:
        out.append(("data", "is required (the dataset folder)"))
    for name, low in _MIN_INT.items():
        value = getattr(config, name, low)
        if not _is_int(value) or value < low:
            out.append((name, f"must be an integer >= {low}, got {value!r}"))
    for name, (low, high, open_low) in _FLOAT_RANGE.items():
        value = getattr(config, name, 0.0)
        ok = _is_number(value)
        if ok and low is not None:
            ok = value > low if open_low else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            lo = "" if low is None else f"{'>' if open_low else '>='} {low:g}"
            hi = "" if high is None else f"<= {high:g}"
            bounds = " and ".join(b for b in (lo, hi) if b)
            out.append((name, f"must be a finite number {bounds}, got {value!r}"))
    if _is_int(config.rounds) and _is_int(config.mask_only_rounds) and (
        config.mask_only_rounds >= config.rounds
    ):
        out.append(("mask_only_rounds", f"must be less than rounds ({config.rounds}), got "
                                        f"{config.mask_only_rounds}"))
    if config.num_threads is not None and (not _is_int(config.num_threads)
                                           or config.num_threads < 1):
        out.append(("num_threads", f"must be an integer >= 1, got {config.num_threads!r}"))
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            out.append((name, f"must be one of {', '.join(choices)}, got "
                              f"{getattr(config, name)!r}"))
    scale = tuple(config.scale_range) if isinstance(config.scale_range, (list, tuple)) else ()
    if len(scale) != 2 or not all(_is_number(v) for v in scale) or not 0 < scale[0] <= scale[1]:
        out.append(("scale_range", f"must be two finite numbers 0 < MIN <= MAX, got "
                                   f"{config.scale_range!r}"))
    betas = tuple(config.betas) if isinstance(config.betas, (list, tuple)) else ()
    if len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
        out.append(("betas", f"must be two numbers in [0, 1), got {config.betas!r}"))
    return out


def validate_config(config: TrainConfig) -> None:
    """Raise :class:`InvalidInputError` naming the first unusable setting of ``config``."""
    problems = config_problems(config)
    if problems:
        name, text = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidInputError(f"TrainConfig.{name} {text}{more}.")


# ---------------------------------------------------------------------------- model


def build_model(model: Any = "vit_t", init: str | None = None) -> torch.nn.Module:
    """The model to train: ``init`` loaded (checkpoint path or zoo name) or built from ``model``."""
    if init:
        if Path(init).expanduser().is_file():
            from napari_sam.models.checkpoint import model_from_checkpoint

            return model_from_checkpoint(init)
        from napari_sam.models import zoo

        return zoo.load_model(init)
    from napari_sam.models.build import MODEL_CONFIGS, SamConfig, build_sam

    if isinstance(model, dict):
        model = SamConfig.from_dict(model)
    elif isinstance(model, (str, Path)) and str(model) not in MODEL_CONFIGS:
        path = Path(model)
        if not path.is_file():
            raise InvalidInputError(
                f"model {str(model)!r} is neither a config name ({sorted(MODEL_CONFIGS)}) "
                "nor a JSON config file."
            )
        model = SamConfig.from_dict(json.loads(path.read_text()))
    return build_sam(model)


def _save_model(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write ``model`` to ``path`` (safetensors with its config; atomic)."""
    from napari_sam.models.checkpoint import save_model

    save_model(model, path, extra_metadata=metadata)


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _load_weights(model: torch.nn.Module, path: Path) -> dict[str, str]:
    """Load a ``last.safetensors`` written by this loop; returns its metadata.

    The tensors' names and shapes are compared with the model's first, so a
    file of another architecture gives a one-line summary, not a list of
    every parameter.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    advice = "pass --overwrite to start over there, or choose another output folder."
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # truncated or not a safetensors file
        raise CheckpointError(f"Cannot resume from {path}: unreadable ({_short(exc)}); "
                              f"{advice}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatch = _state_mismatch(expected, shapes)
    if mismatch:
        raise CheckpointError(
            f"Cannot resume from {path}: its weights do not fit the model of this run "
            f"({mismatch}); {advice}"
        )
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as exc:
        raise CheckpointError(f"Cannot resume from {path}: {_short(exc, 200)}; {advice}") from None
    return meta


def _load_state(path: Path) -> dict[str, Any]:
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


#: settings that may differ when a run is resumed: they do not change what the
#: weights in the folder are (how long to train, how often to log and save)
RESUMABLE_CHANGES = frozenset({
    "steps", "output_dir", "checkpoint_every", "log_every", "val_every", "val_images",
    "num_threads", "cache_images",
})
#: files a run writes into its folder
_RUN_FILES = ("config.json", "log.jsonl", "last.safetensors", "last_state.pt",
              "last_state.pt.tmp", "best.safetensors")


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
    if not isinstance(saved, dict) or not {"data", "steps", "lr"} <= set(saved):
        raise InvalidInputError(
            f"{path} exists and is not a napari-sam training config; choose another output "
            "folder (or pass --overwrite to replace the files of a run there)."
        )
    return saved


def _prepare_output_dir(config: TrainConfig, overwrite: bool) -> bool:
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
            print(f"starting over in {out} (--overwrite: removed {', '.join(present)})",
                  file=sys.stderr)
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


# ------------------------------------------------------------------------ schedule


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate at ``step`` (0-based): linear warmup, then the decay schedule."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "step":
        n = sum(step >= config.steps * f for f in (2 / 3, 8 / 9))
        return config.lr * (0.1**n)
    span = max(1, config.steps - config.warmup_steps)
    t = min(1.0, (step - config.warmup_steps) / span)
    lo = config.lr * config.min_lr_ratio
    return lo + 0.5 * (config.lr - lo) * (1 + math.cos(math.pi * t))


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # no weight decay on norms, biases, position tables and prompt embeddings
        if p.ndim < 2 or "pos" in name or "embed.weight" in name or name.endswith("_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))


# -------------------------------------------------------------------------- data


def _id_list(value: Any, what: str, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(
        isinstance(i, (str, int)) and not isinstance(i, bool) for i in value
    ):
        raise InvalidInputError(
            f"{path}: {what} must be a list of image ids (strings or numbers), got "
            f"{_short(value, 40)}."
        )
    return [str(i) for i in value]


def load_ids(path: str | Path) -> tuple[list[str] | None, list[str]]:
    """Read an ids file: ``(train_ids or None, val_ids)``.

    Accepts a JSON list of validation ids, a JSON object with a ``"val"`` list
    (and optionally a ``"train"`` list), or a text file with one validation id
    a line. A file named ``.json``, or whose text starts with ``[`` or ``{``,
    must be valid JSON (it is never read as a text list).

    Raises:
      InvalidInputError: missing file, invalid JSON, or lists that are not
        lists of ids.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"ids file {str(path)!r} does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"{path}: cannot read the ids file ({err}).") from None
    looks_json = path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{")
    if not looks_json:
        return None, [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInputError(
            f"{path}: invalid JSON ({err.msg} at line {err.lineno} column {err.colno}); write a "
            'list of ids, {"val": [...], "train": [...]}, or a text file with one id a line.'
        ) from None
    if isinstance(data, list):
        return None, _id_list(data, "the list", path)
    if isinstance(data, dict) and "val" in data:
        # Descriptive keys ("dataset", "rule", "seed") are kept as documentation; an
        # unknown key holding a list is a misspelt split and must not be ignored.
        unknown = {key for key in set(data) - {"train", "val"} if isinstance(data[key], list)}
        if unknown:
            raise InvalidInputError(
                f"{path}: unknown list key(s) {', '.join(sorted(map(repr, unknown)))}; an ids "
                'object holds "val" and optionally "train" (other keys may only hold notes).'
            )
        train = data.get("train")
        return (None if train is None else _id_list(train, '"train"', path),
                _id_list(data["val"], '"val"', path))
    raise InvalidInputError(
        f"{path}: expected a list of ids or an object with a \"val\" list, got "
        f"{type(data).__name__}."
    )


def _image_order(n: int, seed: int, step: int, batch_size: int) -> list[int]:
    """Dataset indices of ``step``: epochs are seeded permutations of ``range(n)``."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch, 1]).permutation(n)
        out.append(int(perm[i]))
    return out


@dataclasses.dataclass
class ObjectBatch:
    """The objects prompted in one step, over all images of the batch.

    Attributes:
      image_index: (M,) index of each object's image in the embedding batch.
      gt: (M, S, S) bool ground-truth masks at model resolution.
      target: (M, L, L) float soft low-resolution targets.
      valid: (M, S, S) bool valid (unpadded) region of each object's image.
    """

    image_index: torch.Tensor
    gt: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor

    def select(self, rows: torch.Tensor) -> ObjectBatch:
        return ObjectBatch(
            self.image_index[rows], self.gt[rows], self.target[rows], self.valid[rows]
        )

    def __len__(self) -> int:
        return int(self.image_index.numel())


def collect_objects(
    samples: Sequence[Sample],
    k: int | None,
    low_res_size: int,
    generator: torch.Generator | None = None,
    min_area: int = 1,
) -> ObjectBatch:
    """Pick up to ``k`` objects per sample (all when ``k`` is None) into an :class:`ObjectBatch`."""
    index, gts, valids = [], [], []
    S = samples[0].labels.shape[-1]
    ar = torch.arange(S)
    for i, s in enumerate(samples):
        ids = sample_instances(s.labels, k if k is not None else 1 << 30, generator, min_area)
        if ids.numel() == 0:
            continue
        gts.append(instance_masks(s.labels, ids))
        h, w = s.input_size
        valid = (ar[:, None] < h) & (ar[None, :] < w)
        valids.append(valid.expand(ids.numel(), S, S))
        index.append(torch.full((ids.numel(),), i, dtype=torch.int64))
    if not gts:
        empty = torch.zeros(0, S, S, dtype=torch.bool)
        return ObjectBatch(
            torch.zeros(0, dtype=torch.int64),
            empty,
            torch.zeros(0, low_res_size, low_res_size),
            empty,
        )
    gt = torch.cat(gts)
    return ObjectBatch(torch.cat(index), gt, soft_targets(gt, low_res_size), torch.cat(valids))


# ------------------------------------------------------------------------- rounds


def run_rounds(
    model: torch.nn.Module,
    embeddings: torch.Tensor,
    objects: ObjectBatch,
    rounds: int,
    first: str = "point",
    mask_only_rounds: int = 0,
    point_mode: str = "interior",
    first_point: str = "uniform",
    box_noise: bool = True,
    generator: torch.Generator | None = None,
    rng: np.random.Generator | None = None,
    loss_kwargs: dict[str, float] | None = None,
    backward_scale: float | None = None,
) -> list[SamLoss]:
    """Simulate ``rounds`` interactive prompting rounds for ``objects``.

    Arguments:
      embeddings: (B, C, E, E) image embeddings; ``objects.image_index``
        indexes them. For training pass a leaf tensor that requires grad.
      first: ``"point"`` (multimask output, best-of-C loss) or ``"box"``.
      first_point: ``"uniform"`` in the mask, or ``"center"`` (innermost pixel).
      box_noise: jitter the tight box (SAM's box noise).
      loss_kwargs: keyword arguments of :func:`~napari_sam.training.losses.sam_loss`
        (weights, focal alpha/gamma).
      backward_scale: if given, ``loss.total * backward_scale`` of each round is
        back-propagated right after the round (training).

    Returns:
      one :class:`SamLoss` per round.
    """
    M = len(objects)
    S = objects.gt.shape[-1]
    if first == "point":
        if first_point == "center":
            rc = torch.from_numpy(innermost_points(objects.gt)).float()
            coords = rc.flip(-1)
        else:
            coords, _ = sample_points_in_masks(objects.gt, generator)
        points = coords[:, None, :]
        labels = torch.ones(M, 1, dtype=torch.int64)
        boxes = None
    elif first == "box":
        boxes = boxes_from_masks(objects.gt)
        if box_noise:
            boxes = jitter_boxes(boxes, (S, S), generator)
        points = torch.zeros(M, 0, 2)
        labels = torch.zeros(M, 0, dtype=torch.int64)
    else:
        raise InvalidInputError(f"first must be 'point' or 'box', got {first!r}")
    image_pe = model.prompt_encoder.get_dense_pe()
    emb = embeddings.index_select(0, objects.image_index)
    loss_kwargs = dict(loss_kwargs or {})
    factor = float(loss_kwargs.pop("loss_window", 0.0) or 0.0)
    if factor > 0:
        loss_kwargs["window"] = object_windows(objects.target, factor)
    mask_input = None
    out = []
    for r in range(rounds):
        if r > 0 and r < rounds - mask_only_rounds:
            pred = F.interpolate(mask_input, (S, S), mode="bilinear", align_corners=False)
            pred = (pred[:, 0] > 0) & objects.valid
            c, lab = correction_points(pred, objects.gt, point_mode, generator, rng)
            points = torch.cat([points, c[:, None]], 1)
            labels = torch.cat([labels, lab[:, None]], 1)
        multimask = first == "point" and r == 0
        sparse, dense = model.prompt_encoder(
            points=(points, labels) if points.shape[1] else None, boxes=boxes, masks=mask_input
        )
        if r > 0 and backward_scale is not None:
            # each round's backward frees the gather's graph: rebuild it
            emb = embeddings.index_select(0, objects.image_index)
        logits, iou_pred = model.mask_decoder(
            image_embeddings=emb,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        loss = sam_loss(logits, iou_pred, objects.target, **loss_kwargs)
        if backward_scale is not None:
            (loss.total * backward_scale).backward()
        chosen = logits.detach()[torch.arange(M), loss.best]
        mask_input = chosen[:, None]
        out.append(loss)
    return out


# --------------------------------------------------------------------------- train


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _summary(losses: list[SamLoss]) -> dict[str, float]:
    return {
        "loss": float(sum(float(x.total.detach()) for x in losses) / len(losses)),
        "focal": float(torch.stack([x.focal.mean() for x in losses]).mean()),
        "dice": float(torch.stack([x.dice.mean() for x in losses]).mean()),
        "iou_mse": float(torch.stack([x.iou_mse.mean() for x in losses]).mean()),
        "iou_first": float(losses[0].iou.mean()),
        "iou_last": float(losses[-1].iou.mean()),
    }


def _split_first_prompt(
    n: int, box_prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    is_box = torch.rand(n, generator=generator) < box_prob
    return torch.nonzero(~is_box).squeeze(1), torch.nonzero(is_box).squeeze(1)


def _prepare(config: TrainConfig) -> tuple[list[str], list[str]]:
    if not config.data:
        raise InvalidInputError("TrainConfig.data (the dataset folder) is required.")
    from .datasets import find_pairs

    all_ids = [t[0] for t in find_pairs(config.data)]
    val_ids: list[str] = []
    train_ids = config.train_ids
    if config.val_ids:
        file_train, val_ids = load_ids(config.val_ids)
        if train_ids is None:
            train_ids = file_train
    if train_ids is None:
        val_set = set(val_ids)
        train_ids = [i for i in all_ids if i not in val_set]
    overlap = set(train_ids) & set(val_ids)
    if overlap:
        raise InvalidInputError(f"{len(overlap)} ids are both in train and val ids.")
    return train_ids, val_ids


def train(
    config: TrainConfig,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    overwrite: bool = False,
) -> Path:
    """Train (or resume training) a SAM model; returns the path of ``last.safetensors``.

    Arguments:
      progress: called as ``progress(step, steps, metrics)`` after every step.
      cancel: polled before every step; when it returns True a checkpoint is
        written and :class:`~napari_sam.errors.CancelledError` is raised.
      overwrite: start over in an output folder that holds a run (its files
        are deleted first); otherwise such a run is resumed if its
        ``config.json`` has the same settings and refused if not.

    Raises:
      InvalidInputError: an unusable setting, or an output folder holding
        another run (see the module docstring).
      CheckpointError: the run to resume has a damaged or unsafe checkpoint.
    """
    validate_config(config)
    resume = _prepare_output_dir(config, overwrite)
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = build_model(config.model, config.init)
    model.train()
    if config.freeze_encoder:
        for p in model.image_encoder.parameters():
            p.requires_grad_(False)
        model.image_encoder.eval()
    S = int(model.image_encoder.img_size)
    L = int(model.prompt_encoder.mask_input_size[0])
    train_ids, val_ids = _prepare(config)
    aug = AugmentConfig() if config.augment else AugmentConfig.none()
    common = dict(
        img_size=S,
        low_res_size=L,
        pixel_mean=model.pixel_mean.flatten().tolist(),
        pixel_std=model.pixel_std.flatten().tolist(),
        cache=config.cache_images,
    )
    data = InstanceDataset(
        config.data,
        ids=train_ids,
        augment=aug,
        full_view_prob=config.full_view_prob,
        scale_range=tuple(config.scale_range),
        min_area=config.min_area,
        **common,
    )
    val = None
    if val_ids and config.val_every > 0:
        val = InstanceDataset(config.data, ids=val_ids[: config.val_images], **common)
    optimizer = _optimizer(model, config)
    aux_head = _aux_head(model, config, optimizer)

    # resume
    start, best = 0, -1.0
    last, state_path = out / "last.safetensors", out / "last_state.pt"
    if resume:
        meta = _load_weights(model, last)
        state = _load_state(state_path)
        if str(meta.get("step", "")) != str(state["step"]):
            raise CheckpointError(
                f"{last} (step {meta.get('step')}) and {state_path} (step {state['step']}) "
                "do not match (interrupted while saving?); pass --overwrite to start over there."
            )
        if aux_head is not None:
            _load_aux_head(aux_head, out / AUX_HEAD_FILE)
        optimizer.load_state_dict(state["optimizer"])
        start, best = int(state["step"]), float(state.get("best", -1.0))
        print(f"resuming from step {start} ({last})", file=sys.stderr)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    def save(step: int) -> None:
        meta = {"step": str(step), "train_config": json.dumps(config.to_dict())}
        torch.save(
            {"step": step, "best": best, "optimizer": optimizer.state_dict()},
            state_path.with_name(state_path.name + ".tmp"),
        )
        _save_model(model, last, meta)
        if aux_head is not None:
            _save_aux_head(aux_head, out / AUX_HEAD_FILE)
        os.replace(state_path.with_name(state_path.name + ".tmp"), state_path)

    params = [p for p in model.parameters() if p.requires_grad]
    if aux_head is not None:
        params += list(aux_head.parameters())
    log_path = out / "log.jsonl"
    tic = time.perf_counter()
    for step in range(start, config.steps):
        if cancel is not None and cancel():
            save(step)
            raise CancelledError(f"Training cancelled at step {step}; resume with the same config.")
        lr = learning_rate(config, step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        weights = config.loss_kwargs(step)
        metrics = train_step(
            model, data, config, step, params, optimizer, weights, aux_head=aux_head
        )
        metrics.update(step=step + 1, lr=lr, sec=time.perf_counter() - tic)
        tic = time.perf_counter()
        done = step + 1
        if val is not None and (done % config.val_every == 0 or done == config.steps):
            v = validate(model, val, config)
            metrics.update({f"val_{k}": x for k, x in v.items()})
            if v["iou_mean"] > best:
                best = v["iou_mean"]
                _save_model(model, out / "best.safetensors", {"step": str(done)})
            model.train()
            if config.freeze_encoder:
                model.image_encoder.eval()
        if done % config.log_every == 0 or done == config.steps or "val_loss" in metrics:
            _log(log_path, metrics)
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("step",))
            print(f"step {done}/{config.steps} {shown}", file=sys.stderr)
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)
        if progress is not None:
            progress(done, config.steps, metrics)
    if not last.is_file():
        save(start)
    return last


def train_step(
    model: torch.nn.Module,
    data: InstanceDataset,
    config: TrainConfig,
    step: int,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    weights: dict[str, float],
    aux_head: torch.nn.Module | None = None,
) -> dict[str, float]:
    """One optimisation step (see the module doc); returns its metrics.

    With ``aux_head`` (and ``config.aux_dense > 0``) the dense auxiliary loss
    of :mod:`.dense_targets` is added, weighted by ``config.aux_dense``.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng([config.seed, step, 2])
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    indices = _image_order(len(data), config.seed, step, config.batch_size)
    samples = [data.sample(i, rng, augment=config.augment) for i in indices]
    objects = collect_objects(
        samples, config.instances_per_image, data.low_res_size, gen, config.min_area
    )
    optimizer.zero_grad(set_to_none=True)
    if len(objects) == 0:
        return {"loss": float("nan"), "objects": 0}
    images = torch.stack([s.image for s in samples])
    t1 = time.perf_counter()
    if config.freeze_encoder:
        with torch.no_grad():
            emb = model.image_encoder(images)
        leaf = emb
    else:
        emb = model.image_encoder(images)
        leaf = emb.detach().requires_grad_(True)
    t2 = time.perf_counter()
    aux_value = None
    if aux_head is not None:
        aux_value = _aux_backward(aux_head, leaf, samples, data.low_res_size, config.aux_dense)
    t_aux = time.perf_counter() - t2
    point_rows, box_rows = _split_first_prompt(len(objects), config.box_prob, gen)
    groups: list[tuple[list[SamLoss], float]] = []
    n_total = len(objects)
    chunk = max(1, config.decoder_chunk)
    for first, rows in (("point", point_rows), ("box", box_rows)):
        for part in rows.split(chunk) if rows.numel() else ():
            w = part.numel() / n_total
            # scaled so that the step's loss is the mean over objects and rounds
            rounds = run_rounds(
                model,
                leaf,
                objects.select(part),
                config.rounds,
                first=first,
                mask_only_rounds=config.mask_only_rounds,
                point_mode=config.point_mode,
                generator=gen,
                rng=rng,
                loss_kwargs=weights,
                backward_scale=w / config.rounds,
            )
            groups.append((rounds, w))
    t3 = time.perf_counter()
    if not config.freeze_encoder and leaf.grad is not None:
        emb.backward(leaf.grad)
    if config.grad_clip > 0:
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
    else:
        gnorm = float("nan")
    optimizer.step()
    metrics = _merge(groups)
    if aux_value is not None:
        metrics.update(aux_dense=aux_value, t_aux=t_aux)
    t4 = time.perf_counter()
    metrics.update(
        objects=n_total,
        grad_norm=gnorm,
        t_data=t1 - t0,
        t_encoder=t2 - t1,
        t_decoder=t3 - t2 - t_aux,
        t_backward=t4 - t3,
    )
    return metrics


AUX_HEAD_FILE = "aux_head.pt"


def _aux_head(
    model: torch.nn.Module, config: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.nn.Module | None:
    """The dense auxiliary head when ``config.aux_dense > 0``; its parameters join ``optimizer``."""
    if not math.isfinite(config.aux_dense) or config.aux_dense < 0:
        raise InvalidInputError(
            f"aux_dense must be a finite weight >= 0 (0 = off), got {config.aux_dense}."
        )
    if config.aux_dense == 0:
        return None
    from .dense_targets import DenseHead

    head = DenseHead(int(model.prompt_encoder.embed_dim))
    optimizer.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0})
    return head


def _save_aux_head(head: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(head.state_dict(), tmp)
    os.replace(tmp, path)


def _load_aux_head(head: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"Cannot resume: {path} (the --aux-dense head) is missing; delete the output "
            "folder's last.* files to restart, or resume without --aux-dense."
        )
    head.load_state_dict(torch.load(path, weights_only=True))


def _aux_backward(
    head: torch.nn.Module,
    leaf: torch.Tensor,
    samples: Sequence[Sample],
    low_res_size: int,
    weight: float,
) -> float:
    """Back-propagate ``weight *`` the dense loss of ``head(leaf)`` (into ``leaf.grad`` when
    ``leaf`` requires grad, and into the head); returns the unweighted loss."""
    from .dense_targets import dense_loss, dense_targets_batch

    targets, valid = dense_targets_batch(
        [s.labels for s in samples], [s.input_size for s in samples], low_res_size
    )
    loss = dense_loss(head(leaf), targets, valid)
    (loss * weight).backward()
    return float(loss.detach())


def _merge(groups: list[tuple[list[SamLoss], float]]) -> dict[str, float]:
    """Object-weighted means of the metrics of several object groups."""
    out: dict[str, float] = {}
    for losses, w in groups:
        for k, v in _summary(losses).items():
            out[k] = out.get(k, 0.0) + w * v
    return out


@torch.no_grad()
def validate(
    model: torch.nn.Module, data: InstanceDataset, config: TrainConfig
) -> dict[str, float]:
    """Deterministic validation: whole images, every object, innermost first point.

    Returns the mean loss, IoU after the first point (``iou_first``), after the
    last round (``iou_last``), their mean over rounds (``iou_mean``) and the IoU
    of a tight box (``iou_box``), all at low resolution.
    """
    model.eval()
    weights = config.loss_kwargs()
    totals: dict[str, float] = {}
    n = 0
    for i in range(len(data)):
        s = data[i]
        objects = collect_objects([s], None, data.low_res_size, None, config.min_area)
        if len(objects) == 0:
            continue
        emb = model.image_encoder(s.image[None])
        pts = run_rounds(
            model,
            emb,
            objects,
            config.rounds,
            "point",
            point_mode="center",
            first_point="center",
            loss_kwargs=weights,
        )
        box = run_rounds(model, emb, objects, 1, "box", box_noise=False, loss_kwargs=weights)
        m = len(objects)
        vals = {
            "loss": float(pts[0].total),
            "iou_first": float(pts[0].iou.mean()),
            "iou_last": float(pts[-1].iou.mean()),
            "iou_mean": float(torch.stack([x.iou.mean() for x in pts]).mean()),
            "iou_box": float(box[0].iou.mean()),
        }
        for k, v in vals.items():
            totals[k] = totals.get(k, 0.0) + v * m
        n += m
    return {k: v / max(n, 1) for k, v in totals.items()}
