"""Stacks in the interactive widget: propagation and the embedding store (no Qt, no napari).

The widget segments the last two data axes of an image layer (the plane, (row, col));
the leading axes are stack axes (z, t, ...). Propagation walks ONE of them, the
*stack axis*, from the shown plane, with the other leading axes held at the shown
slice. Everything here is in the image layer's data pixels:

* :func:`stack_axes` / :func:`default_stack_axis`: the axes a user can pick (with
  their names and sizes) and the default, the first non-displayed axis (axis 0);
* :class:`StackWalk`: which planes are walked (``plane_index(k)`` is the full data
  index of plane ``k``);
* :func:`iter_walk` runs :func:`~napari_sam.engine.propagate.iter_propagate` over
  those planes, embedding each plane on demand exactly as the widget embeds the shown
  plane (same normalisation, so the embedding cache and a store are hit), and ends
  with a :class:`PropagatedObject`: the object's bounding-box crop in the image's
  data layout, ready for the preview and for ONE commit;
* :func:`store_location`: where "precompute all planes" writes its store.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam.engine.image import to_rgb_uint8
from napari_sam.engine.propagate import (
    PropagationProgress,
    PropagationResult,
    PropagationSettings,
    iter_propagate,
)
from napari_sam.errors import InvalidInputError

__all__ = [
    "PropagatedObject",
    "StackWalk",
    "default_stack_axis",
    "iter_walk",
    "stack_axes",
    "store_location",
]


def stack_axes(shape: tuple[int, ...], names: tuple[str, ...] | None = None) -> list[str]:
    """One label per stack axis of an image of spatial ``shape`` (RGB channel excluded):
    ``"axis 0 (z): 40 planes"``; empty for a 2D image."""
    lead = shape[:-2]
    out = []
    for axis, size in enumerate(lead):
        name = names[axis] if names is not None and axis < len(names) else ""
        # napari names unnamed axes by number ("-3", "0"): those are left out
        named = f" ({name})" if name and not name.lstrip("-").isdigit() else ""
        out.append(f"axis {axis}{named}: {size} planes")
    return out


def default_stack_axis(shape: tuple[int, ...], displayed: tuple[int, ...] = ()) -> int | None:
    """The first stack axis not displayed (the plane is the last two axes), or None for
    a 2D image. ``displayed`` are the layer's displayed data axes."""
    for axis in range(len(shape) - 2):
        if axis not in displayed:
            return axis
    return None


@dataclass(frozen=True)
class StackWalk:
    """The planes a propagation walks.

    axis: the stack axis (a leading data axis of the image).
    slice_index: the shown plane's leading indices (``len(shape) - 2`` ints); the
      walk starts at ``slice_index[axis]`` and keeps the other leading indices.
    n_planes: the image's size along ``axis``.
    """

    axis: int
    slice_index: tuple[int, ...]
    n_planes: int

    @classmethod
    def make(cls, shape: tuple[int, ...], slice_index: tuple[int, ...], axis: int) -> StackWalk:
        """Check ``axis`` against the image's spatial ``shape``; InvalidInputError if the
        image has no such stack axis."""
        n_lead = len(shape) - 2
        if n_lead < 1:
            raise InvalidInputError(
                "Propagation needs a stack (z or t): this image is a single 2D plane.")
        if not 0 <= int(axis) < n_lead:
            raise InvalidInputError(
                f"The stack axis must be one of 0..{n_lead - 1} (the plane is the last two "
                f"axes), got {axis}.")
        if len(slice_index) != n_lead:
            raise InvalidInputError(
                f"The shown slice {slice_index} does not match the image's {n_lead} stack axes.")
        return cls(int(axis), tuple(int(i) for i in slice_index), int(shape[axis]))

    @property
    def start(self) -> int:
        """The prompted plane, along the stack axis."""
        return self.slice_index[self.axis]

    def plane_index(self, k: int) -> tuple[int, ...]:
        """Leading data indices of plane ``k`` of the walk."""
        index = list(self.slice_index)
        index[self.axis] = int(k)
        return tuple(index)


