"""The settings of a training run: :class:`TrainConfig`, its sections and its validation.

:class:`TrainConfig` groups about 40 settings into five sections:

============  ==================  ====================================================
attribute     section             what
============  ==================  ====================================================
``run``       :class:`RunConfig`  model, output folder, length, seed, logging, saving
``dataset``   :class:`DataConfig` dataset folder, ids, views and augmentation
``optim``     :class:`OptimConfig`  AdamW, learning-rate schedule, frozen encoder
``prompts``   :class:`PromptConfig` the simulated interactive prompting
``loss``      :class:`LossConfig` loss weights and curricula
============  ==================  ====================================================

Every setting keeps its flat name as well: ``TrainConfig(lr=1e-4, steps=10)``,
``config.lr`` and ``config.lr = ...`` reach ``config.optim.lr``, so code and
files written for the flat config keep working. Each field's ``metadata``
holds its help line and its valid values (``kind``, ``min``, ``max``,
``min_open``, ``choices``), from which :func:`config_problems` checks a
config and the CLI can build its options::

    for section, f in setting_fields():
        f.name, f.metadata["help"], f.metadata.get("min"), f.default

``config.json`` stays flat (:meth:`TrainConfig.to_dict`), as written by
earlier versions; :meth:`TrainConfig.from_dict` reads flat and nested
(:meth:`TrainConfig.to_nested_dict`) dictionaries. A run resumes only when
its saved settings match, except for :data:`RESUMABLE_CHANGES`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from napari_sam.errors import InvalidInputError

__all__ = [
    "RESUMABLE_CHANGES",
    "SECTIONS",
    "DataConfig",
    "LossConfig",
    "OptimConfig",
    "PromptConfig",
    "RunConfig",
    "TrainConfig",
    "config_problems",
    "flat_settings",
    "setting_fields",
    "validate_config",
]


def _setting(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - argparse's name
    *,
    kind: Any = None,
    min: float | None = None,  # noqa: A002
    max: float | None = None,  # noqa: A002
    min_open: bool = False,
    choices: tuple[str, ...] | None = None,
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its help line and valid values in ``metadata``.

    ``kind`` is int, float, str, bool or None (checked elsewhere: paths, pairs,
    the model); ``min``/``max`` bound numbers (``min_open``: ``min`` excluded).
    """
    if kind is None and default is not dataclasses.MISSING and default is not None:
        kind = type(default) if type(default) in (int, float, str, bool) else None
    meta = {"help": help, "kind": kind, "min": min, "max": max, "min_open": min_open,
            "choices": choices}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class RunConfig:
    """The model, the run folder, how long to train, and how often to log, save and validate.

    Model: ``init`` (a checkpoint path or zoo name) is fine-tuned when given;
    otherwise a randomly initialised model is built from ``model`` (a
    ``SamConfig``, its ``to_dict()``, a ``MODEL_CONFIGS`` name or a JSON file).
    """

    output_dir: str = _setting("runs/sam", "run folder for checkpoints, config.json and "
                               "log.jsonl")
    model: Any = _setting("vit_t", "architecture of a model trained from scratch (a config "
                          "name, a SamConfig, its dict or a JSON file)")
    init: str | None = _setting(None, "model to start from: a zoo name or a checkpoint file")
    steps: int = _setting(1000, "training steps (optimizer updates) in all, counting a "
                          "resumed run's", min=1)
    batch_size: int = _setting(4, "images per step", min=1)
    seed: int = _setting(0, "random seed (image order, crops, prompts), >= 0", min=0)
    checkpoint_every: int = _setting(100, "write last.safetensors every N steps (and at the "
                                     "end)", min=1)
    log_every: int = _setting(10, "append a line to log.jsonl (and stderr) every N steps", min=1)
    val_every: int = _setting(0, "validate on the --val-ids images every N steps (0: never)",
                              min=0)
    val_images: int = _setting(16, "validation images used (the first N of --val-ids)", min=1)
    num_threads: int | None = _setting(None, "torch threads (default: torch's choice)",
                                       kind=int, min=1)


