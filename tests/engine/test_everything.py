"""Tests of everything-mode (napari_sam.engine.everything) with a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.engine import masks as M
from napari_sam.engine.everything import (
    AutomaticMaskGenerator,
    records_to_labels,
)
from napari_sam.engine.predictor import Predictor
from napari_sam.engine.transforms import ImageTransform
from napari_sam.engine.upsample import (
    bilinear_taps,
    stability_upper_bound,
    support_window,
    upscale_logits,
)
from napari_sam.errors import CancelledError, InvalidInputError
from napari_sam.evaluation.metrics import mask_iou
from napari_sam.models.fast_decoder import FactoredBackend, ReferenceBackend, make_decoder_backend

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


def blobs(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """Bright disks (radius 5..14) on a noisy dark background, uint8."""
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(n):
        cy, cx = rng.integers(15, shape[0] - 15), rng.integers(15, shape[1] - 15)
        r = rng.integers(5, 15)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 200
    return img + rng.integers(0, 30, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- fast decoder


# width 256 (SAM's) takes the factored first convolution of the mask head
@pytest.mark.parametrize(("depth", "width"), [(1, 64), (2, 64), (1, 256), (2, 256)])
def test_fast_decoder_matches_mask_decoder(depth, width):
    from reference_utils import build_random_sam, tiny_vit_sam_config

    cfg = tiny_vit_sam_config(decoder_depth=depth, prompt_embed_dim=width)
    model = build_random_sam(cfg, seed=3)
    fd = make_decoder_backend(model, "auto")
    assert isinstance(fd, FactoredBackend)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        feats = torch.randn(1, width, 8, 8, generator=g)
        pe = model.prompt_encoder.get_dense_pe()
        coords = torch.rand(11, 1, 2, generator=g, dtype=torch.float64) * 128
        labels = torch.ones(11, 1, dtype=torch.int)
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low, iou = model.mask_decoder(feats, pe, sparse, dense, multimask_output=True)
        ctx = fd.prepare(feats)
        chosen = torch.zeros(11, 3, dtype=torch.bool)
        chosen[[0, 0, 5, 10, 7, 7, 7], [0, 2, 1, 0, 0, 1, 2]] = True
        offset = 0

        def select(iou_sub):  # sub-batches of 4 prompts arrive in order
            nonlocal offset
            offset += len(iou_sub)
            return chosen[offset - len(iou_sub) : offset]

        iou_fast, chosen_fast, low_fast = fd.decode_selected(ctx, sparse, dense, select,
                                                             sub_batch=4)
        assert offset == 11
        assert torch.equal(chosen_fast, chosen)
        torch.testing.assert_close(iou_fast, iou, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(low_fast, low[chosen], atol=1e-5, rtol=1e-4)


def test_fast_decoder_refuses_unknown_structure():
    class Other(torch.nn.Module):
        pass

    m = Other()
    m.mask_decoder = torch.nn.Linear(2, 2)
    assert not FactoredBackend.supports(m)
    assert isinstance(make_decoder_backend(m, "auto"), ReferenceBackend)
    with pytest.raises(InvalidInputError, match="no fast path"):
        make_decoder_backend(m, "factored")


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
    full = upscale_logits(low[:, None], target, (h, w), original)[:, 0]
    exact = M.stability_score(full, 0.0, 1.0)
    bound = stability_upper_bound(low, target, (h, w), original, 0.0, 1.0)
    valid = ~torch.isnan(exact)
    assert (bound[valid] >= exact[valid]).all()
    assert bound[0] >= 1.0
    assert bound[1:].median() < 1.0  # the bound is informative for noisy masks


@pytest.mark.parametrize(
    ("n_low", "target", "n_in", "n_out"),
    [(256, 1024, 1024, 1024), (256, 1024, 683, 1200), (256, 1024, 29, 333),
     (256, 1024, 925, 333), (32, 128, 85, 60), (32, 128, 3, 1000), (32, 128, 128, 1)],
)
def test_support_window_agrees_with_the_resize_taps(n_low, target, n_in, n_out):
    """Every low-res pixel the resize reads (with any weight) lies in the window, and
    the window starts at the first one: the bound and the resize share one geometry."""
    lo, k = support_window(n_low, target, n_in, n_out)
    i0, i1, w0, w1 = bilinear_taps(n_low, target)
    if n_in == n_out:
        first, last = i0[:n_in], i1[:n_in]
    else:
        j0, j1, _, _ = bilinear_taps(n_in, n_out)
        first, last = i0[j0], i1[j1]
    assert lo.shape == (n_out,)
    np.testing.assert_array_equal(lo, first)
    assert ((last - lo) < k).all() and k == int((last - first).max()) + 1
    # the taps' rows of the resize matrix are zero outside the window
    from napari_sam.engine.upsample import resize_matrix

    m = resize_matrix(n_low, target, n_in, n_out)
    cols = np.arange(n_low)
    outside = (cols[None, :] < lo[:, None]) | (cols[None, :] >= lo[:, None] + k)
    assert not m[outside].any()


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
    slow = AutomaticMaskGenerator(Predictor(sam, decoder="reference"), points_per_side=6,
                                  **LOW)
    a, b = fast.generate(image), slow.generate(image)
    assert len(a) == len(b) >= 3
    for ra, rb in zip(a, b, strict=True):
        assert mask_iou(ra["segmentation"], rb["segmentation"]) > 0.99
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
    features = pred.features
    during = []  # the predictor's image while everything-mode runs: never swapped

    def progress(done, total):
        during.append((pred.original_size, pred.features is features))
        during.append(pred.predict(points=[[25, 30]]).masks.shape)

    AutomaticMaskGenerator(pred, points_per_side=3, **LOW).generate(image, progress=progress)
    assert during and all(d in (((50, 60), True), (3, 50, 60)) for d in during)
    assert pred.original_size == (50, 60) and pred.features is features
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


# ----------------------------------------------------------------------------- parameters
# issue 13, reliability review D5 and table 1c: every bad value raises InvalidInputError with
# a one-line message naming the parameter, when the generator is built (before any work)

BAD_PARAMETERS = [
    ({"points_per_side": 2.7}, "points_per_side"),  # 1c #5: was truncated to 2
    ({"points_per_side": "abc"}, "points_per_side"),  # 1c #6: raw ValueError from int()
    ({"points_per_side": 100000}, "points_per_side"),  # 1c #9: MemoryError, 74.5 GiB
    ({"points_per_side": True}, "points_per_side"),
    ({"points_per_batch": 2.5}, "points_per_batch"),
    ({"pred_iou_thresh": 1.5}, "pred_iou_thresh"),  # 1c #12: 0 masks, no warning
    ({"pred_iou_thresh": -1}, "pred_iou_thresh"),  # 1c #13
    ({"pred_iou_thresh": float("nan")}, "pred_iou_thresh"),  # 1c #14
    ({"stability_score_thresh": 2}, "stability_score_thresh"),  # 1c #15
    ({"stability_score_thresh": float("nan")}, "stability_score_thresh"),  # 1c #17: filter off
    ({"stability_score_offset": -1}, "stability_score_offset"),  # 1c #18
    ({"stability_score_offset": float("inf")}, "stability_score_offset"),
    ({"box_nms_thresh": 5}, "box_nms_thresh"),  # 1c #21
    ({"box_nms_thresh": -1}, "box_nms_thresh"),  # 1c #22: kept 1 mask
    ({"crop_nms_thresh": float("nan")}, "crop_nms_thresh"),
    ({"crop_n_layers": 3, "crop_n_points_downscale_factor": 0},
     "crop_n_points_downscale_factor"),  # 1c #25: ZeroDivisionError
    ({"crop_n_layers": 1, "crop_n_points_downscale_factor": 0.5},
     "crop_n_points_downscale_factor"),
    ({"crop_n_layers": 1, "crop_overlap_ratio": 5}, "crop_overlap_ratio"),  # 1c #27
    ({"crop_n_layers": 1, "crop_overlap_ratio": -1}, "crop_overlap_ratio"),  # 1c #28
    ({"crop_n_layers": 2, "crop_overlap_ratio": -0.9}, "crop_overlap_ratio"),  # 1c #29
    ({"crop_n_layers": 1, "crop_overlap_ratio": 1.0}, "crop_overlap_ratio"),
    ({"crop_n_layers": 8}, "crop_n_layers"),  # 1c #30: 87,381 crops accepted
    ({"crop_n_layers": -1}, "crop_n_layers"),
    ({"min_mask_region_area": -5}, "min_mask_region_area"),  # 1c #31
    ({"points_per_side": None, "point_grids": [np.array([[1.5, 0.5], [0.2, -0.1]])]},
     "point_grids"),  # 1c #36: prompts outside the image
    ({"points_per_side": None, "point_grids": [np.array([[np.nan, 0.5]])]},
     "point_grids"),  # 1c #37: NaN prompts, records carried point_coords [[nan, 32.0]]
    ({"points_per_side": None, "point_grids": [np.zeros((70_000, 2))]}, "point_grids"),
    ({"points_per_side": 256, "crop_n_layers": 4}, "points_per_side"),  # 22 M prompts
    ({"output_mode": "coco_rle"}, "output_mode"),
    ({"auto_tile": "no"}, "auto_tile"),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_PARAMETERS)
def test_bad_parameters_raise_when_built(sam, kwargs, name):
    with pytest.raises(InvalidInputError) as info:
        AutomaticMaskGenerator(sam, **kwargs)
    message = str(info.value)
    assert name in message and "\n" not in message and len(message) < 300


def test_review_reproductions_with_the_default_model():
    """D5's snippet: each call failed after the whole computation, or ran silently."""
    from napari_sam import load_model

    model = load_model()
    for kwargs in (
        dict(points_per_side=8, crop_n_layers=1, crop_overlap_ratio=5),
        dict(points_per_side=4, crop_n_layers=1, crop_n_points_downscale_factor=0),
        dict(points_per_side=8, pred_iou_thresh=0.6, stability_score_thresh=float("nan")),
    ):
        with pytest.raises(InvalidInputError):
            AutomaticMaskGenerator(model, **kwargs)  # no generate(): raised when built


