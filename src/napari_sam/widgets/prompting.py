"""Pure rules of the interactive widget (no Qt, no napari, no torch).

Everything here is in image data pixels, napari/numpy order: points ``(row, col)``,
boxes ``(row0, col0, row1, col1)``, masks ``(H, W)``.

* :class:`Prompts`, :class:`DecodePlan` and :func:`plan_decode` (the decoding rule)
  live in :mod:`napari_sam.engine.session` and are re-exported here.
* :func:`mask_bbox` and :func:`crop_mask` keep large-image work to the mask's
  bounding box (previews and commits of an 8000 x 8000 plane touch only the object).
* :func:`superseded_boxes` says which rectangles are no longer used: only the most
  recent rectangle of a plane is a prompt, so the older ones are removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_sam.engine.session import DecodePlan, Prompts, plan_decode

__all__ = [
    "DecodePlan",
    "Prompts",
    "crop_mask",
    "mask_bbox",
    "plan_decode",
    "superseded_boxes",
]


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
