"""Everything-mode (automatic mask generation) evaluation.

Each image is segmented with an :class:`~napari_sam.engine.everything.AutomaticMaskGenerator`
(or anything with ``generate(image) -> list of records`` holding a boolean
``"segmentation"``); the predicted masks, which may overlap, are matched to the
ground-truth objects as described in :mod:`napari_sam.evaluation.metrics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import matching_metrics

__all__ = ["evaluate_image_everything", "records_to_masks"]


def records_to_masks(records: list[dict[str, Any]], shape: tuple[int, int]) -> np.ndarray:
    """Stack the ``"segmentation"`` masks of generator records -> (N, H, W) bool."""
    if not records:
        return np.zeros((0, *shape), dtype=bool)
    return np.stack([np.asarray(r["segmentation"], dtype=bool) for r in records])


def evaluate_image_everything(
    generator: Any,
    image: np.ndarray,
    labels: np.ndarray,
    thresholds: tuple[float, ...] = (0.5, 0.75),
) -> dict[str, float]:
    """Run ``generator.generate(image)`` and score its masks against ``labels``.

    Returns :func:`~napari_sam.evaluation.metrics.matching_metrics` (``ap50``,
    ``ap75``, ``ap_dsb``, precision/recall/F1 and counts per threshold).
    """
    records = generator.generate(image)
    masks = records_to_masks(records, labels.shape)
    return matching_metrics(labels, masks, thresholds)
