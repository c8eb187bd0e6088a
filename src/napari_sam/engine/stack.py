"""One id rule for label images of a stack of 2D planes.

Everything-mode segments each 2D plane of a stack on its own; the planes' label
images are then numbered with one rule, used by the "Segment Everything" widget
and by ``napari-sam everything`` (:func:`napari_sam.engine.batch.everything_labels`):

* within a plane, objects keep the ids of their painting
  (:func:`~napari_sam.engine.everything.records_to_labels`: 1..n, largest mask
  first), so a single 2D image is labelled exactly as ``records_to_labels`` does;
* each plane's ids are shifted by the largest id of the planes before it, in plane
  order (C order of the stack's leading axes): ids are unique across the stack
  and increase from plane to plane (objects are not linked between planes);
* a mask that later masks of its plane cover completely has no pixel: its id is
  unused (and, as with ``records_to_labels``, ids may skip it).

:func:`link_planes` then turns such per-plane ids into 3D objects (or tracks):
objects of neighbouring planes along one stack axis that overlap are given one id
(see there for the matching rule and its threshold, :data:`LINK_IOU`), and linked
objects shorter than ``min_planes`` planes can be dropped
(:func:`drop_short_objects`; :data:`MIN_PLANES` is the default of the CLI and widget).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from napari_sam.errors import InvalidInputError

__all__ = [
    "LINK_IOU", "MIN_PLANES", "PlaneLinker", "StackLabeller", "check_link_iou",
    "check_min_planes", "drop_short_objects", "label_planes", "link_planes", "linked_ids",
]

#: default IoU of two objects of neighbouring planes above which they are one object
LINK_IOU = 0.3
#: least number of planes of a linked object that ``napari-sam everything`` and the
#: Segment Everything widget keep by default (measured: docs/volumes.md); the library
#: functions keep every object (1) unless asked
MIN_PLANES = 3


class StackLabeller:
    """Renumbers the label images of successive planes with the stack's id rule.

    Arguments:
      start: the largest id already used (the first new id is ``start + 1``).
    """

    def __init__(self, start: int = 0) -> None:
        self.last_id = int(start)

    def add(self, plane_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Number one plane's objects after those of the planes added before.

        Arguments:
          plane_labels: ``(H, W)`` non-negative integer labels of one plane, 0 =
            background, object ``k`` of the plane painted as ``k``.

        Returns:
          ``(labels, new_ids)``: ``(H, W)`` uint32 labels with stack-wide ids, and
          ``new_ids`` (``max(plane_labels) + 1``,) uint32 with ``new_ids[k]`` the
          stack id of plane object ``k`` (0 when it has no pixel; ``new_ids[0]`` is 0).

        Raises:
          InvalidInputError: negative labels.
        """
        plane = np.asarray(plane_labels)
        if plane.size and plane.min() < 0:
            raise InvalidInputError("Plane labels must be >= 0 (0 is background).")
        flat = plane.reshape(-1)
        n = int(flat.max()) if flat.size else 0
        # bincount is linear in the pixels (np.unique sorts: seconds on large planes)
        present = np.bincount(flat, minlength=n + 1).astype(bool)
        present[0] = False
        new_ids = np.where(present, np.arange(n + 1, dtype=np.uint32) + np.uint32(self.last_id),
                           np.uint32(0)).astype(np.uint32)
        if n:
            self.last_id += n  # n is present: the plane's largest id has pixels
        return new_ids[plane], new_ids


def label_planes(
    planes: Iterable[tuple[tuple[int, ...], np.ndarray]], start: int = 0
) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """``(index, plane labels)`` pairs -> ``(index, labels with stack-wide ids)``.

    The rule is the module's; see :class:`StackLabeller` for the arrays.
    """
    labeller = StackLabeller(start)
    for index, plane_labels in planes:
        yield index, labeller.add(plane_labels)[0]


