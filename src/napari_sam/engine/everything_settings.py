"""Everything-mode parameters: one typed, validated description for the API, the CLI and the widget.

:class:`EverythingSettings` holds the parameters of
:class:`~napari_sam.engine.everything.AutomaticMaskGenerator` (SAM's names and
meaning). Each field's ``metadata`` gives its range and a help line, so forms
can be generated from it::

    for f in dataclasses.fields(EverythingSettings):
        f.name, f.metadata["kind"], f.metadata["min"], f.metadata["max"], f.metadata["help"]

Construction validates every value and raises
:class:`~napari_sam.errors.InvalidInputError` with a one-line message; the
generator, ``generate_tiled``, the CLI (before any model is loaded) and the
widget all go through it. Ranges:

==================================  ===========================  =========================
parameter                           range                        why
==================================  ===========================  =========================
points_per_side                     whole number 1..256          256 x 256 = 65,536 prompts
                                                                 per crop at most
points_per_batch                    whole number 1..4096         memory grows with it
pred_iou_thresh                     [0, 1] or None               None: the model's value
stability_score_thresh              [0, 1] or None               None: the model's value
stability_score_offset              finite, >= 0                 a logit offset
box_nms_thresh, crop_nms_thresh     [0, 1]                       box IoU
crop_n_layers                       whole number 0..4            layer i has 4**i crops
crop_overlap_ratio                  [0, 1)                       of the short side
crop_n_points_downscale_factor      whole number >= 1
point_grids                         (N, 2) in [0, 1], N <= 65,536
min_mask_region_area                whole number >= 0            pixels
==================================  ===========================  =========================

and at most :data:`MAX_PROMPTS` prompts over all crops of all layers.

Thresholds left at None are resolved per model by :func:`recommended_settings`
(the default thresholds of the model, else SAM's 0.88 / 0.95), the one place
that decides them; :meth:`EverythingSettings.recommended_for` gives a form its
values and :func:`everything_kwargs` merges them under given keywords (CLI,
evaluation). The numeric fields (:meth:`EverythingSettings.cli_fields`) are the
CLI's options, with their help and range from ``metadata``.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from napari_sam.errors import InvalidInputError

__all__ = [
    "AUTO_TILE_FACTOR",
    "MAX_CROP_LAYERS",
    "MAX_POINTS_PER_BATCH",
    "MAX_POINTS_PER_SIDE",
    "MAX_PROMPTS",
    "MIN_TILE_SIZE",
    "OUTPUT_MODES",
    "SAM_THRESHOLDS",
    "EverythingSettings",
    "TilingSettings",
    "auto_tile_size",
    "check_number",
    "describe_range",
    "everything_kwargs",
    "recommended_settings",
    "recommended_thresholds",
]

#: largest points_per_side: a grid of 256 x 256 = 65,536 prompts per crop
MAX_POINTS_PER_SIDE = 256
MAX_POINTS_PER_LAYER = MAX_POINTS_PER_SIDE * MAX_POINTS_PER_SIDE
#: largest crop_n_layers: 1 + 4 + 16 + 64 + 256 = 341 crops
MAX_CROP_LAYERS = 4
#: prompts over all crops of all layers (the default setting uses 1,024)
MAX_PROMPTS = 1 << 22
MAX_POINTS_PER_BATCH = 4096
#: smallest tile of generate_tiled (as the CLI's --tile-size)
MIN_TILE_SIZE = 16
OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "cropped_mask")
#: SAM's thresholds, used when the model recommends none
SAM_THRESHOLDS: dict[str, float] = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}
#: images whose longest side exceeds AUTO_TILE_FACTOR x the model's input size are tiled
AUTO_TILE_FACTOR = 3
#: ... into tiles of AUTO_TILE_SIZE_FACTOR x the input size, overlapping by 1/8 of a tile
AUTO_TILE_SIZE_FACTOR = 2


def _param(
    default: Any,
    kind: type,
    minimum: float | None,
    maximum: float | None,
    help: str,  # noqa: A002 - the field's help line
    *,
    max_open: bool = False,
    optional: bool = False,
    step: float | None = None,
) -> Any:
    """A settings field: ``metadata`` holds its kind, range, help line and a form's step
    (default: 1 for ints, 0.01 for floats)."""
    if step is None:
        step = 1 if kind is int else 0.01
    meta = {"kind": kind, "min": minimum, "max": maximum, "max_open": max_open,
            "optional": optional, "help": help, "step": step}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EverythingSettings:
    """Validated everything-mode parameters (see the module docstring for the ranges).

    Numbers are coerced to ``int`` / ``float``; ``point_grids`` to a tuple of
    (N, 2) float64 arrays of normalised ``(x, y)``. Build it from keywords
    (``EverythingSettings(points_per_side=16)``) or with :meth:`from_kwargs`,
    which can name parameters differently in its messages (CLI options).
    """

    points_per_side: int | None = _param(
        32, int, 1, MAX_POINTS_PER_SIDE,
        "grid of N x N prompt points over the image (per crop layer 0)", optional=True)
    points_per_batch: int = _param(
        64, int, 1, MAX_POINTS_PER_BATCH,
        "points run through the mask decoder at once (memory vs speed)", step=16)
    pred_iou_thresh: float | None = _param(
        None, float, 0.0, 1.0, "drop masks whose predicted IoU is below this", optional=True)
    stability_score_thresh: float | None = _param(
        None, float, 0.0, 1.0, "drop masks whose stability score is below this",
        optional=True)
    stability_score_offset: float = _param(
        1.0, float, 0.0, None, "logit offset used to compute the stability score")
    box_nms_thresh: float = _param(
        0.7, float, 0.0, 1.0, "box IoU above which duplicate masks are removed")
    crop_n_layers: int = _param(
        0, int, 0, MAX_CROP_LAYERS, "extra layers of image crops (0: whole image only)")
    crop_nms_thresh: float = _param(
        0.7, float, 0.0, 1.0, "box IoU for removing duplicates between crops")
    crop_overlap_ratio: float = _param(
        512 / 1500, float, 0.0, 1.0,
        "overlap of neighbouring first-layer crops, as a fraction of the image's short side",
        max_open=True)
    crop_n_points_downscale_factor: int = _param(
        1, int, 1, None, "points per side in crop layer n are divided by this**n")
    point_grids: tuple[np.ndarray, ...] | None = field(
        default=None,
        metadata={"kind": list, "help": "explicit (N, 2) grids of normalised (x, y) in [0, 1], "
                  "one per crop layer (instead of points_per_side)"})
    min_mask_region_area: int = _param(
        0, int, 0, None, "remove holes and islands smaller than this many pixels (0: off)",
        step=10)
    output_mode: str = field(
        default="binary_mask",
        metadata={"kind": str, "choices": OUTPUT_MODES,
                  "help": "binary_mask: (H, W) bool masks; uncompressed_rle: COCO RLE; "
                  "cropped_mask: masks cropped to bbox_rc (memory scales with the objects)"})
    auto_tile: bool = field(
        default=True,
        metadata={"kind": bool, "help": "tile images larger than the model can resolve "
                  "(see auto_tile_size)"})

    def __post_init__(self) -> None:
        values = _validate({f.name: getattr(self, f.name) for f in fields(self)}, str)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_kwargs(
        cls, kwargs: Mapping[str, Any], labels: Mapping[str, str] | None = None
    ) -> EverythingSettings:
        """Settings from keywords; ``labels`` names parameters in messages (e.g. CLI options)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InvalidInputError(
                f"Unknown everything-mode parameter(s) {', '.join(unknown)}; valid: "
                f"{', '.join(sorted(names))}."
            )
        label = (lambda n: labels.get(n, n)) if labels else str
        defaults = {f.name: f.default for f in fields(cls)}
        return cls(**_validate({**defaults, **dict(kwargs)}, label))

    @classmethod
    def recommended_for(cls, model: Any) -> EverythingSettings:
        """The default settings with ``model``'s thresholds (:func:`recommended_thresholds`).

        ``model``: a zoo name, None (the default model), a path, a SAM model
        or a ``Predictor``. A form shows these when a model is picked.
        """
        return cls().resolved(model)

    @classmethod
    def cli_fields(cls) -> list[Any]:
        """The numeric parameters (fields with a range), in order: the CLI's options."""
        return [f for f in fields(cls) if "min" in f.metadata]

    def resolved(self, model: Any) -> EverythingSettings:
        """These settings with thresholds left at None taken from :func:`recommended_thresholds`."""
        rec = recommended_thresholds(model)
        fill = {k: rec[k] for k in SAM_THRESHOLDS if getattr(self, k) is None}
        return replace(self, **fill) if fill else self

    def kwargs(self) -> dict[str, Any]:
        """The settings as ``AutomaticMaskGenerator`` keywords."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["point_grids"] is not None:
            out["point_grids"] = list(out["point_grids"])
        return out


@dataclass(frozen=True)
class TilingSettings:
    """Validated parameters of :func:`~napari_sam.engine.tiles.generate_tiled`."""

    tile_size: int = _param(1024, int, MIN_TILE_SIZE, None, "tile side in pixels")
    overlap: int = _param(128, int, 0, None, "overlap of neighbouring tiles in pixels "
                          "(less than tile_size)")
    edge_margin: int = _param(2, int, 0, None, "pixels from an interior tile edge that count "
                              "as touching it")
    contain_thresh: float = _param(0.9, float, 0.0, 1.0, "fraction of a cut piece inside "
                                   "another tile's mask for it to be dropped")
    merge_iou: float = _param(0.5, float, 0.0, 1.0, "IoU in the shared region above which "
                              "cut pieces are merged")
    dup_iou: float = _param(0.5, float, 0.0, 1.0, "mask IoU above which duplicates between "
                            "tiles are removed")

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, check_number(f.name, getattr(self, f.name),
                                                          **_range(f.metadata)))
        if self.overlap >= self.tile_size:
            raise InvalidInputError(
                f"overlap must be smaller than tile_size, got overlap={self.overlap} for "
                f"tile_size={self.tile_size}."
            )


# ----------------------------------------------------------------------------- checks


def _range(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": meta["kind"], "minimum": meta["min"], "maximum": meta["max"],
            "max_open": meta.get("max_open", False)}


def describe_range(metadata: Mapping[str, Any]) -> str:
    """The valid values of a field with a range, in words: ``"a number in [0, 1]"``."""
    return _describe(**_range(metadata))


def _describe(kind: type, minimum: float | None, maximum: float | None, max_open: bool) -> str:
    what = "a whole number" if kind is int else "a number"
    if minimum is not None and maximum is not None:
        if kind is int:
            return f"{what} from {minimum:g} to {maximum:g}"
        return f"{what} in [{minimum:g}, {maximum:g}{')' if max_open else ']'}"
    if minimum is not None:
        return f"{what} >= {minimum:g}"
    if maximum is not None:
        return f"{what} <= {maximum:g}"
    return f"a finite {what[2:]}" if kind is float else what


def check_number(
    name: str,
    value: Any,
    kind: type = float,
    minimum: float | None = None,
    maximum: float | None = None,
    max_open: bool = False,
) -> int | float:
    """``value`` as ``kind`` (int or float) when it is a finite number in range.

    Raises InvalidInputError otherwise, naming ``name`` and the range.

    Ints must be whole (``2.0`` is accepted, ``2.7`` is not); bools and strings
    are refused; ``maximum`` is excluded when ``max_open``.
    """
    expected = _describe(kind, minimum, maximum, max_open)
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    bad = InvalidInputError(f"{name} must be {expected}, got {shown}.")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise bad
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        raise bad from None
    if not math.isfinite(number):
        raise bad
    if kind is int:
        if number != int(number):
            raise bad
        number = int(value) if isinstance(value, numbers.Integral) else int(number)
    if minimum is not None and number < minimum:
        raise bad
    if maximum is not None and (number >= maximum if max_open else number > maximum):
        raise bad
    return number


def _validate(values: dict[str, Any], label: Callable[[str], str]) -> dict[str, Any]:
    """Check and coerce every setting; messages name parameters with ``label``."""
    out = dict(values)
    meta = {f.name: f.metadata for f in fields(EverythingSettings)}
    for name, m in meta.items():
        if "min" not in m:
            continue
        if out[name] is None and m["optional"]:
            continue
        out[name] = check_number(label(name), out[name], **_range(m))
    if out["output_mode"] not in OUTPUT_MODES:
        raise InvalidInputError(
            f"{label('output_mode')} must be one of {', '.join(OUTPUT_MODES)}, got "
            f"{out['output_mode']!r} (for COCO's compressed RLE, encode the uncompressed RLEs "
            "with pycocotools)."
        )
    if not isinstance(out["auto_tile"], (bool, np.bool_)):
        raise InvalidInputError(f"{label('auto_tile')} must be True or False, got "
                                f"{out['auto_tile']!r}.")
    out["auto_tile"] = bool(out["auto_tile"])

    pps, grids = out["points_per_side"], out["point_grids"]
    if (pps is None) == (grids is None):
        raise InvalidInputError(
            f"Give exactly one of {label('points_per_side')} (e.g. 32) and "
            f"{label('point_grids')}; got {label('points_per_side')}={pps!r} and "
            f"{label('point_grids')}={'None' if grids is None else 'a list'}."
        )
    n_layers = out["crop_n_layers"]
    if grids is not None:
        out["point_grids"] = _check_grids(grids, n_layers, label)
        per_layer = [len(g) for g in out["point_grids"][: n_layers + 1]]
    else:
        factor = out["crop_n_points_downscale_factor"]
        per_layer = []
        for i in range(n_layers + 1):
            n = int(pps / factor**i)
            if n < 1:
                raise InvalidInputError(
                    f"Crop layer {i} would get {n} points per side ({label('points_per_side')}="
                    f"{pps}, {label('crop_n_points_downscale_factor')}={factor}); use more points "
                    "per side, fewer crop layers or a smaller downscale factor."
                )
            per_layer.append(n * n)
    prompts = sum(n * 4**i for i, n in enumerate(per_layer))
    if prompts > MAX_PROMPTS:
        raise InvalidInputError(
            f"These settings decode {prompts:,} prompts per image (at most {MAX_PROMPTS:,}); "
            f"lower {label('points_per_side')} or {label('crop_n_layers')}, or raise "
            f"{label('crop_n_points_downscale_factor')}."
        )
    return out


def _check_grids(
    grids: Any, n_layers: int, label: Callable[[str], str]
) -> tuple[np.ndarray, ...]:
    name = label("point_grids")
    if isinstance(grids, np.ndarray) and grids.ndim == 2:
        grids = [grids]  # one grid for one layer, as a bare (N, 2) array
    if not isinstance(grids, (Sequence, np.ndarray)) or isinstance(grids, (str, bytes)):
        raise InvalidInputError(
            f"{name} must be a list of (N, 2) arrays, one per crop layer; got "
            f"{type(grids).__name__}."
        )
    out = []
    for k, g in enumerate(grids):
        try:
            arr = np.array(g, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"{name}[{k}] must be an (N, 2) array of numbers (x, y) in [0, 1]."
            ) from None
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
            raise InvalidInputError(
                f"Each point grid must be an (N, 2) array of (x, y) in [0, 1]; {name}[{k}] has "
                f"shape {arr.shape}."
            )
        if arr.shape[0] > MAX_POINTS_PER_LAYER:
            raise InvalidInputError(
                f"{name}[{k}] has {arr.shape[0]:,} points; at most {MAX_POINTS_PER_LAYER:,} "
                "per grid."
            )
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            bad = arr[~(np.isfinite(arr).all(axis=1) & (arr >= 0).all(axis=1)
                        & (arr <= 1).all(axis=1))][0]
            raise InvalidInputError(
                f"{name}[{k}] holds the point {bad.tolist()}; grid points are normalised (x, y) "
                "in [0, 1] (0 = first pixel edge, 1 = last)."
            )
        arr.setflags(write=False)
        out.append(arr)
    if len(out) < n_layers + 1:
        raise InvalidInputError(
            f"{name} has {len(out)} grids but {label('crop_n_layers')}={n_layers} needs "
            f"{n_layers + 1} (one per layer, the full image first)."
        )
    return tuple(out)


# ----------------------------------------------------------------------------- per model


@functools.lru_cache(maxsize=1)
def _default_model_config() -> Any:
    """The architecture of the embedded default model, read from its file's metadata."""
    from safetensors import safe_open

    from napari_sam.models.build import SamConfig
    from napari_sam.models.checkpoint import CONFIG_METADATA_KEY
    from napari_sam.models.zoo import embedded_weights_path

    try:
        with safe_open(str(embedded_weights_path()), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
        import json

        return SamConfig.from_dict(json.loads(raw)) if raw else None
    except Exception:  # no embedded model (a stripped install): nothing to recognise
        return None


def recommended_settings(model: Any) -> dict[str, float]:
    """Everything-mode thresholds recommended for ``model`` where they differ from SAM's.

    The one place where per-model thresholds are decided; the generator, the
    CLI, evaluation and the widget all ask here. ``model`` is

    * a zoo name, or None for the default model: the zoo's recommendation
      (:attr:`~napari_sam.models.zoo.ModelInfo.everything`); a checkpoint path
      gets none here (the generator recognises the architecture once the
      model is loaded);
    * a SAM model or a ``Predictor``: a model with the architecture of the
      embedded default model (the default model itself, and models fine-tuned
      from it with ``napari-sam train``) gets the default model's settings
      (``pred_iou_thresh=0.6``, ``stability_score_thresh=0.85``: its scores
      run lower than SAM's); every other model, the official SAM checkpoints
      included, gets none (SAM's 0.88 / 0.95 apply).
    """
    from napari_sam.models.zoo import recommended_everything_settings

    if model is None or isinstance(model, (str, os.PathLike)):
        return recommended_everything_settings(None if model is None else os.fspath(model))
    model = getattr(model, "model", model)  # a Predictor
    config = getattr(model, "config", None)
    if config is not None and config == _default_model_config():
        return recommended_everything_settings(None)
    return {}


def recommended_thresholds(model: Any) -> dict[str, float]:
    """Both thresholds for ``model``: its recommendation (:func:`recommended_settings`),
    else SAM's (:data:`SAM_THRESHOLDS`)."""
    return {**SAM_THRESHOLDS, **recommended_settings(model)}


def everything_kwargs(
    given: Mapping[str, Any], model: Any, labels: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, float]]:
    """Generator keywords: the ``given`` ones, then the settings ``model`` recommends.

    Validated here (:meth:`EverythingSettings.from_kwargs`; ``labels`` names
    parameters in messages, e.g. CLI options), before any model is loaded.
    ``model`` as in :func:`recommended_settings` (a name or a path for the
    CLI). Returns the keywords and the recommended settings.

    Raises:
      InvalidInputError: a value out of range, naming it with ``labels``.
    """
    kwargs = dict(given)
    recommended = recommended_settings(model)
    for key, value in recommended.items():
        kwargs.setdefault(key, value)
    EverythingSettings.from_kwargs(kwargs, labels=labels)
    return kwargs, recommended


def auto_tile_size(shape: tuple[int, int], img_size: int) -> int | None:
    """The tile size everything-mode uses on its own for an (H, W) image, or None.

    A model sees the image resized so that its longest side is ``img_size``
    (256 px for the default model, 1024 for SAM), so objects in a larger image
    shrink by ``max(H, W) / img_size`` and small ones vanish. Images whose
    longest side is more than ``AUTO_TILE_FACTOR`` (3) x ``img_size`` are
    therefore split into tiles of ``AUTO_TILE_SIZE_FACTOR`` (2) x ``img_size``
    (512 px for the default model, 2048 for SAM), overlapping by 1/8 of a tile.
    """
    if max(int(shape[0]), int(shape[1])) > AUTO_TILE_FACTOR * int(img_size):
        return AUTO_TILE_SIZE_FACTOR * int(img_size)
    return None
