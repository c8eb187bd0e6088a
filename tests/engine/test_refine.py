"""The mask refiner: window geometry, features, the Predictor's use of it, and its weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_sam.engine.predictor import Predictor
from napari_sam.engine.refine import (
    MIN_WINDOW,
    paste_window,
    refine_logits,
    refine_window,
    window_features,
    window_target,
)
from napari_sam.models.build import SamConfig, build_sam, config_from_state_dict
from napari_sam.models.mask_refiner import REFINER_CROP, MaskRefiner


def _image(h=96, w=120, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, (h, w), dtype=np.uint8)
    img[30:50, 40:70] = 200
    return np.repeat(img[..., None], 3, -1)


def test_window_covers_the_mask_and_points_with_a_margin():
    mask = np.zeros((100, 100), bool)
    mask[40:60, 30:50] = True  # 20 x 20
    r0, c0, side = refine_window(mask, np.array([[45.0, 35.0]]))
    assert side == int(np.ceil(20 * 1.5 + 4))
    assert r0 <= 40 and r0 + side >= 60 and c0 <= 30 and c0 + side >= 50
    # a click far from the mask stretches the window to hold it
    r0, c0, side = refine_window(mask, np.array([[90.0, 35.0]]))
    assert r0 <= 40 and r0 + side > 90
    # an empty mask and one click: the smallest window, centred on the click
    r0, c0, side = refine_window(np.zeros((100, 100), bool), np.array([[10.0, 10.0]]))
    assert side == MIN_WINDOW and r0 <= 10 < r0 + side and c0 <= 10 < c0 + side
    # a box (inclusive corners) is inside its window
    r0, c0, side = refine_window(None, None, np.array([5, 6, 25, 16]))
    assert r0 <= 5 and r0 + side > 25 and c0 <= 6 and c0 + side > 16


def test_features_and_target_read_the_window_and_pad_outside_with_zeros():
    rgb = _image()
    logits = np.full(rgb.shape[:2], -5.0, np.float32)
    logits[30:50, 40:70] = 5.0
    window = (-10, -10, 32)  # reaches past the top-left corner
    x = window_features(rgb, logits, window, np.array([[5.0, 5.0]]), np.array([[20.0, 20.0]]))
    assert x.shape == (6, REFINER_CROP, REFINER_CROP) and x.dtype == torch.float32
    # the positive bump peaks where the point is (grid scale 2: row 5 -> (15 + 0.5) * 2 - 0.5)
    peak = np.unravel_index(int(x[4].argmax()), x[4].shape)
    assert peak == (30, 30)
    assert x[5].max() > 0.9 and x[5].argmax() != x[4].argmax()
    truth = np.zeros(rgb.shape[:2], bool)
    truth[0:6, 0:6] = True
    target = window_target(truth, window).numpy()
    assert target[:19].max() == 0  # outside the image: zeros (bilinear: one row of blur)
    assert target[21:31, 21:31].min() == pytest.approx(1.0)


def test_paste_keeps_the_logits_outside_the_window():
    logits = np.linspace(-3, 3, 40 * 50, dtype=np.float32).reshape(40, 50)
    refined = torch.full((REFINER_CROP, REFINER_CROP), 7.0)
    out = paste_window(logits, refined, (10, 20, 16))
    assert np.all(out[10:26, 20:36] == 7.0)
    outside = np.ones_like(logits, bool)
    outside[10:26, 20:36] = False
    np.testing.assert_array_equal(out[outside], logits[outside])


def _with_refiner(tiny_sam_config, seed=0):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(tiny_sam_config, refiner_widths=(4, 8))
    return build_sam(cfg).eval()


def test_config_round_trip_and_state_dict_inference(tiny_sam_config):
    model = _with_refiner(tiny_sam_config)
    assert isinstance(model.mask_refiner, MaskRefiner)
    cfg = model.config
    assert SamConfig.from_dict(cfg.to_dict()) == cfg
    assert config_from_state_dict(model.state_dict()).refiner_widths == (4, 8)
    # models without one keep their old config form and state dict
    plain = build_sam(tiny_sam_config)
    assert "refiner_widths" not in tiny_sam_config.to_dict()
    assert not any(k.startswith("mask_refiner.") for k in plain.state_dict())
    with pytest.raises(Exception, match="refiner_widths"):
        dataclasses.replace(tiny_sam_config, refiner_widths=(8,))


def test_predictor_refines_clicks_and_boxes_but_not_the_low_res_logits(tiny_sam_config):
    model = _with_refiner(tiny_sam_config)
    rgb = _image()
    refined = Predictor(model)
    plain = Predictor(model, refine=False)
    for p in (refined, plain):
        p.set_image(rgb)
    assert refined.refiner is model.mask_refiner and plain.refiner is None
    point = dict(points=np.array([[40.0, 55.0]]), multimask=True)
    a = refined.predict(**point, return_logits=True)
    b = plain.predict(**point, return_logits=True)
    np.testing.assert_array_equal(a.logits, b.logits)  # the decoder's, fed back as before
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.array_equal(a.masks, b.masks)
    # exactly refine_logits of the decoder's logits, with the model's threshold
    expected = refine_logits(model.mask_refiner, rgb, b.masks[None],
                             np.array([[[40.0, 55.0]]]), np.ones((1, 1)), None)[0]
    np.testing.assert_allclose(a.masks, expected, atol=1e-5)
    masks = refined.predict(**point).masks
    np.testing.assert_array_equal(masks, expected > 0)
    # a batch of boxes is refined too, each in its own window
    boxes = np.array([[30, 40, 49, 69], [5, 5, 20, 30]], np.float64)
    got = refined.predict(box=boxes, multimask=False, return_logits=True).masks
    dec = plain.predict(box=boxes, multimask=False, return_logits=True).masks
    np.testing.assert_allclose(got, refine_logits(model.mask_refiner, rgb, dec, None, None,
                                                  boxes), atol=1e-5)


def test_an_embedding_without_its_image_is_not_refined(tiny_sam_config):
    model = _with_refiner(tiny_sam_config)
    predictor = Predictor(model)
    entry = predictor.embed(_image())
    predictor.set_embedding(entry.features, entry.original_size, entry.input_size)
    assert predictor.refiner is None
    predictor.set_embedding(entry.features, entry.original_size, entry.input_size,
                            image=entry.image)
    assert predictor.refiner is model.mask_refiner
    assert predictor.embedding.image is entry.image


def test_default_model_refiner_raises_click_iou_on_the_sample():
    """The shipped refiner on the bundled sample: refined clicks beat the decoder's."""
    from napari_sam.evaluation.interactive import evaluate_image_interactive
    from napari_sam.models import load_model
    from napari_sam.sample_data import nuclei, nuclei_labels

    model = load_model()
    assert model.mask_refiner is not None  # the default model ships with one
    rgb = nuclei()[0][0]
    labels = nuclei_labels()
    got = {}
    for refine in (True, False):
        res = evaluate_image_interactive(Predictor(model, refine=refine), rgb, labels,
                                         n_clicks=0, box=True)
        got[refine] = (np.nanmean(res["point_iou"][:, 0]), np.nanmean(res["box_iou"]))
    assert got[True][0] > got[False][0] + 0.02
    assert got[True][1] > got[False][1]


