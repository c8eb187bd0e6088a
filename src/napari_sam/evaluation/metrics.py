"""Instance segmentation metrics.

Definitions (per image; ``t`` is an IoU threshold):

* Objects are matched one-to-one between ground truth and prediction by
  maximising the number of pairs with ``IoU >= t`` (``scipy``'s
  ``linear_sum_assignment`` on the thresholded IoU matrix, ties broken by
  IoU). For ``t > 0.5`` the matching is unique and this equals greedy matching.
* ``TP`` = matched pairs, ``FP`` = unmatched predictions, ``FN`` = unmatched
  ground-truth objects.
* **AP@t** (what this project calls "AP", as in the Data Science Bowl 2018
  and StarDist) is ``TP / (TP + FP + FN)``. It is *not* the area under a
  precision-recall curve (COCO AP). ``ap50`` and ``ap75`` use ``t = 0.5`` and
  ``0.75``; ``ap_dsb`` is the DSB 2018 score, the mean of AP@t over
  ``t = 0.50, 0.55, ..., 0.95``.
* precision ``TP / (TP + FP)``, recall ``TP / (TP + FN)``, F1
  ``2 TP / (2 TP + FP + FN)``.
* An image with no objects and no predictions scores 1 everywhere. A score
  whose denominator is 0 otherwise is 0 (precision of an empty prediction on
  an image with objects, recall of predictions on an image without objects).

Scores over a dataset are means over images (as in DSB 2018).

The same scores apply to label images of any dimension (3D objects of a volume,
tracks of a time-lapse): :func:`label_iou_matrix` and :func:`label_matching_metrics`,
where an object is all the pixels (voxels) of one id.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_sam.errors import InvalidInputError

__all__ = [
    "DSB_THRESHOLDS",
    "iou_matrix",
    "label_iou_matrix",
    "label_matching_metrics",
    "mask_iou",
    "match_counts",
    "matching_metrics",
    "mean_metrics",
    "paired_mask_iou",
]

DSB_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.96, 0.05), 2).tolist())


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape.

    Two empty masks agree perfectly: their IoU is **1.0** (not 0 and not NaN),
    so an object that is correctly absent does not count as a miss. This is
    the package's one definition of mask IoU; :func:`paired_mask_iou` is its
    batched form (training's ``logits_mask_iou`` works on logits).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise InvalidInputError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def paired_mask_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """:func:`mask_iou` of paired masks: (K, H, W) bool and (K, H, W) bool -> (K,) float64.

    ``pred[k]`` is compared with ``gt[k]``; two empty masks give 1.0.
    """
    pred = pred.reshape(len(pred), -1)
    gt = gt.reshape(len(gt), -1)
    inter = np.count_nonzero(pred & gt, axis=1)
    union = np.count_nonzero(pred | gt, axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _as_masks(pred: np.ndarray | Sequence[np.ndarray], shape: tuple[int, int]) -> list[np.ndarray]:
    if isinstance(pred, np.ndarray) and pred.ndim == 2 and pred.dtype != bool:
        ids = np.unique(pred)
        return [pred == i for i in ids[ids != 0]]
    masks = [np.asarray(m, dtype=bool) for m in pred]
    for m in masks:
        if m.shape != shape:
            raise InvalidInputError(f"a predicted mask has shape {m.shape}, expected {shape}")
    return masks


def iou_matrix(gt: np.ndarray, pred: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """IoU of every ground-truth object with every predicted one.

    Arguments:
      gt: (H, W) integer instance labels (0 = background).
      pred: (H, W) integer instance labels, or a sequence / (N, H, W) stack of
        boolean masks (which may overlap, as everything-mode masks do).

    Returns:
      (n_gt, n_pred) float64; rows follow the sorted gt ids, columns the
      sorted pred ids or the order of the masks.
    """
    gt = np.asarray(gt)
    if gt.ndim != 2 or not np.issubdtype(gt.dtype, np.integer):
        raise InvalidInputError(f"gt must be a 2D integer label image, got {gt.shape} {gt.dtype}")
    gt_ids, gt_inv, gt_area = np.unique(gt, return_inverse=True, return_counts=True)
    gt_inv = gt_inv.reshape(gt.shape)
    keep = gt_ids != 0
    masks = _as_masks(pred, gt.shape)
    n_gt, n_pred = int(keep.sum()), len(masks)
    out = np.zeros((n_gt, n_pred))
    if n_gt == 0 or n_pred == 0:
        return out
    for j, m in enumerate(masks):
        area = np.count_nonzero(m)
        if area == 0:
            continue
        inter = np.bincount(gt_inv[m], minlength=len(gt_ids))[keep]
        out[:, j] = inter / (gt_area[keep] + area - inter)
    return out


def match_counts(iou: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` of a one-to-one matching at ``IoU >= threshold``."""
    n_gt, n_pred = iou.shape
    if n_gt == 0 or n_pred == 0:
        return 0, n_pred, n_gt
    ok = iou >= threshold
    if threshold > 0.5:
        # ground-truth objects are disjoint, so a prediction has IoU > 0.5 with at
        # most one of them; every object with such a prediction can be matched
        tp = int(ok.any(1).sum())
    else:
        from scipy.optimize import linear_sum_assignment

        # maximise the number of matches first, then their IoU
        rows, cols = linear_sum_assignment(-(ok + ok * iou * 1e-3))
        tp = int(ok[rows, cols].sum())
    return tp, n_pred - tp, n_gt - tp


