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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from napari_sam.errors import InvalidInputError

__all__ = ["StackLabeller", "label_planes"]


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