def test_edge_values_are_accepted_and_coerced(sam, image):
    gen = AutomaticMaskGenerator(sam, points_per_side=4.0, points_per_batch=np.int64(8),
                                 pred_iou_thresh=0, stability_score_thresh=1,
                                 stability_score_offset=0, box_nms_thresh=1, crop_n_layers=1,
                                 crop_overlap_ratio=0, crop_nms_thresh=0)
    assert type(gen.point_grids[0]) is np.ndarray and len(gen.point_grids[0]) == 16
    assert type(gen.points_per_batch) is int and gen.points_per_batch == 8
    assert isinstance(gen.generate(image), list)


def test_settings_dataclass_describes_the_ranges():
    import dataclasses

    from napari_sam.engine.everything_settings import EverythingSettings

    meta = {f.name: f.metadata for f in dataclasses.fields(EverythingSettings)}
    assert (meta["pred_iou_thresh"]["min"], meta["pred_iou_thresh"]["max"]) == (0.0, 1.0)
    assert meta["crop_overlap_ratio"]["max_open"] is True
    assert meta["points_per_side"]["kind"] is int and meta["points_per_side"]["max"] == 256
    assert all(m["help"] for m in meta.values())

    st = EverythingSettings(points_per_side=16, box_nms_thresh=0.5)
    assert st.pred_iou_thresh is None  # resolved per model
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.points_per_side = 3
    with pytest.raises(InvalidInputError, match="--box-nms-thresh must be a number in"):
        EverythingSettings.from_kwargs({"box_nms_thresh": 7},
                                       labels={"box_nms_thresh": "--box-nms-thresh"})
    with pytest.raises(InvalidInputError, match="points_per_sid"):
        EverythingSettings.from_kwargs({"points_per_sid": 7})


