"""n-D label matching (evaluation.metrics.label_iou_matrix / label_matching_metrics):
hand-made volumes whose scores are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.errors import InvalidInputError
from napari_sam.evaluation.metrics import (
    iou_matrix,
    label_iou_matrix,
    label_matching_metrics,
    matching_metrics,
)


def _volume_pair() -> tuple[np.ndarray, np.ndarray]:
    """gt: two 4 x 3 x 3 boxes (ids 1, 2). pred: id 5 = gt 1 exactly; gt 2 split along z
    into id 7 (plane 0: IoU 9/36) and id 8 (planes 1-3: IoU 27/36); id 9 a false object."""
    gt = np.zeros((4, 6, 6), np.uint16)
    gt[:, :3, :3] = 1
    gt[:, 3:, 3:] = 2
    pred = np.zeros((4, 6, 6), np.int32)
    pred[:, :3, :3] = 5
    pred[0, 3:, 3:] = 7
    pred[1:, 3:, 3:] = 8
    pred[0, :3, 3:] = 9
    return gt, pred


def test_label_iou_matrix_counts_voxels_over_all_planes():
    gt, pred = _volume_pair()
    expected = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.25, 0.75, 0.0]])
    np.testing.assert_allclose(label_iou_matrix(gt, pred), expected)


def test_3d_ap_counts_a_split_object_as_a_false_positive():
    gt, pred = _volume_pair()
    m = label_matching_metrics(gt, pred, thresholds=(0.5, 0.8))
    # t = 0.5: 5-1 and 8-2 match; 7 and 9 are false: 2 / (2 + 2 + 0)
    assert (m["tp50"], m["fp50"], m["fn50"]) == (2, 2, 0)
    assert m["ap50"] == pytest.approx(0.5)
    # t = 0.8: only 5-1; gt 2 missed: 1 / (1 + 3 + 1)
    assert (m["tp80"], m["fp80"], m["fn80"]) == (1, 3, 1)
    assert m["ap80"] == pytest.approx(0.2)
    assert (m["n_gt"], m["n_pred"]) == (2, 4)
    # plane 0 alone, in 2D: 7 covers gt 2 exactly there, so 2D matching finds it
    assert matching_metrics(gt[0], pred[0])["tp50"] == 2


def test_label_metrics_agree_with_the_2d_functions_on_a_plane():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 5, (20, 30)).astype(np.uint8)
    pred = rng.integers(0, 4, (20, 30)).astype(np.int64)
    np.testing.assert_allclose(label_iou_matrix(gt, pred), iou_matrix(gt, pred))
    assert label_matching_metrics(gt, pred) == matching_metrics(gt, pred)


def test_empty_volumes_score_one_and_a_miss_scores_zero():
    empty = np.zeros((3, 4, 4), np.uint8)
    assert label_matching_metrics(empty, empty)["ap50"] == 1.0
    gt = empty.copy()
    gt[1, 1:3, 1:3] = 4
    m = label_matching_metrics(gt, empty)
    assert (m["ap50"], m["fn50"], m["n_pred"]) == (0.0, 1, 0)


@pytest.mark.parametrize("gt, pred, words", [
    (np.zeros((2, 3, 3), np.uint8), np.zeros((2, 3, 4), np.uint8), "shapes differ"),
    (np.zeros((2, 3, 3), np.float32), np.zeros((2, 3, 3), np.uint8), "gt must be an integer"),
    (np.zeros((2, 3, 3), np.uint8), np.zeros((2, 3, 3), bool), "pred must be an integer"),
])
def test_bad_labels_are_refused(gt, pred, words):
    with pytest.raises(InvalidInputError, match=words):
        label_iou_matrix(gt, pred)
