"""Interactive (promptable) evaluation: point and box mIoU with simulated clicks.

Protocol, per ground-truth object of an image (objects with fewer than
``min_area`` pixels are skipped: at DSB scale they are border fragments or
debris, and one click cannot be placed meaningfully):

* **first click**: the object's innermost pixel (maximum of its Euclidean
  distance transform, first in raster order on ties), ``multimask=True``;
  the mask with the highest predicted IoU is kept (as a user of the
  predictor would).
* **correction clicks** 1..``n_clicks``: one click at the innermost pixel of
  the larger error region between the current mask and the truth (positive
  on a false negative region, negative on a false positive one; the same
  rule as training's ``point_mode="center"``), all previous clicks kept, the
  previous low-res logits fed back as ``mask_input``, ``multimask=False``.
  An object already segmented perfectly gets no more clicks and keeps IoU 1.
* **box**: the tight box of the object (inclusive ``(row0, col0, row1,
  col1)``; one pixel wider for objects one pixel thin, whose tight box has no
  area), ``multimask=False`` (as SAM does for boxes).

IoUs are computed at the original image resolution. Everything works with any
predictor that has ``set_image(image)`` and the batched
:meth:`napari_sam.engine.predictor.Predictor.predict`.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from napari_sam.engine.session import InteractiveSession
from napari_sam.errors import InvalidInputError
from napari_sam.evaluation.metrics import paired_mask_iou
from napari_sam.training.prompts import correction_points, innermost_points, prompt_boxes

__all__ = ["PredictorLike", "evaluate_image_interactive"]


class PredictorLike(Protocol):
    def set_image(self, image: np.ndarray) -> None: ...

    def predict(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = True,
    ) -> Any: ...


def evaluate_image_interactive(
    predictor: PredictorLike,
    image: np.ndarray | None,
    labels: np.ndarray,
    n_clicks: int = 3,
    box: bool = True,
    min_area: int = 10,
    batch_size: int = 16,
) -> dict[str, np.ndarray]:
    """Simulated interactive segmentation of every object of one image.

    Arguments:
      predictor: see the module doc. ``set_image(image)`` is called unless
        ``image`` is None (the caller already set it).
      labels: (H, W) integer instance labels of the image.
      n_clicks: number of correction clicks after the first one.
      box: also evaluate tight-box prompts.
      min_area: skip objects with fewer pixels.
      batch_size: objects predicted together (memory grows with it).

    Returns:
      ``ids`` (K,), ``area`` (K,), ``point_iou`` (K, 1 + n_clicks) IoU after
      the first click and after each correction, and ``box_iou`` (K,) (NaN
      when ``box`` is False).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(f"labels must be a 2D integer image, got {labels.shape}.")
    if n_clicks < 0:
        raise InvalidInputError(f"n_clicks must be >= 0, got {n_clicks}.")
    if image is not None:
        predictor.set_image(image)
    ids, areas = np.unique(labels, return_counts=True)
    sel = (ids != 0) & (areas >= min_area)
    ids, areas = ids[sel], areas[sel]
    point_iou = np.full((len(ids), 1 + n_clicks), np.nan)
    box_iou = np.full(len(ids), np.nan)
    for start in range(0, len(ids), batch_size):
        chunk = slice(start, start + batch_size)
        gt = labels[None] == ids[chunk, None, None]
        point_iou[chunk] = _clicks(predictor, gt, n_clicks)
        if box:
            pred = predictor.predict(box=prompt_boxes(gt), multimask=False)
            box_iou[chunk] = paired_mask_iou(np.asarray(pred.masks)[:, 0].astype(bool), gt)
    return {"ids": ids, "area": areas, "point_iou": point_iou, "box_iou": box_iou}


def _clicks(predictor: PredictorLike, gt: np.ndarray, n_clicks: int) -> np.ndarray:
    """IoU (K, 1 + n_clicks) of the click protocol for (K, H, W) ground-truth masks.

    The decoding rule (multimask for the first click, the selected candidate's
    logits fed back for each appended click) is :class:`InteractiveSession`'s.
    """
    K = len(gt)
    out = np.ones((K, 1 + n_clicks))
    session = InteractiveSession(predictor)
    points = innermost_points(gt)[:, None, :].astype(np.float64)  # (K, 1, 2) row, col
    plabels = np.ones((K, 1), dtype=np.int64)
    session.update(points, plabels)
    out[:, 0] = paired_mask_iou(session.mask, gt)
    active = np.flatnonzero(out[:, 0] < 1.0)
    session.keep(active)  # the session's rows follow ``active``
    points, plabels = points[active], plabels[active]
    for k in range(1, n_clicks + 1):
        if active.size == 0:
            break
        xy, lab = correction_points(
            torch.from_numpy(session.mask), torch.from_numpy(gt[active]), mode="center"
        )
        rc = xy.numpy()[:, ::-1].astype(np.float64)
        points = np.concatenate([points, rc[:, None]], 1)
        plabels = np.concatenate([plabels, lab.numpy()[:, None]], 1)
        session.update(points, plabels)  # points appended: refines, one mask
        iou = paired_mask_iou(session.mask, gt[active])
        out[active, k] = iou
        out[active, k + 1 :] = iou[:, None]  # kept when the object is done before the end
        keep = iou < 1.0
        points, plabels, active = points[keep], plabels[keep], active[keep]
        session.keep(keep)
    # objects perfect after the first click keep IoU 1 in later columns (ones)
    return out