def test_settings_round_trip_into_the_generator(sam, image):
    from napari_sam.engine.everything_settings import EverythingSettings

    st = EverythingSettings(points_per_side=5, **LOW)
    a = AutomaticMaskGenerator(sam, **st.kwargs()).generate(image)
    b = AutomaticMaskGenerator(sam, points_per_side=5, **LOW).generate(image)
    assert len(a) == len(b) > 0


# ----------------------------------------------------------------------------- thresholds


def test_thresholds_follow_the_model(sam):
    """Not given: the model's recommended values (default model) or SAM's (other models)."""
    from napari_sam import load_model
    from napari_sam.engine.everything_settings import recommended_settings
    from napari_sam.models.zoo import recommended_everything_settings

    default = load_model()
    gen = AutomaticMaskGenerator(default)
    rec = recommended_everything_settings("default")
    assert (gen.pred_iou_thresh, gen.stability_score_thresh) == (
        rec["pred_iou_thresh"], rec["stability_score_thresh"]) == (0.6, 0.85)
    assert AutomaticMaskGenerator(Predictor(default)).pred_iou_thresh == 0.6
    assert recommended_settings(default) == rec
    given = AutomaticMaskGenerator(default, pred_iou_thresh=0.7)
    assert (given.pred_iou_thresh, given.stability_score_thresh) == (0.7, 0.85)

    other = AutomaticMaskGenerator(sam)  # any other architecture: SAM's thresholds
    assert (other.pred_iou_thresh, other.stability_score_thresh) == (0.88, 0.95)
    assert recommended_settings(sam) == {}


