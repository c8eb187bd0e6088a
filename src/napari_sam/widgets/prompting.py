"""Pure rules of the interactive widget (no Qt, no napari, no torch).

Everything here is in image data pixels, napari/numpy order: points ``(row, col)``,
boxes ``(row0, col0, row1, col1)``, masks ``(H, W)``.

* :class:`Prompts` is what one prediction is asked for; :func:`plan_decode` says how
  (three candidates or one, whether the previous low-res logits are fed back).
* :func:`mask_bbox` and :func:`crop_mask` keep large-image work to the mask's
  bounding box (previews and commits of an 8000 x 8000 plane touch only the object).
* :func:`superseded_boxes` says which rectangles are no longer used: only the most
  recent rectangle of a plane is a prompt, so the older ones are removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DecodePlan",
    "Prompts",
    "crop_mask",
    "mask_bbox",
    "plan_decode",
    "superseded_boxes",
]


@dataclass(frozen=True)
class Prompts:
    """The prompts of one prediction.

    Attributes:
      points: ``(N, 2)`` float ``(row, col)``.
      labels: ``(N,)`` int32, 1 positive, 0 negative.
      box: ``(4,)`` float ``(row0, col0, row1, col1)`` or None.
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None

    @classmethod
    def make(
        cls, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None = None
    ) -> Prompts:
        """Copies the arrays (the caller's layers may change them later)."""
        pts = np.asarray(points, dtype=float).reshape(-1, 2).copy()
        lab = np.asarray(labels, dtype=np.int32).reshape(-1).copy()
        b = None if box is None else np.asarray(box, dtype=float).reshape(4).copy()
        return cls(pts, lab, b)

    @property
    def empty(self) -> bool:
        """No point and no box."""
        return len(self.points) == 0 and self.box is None

    def same_as(self, other: Prompts | None) -> bool:
        """Equal points, labels and box (within float tolerance for the coordinates)."""
        if other is None or len(self.points) != len(other.points):
            return False
        return (
            np.allclose(self.points, other.points)
            and np.array_equal(self.labels, other.labels)
            and _same_box(self.box, other.box)
        )

    def extends(self, other: Prompts | None) -> bool:
        """``self`` = ``other`` plus more points (same order, same labels, same box)."""
        if other is None or len(self.points) <= len(other.points):
            return False
        n = len(other.points)
        return (
            np.array_equal(self.points[:n], other.points)
            and np.array_equal(self.labels[:n], other.labels)
            and _same_box(self.box, other.box)
        )


@dataclass(frozen=True)
class DecodePlan:
    """How to decode a set of prompts.

    Attributes:
      multimask: ask for three candidates (a single click is ambiguous: part, object,
        group) instead of one.
      refine: feed the shown candidate's low-res logits back as ``mask_input``.
    """

    multimask: bool
    refine: bool


def plan_decode(prompts: Prompts, previous: Prompts | None, have_logits: bool) -> DecodePlan:
    """The decoding rules of the widget.

    * One point and no box -> three candidates, otherwise one mask.
    * Points only added since the previous prediction (same earlier points, same
      box) and its logits available -> refine: the previous mask guides the model,
      as in SAM's interactive training.
    """
    multimask = len(prompts.points) == 1 and prompts.box is None
    refine = have_logits and prompts.extends(previous)
    return DecodePlan(multimask=multimask, refine=refine)


def mask_bbox(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding box of the True pixels of an ``(H, W)`` mask as ``(rows, cols)`` slices.

    Returns None for an empty mask.
    """
    m = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    # only the rows that hold the mask are scanned for the columns
    cols = np.flatnonzero(m[rows[0] : rows[-1] + 1].any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def crop_mask(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """``(crop, (row0, col0))``: the mask's bounding box and its offset in the mask.

    An empty mask gives a ``(0, 0)`` crop at ``(0, 0)``.
    """
    box = mask_bbox(mask)
    if box is None:
        return np.zeros((0, 0), dtype=bool), (0, 0)
    return np.asarray(mask[box], dtype=bool), (box[0].start, box[1].start)


def superseded_boxes(on_plane: Sequence[bool]) -> list[int]:
    """Indices of rectangles to remove so that one remains on the shown plane.

    Arguments:
      on_plane: for each shape of the boxes layer, in drawing order, whether it
        lies on the shown plane.

    Returns:
      every index on the plane except the last one (the most recent rectangle,
      the only one used as a prompt); shapes of other planes are kept.
    """
    here = [i for i, flag in enumerate(on_plane) if flag]
    return here[:-1]


def _same_box(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.allclose(a, b))
