"""Automatic instance segmentation (AIS): the model's dense maps + a seeded watershed.

Beside SAM's grid everything-mode (AMG, :mod:`napari_sam.engine.everything`),
a model with an AIS head (:mod:`napari_sam.models.ais_head`) segments every
object of an image in one pass:

1. the image is embedded once (the predictor's embedding, cache and threads);
2. the head turns the embedding into four low-resolution maps, which are
   upsampled to the image like SAM's mask logits (crop the padding, bilinear);
3. :func:`instances_from_maps` cuts the foreground into instances: seeds are
   the connected regions where the centre map is high, and a watershed on the
   inverted boundary-distance map grows each seed until it meets its
   neighbours or leaves the foreground.

Maps are probabilities in [0, 1], shape (4, H, W), channels
:data:`~napari_sam.models.ais_head.AIS_CHANNELS`, indexed (row, col) like the
image. Records follow everything-mode's format (``segmentation`` cut to
``bbox_rc``, ``bbox`` as SAM reports it), so labels, COCO files, tiles and
batches treat both modes alike; ``predicted_iou`` is the object's mean
foreground probability and ``stability_score`` its mean centre-map peak
height (both in [0, 1]).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any

import numpy as np

from napari_sam.engine.progress import check_cancel, run_steps
from napari_sam.errors import InvalidInputError

__all__ = [
    "MODES",
    "AisSettings",
    "InstanceSegmenter",
    "has_ais_head",
    "instances_from_maps",
    "make_segmenter",
    "mode_reason",
    "refine_maps",
    "resolve_mode",
]

#: the automatic-segmentation modes a caller may ask for ("auto": the model's best)
MODES = ("auto", "amg", "ais")
# what CancelledError says when ``cancel`` stops a run
_CANCELLED = "Automatic instance segmentation"

#: the error of mode "ais" on a model without an AIS head
NO_HEAD_MESSAGE = (
    "This model has no AIS head (official SAM checkpoints have none): use "
    "everything-mode's grid prompts (mode 'amg' or 'auto'), or add a head with "
    "`napari-sam train --aux-dense 1 --init MODEL ...`."
)

#: default overlap of AIS tiles, in pixels
AIS_TILE_OVERLAP = 64


@dataclasses.dataclass(frozen=True)
class AisSettings:
    """Thresholds of the watershed decoding (all maps are probabilities in [0, 1])."""

    foreground_threshold: float = dataclasses.field(
        default=0.5, metadata={"help": "pixels above this foreground probability are objects"})
    center_threshold: float = dataclasses.field(
        default=0.6, metadata={"help": "seeds: connected regions where the centre map is above"})
    min_size: int = dataclasses.field(
        default=10, metadata={"help": "objects smaller than this many pixels are dropped"})

    def __post_init__(self) -> None:
        for name in ("foreground_threshold", "center_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and 0.0 <= value <= 1.0
            ):
                raise InvalidInputError(
                    f"AisSettings.{name} must be a number in [0, 1], got {value!r}."
                )
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int | np.integer) or (
            self.min_size < 0
        ):
            raise InvalidInputError(
                f"AisSettings.min_size must be a whole number >= 0, got {self.min_size!r}."
            )


def has_ais_head(model: Any) -> bool:
    """True when ``model`` (a :class:`~napari_sam.models.sam.Sam`) carries an AIS head."""
    return getattr(model, "ais_head", None) is not None


def instances_from_maps(maps: np.ndarray, settings: AisSettings | None = None) -> np.ndarray:
    """Instances of (4, H, W) probability maps as (H, W) int32 labels (0 = background).

    Seeds are the connected regions (8-connectivity) of ``center > center_threshold``
    inside the foreground, at least ``min_size`` pixels... or smaller when an object
    has no larger one; every object keeps its seed. A watershed on
    ``-boundary_distance`` restricted to ``foreground > foreground_threshold`` grows
    them; objects under ``min_size`` pixels are removed. Ids are 1..N in the order
    of the seeds' first pixel (row-major).
    """
    from scipy import ndimage
    from skimage.segmentation import watershed

    settings = settings or AisSettings()
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != 4:
        raise InvalidInputError(f"AIS maps must have shape (4, H, W), got {maps.shape}.")
    foreground = maps[0] > settings.foreground_threshold
    if not foreground.any():
        return np.zeros(maps.shape[1:], dtype=np.int32)
    seeds, n = ndimage.label(
        foreground & (maps[2] > settings.center_threshold), structure=np.ones((3, 3), bool)
    )
    if n == 0:
        return np.zeros(maps.shape[1:], dtype=np.int32)
    labels = watershed(-maps[3], markers=seeds, mask=foreground)
    if settings.min_size > 1:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        small = sizes < settings.min_size
        small[0] = False
        if small.any():
            labels[small[labels]] = 0
    # consecutive ids 1..N
    present = np.unique(labels)
    present = present[present > 0]
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return lut[labels]


def _labels_to_records(labels: np.ndarray, maps: np.ndarray) -> list[dict[str, Any]]:
    """Everything-mode records (cropped masks) of (H, W) labels; scores from ``maps``."""
    from scipy import ndimage

    H, W = labels.shape
    out = []
    for i, slc in enumerate(ndimage.find_objects(labels), start=1):
        if slc is None:
            continue
        mask = labels[slc] == i
        r0, r1, c0, c1 = slc[0].start, slc[0].stop, slc[1].start, slc[1].stop
        centre_map = maps[2][slc]
        k = int(np.argmax(np.where(mask, centre_map, -1.0)))
        peak_r, peak_c = divmod(k, mask.shape[1])
        out.append(
            {
                "segmentation": mask,
                "area": int(mask.sum()),
                "bbox": [c0, r0, (c1 - c0) - 1, (r1 - r0) - 1],
                "bbox_rc": [r0, c0, r1, c1],
                "predicted_iou": float(maps[0][slc][mask].mean()),
                "point_coords": [[float(c0 + peak_c), float(r0 + peak_r)]],
                "stability_score": float(centre_map[peak_r, peak_c]),
                "crop_box": [0, 0, W, H],
            }
        )
    return out


class InstanceSegmenter:
    """Automatic instance segmentation with a model's AIS head.

    Arguments:
      model: a :class:`~napari_sam.models.sam.Sam` with an AIS head, or a
        :class:`~napari_sam.engine.predictor.Predictor` of one (its embedding
        cache and thread policy are then shared).
      settings: :class:`AisSettings` (defaults if None); keyword overrides are
        applied on top, e.g. ``InstanceSegmenter(model, center_threshold=0.6)``.
      output_mode: ``"binary_mask"`` (full-size masks) or ``"cropped_mask"``,
        as in everything-mode.
      tile_size: ``"auto"`` (default): an image whose longest side exceeds the
        model's input size (``model.img_size``) is cut into tiles of that size at
        native scale, a smaller one is embedded whole; an int (>= 16): tiles of
        that many pixels for images larger than it; None: never tile (the whole
        image is resized to the model input, small objects may be lost).
      overlap: overlap of neighbouring tiles in pixels (>= 0, less than the
        tile size; default 64). Tiled maps are blended as :meth:`maps` does.
      refine: redraw the maps at the image's resolution with the model's AIS map
        refiner (:mod:`napari_sam.models.ais_refiner`, :func:`refine_maps`) before
        decoding; None (default): when the model has one; False: never.
    """

    #: use the model's AIS map refiner (None: when it has one; False: never)
    refine: bool | None = None

    def __init__(
        self,
        model: Any,
        settings: AisSettings | None = None,
        output_mode: str = "binary_mask",
        tile_size: int | str | None = "auto",
        overlap: int = AIS_TILE_OVERLAP,
        refine: bool | None = None,
        **overrides: Any,
    ) -> None:
        from napari_sam.engine.predictor import Predictor

        predictor = model if isinstance(model, Predictor) else Predictor(model)
        if not has_ais_head(predictor.model):
            raise InvalidInputError(NO_HEAD_MESSAGE)
        if output_mode not in ("binary_mask", "cropped_mask"):
            raise InvalidInputError(
                f"output_mode must be 'binary_mask' or 'cropped_mask', got {output_mode!r}."
            )
        _check_tiling(tile_size, overlap)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(AisSettings)}
        if unknown:
            raise InvalidInputError(
                f"Unknown AIS setting(s) {sorted(unknown)}; valid: "
                f"{[f.name for f in dataclasses.fields(AisSettings)]}."
            )
        self.predictor = predictor
        self.settings = dataclasses.replace(settings or AisSettings(), **overrides)
        self.output_mode = output_mode
        self.tile_size = tile_size
        self.overlap = int(overlap)
        self.refine = refine

    @property
    def refiner(self) -> Any:
        """The AIS map refiner used now (the model's, unless ``refine=False``), or None."""
        refiner = getattr(self.model, "ais_refiner", None)
        return None if self.refine is False else refiner

    def tile_size_for(self, shape: tuple[int, int]) -> int | None:
        """Tile size used for an (H, W) image under :attr:`tile_size`, or None (whole image)."""
        size = self.model.img_size if self.tile_size == "auto" else self.tile_size
        if size is None or max(int(shape[0]), int(shape[1])) <= size:
            return None
        return int(size)

    def n_tiles(self, shape: tuple[int, int]) -> int:
        """How many embeddings an (H, W) image takes (1 when it is not tiled)."""
        from napari_sam.engine.tiles import tile_boxes

        size = self.tile_size_for(shape)
        if size is None:
            return 1
        return len(tile_boxes(shape, tile_size=size, overlap=min(self.overlap, size - 1)))

    @property
    def model(self) -> Any:
        return self.predictor.model

    def maps(
        self,
        rgb: np.ndarray,
        use_cache: bool = True,
        tile_size: int | None = None,
        overlap: int = AIS_TILE_OVERLAP,
        scale: float = 1.0,
    ) -> np.ndarray:
        """(4, H, W) float32 probability maps of an (H, W, 3) uint8 RGB image.

        Without ``tile_size`` (and at ``scale`` 1) the whole image is embedded once,
        resized to the model input as SAM does. With ``tile_size`` the image,
        first resized by ``scale``, is cut into overlapping tiles of that many
        pixels (:func:`~napari_sam.engine.tiles.tile_boxes`); each tile's maps are
        blended into the image's with weights that fall to 0 towards interior tile
        edges, so an object across a tile border is decoded once, from maps without
        seams. Maps come back at the image's own resolution.
        """
        if tile_size is None and scale == 1.0:
            maps = self._image_maps(rgb, use_cache)
        else:
            maps = run_steps(self._iter_tiled_maps(rgb, tile_size or self.model.img_size,
                                                   overlap, scale))
        return self._refined(rgb, maps)

    def _refined(self, rgb: np.ndarray, maps: np.ndarray) -> np.ndarray:
        """``maps`` redrawn by :attr:`refiner` (unchanged when there is none)."""
        refiner = self.refiner
        return maps if refiner is None else refine_maps(refiner, rgb, maps)

    def _image_maps(self, rgb: np.ndarray, use_cache: bool) -> np.ndarray:
        """(4, H, W) maps of the whole image, embedded at the model's input size."""
        import torch

        p = self.predictor
        original_size = (int(rgb.shape[0]), int(rgb.shape[1]))
        with torch.no_grad():
            # embed() leaves the predictor's current image alone
            features = p.embed(rgb).features if use_cache else p.compute_embedding(rgb)
            return self._decode(features, p.transform.input_size(original_size), original_size)

    def _decode(self, features: Any, input_size, original_size) -> np.ndarray:
        import torch

        head = self.model.ais_head
        dtype = next(head.parameters()).dtype
        logits = head(features.to(dtype))
        logits = self.model.postprocess_masks(logits.float(), input_size, original_size)
        return torch.sigmoid(logits[0]).cpu().numpy()

    def _iter_tiled_maps(
        self,
        rgb: np.ndarray,
        tile: int,
        overlap: int,
        scale: float,
        cancel: Callable[[], bool] | None = None,
        use_cache: bool = False,
    ) -> Generator[Any, None, np.ndarray]:
        """Blended tiled maps (see :meth:`maps`); yields ``EverythingProgress`` per tile
        and returns the maps. ``cancel`` is polled before each tile. ``use_cache``: tile
        embeddings through the predictor's cache (the interactive predictor's tiles of a
        large image, :mod:`napari_sam.engine.tiled`, are the same tiles)."""
        import torch
        import torch.nn.functional as F

        from napari_sam.engine.everything import EverythingProgress
        from napari_sam.engine.tiles import tile_boxes

        H, W = rgb.shape[:2]
        if scale != 1.0:
            size = (max(1, round(H * scale)), max(1, round(W * scale)))
            x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
            x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=scale < 1)
            work = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        else:
            work = rgb
        h, w = work.shape[:2]
        total = np.zeros((4, h, w), dtype=np.float32)
        weight = np.zeros((h, w), dtype=np.float32)
        ramp = max(1, overlap // 2)
        boxes = tile_boxes((h, w), tile_size=tile, overlap=min(overlap, tile - 1))
        for done, (r0, c0, r1, c1) in enumerate(boxes):
            check_cancel(cancel, _CANCELLED)
            piece = np.ascontiguousarray(work[r0:r1, c0:c1])
            tile_maps = self._image_maps(piece, use_cache=use_cache and scale == 1.0)
            wr = _edge_weights(r1 - r0, ramp, r0 > 0, r1 < h)
            wc = _edge_weights(c1 - c0, ramp, c0 > 0, c1 < w)
            wt = wr[:, None] * wc[None, :]
            total[:, r0:r1, c0:c1] += tile_maps * wt
            weight[r0:r1, c0:c1] += wt
            yield EverythingProgress(done + 1, len(boxes))
        total /= np.maximum(weight, 1e-6)
        if (h, w) != (H, W):
            t = F.interpolate(torch.from_numpy(total)[None], (H, W), mode="bilinear",
                              align_corners=False)
            total = t[0].numpy()
        return total

    def _iter_maps(
        self, rgb: np.ndarray, cancel: Callable[[], bool] | None, use_cache: bool
    ) -> Generator[Any, None, np.ndarray]:
        """The maps of an (H, W, 3) uint8 image under :attr:`tile_size` / :attr:`overlap`;
        yields ``EverythingProgress`` per embedding (tile) and returns the maps."""
        from napari_sam.engine.everything import EverythingProgress

        tile = self.tile_size_for(rgb.shape[:2])
        if tile is None:
            check_cancel(cancel, _CANCELLED)
            maps = self._image_maps(rgb, use_cache)
            yield EverythingProgress(1, 1)
            return maps
        return (yield from self._iter_tiled_maps(rgb, tile, self.overlap, 1.0, cancel,
                                                 use_cache))

    def _iter_labels(
        self,
        image: np.ndarray,
        contrast_limits: tuple[float, float] | None,
        channel_axis: int | None,
        cancel: Callable[[], bool] | None,
        use_cache: bool,
    ) -> Generator[Any, None, tuple[np.ndarray, np.ndarray]]:
        from napari_sam.engine.image import to_rgb_uint8

        rgb = to_rgb_uint8(image, contrast_limits=contrast_limits, channel_axis=channel_axis)
        maps = yield from self._iter_maps(rgb, cancel, use_cache)
        check_cancel(cancel, _CANCELLED)
        maps = self._refined(rgb, maps)
        return instances_from_maps(maps, self.settings), maps

    def iter_generate(
        self,
        image: np.ndarray,
        contrast_limits: tuple[float, float] | None = None,
        channel_axis: int | None = None,
        cancel: Callable[[], bool] | None = None,
        use_cache: bool = True,
    ) -> Iterator[Any]:
        """:meth:`generate` as a generator, like
        :meth:`AutomaticMaskGenerator.iter_generate
        <napari_sam.engine.everything.AutomaticMaskGenerator.iter_generate>`: yields an
        :class:`~napari_sam.engine.everything.EverythingProgress` after each tile
        (``total`` = number of tiles, 1 when the image is not tiled), and last the
        list of records. ``close()`` stops the work between tiles."""
        labels, maps = yield from self._iter_labels(
            image, contrast_limits, channel_axis, cancel, use_cache)
        yield self._records(labels, maps)

    def generate(
        self,
        image: np.ndarray,
        contrast_limits: tuple[float, float] | None = None,
        channel_axis: int | None = None,
        progress: Callable[[int, int], Any] | None = None,
        cancel: Callable[[], bool] | None = None,
        use_cache: bool = True,
    ) -> list[dict[str, Any]]:
        """Records of every object in ``image`` (everything-mode's record format).

        ``progress(done, total)`` is called after each tile (once when the image is
        not tiled); ``cancel`` is polled before each tile and raises
        :class:`~napari_sam.errors.CancelledError`.
        """
        steps = self._iter_labels(image, contrast_limits, channel_axis, cancel, use_cache)
        labels, maps = run_steps(steps, progress)
        return self._records(labels, maps)

    def _records(self, labels: np.ndarray, maps: np.ndarray) -> list[dict[str, Any]]:
        from napari_sam.engine.everything import _finish_records

        return _finish_records(_labels_to_records(labels, maps), labels.shape, self.output_mode)

    def generate_labels(
        self,
        image: np.ndarray,
        contrast_limits: tuple[float, float] | None = None,
        channel_axis: int | None = None,
        progress: Callable[[int, int], Any] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """(H, W) uint32 instance labels, ids 1..N (see :func:`instances_from_maps`);
        tiles, ``progress`` and ``cancel`` as in :meth:`generate`."""
        steps = self._iter_labels(image, contrast_limits, channel_axis, cancel, True)
        labels, _maps = run_steps(steps, progress)
        return labels.astype(np.uint32)


#: core side and context margin of the tiles :func:`refine_maps` works on (multiples of 8)
REFINE_TILE, REFINE_HALO = 512, 64


def refine_maps(
    refiner: Any, rgb: np.ndarray, maps: np.ndarray, tile: int = REFINE_TILE,
    halo: int = REFINE_HALO,
) -> np.ndarray:
    """(4, H, W) AIS maps redrawn by an :class:`~napari_sam.models.ais_refiner.AisRefiner`.

    Arguments:
      refiner: the refiner (eval mode).
      rgb: (H, W, 3) uint8, the image the maps belong to (its own resolution).
      maps: (4, H, W) probabilities from the AIS head.
      tile, halo: the image is refined in square cores of ``tile`` pixels, each seen
        with ``halo`` pixels of context on every side (so memory stays bounded on
        large images and a core's result does not depend on the tiling as long as the
        halo covers the refiner's reach); both are rounded up to the refiner's
        :meth:`~napari_sam.models.ais_refiner.AisRefiner.multiple` so that pooling
        sees the same pixel pairs in every tile.

    Returns:
      (4, H, W) float32 probabilities.
    """
    import torch
    import torch.nn.functional as F

    from napari_sam.engine.threads import compute_threads
    from napari_sam.models.sam import PIXEL_MEAN, PIXEL_STD

    maps = np.asarray(maps, np.float32)
    H, W = maps.shape[1:]
    if rgb.shape[:2] != (H, W) or maps.shape[0] != 4:
        raise InvalidInputError(
            f"AIS maps (4, H, W) and image (H, W, 3) must match, got {maps.shape} and "
            f"{rgb.shape}.")
    k = refiner.multiple()
    tile, halo = -(-int(tile) // k) * k, -(-int(halo) // k) * k
    mean = np.asarray(PIXEL_MEAN, np.float32)
    std = np.asarray(PIXEL_STD, np.float32)
    device = next(refiner.parameters()).device
    out = np.empty((4, H, W), np.float32)
    with torch.inference_mode(), compute_threads():
        for r0 in range(0, H, tile):
            for c0 in range(0, W, tile):
                R0, C0 = max(0, r0 - halo), max(0, c0 - halo)
                R1, C1 = min(H, r0 + tile + halo), min(W, c0 + tile + halo)
                image = (rgb[R0:R1, C0:C1].astype(np.float32) - mean) / std
                x = torch.cat([torch.from_numpy(image).permute(2, 0, 1),
                               torch.from_numpy(maps[:, R0:R1, C0:C1])], 0)[None]
                h, w = R1 - R0, C1 - C0
                x = F.pad(x, (0, (-w) % k, 0, (-h) % k))
                x = x.to(device).contiguous(memory_format=torch.channels_last)
                y = torch.sigmoid(refiner(x).float())[0].cpu().numpy()
                r1, c1 = min(H, r0 + tile), min(W, c0 + tile)
                out[:, r0:r1, c0:c1] = y[:, r0 - R0:r1 - R0, c0 - C0:c1 - C0]
    return out


def _check_tiling(tile_size: Any, overlap: Any) -> None:
    """Typed errors for InstanceSegmenter's ``tile_size`` / ``overlap``."""
    if not (tile_size is None or tile_size == "auto" or (
        isinstance(tile_size, int | np.integer) and not isinstance(tile_size, bool)
        and tile_size >= 16
    )):
        raise InvalidInputError(
            f"tile_size must be 'auto', None or a whole number >= 16 pixels, got {tile_size!r}."
        )
    if isinstance(overlap, bool) or not isinstance(overlap, int | np.integer) or overlap < 0:
        raise InvalidInputError(f"overlap must be a whole number >= 0, got {overlap!r}.")
    if isinstance(tile_size, int | np.integer) and overlap >= tile_size:
        raise InvalidInputError(
            f"overlap ({overlap}) must be smaller than tile_size ({tile_size})."
        )


def _model_of(model_or_predictor: Any) -> Any:
    from napari_sam.engine.predictor import Predictor

    if isinstance(model_or_predictor, Predictor):
        return model_or_predictor.model
    return model_or_predictor


def resolve_mode(model_or_predictor: Any, mode: str = "auto") -> str:
    """The mode that runs: ``"ais"`` or ``"amg"``.

    ``"auto"`` gives ``"ais"`` when the model has an AIS head, else ``"amg"``;
    ``"amg"`` and ``"ais"`` are kept as asked (``"ais"`` on a model without a head
    raises :class:`~napari_sam.errors.InvalidInputError`, as
    :class:`InstanceSegmenter` does). Any other value is an InvalidInputError.
    """
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    has_head = has_ais_head(_model_of(model_or_predictor))
    if mode == "auto":
        return "ais" if has_head else "amg"
    if mode == "ais" and not has_head:
        raise InvalidInputError(NO_HEAD_MESSAGE)
    return mode


def mode_reason(model_or_predictor: Any, mode: str = "auto") -> str:
    """One line saying which mode runs and why, e.g. ``"mode ais (the model has an AIS head)"``."""
    resolved = resolve_mode(model_or_predictor, mode)
    if mode != "auto":
        why = f"--mode {mode}"
    elif resolved == "ais":
        why = "the model has an AIS head"
    else:
        why = "the model has no AIS head"
    return f"mode {resolved} ({why})"


def make_segmenter(
    model_or_predictor: Any,
    mode: str = "auto",
    amg_kwargs: Mapping[str, Any] | None = None,
    ais_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """An ``AutomaticMaskGenerator`` (mode amg) or an :class:`InstanceSegmenter` (mode ais).

    ``mode`` is resolved by :func:`resolve_mode`; ``amg_kwargs`` go to
    ``AutomaticMaskGenerator``, ``ais_kwargs`` to :class:`InstanceSegmenter`
    (settings fields, ``tile_size``, ``overlap``, ``output_mode``); the other
    mode's keywords are ignored. Both return everything-mode records from
    ``generate`` / ``iter_generate`` and labels from ``generate_labels``.
    """
    if resolve_mode(model_or_predictor, mode) == "ais":
        return InstanceSegmenter(model_or_predictor, **dict(ais_kwargs or {}))
    from napari_sam.engine.everything import AutomaticMaskGenerator

    return AutomaticMaskGenerator(model_or_predictor, **dict(amg_kwargs or {}))


def _edge_weights(n: int, ramp: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """(n,) blending weights of one tile axis: rising over ``ramp`` pixels at interior edges."""
    w = np.ones(n, dtype=np.float32)
    k = min(ramp, n)
    rise = (np.arange(k, dtype=np.float32) + 0.5) / k
    if ramp_start:
        w[:k] = np.minimum(w[:k], rise)
    if ramp_end:
        w[n - k:] = np.minimum(w[n - k:], rise[::-1])
    return w