def _ratio(num: float, den: float, perfect: bool = True) -> float:
    """``num / den``; when ``den`` is 0: 1 if ``perfect`` (nothing was expected) else 0."""
    if den == 0:
        return 1.0 if perfect else 0.0
    return num / den


def matching_metrics(
    gt: np.ndarray,
    pred: np.ndarray | Sequence[np.ndarray],
    thresholds: Sequence[float] = (0.5, 0.75),
) -> dict[str, float]:
    """Per-image scores of ``pred`` against ``gt`` (definitions in the module doc).

    Returns keys ``ap50, precision50, recall50, f1_50, tp50, fp50, fn50`` for
    each threshold (named by ``round(100 t)``), ``ap_dsb``, ``n_gt`` and ``n_pred``.
    """
    return _scores(iou_matrix(gt, pred), thresholds)


def _scores(iou: np.ndarray, thresholds: Sequence[float]) -> dict[str, float]:
    """:func:`matching_metrics`' scores from an (n_gt, n_pred) IoU matrix."""
    out: dict[str, float] = {"n_gt": float(iou.shape[0]), "n_pred": float(iou.shape[1])}
    for t in sorted(set(thresholds) | set(DSB_THRESHOLDS)):
        tp, fp, fn = match_counts(iou, t)
        name = f"{round(100 * t)}"
        out[f"ap{name}"] = _ratio(tp, tp + fp + fn)
        if t in thresholds:
            out[f"precision{name}"] = _ratio(tp, tp + fp, perfect=fn == 0)
            out[f"recall{name}"] = _ratio(tp, tp + fn, perfect=fp == 0)
            out[f"f1_{name}"] = _ratio(2 * tp, 2 * tp + fp + fn)
            out[f"tp{name}"], out[f"fp{name}"], out[f"fn{name}"] = float(tp), float(fp), float(fn)
    out["ap_dsb"] = float(np.mean([out[f"ap{round(100 * t)}"] for t in DSB_THRESHOLDS]))
    keep = {f"ap{round(100 * t)}" for t in thresholds}
    for t in DSB_THRESHOLDS:
        key = f"ap{round(100 * t)}"
        if key not in keep:
            del out[key]
    return out


def label_iou_matrix(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every ground-truth object with every predicted one, for label images of any
    dimension (e.g. (Z, Y, X) volumes: an object is all voxels of one id).

    Arguments:
      gt, pred: integer instance labels of the same shape (0 = background).

    Returns:
      (n_gt, n_pred) float64; rows follow the sorted nonzero gt ids, columns the
      sorted nonzero pred ids.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    for name, a in (("gt", gt), ("pred", pred)):
        if a.ndim < 1 or not np.issubdtype(a.dtype, np.integer):
            raise InvalidInputError(
                f"{name} must be an integer label image, got {a.shape} {a.dtype}")
    if gt.shape != pred.shape:
        raise InvalidInputError(f"label shapes differ: gt {gt.shape} vs pred {pred.shape}")
    gt_ids, gt_inv = np.unique(gt, return_inverse=True)
    pred_ids, pred_inv = np.unique(pred, return_inverse=True)
    n_p = len(pred_ids)
    # contingency table: overlap of every (gt id, pred id) pair, background included
    table = np.bincount(gt_inv.ravel() * n_p + pred_inv.ravel(),
                        minlength=len(gt_ids) * n_p).reshape(len(gt_ids), n_p)
    gt_area, pred_area = table.sum(1), table.sum(0)
    keep_g, keep_p = gt_ids != 0, pred_ids != 0
    inter = table[np.ix_(keep_g, keep_p)]
    union = gt_area[keep_g][:, None] + pred_area[keep_p][None, :] - inter
    return inter / np.maximum(union, 1)


def label_matching_metrics(
    gt: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = (0.5, 0.75)
) -> dict[str, float]:
    """:func:`matching_metrics` for label images of any dimension (3D AP50 of a volume's
    objects, matched one-to-one at IoU >= t over all their voxels): same keys and
    definitions, from :func:`label_iou_matrix`."""
    return _scores(label_iou_matrix(gt, pred), thresholds)


def mean_metrics(per_image: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each score over images; ``tp/fp/fn/n_*`` counts are summed instead."""
    if not per_image:
        return {}
    out: dict[str, float] = {}
    for key in per_image[0]:
        vals = [float(d[key]) for d in per_image if key in d]
        counts = key.startswith(("tp", "fp", "fn", "n_"))
        out[key] = float(np.sum(vals)) if counts else float(np.mean(vals))
    return out