def _matched(labels: np.ndarray, truth: np.ndarray, min_iou: float = 0.5) -> int:
    """Ground-truth objects that some label matches with IoU > min_iou."""
    n = 0
    for t in np.unique(truth)[1:]:
        obj = truth == t
        ids, inter = np.unique(labels[obj], return_counts=True)
        best = 0.0
        for i, k in zip(ids, inter, strict=True):
            if i:
                best = max(best, k / (obj.sum() + (labels == i).sum() - k))
        n += best > min_iou
    return n


def test_readme_example_finds_the_nuclei():
    """usability review 5: the README example returned 0 records with the default model."""
    from napari_sam import load_model
    from napari_sam.sample_data import nuclei, nuclei_labels

    image = nuclei()[0][0]
    truth = nuclei_labels()
    model = load_model()
    records = AutomaticMaskGenerator(model, points_per_side=32).generate(image)  # as README
    assert 60 <= len(records) <= 200  # 107 nuclei
    labels = records_to_labels(records, image.shape)
    assert _matched(labels, truth) >= 50


# ----------------------------------------------------------------------------- empty masks


def test_no_empty_masks_or_nan_scores():
    """1c #38: a 1x1 image with both thresholds 0 gave 48 records of area 0, stability NaN."""
    from napari_sam import load_model

    model = load_model()
    gen = AutomaticMaskGenerator(model, points_per_side=8, pred_iou_thresh=0.0,
                                 stability_score_thresh=0.0)
    crops = AutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0.0,
                                   stability_score_thresh=0.0, crop_n_layers=2)
    rng = np.random.default_rng(0)
    for img in (np.full((1, 1), 7, np.uint8), rng.random((1, 1)), rng.random((2, 3)),
                rng.random((3, 500))):
        for g in (gen, crops):
            for r in g.generate(img):
                assert r["area"] > 0 and r["segmentation"].any()
                assert np.isfinite(r["stability_score"]) and np.isfinite(r["predicted_iou"])


# ----------------------------------------------------------------------------- memory