def link_planes(
    labels: np.ndarray, axis: int = 0, iou_threshold: float = LINK_IOU, min_planes: int = 1,
) -> np.ndarray:
    """Link the 2D objects of a stack's planes into 3D objects (or tracks) by overlap.

    Walking along ``axis``, the objects of each plane are matched one-to-one with
    those of the plane before (Hungarian matching maximising the summed IoU, on
    the pixels of the two planes); a matched pair with ``IoU >= iou_threshold``
    (and IoU > 0) shares one id, every other object starts a new one. Along a
    time axis this is tracking by overlap: at a division the daughter that
    overlaps its mother most keeps the id, the other starts a new one. An object
    missing from one plane is not bridged: it gets a new id after the gap. Lines
    along ``axis`` at different indices of the other stack axes (e.g. the time
    points of a ``(T, Z, H, W)`` stack linked along z) are linked separately.
    Linked objects on fewer than ``min_planes`` planes are then dropped
    (:func:`drop_short_objects`).

    Arguments:
      labels: ``(*stack, H, W)`` non-negative integer labels, 0 = background; the
        ids of different planes need not be distinct (each plane is read alone).
      axis: the stack axis to link along (``0 <= axis < len(stack)``, or negative
        from the last stack axis: -1 is the axis next to the planes).
      iou_threshold: the least IoU ([0, 1]) of two objects of neighbouring planes
        that are one object (default :data:`LINK_IOU`).
      min_planes: the least number of planes along ``axis`` a linked object must
        span to be kept (default 1: all; the CLI and widget use :data:`MIN_PLANES`).

    Returns:
      ``(*stack, H, W)`` uint32 labels: ids 1..n, numbered in order of first
      appearance (lines in C order, then planes along ``axis``, then plane ids).

    Raises:
      InvalidInputError: not an integer array with at least one stack axis,
        negative labels, ``axis`` out of range, threshold outside [0, 1],
        ``min_planes`` not a positive integer.
    """
    lab = _check_stack_labels(labels)
    axis = _check_stack_axis(axis, lab)
    iou_threshold = check_link_iou(iou_threshold)
    min_planes = check_min_planes(min_planes)
    lines = np.moveaxis(lab, axis, 0)  # (L, *rest, H, W)
    out = np.zeros(lines.shape, dtype=np.uint32)
    counter = [0]
    for rest in np.ndindex(*lines.shape[1:-2]):
        prev = None
        for k in range(lines.shape[0]):
            out[(k, *rest)], prev = _link_step(prev, lines[(k, *rest)], iou_threshold, counter)
    out = np.moveaxis(out, 0, axis)
    return drop_short_objects(out, axis, min_planes) if min_planes > 1 else out


def drop_short_objects(labels: np.ndarray, axis: int = 0,
                       min_planes: int = MIN_PLANES) -> np.ndarray:
    """Remove the objects of a stack that lie on fewer than ``min_planes`` planes.

    An object's length is the number of indices along ``axis`` at which it has a
    pixel (for :func:`link_planes`' output, whose objects have no gaps, its extent
    in planes). Out-of-focus blur and noise segmented in one plane become
    one-plane objects after linking; a real nucleus spans several planes. Along
    a time axis this drops tracks shorter than ``min_planes`` frames (including a
    cell that enters in the last frame).

    Arguments:
      labels: ``(*stack, H, W)`` non-negative integer labels, 0 = background.
      axis: the stack axis along which lengths are counted (negative: from the
        last stack axis).
      min_planes: the least number of planes of a kept object (>= 1).

    Returns:
      ``(*stack, H, W)`` uint32 labels: the kept objects renumbered 1..n in the
      order of their ids (which, for :func:`link_planes`' output, is the order
      of first appearance); removed objects become background.

    Raises:
      InvalidInputError: as :func:`link_planes`.
    """
    lab = _check_stack_labels(labels)
    axis = _check_stack_axis(axis, lab)
    min_planes = check_min_planes(min_planes)
    if not lab.size:
        return lab.astype(np.uint32)
    if int(lab.max()) < max(lab.size, 1 << 16):
        dense, n = lab, int(lab.max()) + 1  # ids index a table (bincount: no sort)
    else:  # sparse large ids: make them dense first
        ids, dense = np.unique(lab, return_inverse=True)
        dense, n = dense.reshape(lab.shape), ids.size
    planes = np.zeros(n, dtype=np.int64)  # planes on which each id has a pixel
    lines = np.moveaxis(dense, axis, 0)
    for k in range(lines.shape[0]):
        planes += np.bincount(lines[k].ravel().astype(np.intp), minlength=n) > 0
    keep = planes >= min_planes
    keep[0] = False  # background (the smallest id when present; else absent, planes 0)
    if dense is not lab and ids[0] != 0:
        keep[0] = planes[0] >= min_planes
    lookup = np.zeros(n, dtype=np.uint32)
    lookup[keep] = np.arange(1, np.count_nonzero(keep) + 1, dtype=np.uint32)
    return lookup[dense]


