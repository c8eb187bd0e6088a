"""Evaluation of SAM models: interactive point/box mIoU and everything-mode AP.

Main entry point: :func:`evaluate` (see :mod:`napari_sam.evaluation.evaluate`);
metric definitions in :mod:`napari_sam.evaluation.metrics`.
"""

from .evaluate import evaluate, format_results, write_results
from .metrics import iou_matrix, mask_iou, matching_metrics, mean_metrics

__all__ = [
    "evaluate",
    "format_results",
    "iou_matrix",
    "mask_iou",
    "matching_metrics",
    "mean_metrics",
    "write_results",
]
