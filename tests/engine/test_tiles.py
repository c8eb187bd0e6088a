"""Tests of tiled everything-mode (napari_sam.engine.tiles) with a fake generator.

Random model weights do not segment anything meaningful, so the stitching logic
is tested with a stand-in generator that returns the true connected components
of each tile: every object must come out exactly once, whole, wherever the
tile borders cut it.
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label

from napari_sam.engine import masks as M
from napari_sam.engine.everything import records_to_labels
from napari_sam.engine.tiles import generate_tiled, tile_boxes
from napari_sam.errors import CancelledError, InvalidInputError


class ComponentsGenerator:
    """Returns one record per connected bright component of a tile."""

    def __init__(self, output="binary"):
        self.output = output
        self.calls = []

    def generate(self, tile):
        assert tile.dtype == np.uint8 and tile.ndim == 3 and tile.shape[2] == 3
        self.calls.append(tile.shape[:2])
        lab = label(tile[..., 0] > 128, connectivity=1)
        out = []
        for i in range(1, lab.max() + 1):
            m = lab == i
            rows, cols = np.nonzero(m)
            rec = {"predicted_iou": 0.9 + 0.001 * i, "stability_score": 0.97,
                   "point_coords": [[float(cols[0]), float(rows[0])]]}
            if self.output == "rle":
                rec["segmentation"] = M.mask_to_rle(m)
            elif self.output == "cropped":
                r0, c0, r1, c1 = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
                rec["segmentation"] = m[r0:r1, c0:c1]
                rec["bbox_rc"] = [r0, c0, r1, c1]
            else:
                rec["segmentation"] = m
            out.append(rec)
        return out


def disks_image(shape=(300, 420), seed=0):
    """Separated bright disks (radius 6..14) on a dark background, plus one long bar
    larger than the tile overlap, crossing tile borders."""
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.uint16)
    truth = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    n = 0
    # a bar spanning several tiles horizontally (longer than tile_size + overlap)
    n += 1
    bar = (yy >= 140) & (yy < 150) & (xx >= 20) & (xx < 400)
    img[bar], truth[bar] = 3000, n
    for _ in range(400):
        r = int(rng.integers(6, 15))
        cy, cx = int(rng.integers(r, shape[0] - r)), int(rng.integers(r, shape[1] - r))
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        grown = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 3) ** 2
        if (truth[grown] != 0).any():
            continue
        n += 1
        img[disk], truth[disk] = 3000, n
    return img, truth


def test_tile_boxes_cover_with_overlap():
    boxes = tile_boxes((300, 420), tile_size=128, overlap=32)
    rows = sorted({(b[0], b[2]) for b in boxes})
    cols = sorted({(b[1], b[3]) for b in boxes})
    assert rows[0][0] == 0 and rows[-1][1] == 300 and cols[0][0] == 0 and cols[-1][1] == 420
    for axis in (rows, cols):
        for (s0, e0), (s1, e1) in zip(axis, axis[1:], strict=False):
            assert e0 - s0 == 128 and e1 - s1 == 128
            assert e0 - s1 >= 32  # at least the requested overlap
    assert len(boxes) == len(rows) * len(cols)
    cover = np.zeros((300, 420), int)
    for r0, c0, r1, c1 in boxes:
        cover[r0:r1, c0:c1] += 1
    assert cover.min() >= 1
    assert tile_boxes((100, 50), 1024, 128) == [(0, 0, 100, 50)]
    with pytest.raises(InvalidInputError):
        tile_boxes((100, 100), 64, 64)


@pytest.mark.parametrize("output", ["binary", "rle", "cropped"])
@pytest.mark.parametrize("tile,overlap", [(128, 40), (100, 36)])
def test_every_object_once_and_whole(output, tile, overlap):
    img, truth = disks_image()
    n_true = truth.max()
    gen = ComponentsGenerator(output)
    done = []
    records = generate_tiled(gen, img, tile_size=tile, overlap=overlap,
                             progress=lambda d, t: done.append((d, t)))
    n_tiles = len(tile_boxes(img.shape, tile, overlap))
    assert len(gen.calls) == n_tiles > 4
    assert done[-1] == (n_tiles, n_tiles)

    assert len(records) == n_true  # nothing duplicated, nothing lost, no leftover piece
    matched = set()
    for rec in records:
        r0, c0, r1, c1 = rec["bbox_rc"]
        seg = rec["segmentation"]
        assert seg.shape == (r1 - r0, c1 - c0)  # cropped, not full-size
        ids = np.unique(truth[r0:r1, c0:c1][seg])
        assert len(ids) == 1 and ids[0] != 0
        obj = truth == ids[0]
        full = np.zeros_like(obj)
        full[r0:r1, c0:c1] = seg
        assert (full == obj).all()  # whole, not cut at a tile border
        assert rec["area"] == obj.sum()
        assert rec["bbox"] == [c0, r0, c1 - 1 - c0, r1 - 1 - r0]
        x, y = rec["point_coords"][0]
        assert obj[int(y), int(x)]  # prompt point mapped back to image coordinates
        matched.add(int(ids[0]))
    assert matched == set(range(1, n_true + 1))
    bar = next(r for r in records if r["area"] == 3800)
    assert bar["n_pieces"] > 1  # the bar was stitched from several tiles

    labels = records_to_labels(records, img.shape)
    assert labels.max() == n_true
    assert ((labels > 0) == (truth > 0)).all()


def test_duplicates_in_overlap_are_removed():
    img = np.zeros((100, 160), np.uint8)
    img[40:60, 70:90] = 255  # inside the overlap of the two tiles
    records = generate_tiled(ComponentsGenerator(), img, tile_size=100, overlap=40)
    assert tile_boxes(img.shape, 100, 40) == [(0, 0, 100, 100), (0, 60, 100, 160)]
    assert len(records) == 1 and records[0]["area"] == 400


def test_small_image_single_tile_and_channel_axis():
    img, truth = disks_image((90, 80), seed=2)
    stack = np.stack([img, img // 2])  # channels first
    gen = ComponentsGenerator()
    records = generate_tiled(gen, stack, tile_size=1024, overlap=128, channel_axis=0)
    assert gen.calls == [(90, 80)]
    assert len(records) == len(np.unique(truth)) - 1  # (the bar lies outside this image)


def test_cancel_and_bad_input():
    img, _ = disks_image((200, 200))
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(CancelledError):
        generate_tiled(ComponentsGenerator(), img, tile_size=100, overlap=20, cancel=cancel)
    with pytest.raises(InvalidInputError):
        generate_tiled(ComponentsGenerator(), np.zeros((2, 3, 4, 5)), tile_size=100, overlap=20)
    with pytest.raises(InvalidInputError):
        generate_tiled(ComponentsGenerator(), img, channel_axis=5)


def test_with_real_generator_bounded_cache():
    """The real generator runs per tile without keeping embeddings alive."""
    from napari_sam.engine.everything import AutomaticMaskGenerator
    from reference_utils import build_random_sam, tiny_vit_sam_config

    sam = build_random_sam(tiny_vit_sam_config(), seed=0)
    gen = AutomaticMaskGenerator(sam, points_per_side=3, pred_iou_thresh=0.0,
                                 stability_score_thresh=0.0, box_nms_thresh=1.0)
    img, _ = disks_image((150, 170), seed=1)
    records = generate_tiled(gen, img, tile_size=100, overlap=30)
    assert len(gen.predictor.cache) == 0 and not gen.predictor.is_image_set
    for rec in records:
        r0, c0, r1, c1 = rec["bbox_rc"]
        assert 0 <= r0 < r1 <= 150 and 0 <= c0 < c1 <= 170
        assert rec["segmentation"].shape == (r1 - r0, c1 - c0)


# ----------------------------------------------------------------------------- issue 13
# reliability review, table 1d: parameters checked before any tile is read


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"tile_size": 1, "overlap": 0}, "tile_size"),  # 1d #4: 361,920 tiles planned
    ({"tile_size": 15, "overlap": 0}, "tile_size"),
    ({"tile_size": 2.5, "overlap": 0}, "tile_size"),
    ({"tile_size": 300, "overlap": 100, "contain_thresh": 5}, "contain_thresh"),  # 1d #10
    ({"tile_size": 300, "overlap": 100, "merge_iou": -1}, "merge_iou"),  # 1d #10
    ({"tile_size": 300, "overlap": 100, "dup_iou": float("nan")}, "dup_iou"),
    ({"tile_size": 300, "overlap": 100, "edge_margin": -1}, "edge_margin"),
    ({"tile_size": 300, "overlap": 300}, "overlap"),
])
def test_bad_tiling_parameters_raise_before_any_tile(kwargs, name):
    img, _ = disks_image((200, 300))
    gen = ComponentsGenerator()
    with pytest.raises(InvalidInputError) as info:
        generate_tiled(gen, img, **kwargs)
    assert name in str(info.value) and "\n" not in str(info.value)
    assert gen.calls == []
    assert len(tile_boxes((200, 300), 16, 0)) == 13 * 19  # the smallest tile is allowed


def test_nan_in_the_image_is_reported_as_nan():
    """1d #8: the message blamed contrast_limits '(nan, nan)', which the user did not pass."""
    img = np.random.default_rng(0).random((520, 696))
    img[3, 4] = img[100, 200] = np.nan
    img[7, 7] = np.inf
    gen = ComponentsGenerator()
    with pytest.raises(InvalidInputError) as info:
        generate_tiled(gen, img, tile_size=300, overlap=100)
    message = str(info.value)
    assert "2 NaN and 1 infinite" in message and "contrast_limits" not in message
    assert gen.calls == []


