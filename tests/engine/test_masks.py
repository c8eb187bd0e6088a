"""Tests of napari_sam.engine.masks with hand-made masks, boxes and logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_sam.engine import masks
from napari_sam.errors import InvalidInputError

# ----------------------------------------------------------------------------- grids and crops


def test_point_grid_positions_and_order():
    g = masks.build_point_grid(4)
    assert g.shape == (16, 2)
    np.testing.assert_allclose(g[:4, 0], [0.125, 0.375, 0.625, 0.875])  # x varies fastest
    np.testing.assert_allclose(g[:4, 1], 0.125)
    np.testing.assert_allclose(g[4:8, 1], 0.375)
    with pytest.raises(InvalidInputError):
        masks.build_point_grid(0)


def test_layer_point_grids_downscale():
    grids = masks.build_all_layer_point_grids(16, 2, 2)
    assert [len(g) for g in grids] == [256, 64, 16]
    with pytest.raises(InvalidInputError):
        masks.build_all_layer_point_grids(2, 2, 4)


def test_crop_boxes_known_numbers():
    boxes, layers = masks.generate_crop_boxes((100, 200), 1, 512 / 1500)
    # overlap = int(512/1500 * 100) = 34; crop_w = ceil((34 + 200) / 2) = 117; crop_h = 67
    assert boxes == [
        [0, 0, 200, 100],
        [0, 0, 117, 67],
        [0, 33, 117, 100],
        [83, 0, 200, 67],
        [83, 33, 200, 100],
    ]
    assert layers == [0, 1, 1, 1, 1]
    boxes2, layers2 = masks.generate_crop_boxes((64, 64), 2, 0.25)
    assert len(boxes2) == 1 + 4 + 16 and layers2.count(2) == 16
    # every crop of every layer stays inside the image and has positive size
    for x0, y0, x1, y1 in boxes2:
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


@pytest.mark.reference
@pytest.mark.parametrize("size", [(100, 200), (512, 512), (333, 517), (1024, 777)])
@pytest.mark.parametrize("n_layers", [0, 1, 2, 3])
def test_crop_boxes_match_reference(size, n_layers):
    amg = pytest.importorskip("segment_anything.utils.amg")
    for ratio in (512 / 1500, 0.1):
        ours = masks.generate_crop_boxes(size, n_layers, ratio)
        ref = amg.generate_crop_boxes(size, n_layers, ratio)
        assert ours == ref


@pytest.mark.reference
def test_point_grids_match_reference():
    amg = pytest.importorskip("segment_anything.utils.amg")
    for ours, ref in zip(
        masks.build_all_layer_point_grids(32, 2, 2), amg.build_all_layer_point_grids(32, 2, 2),
        strict=True,
    ):
        np.testing.assert_array_equal(ours, ref)


# ----------------------------------------------------------------------------- stability


def test_stability_score_known_logits():
    logits = torch.full((2, 10, 10), -5.0)
    logits[0, 2:6, 2:6] = 3.0  # 16 px above +1
    logits[0, 6, 2:6] = 0.5  # 4 px only above -1
    logits[0, 7, 2:6] = -0.5  # 4 px only above -1
    logits[1, 0, 0] = 0.0  # 1 px above -1, none above +1
    s = masks.stability_score(logits, 0.0, 1.0)
    assert s.dtype == torch.float32 and s.shape == (2,)
    assert s[0].item() == pytest.approx(16 / 24)
    assert s[1].item() == 0.0
    empty = masks.stability_score(torch.full((1, 4, 4), -9.0), 0.0, 1.0)
    assert torch.isnan(empty).all()


def test_stability_score_chunking_and_batch_shape():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 20, 30, generator=g) * 3
    s = masks.stability_score(logits, 0.0, 1.0, chunk=4)
    hi = (logits > 1).flatten(-2).sum(-1).float()
    lo = (logits > -1).flatten(-2).sum(-1).float()
    torch.testing.assert_close(s, hi / lo)


@pytest.mark.reference
def test_stability_score_matches_reference():
    amg = pytest.importorskip("segment_anything.utils.amg")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 64, 48, generator=g) * 2
    torch.testing.assert_close(
        masks.stability_score(logits, 0.0, 1.0), amg.calculate_stability_score(logits, 0.0, 1.0)
    )


# ----------------------------------------------------------------------------- boxes


def test_mask_boxes_both_conventions():
    m = torch.zeros(3, 8, 10, dtype=torch.bool)
    m[0, 2:5, 3:9] = True
    m[1, 7, 0] = True
    xyxy = masks.mask_to_box_xyxy(m)
    assert xyxy.tolist() == [[3, 2, 8, 4], [0, 7, 0, 7], [0, 0, 0, 0]]
    rc = masks.mask_to_box_rc(m)
    assert rc.tolist() == [[2, 3, 5, 9], [7, 0, 8, 1], [0, 0, 0, 0]]
    r0, c0, r1, c1 = rc[0].tolist()
    assert m[0, r0:r1, c0:c1].sum() == m[0].sum()
    assert masks.mask_to_box_xyxy(np.zeros((0, 4, 4), bool)).shape == (0, 4)
    assert masks.box_xyxy_to_xywh(torch.tensor([3, 2, 8, 4])) == [3, 2, 5, 2]


@pytest.mark.reference
def test_mask_boxes_match_reference():
    amg = pytest.importorskip("segment_anything.utils.amg")
    g = torch.Generator().manual_seed(2)
    m = torch.rand(2, 5, 17, 23, generator=g) > 0.97
    m[0, 0] = False
    torch.testing.assert_close(masks.mask_to_box_xyxy(m), amg.batched_mask_to_box(m))


def _brute_nms(boxes, scores, thr):
    order = sorted(range(len(boxes)), key=lambda i: -float(scores[i]))  # stable
    keep = []
    for i in order:
        ok = True
        for j in keep:
            x0, y0 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            x1, y1 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
            ai = (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])
            aj = (boxes[j][2] - boxes[j][0]) * (boxes[j][3] - boxes[j][1])
            union = ai + aj - inter
            if union > 0 and inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thr", [0.3, 0.7])
def test_nms_matches_brute_force(seed, thr):
    rng = np.random.default_rng(seed)
    n = 120
    xy = rng.integers(0, 50, size=(n, 2))
    wh = rng.integers(0, 20, size=(n, 2))  # includes zero-area boxes
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.integers(0, 10, size=n).astype(np.float32)  # many ties
    expected = _brute_nms(boxes.tolist(), scores, thr)
    keep = masks.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr, chunk=16)
    assert keep.tolist() == expected
    assert masks.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).tolist() == expected


def test_batched_nms_categories_independent():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.8, 0.95, 0.1])
    idxs = torch.tensor([0, 1, 0, 1])
    keep = masks.batched_nms(boxes.float(), scores, idxs, 0.5)
    # box 2 suppresses box 0 (same category); box 1 is alone in category 1 with box 3
    assert keep.tolist() == [2, 1, 3]
    assert masks.batched_nms(boxes.float(), scores, torch.zeros(4), 0.5).tolist() == [2, 3]
    assert masks.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


@pytest.mark.reference
def test_nms_matches_reference_stand_in():
    ops = pytest.importorskip("torchvision.ops")
    g = torch.Generator().manual_seed(3)
    xy = torch.randint(0, 100, (300, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.randint(1, 40, (300, 2), generator=g)], 1)
    scores = torch.rand(300, generator=g)
    cats = torch.randint(0, 3, (300,), generator=g)
    assert masks.nms(boxes, scores, 0.5).tolist() == ops.nms(boxes, scores, 0.5).tolist()
    assert (
        masks.batched_nms(boxes, scores, cats, 0.5).tolist()
        == ops.batched_nms(boxes, scores, cats, 0.5).tolist()
    )


def test_box_near_crop_edge():
    crop = [100, 0, 200, 100]  # x0, y0, x1, y1 inside a 300 x 100 image
    orig = [0, 0, 300, 100]
    boxes = torch.tensor(
        [
            [40, 40, 60, 60],  # centre of the crop
            [0, 40, 30, 60],  # touches the crop's left edge (interior) -> near
            [40, 0, 60, 20],  # touches the top edge, which is also the image's -> not near
            [70, 30, 99, 50],  # touches the right edge (interior) -> near
            [21, 21, 79, 79],  # 21 px away from every edge -> not near
        ]
    )
    near = masks.is_box_near_crop_edge(boxes, crop, orig)
    assert near.tolist() == [False, True, False, True, False]


def test_uncrop():
    b = masks.uncrop_boxes_xyxy(torch.tensor([[1, 2, 3, 4]]), [10, 20, 50, 60])
    assert b.tolist() == [[11, 22, 13, 24]]
    p = masks.uncrop_points(torch.tensor([[1.5, 2.5]]), [10, 20, 50, 60])
    assert p.tolist() == [[11.5, 22.5]]
    m = torch.ones(2, 3, 4, dtype=torch.bool)
    full = masks.uncrop_masks(m, [1, 2, 5, 5], 6, 7)
    assert full.shape == (2, 6, 7) and full.sum() == 24 and full[:, 2:5, 1:5].all()
    assert masks.uncrop_masks(m, [0, 0, 4, 3], 3, 4) is m


# ----------------------------------------------------------------------------- small regions


def test_remove_small_holes_and_islands():
    m = np.zeros((20, 20), bool)
    m[2:12, 2:12] = True
    m[5, 5] = False  # 1-px hole
    m[6:9, 8:10] = False  # 6-px hole
    m[16, 16] = True  # 1-px island
    m[15:19, 0:3] = True  # 12-px island

    filled, changed = masks.remove_small_regions(m, 5, "holes")
    assert changed and filled[5, 5] and not filled[6:9, 8:10].any()
    assert filled.sum() == m.sum() + 1

    cleaned, changed = masks.remove_small_regions(m, 5, "islands")
    assert changed and not cleaned[16, 16] and cleaned[15:19, 0:3].all()
    assert cleaned.sum() == m.sum() - 1

    same, changed = masks.remove_small_regions(m, 1, "islands")
    assert not changed and (same == m).all()

    # all islands small -> the largest one survives
    tiny = np.zeros((10, 10), bool)
    tiny[0, 0] = True
    tiny[5:7, 5:7] = True
    out, changed = masks.remove_small_regions(tiny, 100, "islands")
    assert changed and out.sum() == 4 and out[5:7, 5:7].all()

    # diagonal pixels are one 8-connected island
    diag = np.eye(6, dtype=bool)
    out, changed = masks.remove_small_regions(diag, 5, "islands")
    assert not changed and out.sum() == 6
    with pytest.raises(InvalidInputError):
        masks.remove_small_regions(m, 5, "blobs")


# ----------------------------------------------------------------------------- RLE and COCO


def test_rle_known_counts():
    m = np.array([[0, 1, 1], [0, 1, 0]], dtype=bool)  # column-major: 0 0 1 1 1 0
    rle = masks.mask_to_rle(m)
    assert rle == {"size": [2, 3], "counts": [2, 3, 1]}
    assert masks.area_from_rle(rle) == 3
    starts_on = masks.mask_to_rle(np.ones((2, 2), bool))
    assert starts_on["counts"] == [0, 4]
    assert masks.mask_to_rle(np.zeros((3, 1), bool))["counts"] == [3]


@pytest.mark.parametrize("seed", range(4))
def test_rle_round_trip(seed):
    rng = np.random.default_rng(seed)
    m = rng.random((13, 29)) > [0.1, 0.5, 0.9, 0.99][seed]
    rle = masks.mask_to_rle(torch.from_numpy(m))
    back = masks.rle_to_mask(rle)
    assert back.dtype == bool and back.flags.c_contiguous
    np.testing.assert_array_equal(back, m)
    assert masks.area_from_rle(rle) == m.sum()
    assert sum(rle["counts"]) == m.size
    many = masks.masks_to_rle(np.stack([m, ~m]))
    np.testing.assert_array_equal(masks.rle_to_mask(many[1]), ~m)


def test_rle_rejects_bad_input():
    with pytest.raises(InvalidInputError):
        masks.rle_to_mask({"size": [2, 2], "counts": [1, 1]})
    with pytest.raises(InvalidInputError):
        masks.rle_to_mask({"counts": [4]})
    with pytest.raises(InvalidInputError):
        masks.mask_to_rle(np.zeros((2, 2, 2), bool))


@pytest.mark.reference
def test_rle_matches_reference():
    amg = pytest.importorskip("segment_anything.utils.amg")
    g = torch.Generator().manual_seed(4)
    m = torch.rand(3, 11, 9, generator=g) > 0.6
    m[1] = True
    m[2] = False
    assert masks.masks_to_rle(m) == amg.mask_to_rle_pytorch(m)


def test_coco_export():
    m1 = np.zeros((6, 8), bool)
    m1[1:3, 2:6] = True
    crop = np.ones((2, 2), bool)
    records = [
        {"segmentation": m1, "predicted_iou": 0.9},
        {"segmentation": masks.mask_to_rle(m1), "predicted_iou": 0.8},
        {"segmentation": crop, "bbox_rc": [4, 6, 6, 8], "predicted_iou": 0.7},
    ]
    coco = masks.coco_json(records, (6, 8), file_name="a.png")
    json.dumps(coco)  # serialisable
    assert coco["images"] == [{"id": 1, "file_name": "a.png", "height": 6, "width": 8}]
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3]
    assert anns[0]["bbox"] == [2, 1, 4, 2] and anns[0]["area"] == 8
    assert anns[0]["segmentation"] == anns[1]["segmentation"]
    assert anns[2]["bbox"] == [6, 4, 2, 2] and anns[2]["area"] == 4
    back = masks.rle_to_mask(anns[2]["segmentation"])
    assert back[4:6, 6:8].all() and back.sum() == 4
    assert anns[2]["score"] == pytest.approx(0.7)
    with pytest.raises(InvalidInputError):
        masks.coco_annotations([{"segmentation": crop}], image_shape=(6, 8))


# ----------------------------------------------------------------------------- cropped masks
# issue 13 (D6): everything-mode keeps masks cropped to their boxes; these helpers must give
# exactly the full-frame results


def _random_blob_mask(rng, shape):
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.random(shape), 1.5)
    return noise > np.quantile(noise, rng.uniform(0.4, 0.8))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions_cropped_equals_full_frame(seed, mode):
    rng = np.random.default_rng(seed)
    H, W = int(rng.integers(8, 40)), int(rng.integers(8, 40))
    # boxes anywhere: touching borders, spanning an axis, almost the whole image
    h, w = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
    r0, c0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    crop = _random_blob_mask(rng, (h, w))
    full = np.zeros((H, W), bool)
    full[r0 : r0 + h, c0 : c0 + w] = crop
    for thresh in (3, 12, 40, 200):
        want, want_changed = masks.remove_small_regions(full, thresh, mode)
        got, (gr, gc), changed = masks.remove_small_regions_cropped(crop, (r0, c0), (H, W), thresh,
                                                               mode)
        placed = np.zeros((H, W), bool)
        placed[gr : gr + got.shape[0], gc : gc + got.shape[1]] = got
        np.testing.assert_array_equal(placed, want)
        assert changed == want_changed


def test_remove_small_regions_cropped_outside_parts():
    # a box spanning the full width: the strips above and below are separate parts
    H, W = 20, 10
    crop = np.ones((10, 10), bool)
    crop[0, 3] = False  # background touching the top side: it continues in the top strip
    crop[5, 5] = False  # an enclosed hole of 1 pixel
    full = np.zeros((H, W), bool)
    full[2:12] = crop
    for thresh in (2, 19, 21, 100):  # top strip: 20 px (+1), bottom strip 80 px
        want, _ = masks.remove_small_regions(full, thresh, "holes")
        got, (r, c), _ = masks.remove_small_regions_cropped(crop, (2, 0), (H, W), thresh, "holes")
        placed = np.zeros((H, W), bool)
        placed[r : r + got.shape[0], c : c + got.shape[1]] = got
        np.testing.assert_array_equal(placed, want)


@pytest.mark.parametrize("seed", range(10))
def test_cropped_mask_to_rle_equals_full_rle(seed):
    rng = np.random.default_rng(seed)
    H, W = int(rng.integers(1, 30)), int(rng.integers(1, 30))
    h, w = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
    r0, c0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    crop = rng.random((h, w)) > rng.uniform(0.1, 0.9)
    full = np.zeros((H, W), bool)
    full[r0 : r0 + h, c0 : c0 + w] = crop
    assert masks.cropped_mask_to_rle(crop, (r0, c0), (H, W)) == masks.mask_to_rle(full)


def test_cropped_mask_to_rle_corner_cases():
    for full in (np.ones((4, 5), bool), np.zeros((4, 5), bool), np.eye(4, 5, dtype=bool)):
        assert masks.cropped_mask_to_rle(full, (0, 0), (4, 5)) == masks.mask_to_rle(full)
    # runs that continue from the bottom of one column to the top of the next
    full = np.zeros((3, 4), bool)
    full[2, 0] = full[0, 1] = full[1, 1] = full[2, 1] = full[0, 2] = True
    assert masks.cropped_mask_to_rle(full[:, :3], (0, 0), (3, 4)) == masks.mask_to_rle(full)
    with pytest.raises(InvalidInputError):
        masks.cropped_mask_to_rle(np.ones((3, 3), bool), (2, 2), (4, 4))


def test_crop_boxes_of_tiny_images_are_never_empty():
    """A 1 x 1 image with crop layers made empty crops (raw TypeError from a memoryview)."""
    for shape in [(1, 1), (2, 3), (3, 500), (1, 40)]:
        for ratio in (0.0, 512 / 1500, 0.99):
            boxes, layers = masks.generate_crop_boxes(shape, 3, ratio)
            assert boxes[0] == [0, 0, shape[1], shape[0]] and layers[0] == 0
            for x0, y0, x1, y1 in boxes:
                assert 0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]


def test_coco_annotations_of_cropped_records_equal_full_ones():
    full = np.zeros((12, 15), bool)
    full[3:7, 4:9] = True
    full[5, 6] = False
    cropped = {"segmentation": full[3:7, 4:9], "bbox_rc": [3, 4, 7, 9], "area": int(full.sum())}
    whole = {"segmentation": full, "area": int(full.sum())}
    a = masks.coco_annotations([cropped], image_shape=(12, 15))[0]
    b = masks.coco_annotations([whole], image_shape=(12, 15))[0]
    assert a == b
    with pytest.raises(InvalidInputError):
        masks.coco_annotations([dict(cropped, bbox_rc=[3, 4, 8, 9])], image_shape=(12, 15))
