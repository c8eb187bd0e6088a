"""Tests of everything-mode (napari_sam.engine.everything) with a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.engine import masks as M
from napari_sam.engine.everything import (
    AutomaticMaskGenerator,
    _FastDecoder,
    _stability_upper_bound,
    records_to_labels,
)
from napari_sam.engine.predictor import Predictor, _postprocess
from napari_sam.engine.transforms import ImageTransform
from napari_sam.errors import CancelledError, InvalidInputError

LOW = dict(pred_iou_thresh=0.0, stability_score_thresh=0.5, box_nms_thresh=1.0)


@pytest.fixture(scope="module")
def sam():
    from reference_utils import build_random_sam, tiny_vit_sam_config

    model = build_random_sam(tiny_vit_sam_config(), seed=0)
    with torch.no_grad():  # stronger logits so that stability scores are not all 0
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(100.0)
            mlp.layers[-1].bias.mul_(100.0)
        # and mostly positive IoU predictions, so that pred_iou_thresh has work to do
        model.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.2)
    return model


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = np.zeros((90, 120), np.uint8)
    yy, xx = np.mgrid[:90, :120]
    for cy, cx, r in [(20, 30, 10), (60, 80, 14), (45, 20, 8), (70, 30, 9)]:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 200
    return img + rng.integers(0, 30, img.shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- fast decoder


# width 256 (SAM's) takes the factored first convolution of the mask head
@pytest.mark.parametrize(("depth", "width"), [(1, 64), (2, 64), (1, 256), (2, 256)])
def test_fast_decoder_matches_mask_decoder(depth, width):
    from reference_utils import build_random_sam, tiny_vit_sam_config

    cfg = tiny_vit_sam_config(decoder_depth=depth, prompt_embed_dim=width)
    model = build_random_sam(cfg, seed=3)
    fd = _FastDecoder.build(model)
    assert fd is not None
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        feats = torch.randn(1, width, 8, 8, generator=g)
        pe = model.prompt_encoder.get_dense_pe()
        coords = torch.rand(11, 1, 2, generator=g, dtype=torch.float64) * 128
        labels = torch.ones(11, 1, dtype=torch.int)
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low, iou = model.mask_decoder(feats, pe, sparse, dense, multimask_output=True)
        fd.prepare(feats, pe)
        chosen = torch.zeros(11, 3, dtype=torch.bool)
        chosen[[0, 0, 5, 10, 7, 7, 7], [0, 2, 1, 0, 0, 1, 2]] = True
        offset = 0

        def select(iou_sub):  # sub-batches of 4 prompts arrive in order
            nonlocal offset
            offset += len(iou_sub)
            return chosen[offset - len(iou_sub) : offset]

        iou_fast, chosen_fast, low_fast = fd.decode(sparse, select, sub_batch=4)
        assert offset == 11
        assert torch.equal(chosen_fast, chosen)
        torch.testing.assert_close(iou_fast, iou, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(low_fast, low[chosen], atol=1e-5, rtol=1e-4)


def test_fast_decoder_refuses_unknown_structure():
    class Other(torch.nn.Module):
        pass

    m = Other()
    m.mask_decoder = torch.nn.Linear(2, 2)
    assert _FastDecoder.build(m) is None


# ----------------------------------------------------------------------------- stability bound


@pytest.mark.parametrize(
    "original,target,low_size",
    [((512, 512), 1024, 256), ((100, 140), 128, 32), ((333, 517), 1024, 256),
     ((1500, 900), 1024, 256), ((37, 50), 128, 32)],
)
def test_stability_bound_never_below_exact(original, target, low_size):
    g = torch.Generator().manual_seed(sum(original))
    h, w = ImageTransform(target).input_size(original)
    blobs = torch.randn(12, 1, low_size // 8, low_size // 8, generator=g) * 3
    low = torch.nn.functional.interpolate(blobs, size=(low_size, low_size), mode="bilinear")[:, 0]
    low = low + 0.3 * torch.randn(low.shape, generator=g)
    low[0] = 5.0  # a constant mask: stability 1, and the bound must allow it
    full = _postprocess(low[:, None], target, (h, w), original)[:, 0]
    exact = M.stability_score(full, 0.0, 1.0)
    bound = _stability_upper_bound(low, target, (h, w), original, 0.0, 1.0)
    valid = ~torch.isnan(exact)
    assert (bound[valid] >= exact[valid]).all()
    assert bound[0] >= 1.0
    assert bound[1:].median() < 1.0  # the bound is informative for noisy masks


# ----------------------------------------------------------------------------- generator


def test_records_format(sam, image):
    gen = AutomaticMaskGenerator(sam, points_per_side=6, **LOW)
    records = gen.generate(image)
    assert len(records) >= 3
    keys = {"segmentation", "area", "bbox", "bbox_rc", "predicted_iou", "point_coords",
            "stability_score", "crop_box"}
    for r in records:
        assert set(r) == keys
        m = r["segmentation"]
        assert m.shape == image.shape and m.dtype == bool
        assert r["area"] == m.sum()
        rows, cols = np.nonzero(m)
        assert r["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min(),
                             rows.max() - rows.min()]
        r0, c0, r1, c1 = r["bbox_rc"]
        assert (r0, c0, r1, c1) == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
        assert r["stability_score"] >= 0.5
        assert r["crop_box"] == [0, 0, 120, 90]
        (x, y), = r["point_coords"]
        assert 0 <= x < 120 and 0 <= y < 90
    # thresholds filter (pred_iou_thresh=0 disables the IoU filter, as in SAM)
    strict = AutomaticMaskGenerator(sam, points_per_side=6, **dict(LOW, stability_score_thresh=0.6))
    assert 0 < len(strict.generate(image)) < len(records)
    ious = sorted(r["predicted_iou"] for r in records)
    thr = ious[len(ious) // 2]
    assert thr > 0, "test set-up: need positive IoU predictions"
    by_iou = AutomaticMaskGenerator(sam, points_per_side=6, **dict(LOW, pred_iou_thresh=thr))
    kept = by_iou.generate(image)
    assert all(r["predicted_iou"] > thr for r in kept)
    assert len(kept) == sum(v > thr for v in ious)


def test_fast_path_equals_generic_path(sam, image):
    fast = AutomaticMaskGenerator(sam, points_per_side=6, **LOW)
    slow = AutomaticMaskGenerator(sam, points_per_side=6, **LOW)
    slow._decoder = None  # Predictor.predict_torch path
    a, b = fast.generate(image), slow.generate(image)
    assert len(a) == len(b) >= 3
    for ra, rb in zip(a, b, strict=True):
        assert M.mask_iou(ra["segmentation"], rb["segmentation"]) > 0.99
        assert ra["predicted_iou"] == pytest.approx(rb["predicted_iou"], abs=1e-5)


def test_rle_output_and_predictor_input(sam, image):
    pred = Predictor(sam)
    binary = AutomaticMaskGenerator(pred, points_per_side=5, **LOW).generate(image)
    rle = AutomaticMaskGenerator(pred, points_per_side=5, output_mode="uncompressed_rle",
                                 **LOW).generate(image)
    assert len(binary) == len(rle) > 0
    for rb, rr in zip(binary, rle, strict=True):
        assert rr["segmentation"]["size"] == list(image.shape)
        np.testing.assert_array_equal(M.rle_to_mask(rr["segmentation"]), rb["segmentation"])
        assert rr["area"] == M.area_from_rle(rr["segmentation"])


def test_progress_and_cancel(sam, image):
    calls = []
    gen = AutomaticMaskGenerator(sam, points_per_side=5, points_per_batch=10, **LOW)
    gen.generate(image, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]  # 25 points in batches of 10

    calls.clear()
    crops = AutomaticMaskGenerator(sam, points_per_side=4, points_per_batch=10, crop_n_layers=1,
                                   **LOW)
    crops.generate(image, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (10, 10)  # 5 crops x 2 batches

    n = {"k": 0}

    def cancel():
        n["k"] += 1
        return n["k"] > 2

    with pytest.raises(CancelledError):
        gen.generate(image, cancel=cancel)
    assert not gen.predictor.is_image_set  # state cleaned up


def test_shared_predictor_keeps_its_image(sam, image):
    pred = Predictor(sam)
    other = np.zeros((50, 60), np.uint8)
    pred.set_image(other)
    before = pred.predict(points=[[25, 30]])
    AutomaticMaskGenerator(pred, points_per_side=3, **LOW).generate(image)
    assert pred.original_size == (50, 60)
    after = pred.predict(points=[[25, 30]])
    np.testing.assert_array_equal(before.masks, after.masks)


def test_use_cache(sam, image):
    pred = Predictor(sam)
    gen = AutomaticMaskGenerator(pred, points_per_side=4, **LOW)
    gen.generate(image, use_cache=False)
    assert len(pred.cache) == 0
    gen.generate(image)
    assert len(pred.cache) == 1


def test_min_mask_region_area_cleans_masks(sam, image):
    gen = AutomaticMaskGenerator(sam, points_per_side=6, min_mask_region_area=30, **LOW)
    for r in gen.generate(image):
        m = r["segmentation"]
        assert M.remove_small_regions(m, 30, "islands")[1] is False
        assert M.remove_small_regions(m, 30, "holes")[1] is False


def test_generate_labels(sam, image):
    gen = AutomaticMaskGenerator(sam, points_per_side=5, **LOW)
    labels = gen.generate_labels(image)
    assert labels.shape == image.shape and labels.dtype == np.uint32
    assert labels.max() >= 1


def test_invalid_parameters(sam):
    with pytest.raises(InvalidInputError):
        AutomaticMaskGenerator(sam, points_per_side=None)
    with pytest.raises(InvalidInputError):
        AutomaticMaskGenerator(sam, points_per_side=8, point_grids=[M.build_point_grid(4)])
    with pytest.raises(InvalidInputError):
        AutomaticMaskGenerator(sam, output_mode="coco_rle")
    with pytest.raises(InvalidInputError):
        AutomaticMaskGenerator(sam, points_per_side=None, point_grids=[M.build_point_grid(4)],
                               crop_n_layers=1)
    with pytest.raises(InvalidInputError):
        AutomaticMaskGenerator(sam, points_per_batch=0)
    gen = AutomaticMaskGenerator(sam, points_per_side=None, point_grids=[np.array([[0.5, 0.5]])],
                                 **LOW)
    assert isinstance(gen.generate(np.zeros((40, 50), np.uint8)), list)


# ----------------------------------------------------------------------------- labels


def _rec(mask, **extra):
    return {"segmentation": mask, "area": int(mask.sum()), **extra}


def test_records_to_labels_order_and_formats():
    big = np.zeros((10, 12), bool)
    big[1:9, 1:11] = True
    small = np.zeros((10, 12), bool)
    small[3:5, 3:5] = True
    crop = np.ones((2, 3), bool)  # placed at rows 6..8, cols 8..11
    records = [
        _rec(small),
        _rec(big),
        {"segmentation": crop, "bbox_rc": [6, 8, 8, 11], "area": 6},
        {"segmentation": M.mask_to_rle(np.eye(10, 12, dtype=bool)), "area": 10},
    ]
    lab = records_to_labels(records, (10, 12))
    # area_desc: big (80) -> 1, eye (10) -> 2, crop (6) -> 3, small (4) -> 4; later on top
    assert lab.dtype == np.uint32
    assert lab[4, 3] == 4 and lab[1, 5] == 1 and lab[7, 9] == 3 and lab[9, 10] == 0
    assert lab[2, 2] == 2  # the diagonal lies on top of the big mask
    assert set(np.unique(lab)) == {0, 1, 2, 3, 4}

    asc = records_to_labels(records, (10, 12), order="area_asc")
    assert asc[4, 3] == 4 and (asc == 1).sum() == 0  # big painted last covers small: id 4
    inp = records_to_labels(records, (10, 12), order="input")
    assert inp[4, 3] == 2 and inp[2, 2] == 4

    with pytest.raises(InvalidInputError):
        records_to_labels(records, (10, 12), order="random")
    with pytest.raises(InvalidInputError):
        records_to_labels([{"segmentation": crop, "area": 6}], (10, 12))
    with pytest.raises(InvalidInputError):
        records_to_labels([{"segmentation": crop, "bbox_rc": [9, 9, 11, 12], "area": 6}],
                          (10, 12))