@dataclasses.dataclass
class DataConfig:
    """The dataset, the train/validation split, and how training views are drawn."""

    data: str = _setting("", "dataset folder (images/ + labels/, or x.png + x_labels.tif)")
    val_ids: str | None = _setting(None, 'ids file: a JSON list of validation ids, '
                                   '{"val": [...], "train": [...]}, or one id a line')
    train_ids: list[str] | None = _setting(None, "training ids (default: all ids of the data "
                                           "minus the validation ids)")
    full_view_prob: float = _setting(0.5, "probability that a training view shows the whole "
                                     "image, not a crop", min=0.0, max=1.0)
    scale_range: tuple[float, float] = _setting((0.5, 2.0), "zoom range of random crops, 1 = "
                                                "native resolution")
    augment: bool = _setting(True, "flips, rotations and intensity changes")
    augment_preset: str = _setting("basic", "augmentation families: basic (flips, rotations, "
                                   "gamma, contrast, inversion, blur, noise) or general (basic "
                                   "plus zoom 0.25-4x, brightfield and H&E-like looks, "
                                   "anisotropic blur and noise, 16-bit and float ranges; "
                                   "napari_sam.training.augment)",
                                   choices=("basic", "general"))
    min_area: int = _setting(8, "objects smaller than this many model-input pixels are not "
                             "prompted", min=0)
    cache_images: bool = _setting(False, "keep decoded images in memory (faster epochs; ~1 GB "
                                  "for DSB 2018)")


@dataclasses.dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (:mod:`napari_sam.training.optim`)."""

    lr: float = _setting(3e-4, "peak learning rate (AdamW)", min=0.0, min_open=True)
    weight_decay: float = _setting(0.1, "AdamW weight decay (not applied to norms, biases, "
                                   "embeddings)", min=0.0)
    betas: tuple[float, float] = _setting((0.9, 0.999), "AdamW betas, two numbers in [0, 1)")
    warmup_steps: int = _setting(50, "steps of linear learning-rate warm-up", min=0)
    schedule: str = _setting("cosine", "learning-rate decay after warm-up: cosine, step (x0.1 "
                             "at 2/3 and 8/9 of the steps) or constant",
                             choices=("cosine", "step", "constant"))
    min_lr_ratio: float = _setting(0.05, "final learning rate of the cosine schedule, as a "
                                   "fraction of --lr", min=0.0, max=1.0)
    grad_clip: float = _setting(1.0, "clip the gradient norm to this (0: off)", min=0.0)
    freeze_encoder: bool = _setting(False, "train the prompt encoder and mask decoder only")
    head_only: bool = _setting(False, "train the AIS head only (one is added to a model that "
                               "has none): the encoder runs without gradients, the prompt "
                               "encoder and mask decoder stay as they are, and the only loss "
                               "is the dense one (no prompt simulation)")


@dataclasses.dataclass
class PromptConfig:
    """The simulated interactive prompting (:mod:`napari_sam.training.simulation`)."""

    instances_per_image: int = _setting(8, "objects prompted per image and step", min=1)
    rounds: int = _setting(3, "prompting rounds per object: the first prompt plus correction "
                           "clicks", min=1)
    mask_only_rounds: int = _setting(0, "of the correction rounds, the last N add no click "
                                     "(mask prompt only)", min=0)
    box_prob: float = _setting(0.5, "probability that an object's first prompt is a box rather "
                               "than a point", min=0.0, max=1.0)
    point_mode: str = _setting("interior", "where correction clicks go in the error region",
                               choices=("uniform", "center", "interior"))
    decoder_chunk: int = _setting(8, "objects per mask-decoder call (small chunks are faster "
                                  "on a CPU)", min=1)


@dataclasses.dataclass
class LossConfig:
    """Loss weights and the curricula for small objects trained from scratch.

    ``focal_ramp_steps`` ramps the focal weight linearly from 0 (small objects
    otherwise push a model trained from scratch into predicting empty masks
    first). For the first ``loss_window_steps`` steps the mask losses count only
    a window of ``loss_window`` x each object's box (0: off, SAM's whole-map
    loss); with ``loss_window_end`` > 0 the factor grows geometrically to it.
    ``aux_dense`` weighs the dense auxiliary loss on the image embedding
    (:mod:`napari_sam.training.dense_targets`; 0: off). Its head is the model's
    AIS head, saved inside the model's weights; a model without one gets one of
    width ``ais_head_hidden``.
    """

    focal_weight: float = _setting(20.0, "weight of the focal loss", min=0.0)
    dice_weight: float = _setting(1.0, "weight of the dice loss", min=0.0)
    iou_weight: float = _setting(1.0, "weight of the IoU-prediction loss", min=0.0)
    focal_alpha: float = _setting(0.25, "weight of foreground pixels in the focal loss (< 0: "
                                  "none)", max=1.0)
    focal_gamma: float = _setting(2.0, "focusing exponent of the focal loss", min=0.0)
    focal_ramp_steps: int = _setting(0, "ramp the focal-loss weight up from 0 over N steps "
                                     "(0: off)", min=0)
    loss_window: float = _setting(0.0, "count mask losses only in a window of this many times "
                                  "each object's box (0: whole map; a curriculum for small "
                                  "objects)", min=0.0)
    loss_window_steps: int = _setting(0, "steps during which --loss-window applies", min=0)
    loss_window_end: float = _setting(0.0, "grow the window geometrically to this factor over "
                                      "--loss-window-steps (0: fixed)", min=0.0)
    # checked when training starts (train() raises InvalidInputError), as before: not a
    # usage error of the CLI
    aux_dense: float = _setting(0.0, "weight of the dense loss of the AIS head on the image "
                                "embedding, beside SAM's losses (0: off)")
    ais_head_hidden: int = _setting(64, "width of the AIS head added to a model that has none "
                                    "(an even number; with --aux-dense or --head-only)", min=2)


#: TrainConfig's sections: attribute name -> section class, in their order
SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "dataset": DataConfig,
    "optim": OptimConfig,
    "prompts": PromptConfig,
    "loss": LossConfig,
}


def setting_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """``(section name, field)`` of every setting, sections in :data:`SECTIONS` order."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f