def test_candidates_are_kept_cropped_to_their_box(sam):
    """D6: every kept candidate was a full-size mask; now each is cut to its bounding box,
    so what is held scales with the objects, not with the image."""
    img = blobs((300, 400), 30, seed=1)
    gen = AutomaticMaskGenerator(sam, points_per_side=8, auto_tile=False, **LOW)
    rgb = np.repeat(img[..., None], 3, axis=2)
    from napari_sam.engine.progress import run_steps as _run

    data = _run(gen._iter_masks(rgb, None, use_cache=False), None)
    assert len(data.masks) >= 3
    held = 0
    for (mask, (r0, c0)), (x0, y0, x1, y1) in zip(data.masks, data.boxes.tolist(),
                                                  strict=True):
        assert (r0, c0) == (y0, x0)
        assert tuple(mask.shape) == (y1 - y0 + 1, x1 - x0 + 1)  # exactly the box
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        held += mask.numel()
    assert held < len(data.masks) * img.size


def test_upsampling_stays_within_its_memory_budget(sam, monkeypatch):
    """D6: float logits were upsampled 16 at a time whatever the image size (1 GB at
    4000 x 4000); now the batch shrinks so that it stays within UPSCALE_BUDGET_BYTES."""
    from napari_sam.engine import everything as E

    img = blobs((200, 260), 20, seed=2)
    budget = 3 * 4 * img.size  # three float32 masks of this image
    monkeypatch.setattr(E, "UPSCALE_BUDGET_BYTES", budget)
    pred = Predictor(sam)
    sizes = []
    original = E.upscale_logits

    def spy(low, *args, **kwargs):
        sizes.append(low.shape[0])
        return original(low, *args, **kwargs)

    monkeypatch.setattr(E, "upscale_logits", spy)
    gen = AutomaticMaskGenerator(pred, points_per_side=6, **LOW)
    assert len(gen.generate(img)) > 0
    assert sizes and max(sizes) <= 3


def test_output_modes_hold_the_same_masks(sam, image):
    binary = AutomaticMaskGenerator(sam, points_per_side=6, **LOW).generate(image)
    cropped = AutomaticMaskGenerator(sam, points_per_side=6, output_mode="cropped_mask",
                                     **LOW).generate(image)
    rle = AutomaticMaskGenerator(sam, points_per_side=6, output_mode="uncompressed_rle",
                                 **LOW).generate(image)
    assert len(binary) == len(cropped) == len(rle) >= 3
    for b, c, r in zip(binary, cropped, rle, strict=True):
        r0, c0, r1, c1 = c["bbox_rc"]
        assert c["segmentation"].shape == (r1 - r0, c1 - c0)
        full = np.zeros(image.shape, bool)
        full[r0:r1, c0:c1] = c["segmentation"]
        np.testing.assert_array_equal(full, b["segmentation"])
        assert r["segmentation"] == M.mask_to_rle(b["segmentation"])
        assert b["bbox"] == c["bbox"] and b["area"] == c["area"]
    np.testing.assert_array_equal(records_to_labels(cropped, image.shape),
                                  records_to_labels(binary, image.shape))
    gen = AutomaticMaskGenerator(sam, points_per_side=6, **LOW)
    np.testing.assert_array_equal(gen.generate_labels(image),
                                  records_to_labels(binary, image.shape))


def test_min_mask_region_area_on_cropped_masks_matches_full_frame(sam, image):
    """The clean-up works on cropped masks and gives SAM's full-frame result."""
    gen = AutomaticMaskGenerator(sam, points_per_side=6, **LOW)
    raw = gen.generate(image)
    cleaned = AutomaticMaskGenerator(sam, points_per_side=6, min_mask_region_area=30,
                                     **LOW).generate(image)
    assert cleaned
    raw_by_point = {tuple(r["point_coords"][0]): r for r in raw}
    for r in cleaned:
        m = r["segmentation"]
        assert M.remove_small_regions(m, 30, "islands")[1] is False
        assert M.remove_small_regions(m, 30, "holes")[1] is False
        src = raw_by_point[tuple(r["point_coords"][0])]["segmentation"]
        want, _ = M.remove_small_regions(M.remove_small_regions(src, 30, "holes")[0], 30,
                                         "islands")
        np.testing.assert_array_equal(m, want)