# --- the fast inference path against the plain algorithm --------------------------------
# The per-window implementation refine_logits had before it was vectorised (one window
# at a time, the whole image converted to float, one Gaussian per point in a loop, the
# refiner's plain eval-mode forward), kept here as the specification of the fast path.


def _plain_features(rgb, logits, window, positive, negative):
    from napari_sam.models.sam import PIXEL_MEAN, PIXEL_STD

    def take(a):
        r0, c0, side = window
        out = np.zeros((side, side) + a.shape[2:], a.dtype)
        rs, re = max(r0, 0), min(r0 + side, a.shape[0])
        cs, ce = max(c0, 0), min(c0 + side, a.shape[1])
        if rs < re and cs < ce:
            out[rs - r0:re - r0, cs - c0:ce - c0] = a[rs:re, cs:ce]
        return out

    def to_grid(a):
        t = torch.from_numpy(np.ascontiguousarray(a)).float()
        t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
        mode = "area" if t.shape[-1] > REFINER_CROP else "bilinear"
        kw = {} if mode == "area" else {"align_corners": False}
        return torch.nn.functional.interpolate(t, size=(REFINER_CROP, REFINER_CROP),
                                               mode=mode, **kw)[0]

    def point_map(points):
        out = torch.zeros(REFINER_CROP, REFINER_CROP)
        r0, c0, side = window
        grid = torch.arange(REFINER_CROP, dtype=torch.float32)
        for r, c in ([] if points is None else np.asarray(points, float).reshape(-1, 2)):
            y = (r - r0 + 0.5) * REFINER_CROP / side - 0.5
            x = (c - c0 + 0.5) * REFINER_CROP / side - 0.5
            out = torch.maximum(out, torch.exp(
                -((grid[:, None] - y) ** 2 + (grid[None, :] - x) ** 2) / 8.0))
        return out

    mean, std = np.asarray(PIXEL_MEAN, np.float32), np.asarray(PIXEL_STD, np.float32)
    image = to_grid((take(rgb.astype(np.float32)) - mean) / std)
    prob = torch.sigmoid(to_grid(take(logits.astype(np.float32)))[0].clamp(-20, 20))
    return torch.cat([image, prob[None], point_map(positive)[None],
                      point_map(negative)[None]], 0)