def test_a_stack_is_reported_with_its_own_shape():
    """1d #9: the message showed a tile's shape (2, 300, 696), not the input's."""
    stack = np.zeros((2, 520, 696), np.uint16)
    gen = ComponentsGenerator()
    with pytest.raises(InvalidInputError, match=r"\(2, 520, 696\)") as info:
        generate_tiled(gen, stack, tile_size=300, overlap=100)
    assert "image[z]" in str(info.value)
    assert gen.calls == []
    with pytest.raises(InvalidInputError, match="contrast_limits"):  # checked before tile 1
        generate_tiled(gen, stack[0], tile_size=300, overlap=100, contrast_limits=(5, 1))
    assert gen.calls == []


def test_crop_box_is_carried_into_image_coordinates():
    img, _ = disks_image((200, 300), seed=4)

    class WithCropBox(ComponentsGenerator):
        def generate(self, tile):
            out = super().generate(tile)
            for rec in out:
                rec["crop_box"] = [0, 0, tile.shape[1], tile.shape[0]]
            return out

    records = generate_tiled(WithCropBox(), img, tile_size=128, overlap=40)
    boxes = {tuple(b) for b in tile_boxes(img.shape, 128, 40)}
    for rec in records:
        x, y, w, h = rec["crop_box"]
        assert (y, x, y + h, x + w) in boxes
        assert rec["crop_box"] == [rec["tile_box"][1], rec["tile_box"][0],
                                   rec["tile_box"][3] - rec["tile_box"][1],
                                   rec["tile_box"][2] - rec["tile_box"][0]]


def test_real_generator_hands_over_cropped_masks(monkeypatch):
    """Each tile's masks stay cropped: no full-tile mask is built on the way."""
    from napari_sam.engine import everything as E
    from reference_utils import build_random_sam, tiny_vit_sam_config

    sam = build_random_sam(tiny_vit_sam_config(), seed=0)
    gen = E.AutomaticMaskGenerator(sam, points_per_side=3, pred_iou_thresh=0.0,
                                   stability_score_thresh=0.0, box_nms_thresh=1.0)

    def no_full_masks(*_a, **_k):
        raise AssertionError("full-size records were built for a tile")

    monkeypatch.setattr(E, "_finish_records", no_full_masks)
    img, _ = disks_image((150, 170), seed=1)
    records = generate_tiled(gen, img, tile_size=100, overlap=30)
    assert records
    for rec in records:
        r0, c0, r1, c1 = rec["bbox_rc"]
        assert rec["segmentation"].shape == (r1 - r0, c1 - c0)
        assert len(rec["crop_box"]) == 4