# ----------------------------------------------------------------------------- large images


def test_large_images_are_tiled_on_their_own(sam):
    """D6: a large image was seen at the model's input size, silently. The tiny model's input
    is 128 px: images longer than 384 px are tiled in 256 px tiles (overlap 32)."""
    from napari_sam.engine.tiles import tile_boxes

    gen = AutomaticMaskGenerator(sam, points_per_side=4, points_per_batch=8, **LOW)
    assert gen.tile_size_for((384, 300)) is None
    assert gen.tile_size_for((385, 300)) == 256
    img = blobs((300, 600), 60, seed=3)
    calls = []
    records = gen.generate(img, progress=lambda d, t: calls.append((d, t)))
    n_tiles = len(tile_boxes(img.shape, 256, 32))
    assert n_tiles == 6
    assert calls[-1] == (2 * n_tiles, 2 * n_tiles)  # 16 prompts in 2 batches per tile
    assert [d for d, _ in calls] == list(range(1, 2 * n_tiles + 1))
    assert records and all("tile_box" in r for r in records)
    assert all(r["segmentation"].shape == img.shape for r in records)  # binary_mask: full
    labels = gen.generate_labels(img)
    np.testing.assert_array_equal(labels, records_to_labels(records, img.shape))

    untiled = AutomaticMaskGenerator(sam, points_per_side=4, auto_tile=False, **LOW)
    assert untiled.tile_size_for(img.shape) is None
    with pytest.warns(UserWarning, match="tile_size=256"):
        untiled.generate(img)


def test_large_image_with_small_objects_yields_objects():
    """D6: at 4000 x 4000 the default model found nothing (it sees 256 px). A 520 x 1392
    mosaic of the sample nuclei: 0 found untiled at SAM's thresholds; tiled, most."""
    from napari_sam import load_model
    from napari_sam.sample_data import nuclei, nuclei_labels

    image, truth = nuclei()[0][0], nuclei_labels().astype(np.int32)
    big = np.concatenate([image, image], axis=1)
    second = np.where(truth > 0, truth + truth.max(), 0)
    big_truth = np.concatenate([truth, second], axis=1)
    model = load_model()
    gen = AutomaticMaskGenerator(model, points_per_side=16)
    assert gen.tile_size_for(big.shape) == 512
    labels = gen.generate_labels(big)
    found = _matched(labels, big_truth)
    assert found >= 0.4 * big_truth.max()
    with pytest.warns(UserWarning, match="tile_size=512"):
        untiled = AutomaticMaskGenerator(model, points_per_side=16, auto_tile=False)
        seen = _matched(untiled.generate_labels(big), big_truth)
    assert seen < found / 3


# ----------------------------------------------------------------------------- CLI and cache


def _write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