def _check_stack_labels(labels: Any) -> np.ndarray:
    """``labels`` as an integer ``(*stack, H, W)`` array of non-negative ids."""
    lab = np.asarray(labels)
    if lab.ndim < 3 or lab.dtype.kind not in "iub":
        raise InvalidInputError(
            f"labels must be an integer (*stack, H, W) array with a stack axis, got "
            f"{lab.dtype} of shape {lab.shape}."
        )
    if lab.size and lab.min() < 0:
        raise InvalidInputError("Labels must be >= 0 (0 is background).")
    return lab


def _check_stack_axis(axis: Any, lab: np.ndarray) -> int:
    """``axis`` of ``(*stack, H, W)`` labels as an index ``0 <= axis < len(stack)``."""
    n_stack = lab.ndim - 2
    try:
        axis = operator.index(axis)
    except TypeError:
        raise InvalidInputError(f"axis must be an integer, got {axis!r}.") from None
    if not -n_stack <= axis < n_stack:
        raise InvalidInputError(
            f"axis {axis} is not a stack axis of labels of shape {lab.shape}; use 0..{n_stack - 1}."
        )
    return axis % n_stack


def check_min_planes(value: Any) -> int:
    """``value`` as a least object length in planes (an integer >= 1); InvalidInputError
    otherwise."""
    try:
        planes = operator.index(value)
    except TypeError:
        planes = 0
    if isinstance(value, bool) or planes < 1:
        raise InvalidInputError(
            f"The least number of planes of a linked object must be an integer >= 1, got "
            f"{value!r}; 1 keeps every object, {MIN_PLANES} drops objects seen in one plane only.")
    return int(planes)


class PlaneLinker:
    """:func:`link_planes` along the last stack axis, one plane at a time.

    For a caller that gets a stack's planes one by one in C order of the stack
    index (as the Segment Everything widget does): each plane is linked to the
    one before it along the last stack axis as it arrives, and the ids are
    exactly those :func:`link_planes` (``axis=-1``, ``min_planes=1``) gives for
    the whole stack. An object's length is only known once the stack is done:
    :meth:`finish` then drops the short objects of the finished stack, so that
    ``finish`` of the planes :meth:`add` returned equals :func:`link_planes`
    with ``min_planes``.

    Arguments:
      iou_threshold: see :func:`link_planes`.
      min_planes: see :func:`link_planes` (applied by :meth:`finish`).
    """

    def __init__(self, iou_threshold: float = LINK_IOU, min_planes: int = 1) -> None:
        self.iou_threshold = check_link_iou(iou_threshold)
        self.min_planes = check_min_planes(min_planes)
        self._counter = [0]
        self._prev: tuple[tuple[int, ...], Any] | None = None

    def add(self, index: tuple[int, ...], plane_labels: np.ndarray) -> np.ndarray:
        """``(H, W)`` uint32 linked labels of the plane at stack ``index``.

        Raises:
          InvalidInputError: negative labels, or planes out of C order.
        """
        plane = np.asarray(plane_labels)
        if plane.size and plane.min() < 0:
            raise InvalidInputError("Plane labels must be >= 0 (0 is background).")
        index = tuple(int(i) for i in index)
        prev = None
        if self._prev is not None:
            last = self._prev[0]
            if index <= last:
                raise InvalidInputError(f"Planes must come in stack order; {index} came after "
                                        f"{last}.")
            if index[:-1] == last[:-1] and index[-1] == last[-1] + 1:
                prev = self._prev[1]
        out, state = _link_step(prev, plane, self.iou_threshold, self._counter)
        self._prev = (index, state)
        return out

    def finish(self, stack_labels: np.ndarray) -> np.ndarray:
        """The finished ``(*stack, H, W)`` stack of :meth:`add`'s planes without the
        objects shorter than ``min_planes`` (renumbered 1..n); unchanged (as uint32)
        when ``min_planes`` is 1."""
        if self.min_planes == 1:
            return np.asarray(stack_labels, dtype=np.uint32)
        return drop_short_objects(stack_labels, axis=-1, min_planes=self.min_planes)