@dataclass(frozen=True)
class PropagatedObject:
    """A propagated object, cropped to its bounding box, in the image's data layout.

    mask: ``n``-dim bool (``n`` = the image's spatial dims): size ``last - first + 1``
      along the stack axis, 1 along the other stack axes, the bounding box of the
      object's union over planes in (row, col).
    offset: ``n`` ints, data index of ``mask``'s first pixel.
    axis: the stack axis; ``extent``: ``(first, last)`` planes holding the object.
    object_id: the id to commit (the seed's committed label), or None for a new id.
    result: the engine's :class:`~napari_sam.engine.propagate.PropagationResult`.
    computed: planes whose embedding the walk computed (none in the cache or store).
    """

    mask: np.ndarray
    offset: tuple[int, ...]
    axis: int
    extent: tuple[int, int]
    object_id: int | None
    result: PropagationResult
    computed: int

    @property
    def n_planes(self) -> int:
        return self.extent[1] - self.extent[0] + 1

    def planes(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(plane, (h, w) crop)`` along the stack axis (the other stack axes squeezed)."""
        stacked = np.moveaxis(self.mask, self.axis, 0)
        for k in range(stacked.shape[0]):
            yield self.extent[0] + k, stacked[k].reshape(stacked.shape[-2:])


def _crop(result: PropagationResult, walk: StackWalk, computed: int,
          object_id: int | None) -> PropagatedObject:
    """The result's masks ``(N, H, W)`` as a :class:`PropagatedObject`."""
    masks = result.masks
    first, last = result.extent  # the seed is never empty: there is an extent
    any_plane = masks[first:last + 1].any(axis=0)
    rows = np.flatnonzero(any_plane.any(axis=1))
    cols = np.flatnonzero(any_plane.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = masks[first:last + 1, r0:r1, c0:c1]  # (planes, h, w)
    n_lead = len(walk.slice_index)
    # (planes, 1 per other stack axis, h, w), the planes moved to the stack axis
    mask = np.moveaxis(crop.reshape(crop.shape[0], *([1] * (n_lead - 1)), *crop.shape[1:]),
                       0, walk.axis)
    offset = list(walk.plane_index(first)) + [r0, c0]
    return PropagatedObject(np.ascontiguousarray(mask), tuple(offset),
                            walk.axis, (first, last), object_id, result, computed)


def iter_walk(
    predictor: Any,
    data: Any,
    walk: StackWalk,
    seed: np.ndarray,
    *,
    contrast_limits: tuple[float, float] | None,
    rgb: bool = False,
    settings: PropagationSettings | None = None,
    object_id: int | None = None,
    cancel: Callable[[], bool] | None = None,
    on_compute: Callable[[int], Any] | None = None,
) -> Iterator[PropagationProgress | PropagatedObject]:
    """Propagate the ``seed`` mask of the shown plane along ``walk``; yields progress,
    last the :class:`PropagatedObject`.

    Arguments:
      predictor: a Predictor of the worker's own (it sets one plane after another).
      data: the image layer's data, ``(*stack, H, W)`` or ``(*stack, H, W, C)`` with
        ``rgb``; read one plane at a time.
      seed: ``(H, W)`` bool, the object in plane ``walk.start``.
      contrast_limits: the layer's contrast limits (each plane is normalised as the
        widget normalises the shown plane, so cached and stored embeddings are used).
      object_id: carried to the result (the committed label the seed came from).
      cancel: polled before each plane (CancelledError).
      on_compute: called with a plane's index (along the axis) just before the
        encoder runs for it (no cached or stored embedding).
    """
    computed = [0]
    compute = getattr(predictor, "compute_embedding", None)
    current = [walk.start]
    if compute is not None:
        def counting(rgb_pixels: np.ndarray) -> Any:
            computed[0] += 1
            if on_compute is not None:
                on_compute(current[0])
            return compute(rgb_pixels)

        predictor.compute_embedding = counting

    def plane(k: int) -> np.ndarray:
        return np.asarray(data[walk.plane_index(k)])

    def embeddings(k: int) -> Any:
        current[0] = k
        return predictor.embed(to_rgb_uint8(plane(k), contrast_limits))

    def pixels(k: int) -> np.ndarray:
        values = plane(k).astype(np.float32)
        return values.mean(-1) if rgb else values

    try:
        for item in iter_propagate(
            predictor, embeddings, walk.n_planes, walk.start, mask=np.asarray(seed, bool),
            settings=settings, cancel=cancel, pixels=pixels,
        ):
            if isinstance(item, PropagationResult):
                yield _crop(item, walk, computed[0], object_id)
            else:
                yield item
    finally:
        if compute is not None:
            del predictor.compute_embedding


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def store_location(source_path: str | None, name: str, checksum: Callable[[], str],
                   cache_folder: Callable[[], Path]) -> tuple[Path, bool]:
    """Where "precompute all planes" writes: ``(path, beside_the_image)``.

    Beside the image file (:func:`~napari_sam.engine.store.store_path_for`) when the
    layer was opened from one (``source_path``); else in the napari-sam cache folder,
    ``<cache>/embeddings/<layer name>-<checksum>.sam.zarr`` (the image checksum keeps
    two images of the same name apart).
    """
    from napari_sam.engine.store import STORE_SUFFIX, store_path_for

    if source_path:
        return store_path_for(source_path), True
    digest = checksum().split(":")[-1][:16]
    stem = _UNSAFE.sub("_", name).strip("._") or "image"
    return cache_folder() / "embeddings" / f"{stem}-{digest}{STORE_SUFFIX}", False