#: flat setting name -> the section that holds it
_OWNER: dict[str, str] = {f.name: section for section, f in setting_fields()}


@dataclasses.dataclass(init=False)
class TrainConfig:
    """Everything a training run depends on (saved as ``config.json``), in five sections.

    Construct it from sections, flat settings, or both (flat settings win)::

        TrainConfig(data="cells", steps=200, lr=1e-4)
        TrainConfig(dataset=DataConfig(data="cells"), optim=OptimConfig(lr=1e-4), steps=200)

    Flat names read and write the owning section (``config.lr`` is
    ``config.optim.lr``). Given sections are copied, never shared.
    """

    run: RunConfig
    dataset: DataConfig
    optim: OptimConfig
    prompts: PromptConfig
    loss: LossConfig

    def __init__(
        self,
        run: RunConfig | None = None,
        dataset: DataConfig | None = None,
        optim: OptimConfig | None = None,
        prompts: PromptConfig | None = None,
        loss: LossConfig | None = None,
        **settings: Any,
    ) -> None:
        given = {"run": run, "dataset": dataset, "optim": optim, "prompts": prompts, "loss": loss}
        for name, cls in SECTIONS.items():
            section = given[name]
            if section is not None and not isinstance(section, cls):
                raise TypeError(f"TrainConfig {name} must be a {cls.__name__}, got "
                                f"{type(section).__name__}")
            object.__setattr__(self, name, cls() if section is None
                               else dataclasses.replace(section))
        for key, value in settings.items():
            if key not in _OWNER:
                raise TypeError(f"TrainConfig() got an unexpected keyword argument {key!r}")
            setattr(getattr(self, _OWNER[key]), key, value)

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: flat setting names read their section
        owner = _OWNER.get(name)
        if owner is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(object.__getattribute__(self, owner), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWNER:
            setattr(getattr(self, _OWNER[name]), name, value)
        else:
            object.__setattr__(self, name, value)

    def loss_kwargs(self, step: int | None = None) -> dict[str, float]:
        """Keyword arguments of :func:`~napari_sam.training.losses.sam_loss` at ``step``."""
        loss = self.loss
        ramp = 1.0
        if step is not None and loss.focal_ramp_steps > 0:
            ramp = min(1.0, step / loss.focal_ramp_steps)
        window = 0.0
        if step is not None and loss.loss_window > 0 and step < loss.loss_window_steps:
            window = loss.loss_window
            if loss.loss_window_end > 0:
                t = step / loss.loss_window_steps
                window = loss.loss_window * (loss.loss_window_end / loss.loss_window) ** t
        return {
            "focal_weight": loss.focal_weight * ramp,
            "dice_weight": loss.dice_weight,
            "iou_weight": loss.iou_weight,
            "focal_alpha": loss.focal_alpha,
            "focal_gamma": loss.focal_gamma,
            "loss_window": window,
        }

    def to_nested_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {setting: value}}``, JSON-ready (the model as its ``to_dict()``)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        if hasattr(self.run.model, "to_dict"):
            out["run"]["model"] = self.run.model.to_dict()
        return out

    def to_dict(self) -> dict[str, Any]:
        """The flat ``{setting: value}`` dictionary (the format of ``config.json``)."""
        return {k: v for section in self.to_nested_dict().values() for k, v in section.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """A config from a flat (``config.json``) or nested (:meth:`to_nested_dict`) dict.

        Raises:
          InvalidInputError: an unknown setting or section.
        """
        return cls(**flat_settings(data))


def flat_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """The flat ``{setting: value}`` of a flat or nested settings dictionary.

    Raises:
      InvalidInputError: an unknown name, or a section that is not a dictionary.
    """
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, Mapping):
                raise InvalidInputError(f"training settings: section {key!r} must be an object "
                                        f"of settings, got {type(value).__name__}.")
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(SECTIONS[key])})
            if unknown:
                raise InvalidInputError(f"training settings: {key!r} has no setting "
                                        f"{', '.join(map(repr, unknown))}.")
            flat.update(value)
        elif key in _OWNER:
            flat[key] = value
        else:
            raise InvalidInputError(f"training settings: unknown setting {key!r}.")
    return flat