@pytest.mark.parametrize(("option", "value"), [
    ("--pred-iou-thresh", "7"),  # 3 #30: rc 0, empty label image
    ("--stability-score-thresh", "nan"),  # 3 #31: filter silently off
    ("--crop-n-points-downscale-factor", "0"),  # 3 #32: ZeroDivisionError per image
    ("--crop-overlap-ratio", "5"),  # 3 #33: ValueError after 4x the work
    ("--points-per-side", "100000"),
])
def test_cli_bad_everything_options_are_usage_errors(tmp_path, monkeypatch, capsys, option,
                                                     value):
    from napari_sam.cli import main
    from napari_sam.models import zoo

    def no_model(*_a, **_k):
        raise AssertionError("a model was loaded for a usage error")

    monkeypatch.setattr(zoo, "load_model", no_model)
    _write_png(tmp_path / "a.png", np.zeros((32, 32), np.uint8))
    extra = ["--crop-n-layers", "1"] if "crop" in option else []
    rc = main(["everything", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"),
               option, value, *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert option in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_usage_error_exit_code_in_a_real_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    _write_png(tmp_path / "a.png", np.zeros((32, 32), np.uint8))
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "napari_sam.cli", "everything", str(tmp_path / "a.png"),
         "--out", str(tmp_path / "out"), "--stability-score-thresh", "nan"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--stability-score-thresh" in proc.stderr


def test_batch_generator_cache_is_bounded(sam, monkeypatch):
    """D13: one generator per parameter set was cached forever (300 sets: +194 MB)."""
    from napari_sam.engine import batch

    monkeypatch.setattr(batch, "_GENERATORS", {})
    monkeypatch.setitem(batch._MODELS, ("tiny-test-model", None), sam)
    first = batch.get_generator("tiny-test-model", None, {"points_per_side": 2})
    for n in range(3, 40):
        batch.get_generator("tiny-test-model", None, {"points_per_side": n})
        assert len(batch._GENERATORS) <= batch.GENERATOR_CACHE_SIZE
    assert len(batch._GENERATORS) == batch.GENERATOR_CACHE_SIZE
    last = batch.get_generator("tiny-test-model", None, {"points_per_side": 39})
    assert batch.get_generator("tiny-test-model", None, {"points_per_side": 39}) is last
    assert batch.get_generator("tiny-test-model", None, {"points_per_side": 2}) is not first
    # the least recently used goes first: 39, used again now, survives 7 new sets
    assert batch.get_generator("tiny-test-model", None, {"points_per_side": 39}) is last
    for n in range(40, 47):
        batch.get_generator("tiny-test-model", None, {"points_per_side": n})
    assert batch.get_generator("tiny-test-model", None, {"points_per_side": 39}) is last
    assert last.output_mode == "cropped_mask"


def test_iter_generate_yields_progress_then_the_records(sam, image):
    """The generator form the widget's worker runs: progress per batch, records last,
    the same records as generate(); closing it stops the work between batches."""
    gen = AutomaticMaskGenerator(sam, points_per_side=4, points_per_batch=5, **LOW)
    items = list(gen.iter_generate(image))
    *steps, records = items
    assert [(s.done, s.total) for s in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert isinstance(records, list) and len(records) > 0
    same = gen.generate(image)
    assert len(same) == len(records)
    for a, b in zip(records, same, strict=True):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])

    decoded = []
    real_backend = gen._backend

    class Counting:  # counts decoded batches through the public backend seam
        def __getattr__(self, name):
            return getattr(real_backend, name)

        def decode_selected(self, *args, **kwargs):
            decoded.append(1)
            return real_backend.decode_selected(*args, **kwargs)

    gen._backend = Counting()
    it = gen.iter_generate(image)
    assert next(it).done == 1
    it.close()  # stop after the first batch
    assert len(decoded) == 1
    assert not torch.is_inference_mode_enabled()  # not left on by the suspended generator


def test_mask_batch_filter_and_cat_keep_fields_aligned():
    from napari_sam.engine.mask_batch import MaskBatch

    def batch(n, start):
        return MaskBatch(
            masks=[(torch.ones(1, i + 1, dtype=torch.bool), (i, 0))
                   for i in range(start, start + n)],
            iou=torch.arange(start, start + n, dtype=torch.float32),
            stability=torch.arange(start, start + n, dtype=torch.float32) / 10,
            points=torch.arange(start, start + n, dtype=torch.float64)[:, None].repeat(1, 2),
            boxes=torch.arange(start, start + n)[:, None].repeat(1, 4),
        )

    both = MaskBatch.cat([batch(3, 0), MaskBatch.empty(), batch(2, 3)])
    assert len(both) == 5 and both.crop_boxes is None
    kept = both.filter(torch.tensor([False, True, False, True, True]))
    assert kept.iou.tolist() == [1.0, 3.0, 4.0]
    assert [origin for _, origin in kept.masks] == [(1, 0), (3, 0), (4, 0)]
    assert kept.boxes[:, 0].tolist() == kept.points[:, 0].long().tolist() == [1, 3, 4]
    assert both.filter(torch.tensor([4, 0])).iou.tolist() == [4.0, 0.0]
    assert len(MaskBatch.cat([])) == 0
