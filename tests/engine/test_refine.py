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