def _fields_where(test: Any) -> dict[str, Mapping[str, Any]]:
    return {f.name: f.metadata for _, f in setting_fields() if test(f)}


#: integer settings and their smallest valid value (a None default: optional, checked apart)
_MIN_INT: dict[str, int] = {
    name: int(meta["min"]) for name, meta in _fields_where(
        lambda f: f.metadata["kind"] is int and f.metadata["min"] is not None
        and f.default is not None).items()
}
#: float settings: (lowest, highest, lowest excluded); None = unbounded
_FLOAT_RANGE: dict[str, tuple[float | None, float | None, bool]] = {
    name: (meta["min"], meta["max"], meta["min_open"]) for name, meta in _fields_where(
        lambda f: f.metadata["kind"] is float
        and (f.metadata["min"] is not None or f.metadata["max"] is not None)).items()
}
#: settings with a fixed set of values
_CHOICES: dict[str, tuple[str, ...]] = {
    name: meta["choices"] for name, meta in _fields_where(
        lambda f: f.metadata["choices"] is not None).items()
}
#: integer settings that may be None (unset)
_OPTIONAL_INT: dict[str, int] = {
    name: int(meta["min"]) for name, meta in _fields_where(
        lambda f: f.metadata["kind"] is int and f.default is None).items()
}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool) and math.isfinite(float(value))


def config_problems(config: TrainConfig) -> list[tuple[str, str]]:
    """Settings of ``config`` that cannot train: ``[(setting, what is wrong), ...]``.

    Empty when every value is usable. Checked before anything is built or
    written, so that a bad value never produces a checkpoint. The ranges come
    from the fields' metadata; order: integers, numbers, the rounds pair,
    optional integers, choices, then the two-number settings.
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
    trains_head = bool(config.head_only) or (_is_number(config.aux_dense)
                                             and config.aux_dense > 0)
    if trains_head and _is_int(config.ais_head_hidden) and config.ais_head_hidden % 2:
        out.append(("ais_head_hidden", f"must be an even number, got {config.ais_head_hidden}"))
    if config.head_only and config.aux_dense != 0:
        out.append(("aux_dense", "weighs the dense loss against SAM's mask losses, which "
                                 "--head-only skips: leave --aux-dense out (0)"))
    for name, low in _OPTIONAL_INT.items():
        value = getattr(config, name)
        if value is not None and (not _is_int(value) or value < low):
            out.append((name, f"must be an integer >= {low}, got {value!r}"))
    if not config.augment and config.augment_preset != "basic":
        out.append(("augment_preset", f"chooses the augmentation of a run that has it off "
                                      f"(augment=False); drop one of the two, got "
                                      f"{config.augment_preset!r}"))
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
