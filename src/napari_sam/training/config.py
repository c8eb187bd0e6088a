"""The settings of a training run: :class:`TrainConfig` and its validation.

A :class:`TrainConfig` is saved as the run folder's ``config.json``; a run
resumes only when the saved settings match, except for
:data:`RESUMABLE_CHANGES`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from napari_sam.errors import InvalidInputError

__all__ = ["RESUMABLE_CHANGES", "TrainConfig", "config_problems", "validate_config"]


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


#: settings that may differ when a run is resumed: they do not change what the
#: weights in the folder are (how long to train, how often to log and save)
RESUMABLE_CHANGES = frozenset({
    "steps", "output_dir", "checkpoint_every", "log_every", "val_every", "val_images",
    "num_threads", "cache_images",
})
