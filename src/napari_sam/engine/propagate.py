"""Propagate one object through a stack: along z (3D) or along t (tracking).

An object prompted in one plane (points, a box, or a committed 2D mask) is
carried to the neighbouring planes, one at a time, up and down the stack. Each
next plane is prompted from the previous plane's result:

* a **box**: the previous mask's bounding box (both corners inclusive, as
  :meth:`~napari_sam.engine.predictor.Predictor.predict` takes it);
* a **point**: the previous mask's innermost pixel (the maximum of its distance
  transform), a foreground click;
* its **low-res logits** as ``mask_input`` (when the previous plane was predicted;
  a committed seed mask has none; never for a model without a mask prompt, EfficientSAM).

Which of the three are used is a setting (:class:`PropagationSettings`). The
walk in one direction stops at the first plane whose prediction fails a rule,
and that plane is left empty:

* ``"empty"``: the mask has fewer than ``min_area`` pixels;
* ``"low_score"``: the model's predicted IoU is below ``min_score``;
* ``"area_change"``: the area grew or shrank by more than ``max_area_ratio``;
* ``"low_overlap"``: the IoU with the previous plane's mask is below ``min_overlap``
  (the rules are tested in this order; as the IoU of two masks is at most the
  ratio of the smaller area to the larger, an area change beyond
  ``max_area_ratio`` is reported as such rather than as low overlap);
* ``"low_contrast"``: the object's contrast with its surroundings fell below
  ``min_contrast`` times the seed plane's (only when the planes' pixels are
  given, as :func:`propagate_volume` and :func:`track_object` do). Contrast is
  the mean intensity inside the mask minus that of a ring of
  :data:`CONTRAST_RING` pixels around it (:func:`mask_contrast`); dividing by
  the seed's keeps the sign, so dark objects in bright boundaries
  (cells through a membrane stain) work as bright nuclei do. The model alone
  does not see where an object ends in z: prompted with the previous plane's
  box, it keeps segmenting the blur above and below a nucleus with a high
  predicted IoU and a high overlap, and only the fading contrast says the
  object has ended;
* ``"max_planes"``: ``max_planes`` planes were added in this direction;
* ``"end"``: the stack ended (no plane is tested).

With ``single_component`` (default) each predicted mask keeps only its connected
component that overlaps the previous mask most (ties: the larger). Along time
this decides what happens at a **division**: the two daughters are separate
components, and the track follows the daughter that overlaps the mother most;
the other daughter is not part of the track. (When the model paints only one
daughter, the track follows that one.)

The stack is read through an embedding provider, a callable ``index ->
EmbeddedImage`` that computes (or loads) a plane's embedding on demand, so an
embedding store can stand in for the image encoder; :func:`volume_embeddings`
makes one from an array and a :class:`~napari_sam.engine.predictor.Predictor`
(which caches them). The predictor's current image is used as scratch and put
back afterwards.

Axes are explicit: the core (:func:`iter_propagate`) works on planes
``0..n_planes-1`` of a stack whose plane index is the stack axis;
:func:`propagate_volume` and :func:`track_object` take an array and the axis
that is z (``z_axis``) or t (``t_axis``) and return masks in the array's own
layout. No pixel scale is needed: each step compares two neighbouring planes.

Progress: :func:`iter_propagate` yields a :class:`PropagationProgress` after
each plane and last the :class:`PropagationResult` (napari's ``thread_worker``
takes it as is); ``cancel()`` is polled before each plane and raises
:class:`~napari_sam.errors.CancelledError`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_sam.engine.cache import EmbeddedImage
from napari_sam.engine.image import to_rgb_uint8
from napari_sam.errors import CancelledError, InvalidInputError

__all__ = [
    "PlaneReport",
    "PropagationProgress",
    "PropagationResult",
    "PropagationSettings",
    "STOP_REASONS",
    "CONTRAST_RING",
    "innermost_pixel",
    "mask_contrast",
    "iter_propagate",
    "propagate",
    "propagate_volume",
    "track_object",
    "volume_embeddings",
]

#: why the walk in one direction stopped (see the module docstring)
STOP_REASONS = ("empty", "low_score", "area_change", "low_overlap", "low_contrast", "max_planes",
                "end")

#: width in pixels of the ring around a mask that its contrast is measured against
CONTRAST_RING = 4

#: a plane's embedding, on demand: ``provider(index) -> EmbeddedImage``
EmbeddingProvider = Callable[[int], EmbeddedImage]

#: a plane's pixels, for the contrast rule: ``pixels(index) -> (H, W) float``
PixelProvider = Callable[[int], np.ndarray]


def _setting(default: Any, help: str, **limits: Any) -> Any:
    return field(default=default, metadata={"help": help, **limits})


@dataclass(frozen=True)
class PropagationSettings:
    """When propagation stops and how each next plane is prompted.

    Every field's help and valid range are in its ``metadata`` (``help``,
    ``min``, ``max``); out-of-range values raise
    :class:`~napari_sam.errors.InvalidInputError` naming the field.
    """

    min_score: float = _setting(
        0.5, "stop when the model's predicted IoU of a plane's mask is below this", min=0.0,
        max=1.0)
    min_overlap: float = _setting(
        0.3, "stop when a plane's mask overlaps the previous plane's mask with an IoU below "
        "this", min=0.0, max=1.0)
    max_area_ratio: float = _setting(
        3.0, "stop when a plane's mask is more than this many times larger or smaller than "
        "the previous plane's", min=1.0)
    min_area: int = _setting(
        4, "stop when a plane's mask has fewer pixels than this (the object has ended)", min=1)
    min_contrast: float = _setting(
        0.35, "stop when the object's contrast with its surroundings falls below this fraction "
        "of the seed plane's (0: off; needs the planes' pixels)", min=0.0, max=1.0)
    max_planes: int | None = _setting(
        None, "add at most this many planes in each direction (None: no limit)", min=1)
    use_box: bool = _setting(True, "prompt with the previous mask's bounding box")
    use_point: bool = _setting(True, "prompt with the previous mask's innermost pixel")
    use_mask: bool = _setting(
        False, "feed the previous plane's low-res logits as mask input")
    single_component: bool = _setting(
        True, "keep only the connected part of each mask that overlaps the previous mask most")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = type(f.default) if f.default is not None else int
            if value is None and f.default is None:
                continue
            if kind is bool:
                if not isinstance(value, (bool, np.bool_)):
                    raise InvalidInputError(
                        f"PropagationSettings.{f.name} must be True or False, got {value!r}.")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise InvalidInputError(
                    f"PropagationSettings.{f.name} must be a number, got {value!r}.")
            if kind is int and float(value) != int(value):
                raise InvalidInputError(
                    f"PropagationSettings.{f.name} must be a whole number, got {value!r}.")
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if not math.isfinite(float(value)) or (lo is not None and value < lo) or (
                    hi is not None and value > hi):
                valid = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise InvalidInputError(
                    f"PropagationSettings.{f.name} must be in {valid}, got {value!r}; "
                    f"it is: {f.metadata['help']}.")
        if not (self.use_box or self.use_point or self.use_mask):
            raise InvalidInputError(
                "PropagationSettings: use_box, use_point and use_mask are all False; keep at "
                "least one to prompt the next plane.")


@dataclass(frozen=True)
class PlaneReport:
    """What happened in one plane.

    index: the plane (along the stack axis).
    status: ``"seed"`` (the prompted plane), ``"kept"``, or the stop reason
      (:data:`STOP_REASONS`) of the plane that ended its direction (its mask is
      not in the result).
    score: the model's predicted IoU (NaN for a seed given as a mask).
    area: pixels of the plane's (filtered) mask.
    overlap: IoU with the previous plane's mask (NaN for the seed).
    area_ratio: area / previous area (NaN for the seed).
    """

    index: int
    status: str
    score: float
    area: int
    overlap: float = math.nan
    area_ratio: float = math.nan


@dataclass(frozen=True)
class PropagationProgress:
    """``done`` planes visited of at most ``total`` (the stack's planes); ``index``
    the plane just visited."""

    done: int
    total: int
    index: int


@dataclass
class PropagationResult:
    """The propagated object.

    masks: ``(N, H, W)`` bool, planes along the stack axis (the wrappers
      :func:`propagate_volume` / :func:`track_object` move it back to the
      input's layout and say so in ``axis``).
    planes: one :class:`PlaneReport` per plane visited, by index.
    stopped: ``{"forward": reason, "backward": reason}`` (increasing and
      decreasing index), from :data:`STOP_REASONS`; a direction not walked is absent.
    axis: the axis of ``masks`` that is the stack axis.
    """

    masks: np.ndarray
    planes: list[PlaneReport]
    stopped: dict[str, str]
    axis: int = 0

    @property
    def extent(self) -> tuple[int, int] | None:
        """``(first, last)`` plane index holding the object (inclusive), or None."""
        kept = [p.index for p in self.planes if p.status in ("seed", "kept")]
        return (min(kept), max(kept)) if kept else None

    def labels(self, object_id: int = 1) -> np.ndarray:
        """``masks`` as a uint32 label array with ``object_id`` on the object."""
        if int(object_id) < 1:
            raise InvalidInputError(f"object_id must be >= 1, got {object_id!r}.")
        return self.masks.astype(np.uint32) * np.uint32(object_id)


def iter_propagate(
    predictor: Any,
    embeddings: EmbeddingProvider,
    n_planes: int,
    start: int,
    *,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    settings: PropagationSettings | None = None,
    directions: Sequence[str] = ("forward", "backward"),
    cancel: Callable[[], bool] | None = None,
    pixels: PixelProvider | None = None,
) -> Iterator[PropagationProgress | PropagationResult]:
    """Propagate an object from plane ``start``; yields progress, last the result.

    Arguments:
      predictor: a :class:`~napari_sam.engine.predictor.Predictor` (anything with
        ``set_embedding``, ``predict`` and ``embedding``); its current image is
        restored at the end. It sets one plane after the other, so no other thread
        may predict with it meanwhile (a worker gets a Predictor of its own, which
        can share the embedding cache).
      embeddings: ``index -> EmbeddedImage`` of a plane, called once per plane
        visited, in walking order (computed on demand).
      n_planes: planes along the stack axis.
      start: the prompted plane, ``0 <= start < n_planes``.
      points, labels, box: prompts in plane ``start`` as for ``Predictor.predict``
        (``(N, 2)`` (row, col), ``(N,)`` 1/0, ``(4,)`` (row0, col0, row1, col1)
        inclusive); or
      mask: a committed ``(H, W)`` mask of the object in plane ``start``
        (instead of prompts).
      settings: the rules (default :class:`PropagationSettings`).
      directions: ``"forward"`` (increasing index) and/or ``"backward"``, walked in
        this order.
      cancel: polled before each plane; True raises CancelledError.
      pixels: ``index -> (H, W)`` intensities of a plane, for the contrast rule
        (``settings.min_contrast``); None turns the rule off.

    Raises:
      InvalidInputError: bad arguments, or a seed whose mask is empty.
      CancelledError: ``cancel()`` returned True.
    """
    settings = PropagationSettings() if settings is None else settings
    if not isinstance(settings, PropagationSettings):
        raise InvalidInputError(
            f"settings must be PropagationSettings, got {type(settings).__name__}.")
    n_planes = _index(n_planes, "n_planes")
    if n_planes < 1:
        raise InvalidInputError(f"n_planes must be at least 1, got {n_planes}.")
    start = _index(start, "start")
    if not 0 <= start < n_planes:
        raise InvalidInputError(f"start plane {start} is outside the stack's 0..{n_planes - 1}.")
    bad = [d for d in directions if d not in ("forward", "backward")]
    if bad or len(set(directions)) != len(directions):
        raise InvalidInputError(
            f"directions must be 'forward' and/or 'backward' (each once), got {list(directions)}.")
    if mask is not None and (points is not None or box is not None):
        raise InvalidInputError("Give either a seed mask or prompts (points / box), not both.")
    if mask is None and points is None and box is None:
        raise InvalidInputError(
            "No prompt given; pass points=[[row, col]], box=[row0, col0, row1, col1] or a "
            "mask of the object in the start plane.")

    mask_prompts = bool(getattr(getattr(predictor, "model", None), "accepts_mask_prompt", True))
    saved = predictor.embedding
    try:
        done = 0
        total = n_planes
        _check_cancel(cancel)
        _use(predictor, embeddings(start), start)
        if mask is not None:
            seed = np.asarray(mask)
            size = predictor.embedding.original_size
            if seed.shape != tuple(size):
                raise InvalidInputError(
                    f"The seed mask has shape {seed.shape}, but the planes are {tuple(size)}.")
            seed = seed.astype(bool)
            seed_score, seed_logits = math.nan, None
        else:
            seed, seed_score, seed_logits = _predict(
                predictor, points=points, labels=labels, box=box,
                multimask=box is None and _n_points(points) == 1)
        if np.count_nonzero(seed) == 0:
            raise InvalidInputError(
                f"The object's mask in plane {start} is empty; prompt inside the object.")
        contrast = None  # (the seed's contrast, pixels) when the rule applies
        if pixels is not None and settings.min_contrast > 0:
            seed_pixels = np.asarray(pixels(start), dtype=np.float64)
            seed_contrast = mask_contrast(seed_pixels, seed)
            # an object without contrast (a flat plane): the rule cannot judge it
            if abs(seed_contrast) > 1e-6 * max(float(np.ptp(seed_pixels)), 1e-30):
                contrast = (seed_contrast, pixels)
        masks = np.zeros((n_planes, *seed.shape), dtype=bool)
        masks[start] = seed
        reports = {start: PlaneReport(start, "seed", seed_score, int(np.count_nonzero(seed)))}
        done += 1
        yield PropagationProgress(done, total, start)
        stopped: dict[str, str] = {}
        for direction in directions:
            step = 1 if direction == "forward" else -1
            prev, logits = seed, seed_logits
            index, added, reason = start + step, 0, "end"
            while 0 <= index < n_planes:
                if settings.max_planes is not None and added >= settings.max_planes:
                    reason = "max_planes"
                    break
                _check_cancel(cancel)
                _use(predictor, embeddings(index), index)
                if not mask_prompts:  # EfficientSAM: no mask prompt, box / point only
                    logits = None
                current, score, logits = _predict(predictor, **_prompt(prev, logits, settings))
                if settings.single_component:
                    current = _component_overlapping(current, prev)
                report = _judge(index, current, score, prev, settings, contrast)
                reports[index] = report
                done += 1
                yield PropagationProgress(done, total, index)
                if report.status != "kept":
                    reason = report.status
                    break
                masks[index] = current
                prev, index, added = current, index + step, added + 1
            stopped[direction] = reason
    finally:
        if saved is not None:
            predictor.set_embedding(saved.features, saved.original_size, saved.input_size,
                                    image=getattr(saved, "image", None))
        elif hasattr(predictor, "reset_image"):
            predictor.reset_image()
    yield PropagationResult(masks, [reports[k] for k in sorted(reports)], stopped)


def propagate(
    predictor: Any,
    embeddings: EmbeddingProvider,
    n_planes: int,
    start: int,
    *,
    progress: Callable[[PropagationProgress], Any] | None = None,
    **kwargs: Any,
) -> PropagationResult:
    """:func:`iter_propagate` run to the end; ``progress(p)`` is called after each plane."""
    for item in iter_propagate(predictor, embeddings, n_planes, start, **kwargs):
        if isinstance(item, PropagationResult):
            return item
        if progress is not None:
            progress(item)
    raise AssertionError("iter_propagate ended without a result")  # pragma: no cover


def volume_embeddings(
    predictor: Any,
    volume: np.ndarray,
    axis: int = 0,
    contrast_limits: tuple[float, float] | None = None,
    rgb: bool = False,
) -> tuple[EmbeddingProvider, int]:
    """An embedding provider for the planes of ``volume`` along ``axis``, and their number.

    Arguments:
      predictor: its :meth:`~napari_sam.engine.predictor.Predictor.embed` (and cache)
        computes each plane's embedding when asked for.
      volume: ``(N, H, W)`` grey or, with ``rgb``, ``(N, H, W, C)`` colour samples
        last; the stack axis is ``axis`` among the first three.
      axis: which of the (non-colour) axes is the stack axis (z or t).
      contrast_limits: the intensity range mapped to 0..255 for every plane;
        None: the whole volume's range (so a dim plane stays dim).

    Raises:
      InvalidInputError: wrong dimensions, or ``axis`` not in 0..2.
    """
    stack = _stack_first(volume, axis, rgb)
    if contrast_limits is None and stack.dtype not in (np.uint8, np.bool_) and stack.size:
        finite = stack[np.isfinite(stack)] if stack.dtype.kind == "f" else stack
        if finite.size:
            contrast_limits = (float(finite.min()), float(finite.max()))

    def provider(index: int) -> EmbeddedImage:
        plane = stack[index]
        return predictor.embed(to_rgb_uint8(plane, contrast_limits=contrast_limits,
                                            channel_axis=-1 if rgb else None))

    return provider, int(stack.shape[0])


def propagate_volume(
    predictor: Any,
    volume: np.ndarray,
    start: int,
    *,
    z_axis: int = 0,
    rgb: bool = False,
    contrast_limits: tuple[float, float] | None = None,
    progress: Callable[[PropagationProgress], Any] | None = None,
    **kwargs: Any,
) -> PropagationResult:
    """Segment one object through z from prompts in plane ``start``.

    ``volume`` is ``(Z, Y, X)`` in any axis order, ``z_axis`` naming the z axis
    (colour samples last with ``rgb``); prompts and ``mask`` are in the plane's
    own (row, col) order, the remaining two axes in their order. Other keywords
    as :func:`iter_propagate` (``points``, ``labels``, ``box``, ``mask``,
    ``settings``, ``cancel``). The result's ``masks`` have the volume's shape
    (without colour), ``axis = z_axis``.
    """
    provider, n = volume_embeddings(predictor, volume, z_axis, contrast_limits, rgb)
    result = propagate(predictor, provider, n, start, progress=progress,
                       pixels=_plane_pixels(volume, z_axis, rgb), **kwargs)
    result.masks = np.moveaxis(result.masks, 0, z_axis)
    result.axis = z_axis
    return result


def track_object(
    predictor: Any,
    frames: np.ndarray,
    start: int,
    *,
    t_axis: int = 0,
    rgb: bool = False,
    contrast_limits: tuple[float, float] | None = None,
    backward: bool = True,
    progress: Callable[[PropagationProgress], Any] | None = None,
    **kwargs: Any,
) -> PropagationResult:
    """Track one object through time from prompts in frame ``start``.

    The same propagation as :func:`propagate_volume` along ``t_axis``: forward to
    the last frame, then (with ``backward``) back to the first, stopping where the
    object is lost (the rules of :class:`PropagationSettings`; at a division the
    track follows the daughter that overlaps the mother most). Use
    ``result.labels(object_id)`` for per-frame labels that keep one id.
    """
    directions = ("forward", "backward") if backward else ("forward",)
    provider, n = volume_embeddings(predictor, frames, t_axis, contrast_limits, rgb)
    result = propagate(predictor, provider, n, start, progress=progress, directions=directions,
                       pixels=_plane_pixels(frames, t_axis, rgb), **kwargs)
    result.masks = np.moveaxis(result.masks, 0, t_axis)
    result.axis = t_axis
    return result


# ---------------------------------------------------------------------- helpers


def _index(value: Any, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{name} must be an integer, got {value!r}.") from None


def _n_points(points: Any) -> int:
    """How many (row, col) points ``points`` holds; 0 when malformed (the predictor
    then says what is wrong)."""
    try:
        return int(np.size(np.asarray(points, dtype=np.float64))) // 2
    except (TypeError, ValueError):
        return 0


def _check_cancel(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise CancelledError("Propagation was cancelled.")


def _stack_first(volume: np.ndarray, axis: int, rgb: bool) -> np.ndarray:
    """``volume`` with the stack axis first: ``(N, H, W)`` or ``(N, H, W, C)``."""
    vol = np.asarray(volume)
    want = 4 if rgb else 3
    if vol.ndim != want or (rgb and not 1 <= vol.shape[-1] <= 4):
        shape = "(N, H, W, C) with C in 1..4" if rgb else "(N, H, W)"
        raise InvalidInputError(
            f"The stack must be {shape}, got shape {vol.shape}; pick one channel or time "
            "point first for more axes.")
    axis = _index(axis, "axis")
    if not -3 <= axis < 3:
        raise InvalidInputError(f"The stack axis must be 0, 1 or 2, got {axis}.")
    return np.moveaxis(vol, axis % 3, 0)


def _plane_pixels(volume: np.ndarray, axis: int, rgb: bool) -> PixelProvider:
    """``index -> (H, W)`` float32 intensities of a plane (colour samples averaged)."""
    stack = _stack_first(volume, axis, rgb)

    def pixels(index: int) -> np.ndarray:
        plane = np.asarray(stack[index], dtype=np.float32)
        return plane.mean(-1) if rgb else plane

    return pixels


def _use(predictor: Any, embedded: EmbeddedImage, index: int) -> None:
    if not isinstance(embedded, EmbeddedImage):
        raise InvalidInputError(
            f"The embedding provider returned {type(embedded).__name__} for plane {index}; it "
            "must return an EmbeddedImage (Predictor.embed).")
    predictor.set_embedding(embedded.features, embedded.original_size, embedded.input_size,
                            image=getattr(embedded, "image", None))


def _predict(predictor: Any, multimask: bool = False, **prompt: Any):
    """``(mask (H, W) bool, score, low-res logits (4E, 4E))`` of the best mask."""
    pred = predictor.predict(multimask=multimask, **prompt)
    best = int(np.argmax(pred.scores))
    return (np.asarray(pred.masks[best], dtype=bool), float(pred.scores[best]),
            np.asarray(pred.logits[best], dtype=np.float32))


def _prompt(prev: np.ndarray, logits: np.ndarray | None,
            settings: PropagationSettings) -> dict[str, Any]:
    """Prompts for the next plane from the previous plane's mask and logits."""
    prompt: dict[str, Any] = {}
    if settings.use_box:
        rows = np.flatnonzero(prev.any(1))
        cols = np.flatnonzero(prev.any(0))
        box = np.array([rows[0], cols[0], rows[-1], cols[-1]], np.float64)
        # a mask one pixel thin gets one pixel more extent: a box without area is no prompt
        box[2:] = np.maximum(box[2:], box[:2] + 1)
        prompt["box"] = box
    if settings.use_point:
        prompt["points"] = np.array([innermost_pixel(prev)], np.float64)
        prompt["labels"] = np.ones(1, np.int64)
    if settings.use_mask and logits is not None:
        prompt["mask_input"] = logits[None]
    if not prompt:  # mask input only, but the seed was a mask: fall back on its box
        return _prompt(prev, None, dataclasses.replace(settings, use_box=True))
    prompt["multimask"] = "box" not in prompt and "mask_input" not in prompt
    return prompt


def innermost_pixel(mask: np.ndarray) -> tuple[int, int]:
    """``(row, col)`` of the pixel of a non-empty 2D mask farthest from its outline
    (the image border counts as outside); the first in raster order on ties."""
    from scipy.ndimage import distance_transform_edt

    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    window = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    depth = distance_transform_edt(np.pad(window, 1))[1:-1, 1:-1]
    r, c = divmod(int(np.argmax(depth)), depth.shape[1])
    return int(rows[0] + r), int(cols[0] + c)


def _component_overlapping(mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The connected part (8-neighbours) of ``mask`` that overlaps ``reference`` most
    (ties: the larger part)."""
    from scipy.ndimage import label

    parts, n = label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    overlap = np.bincount(parts[reference], minlength=n + 1)[1:]
    size = np.bincount(parts.ravel(), minlength=n + 1)[1:]
    best = max(range(n), key=lambda k: (overlap[k], size[k]))
    return parts == best + 1


def mask_contrast(plane: np.ndarray, mask: np.ndarray, ring: int = CONTRAST_RING) -> float:
    """Mean of ``plane`` inside ``mask`` minus its mean in a ring of ``ring`` pixels
    around it, in the plane's intensity units; 0 for an empty mask or ring."""
    from scipy.ndimage import binary_dilation

    values = np.asarray(plane, dtype=np.float64)
    around = binary_dilation(mask, iterations=ring) & ~mask
    if not mask.any() or not around.any():
        return 0.0
    return float(values[mask].mean()) - float(values[around].mean())


def _judge(index: int, mask: np.ndarray, score: float, prev: np.ndarray,
           settings: PropagationSettings,
           contrast: tuple[float, PixelProvider] | None = None) -> PlaneReport:
    """The plane's report: ``"kept"`` or the first stop rule it fails."""
    area = int(np.count_nonzero(mask))
    prev_area = int(np.count_nonzero(prev))
    inter = int(np.count_nonzero(mask & prev))
    union = area + prev_area - inter
    overlap = inter / union if union else 0.0
    ratio = area / prev_area if prev_area else math.inf
    if area < settings.min_area:
        status = "empty"
    elif score < settings.min_score:
        status = "low_score"
    elif max(ratio, 1.0 / ratio) > settings.max_area_ratio:
        status = "area_change"
    elif overlap < settings.min_overlap:
        status = "low_overlap"
    elif contrast is not None and (
            mask_contrast(contrast[1](index), mask) / contrast[0] < settings.min_contrast):
        status = "low_contrast"
    else:
        status = "kept"
    return PlaneReport(index, status, score, area, overlap, ratio)