def _link_step(
    prev: tuple[np.ndarray, np.ndarray, np.ndarray] | None, plane_labels: np.ndarray,
    threshold: float, counter: list[int],
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Link one plane to the previous one (``prev``: its plane, object ids, linked ids).

    New objects take ids ``counter[0] + 1, ...`` in the order of their plane ids.
    Returns the plane's linked labels and its state for the next step.
    """
    from scipy.optimize import linear_sum_assignment

    plane = np.asarray(plane_labels).astype(np.int64)
    area = np.bincount(plane.ravel())
    ids = np.flatnonzero(area[1:]) + 1
    linked = np.zeros(ids.size, dtype=np.uint32)
    if prev is not None and ids.size and prev[1].size:
        rows, cols = _overlap_matches(prev[0], prev[1], plane, ids, threshold,
                                      linear_sum_assignment)
        linked[cols] = prev[2][rows]
    for j in np.flatnonzero(linked == 0):
        counter[0] += 1
        linked[j] = counter[0]
    lookup = np.zeros(area.size, dtype=np.uint32)
    lookup[ids] = linked
    return lookup[plane], (plane, ids, linked)


def check_link_iou(value: Any) -> float:
    """``value`` as a linking IoU threshold in [0, 1]; InvalidInputError otherwise."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = float("nan")
    if isinstance(value, bool) or not 0.0 <= threshold <= 1.0:
        raise InvalidInputError(
            f"The linking IoU threshold must be in [0, 1], got {value!r}; {LINK_IOU} links "
            "objects that overlap by about a third.")
    return threshold


def _overlap_matches(
    prev: np.ndarray, prev_ids: np.ndarray, plane: np.ndarray, ids: np.ndarray,
    threshold: float, assign,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(rows into prev_ids, cols into ids)`` of the objects of ``plane`` matched
    to those of the previous plane ``prev`` (Hungarian, IoU >= threshold and > 0)."""
    both = (prev > 0) & (plane > 0)
    a = np.searchsorted(prev_ids, prev[both])
    b = np.searchsorted(ids, plane[both])
    inter = np.bincount(a * ids.size + b, minlength=prev_ids.size * ids.size)
    inter = inter.reshape(prev_ids.size, ids.size).astype(np.float64)
    area_prev = np.bincount(prev.ravel())[prev_ids].astype(np.float64)
    area_cur = np.bincount(plane.ravel())[ids].astype(np.float64)
    iou = inter / (area_prev[:, None] + area_cur[None, :] - inter)
    rows, cols = assign(iou, maximize=True)
    keep = (iou[rows, cols] >= threshold) & (iou[rows, cols] > 0)
    return rows[keep], cols[keep]


def linked_ids(before: np.ndarray, after: np.ndarray) -> dict[int, int]:
    """``{id before: id after}`` of a relabelling of the same pixels (e.g. by
    :func:`link_planes`): every object of ``before`` has one id in ``after``.

    Arguments:
      before, after: integer label arrays of one shape; 0 = background in both.
    """
    a = np.asarray(before).ravel().astype(np.int64)
    b = np.asarray(after).ravel().astype(np.int64)
    if a.shape != b.shape:
        raise InvalidInputError(f"label arrays differ in shape: {np.shape(before)} vs "
                                f"{np.shape(after)}.")
    fg = a > 0
    if not fg.any():
        return {}
    pairs = np.unique(np.stack([a[fg], b[fg]], 1), axis=0)
    return {int(old): int(new) for old, new in pairs}