def _plain_refine(refiner, rgb, logits, points, labels, boxes, threshold):
    out = np.empty(logits.shape, np.float32)
    for b in range(logits.shape[0]):
        pos = neg = None
        if points is not None:
            pos, neg = points[b][labels[b] == 1], points[b][labels[b] == 0]
        box = boxes[b] if boxes is not None else None
        for c in range(logits.shape[1]):
            window = refine_window(logits[b, c] > threshold, pos, box)
            x = _plain_features(rgb, logits[b, c], window, pos, neg)
            with torch.no_grad():
                refined = refiner.eval()(x[None])[0, 0]
            out[b, c] = paste_window(logits[b, c], refined, window)
    return out


PROMPTS = {
    "point": dict(points=np.array([[70.0, 90.0]])),
    "points and negatives": dict(points=np.array([[70.0, 90.0], [80.0, 60.0], [140.0, 30.0]]),
                                 labels=np.array([1, 0, 0])),
    "box": dict(box=np.array([50, 60, 100, 130])),
    "box and points past the border": dict(box=np.array([0, 0, 30, 40]),
                                           points=np.array([[1.0, 2.0], [20.0, 35.0]]),
                                           labels=np.array([1, 0])),
    "batch": dict(points=np.array([[[70.0, 90.0]], [[10.0, 150.0]], [[140.0, 100.0]]]),
                  labels=np.ones((3, 1), int),
                  box=np.array([[50, 60, 100, 130], [0, 120, 30, 179], [120, 80, 149, 120]])),
}


@pytest.fixture(scope="module")
def default_predictors():
    from napari_sam.models import load_model

    model = load_model()
    rgb = _image(150, 180, seed=3)
    rgb[100:130, 20:60] = 180  # a second object
    refined, plain = Predictor(model), Predictor(model, refine=False)
    for p in (refined, plain):
        p.set_image(rgb)
    return model, rgb, refined, plain


@pytest.mark.parametrize("name", list(PROMPTS))
def test_default_model_refined_masks_equal_the_plain_algorithm(default_predictors, name):
    model, rgb, refined, plain = default_predictors
    prompt = PROMPTS[name]
    got = refined.predict(**prompt, multimask=True, return_logits=True).masks
    decoder = plain.predict(**prompt, multimask=True, return_logits=True).masks
    batched = decoder.ndim == 4
    logits = decoder if batched else decoder[None]
    n = logits.shape[0]
    points, labels, box = prompt.get("points"), prompt.get("labels"), prompt.get("box")
    if points is not None:
        labels = np.ones(points.shape[:-1], int) if labels is None else labels
        points = points if points.ndim == 3 else np.broadcast_to(points, (n, *points.shape))
        labels = labels if labels.ndim == 2 else np.broadcast_to(labels, (n, *labels.shape))
    if box is not None and box.ndim == 1:
        box = np.broadcast_to(box, (n, 4))
    threshold = float(model.mask_threshold)
    expected = _plain_refine(model.mask_refiner, rgb, logits, points, labels, box, threshold)
    expected = expected if batched else expected[0]
    assert not np.allclose(expected, decoder, atol=1e-2)  # the refiner did change them
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    masks = refined.predict(**prompt, multimask=True).masks
    decided = np.abs(expected - threshold) > 1e-3  # pixels float rounding cannot flip
    np.testing.assert_array_equal(masks[decided], (expected > threshold)[decided])


def test_logit_window_equals_the_window_of_the_thresholded_mask():
    from napari_sam.engine.refine import _logit_window

    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(-4, 1, (60, 80)).astype(np.float32)
        for _ in range(rng.integers(0, 3)):  # 0-2 blobs
            r, c = rng.integers(0, 60), rng.integers(0, 80)
            logits[r:r + rng.integers(1, 20), c:c + rng.integers(1, 20)] = 3.0
        pts = rng.uniform(0, 60, (rng.integers(0, 3), 2))
        assert _logit_window(logits, 0.0, pts, None) == refine_window(logits > 0.0, pts)


def test_refine_logits_in_place_equals_a_new_array(tiny_sam_config):
    model = _with_refiner(tiny_sam_config)
    rgb = _image()
    rng = np.random.default_rng(1)
    logits = rng.normal(-2, 3, (2, 3, *rgb.shape[:2])).astype(np.float32)
    boxes = np.array([[30, 40, 49, 69], [5, 5, 20, 30]], np.float64)
    new = refine_logits(model.mask_refiner, rgb, logits, None, None, boxes)
    inplace = logits.copy()
    assert refine_logits(model.mask_refiner, rgb, inplace, None, None, boxes,
                         out=inplace) is inplace
    np.testing.assert_array_equal(inplace, new)
    np.testing.assert_allclose(new, _plain_refine(model.mask_refiner, rgb, logits, None, None,
                                                  boxes, 0.0), atol=1e-4, rtol=0)
