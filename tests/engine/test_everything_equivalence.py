"""Everything-mode against the reference ``SamAutomaticMaskGenerator``.

Both generators get the same small random-weight model. Random weights give
weak, image-wide masks: their logits are scaled up (the last layer of each
hypernetwork MLP, identically in both models) so that the stability score
means something, and the quality thresholds are lowered so that enough masks
survive. The reference's small-region cleanup needs OpenCV, which is not
installed; a stand-in for ``cv2.connectedComponentsWithStats`` built on
scipy is injected for that test only.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from napari_sam.engine import masks as M
from napari_sam.engine.everything import AutomaticMaskGenerator
from napari_sam.evaluation.metrics import mask_iou

pytestmark = pytest.mark.reference

LOW_THRESHOLDS = dict(pred_iou_thresh=0.0, stability_score_thresh=0.5, box_nms_thresh=1.0)


def sharpen_(sam: torch.nn.Module, factor: float = 100.0) -> torch.nn.Module:
    """Scale the mask logits of ``sam`` by ``factor`` (hypernetwork output layers)."""
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(factor)
            mlp.layers[-1].bias.mul_(factor)
    return sam


@pytest.fixture(scope="module")
def models():
    from reference_utils import build_random_sam, make_reference_sam, tiny_vit_sam_config

    pytest.importorskip("segment_anything")
    cfg = tiny_vit_sam_config()
    ours = sharpen_(build_random_sam(cfg, seed=0))
    ref = make_reference_sam(cfg)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    from napari_sam import __file__ as pkg

    path = pkg.replace("__init__.py", "data/nuclei.png")
    return np.asarray(Image.open(path).convert("RGB"))[:100, :140].copy()  # non-square


def _fake_cv2() -> types.ModuleType:
    from scipy import ndimage

    def connected_components_with_stats(img, connectivity=8):
        structure = np.ones((3, 3)) if connectivity == 8 else None
        labels, n = ndimage.label(img, structure=structure)
        stats = np.zeros((n + 1, 5), np.int32)
        stats[:, -1] = np.bincount(labels.ravel(), minlength=n + 1)
        return n + 1, labels.astype(np.int32), stats, None

    mod = types.ModuleType("cv2")
    mod.connectedComponentsWithStats = connected_components_with_stats
    return mod


def _seg(rec) -> np.ndarray:
    s = rec["segmentation"]
    return M.rle_to_mask(s) if isinstance(s, dict) else s


def _compare(ours, theirs, min_count):
    assert len(theirs) >= min_count, "test set-up: too few reference masks to be meaningful"
    assert len(ours) == len(theirs)
    our_masks = [_seg(r) for r in ours]
    for ref in theirs:
        rm = _seg(ref)
        best = max(mask_iou(rm, om) for om in our_masks)
        assert best >= 0.95
    # same order, same numbers (float tolerance for the model outputs)
    for o, r in zip(ours, theirs, strict=True):
        assert mask_iou(_seg(o), _seg(r)) >= 0.95
        assert o["crop_box"] == r["crop_box"]
        assert o["point_coords"][0] == pytest.approx(r["point_coords"][0])
        assert o["predicted_iou"] == pytest.approx(r["predicted_iou"], abs=1e-4)
        assert o["stability_score"] == pytest.approx(r["stability_score"], abs=2e-2)
        assert abs(o["area"] - r["area"]) <= 0.02 * r["area"] + 2
        assert np.allclose(o["bbox"], r["bbox"], atol=2)


def _run(models, image, **kw):
    from segment_anything import SamAutomaticMaskGenerator

    ours_model, ref_model = models
    ours = AutomaticMaskGenerator(ours_model, **kw).generate(image)
    theirs = SamAutomaticMaskGenerator(ref_model, **kw).generate(image)
    return ours, theirs


def test_matches_reference_low_thresholds(models, image):
    ours, theirs = _run(models, image, points_per_side=8, **LOW_THRESHOLDS)
    _compare(ours, theirs, min_count=5)


def test_matches_reference_default_nms(models, image):
    # random masks are image-wide, so box NMS keeps few of them: checks NMS picks the same
    kw = dict(LOW_THRESHOLDS, box_nms_thresh=0.7)
    ours, theirs = _run(models, image, points_per_side=8, **kw)
    _compare(ours, theirs, min_count=1)


def test_matches_reference_crop_layer(models, image):
    # Random masks are image-wide, so the masks of the 4 crops all touch a crop edge
    # and are dropped by both; this checks the crop geometry, edge filter and crop NMS.
    kw = dict(LOW_THRESHOLDS, stability_score_thresh=0.4, crop_overlap_ratio=0.3)
    ours, theirs = _run(models, image, points_per_side=6, crop_n_layers=1, **kw)
    _compare(ours, theirs, min_count=1)
    assert {tuple(r["crop_box"]) for r in theirs} == {tuple(r["crop_box"]) for r in ours}


def test_matches_reference_min_region_area_and_rle(models, image, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", _fake_cv2())
    kw = dict(LOW_THRESHOLDS, min_mask_region_area=40, output_mode="uncompressed_rle")
    ours, theirs = _run(models, image, points_per_side=8, **kw)
    _compare(ours, theirs, min_count=5)
    assert all(isinstance(r["segmentation"], dict) for r in ours)
    exact = sum(o["segmentation"] == r["segmentation"] for o, r in zip(ours, theirs, strict=True))
    assert exact >= 0.9 * len(theirs)
