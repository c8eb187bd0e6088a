"""Predictor against the reference ``SamPredictor`` with identical random weights.

Both get the same (mid-size, 256 px) model; the reference gets the uint8 RGB
image our normalisation produced and the same prompts in its (x, y) order.
Random weights give arbitrary but deterministic masks; the fixture checks they
are neither empty nor full, so the IoU comparisons mean something.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.engine.image import to_rgb_uint8
from napari_sam.engine.predictor import Predictor

pytestmark = pytest.mark.reference

RNG = np.random.default_rng(42)


def _images() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:300, 0:170]
    blob = np.exp(-((yy - 120) ** 2 + (xx - 70) ** 2) / 900.0)
    return {
        "rgb_uint8_150x230": RNG.integers(0, 256, (150, 230, 3), dtype=np.uint8),
        "gray_uint16_300x170": (blob * 40000 + RNG.integers(0, 3000, blob.shape)).astype(
            np.uint16
        ),
        "rgba_uint8_256x256": RNG.integers(0, 256, (256, 256, 4), dtype=np.uint8),
        "float32_37x411": RNG.normal(-3.0, 2.0, (37, 411)).astype(np.float32),
    }


IMAGES = _images()


@pytest.fixture(scope="module", params=[128, 256], ids=["width128", "width256"])
def pair(request):
    """Width 256 (SAM's own) engages the factored mask-head convolution for
    prompts of few tokens; width 128 takes the direct path."""
    pytest.importorskip("segment_anything")
    from segment_anything import SamPredictor

    from reference_utils import reference_pair, tiny_vit_sam_config

    cfg = tiny_vit_sam_config(
        encoder=dict(img_size=256), prompt_embed_dim=request.param, decoder_mlp_dim=256
    )
    ours, ref = reference_pair(cfg, seed=0)
    return Predictor(ours), SamPredictor(ref)


@pytest.fixture(scope="module", params=list(IMAGES))
def predictors(request, pair):
    ours, ref = pair
    image = IMAGES[request.param]
    ours.set_image(image)
    ref.set_image(to_rgb_uint8(image), image_format="RGB")
    return ours, ref


def _xy(points_rc) -> np.ndarray:
    return np.asarray(points_rc, dtype=float)[..., ::-1].copy()


def _box_xyxy(box_rc) -> np.ndarray:
    b = np.asarray(box_rc, dtype=float)
    return b[..., [1, 0, 3, 2]].copy()


def _prompts(shape: tuple[int, int]) -> dict[str, dict]:
    h, w = shape
    pos, neg = [0.45 * h, 0.4 * w], [0.85 * h, 0.9 * w]
    box = [0.1 * h, 0.15 * w, 0.7 * h, 0.8 * w]
    return {
        "one_point": dict(points=[pos], labels=[1]),
        "pos_neg": dict(points=[pos, neg], labels=[1, 0]),
        "box": dict(box=box),
        "box_points": dict(points=[pos, neg], labels=[1, 0], box=box),
    }


def _assert_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-3) -> None:
    span = max(float(np.ptp(ref)), float(np.abs(ref).max()), 1e-6)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=rel * span)


def _assert_masks_match(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.bool_
    for a, b in zip(ours.reshape(-1, *ours.shape[-2:]), ref.reshape(-1, *ref.shape[-2:]),
                    strict=True):
        union = np.logical_or(a, b).sum()
        iou = np.logical_and(a, b).sum() / union if union else 1.0
        assert iou >= 0.999


def test_embeddings_match(predictors):
    ours, ref = predictors
    assert ours.original_size == tuple(ref.original_size)
    assert ours.input_size == tuple(ref.input_size)
    torch.testing.assert_close(ours.features, ref.features, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt", ["one_point", "pos_neg", "box", "box_points"])
@pytest.mark.parametrize("multimask", [True, False])
def test_prompts_match(predictors, prompt, multimask):
    ours, ref = predictors
    kw = _prompts(ours.original_size)[prompt]
    mine = ours.predict(**kw, multimask=multimask)
    theirs = ref.predict(
        point_coords=_xy(kw["points"]) if "points" in kw else None,
        point_labels=np.asarray(kw["labels"]) if "labels" in kw else None,
        box=_box_xyxy(kw["box"]) if "box" in kw else None,
        multimask_output=multimask,
    )
    frac = theirs[0].mean()
    assert 0.01 < frac < 0.99, "masks must be non-trivial for the comparison to mean anything"
    _assert_masks_match(mine.masks, theirs[0])
    _assert_close(mine.scores, theirs[1])
    _assert_close(mine.logits, theirs[2])
    # full-resolution logits too (the threshold alone could hide differences)
    full = ours.predict(**kw, multimask=multimask, return_logits=True).masks
    full_ref = ref.predict(
        point_coords=_xy(kw["points"]) if "points" in kw else None,
        point_labels=np.asarray(kw["labels"]) if "labels" in kw else None,
        box=_box_xyxy(kw["box"]) if "box" in kw else None,
        multimask_output=multimask,
        return_logits=True,
    )[0]
    _assert_close(full, full_ref)


def test_mask_input_feedback_matches(predictors):
    ours, ref = predictors
    kw = _prompts(ours.original_size)["pos_neg"]
    first = ref.predict(_xy(kw["points"]), np.asarray(kw["labels"]), multimask_output=True)
    low = first[2][np.argmax(first[1])][None]  # (1, 4E, 4E)
    mine = ours.predict(**kw, mask_input=low, multimask=False)
    theirs = ref.predict(
        _xy(kw["points"]), np.asarray(kw["labels"]), mask_input=low, multimask_output=False
    )
    _assert_masks_match(mine.masks, theirs[0])
    _assert_close(mine.scores, theirs[1])
    _assert_close(mine.logits, theirs[2])


def test_batched_boxes_predict_torch_match(predictors):
    ours, ref = predictors
    h, w = ours.original_size
    boxes_rc = np.array(
        [[0.1 * h, 0.1 * w, 0.5 * h, 0.6 * w], [0.3 * h, 0.2 * w, 0.9 * h, 0.9 * w],
         [0.0, 0.0, h - 1.0, w - 1.0]]
    )
    mine = ours.predict_torch(
        None,
        None,
        torch.as_tensor(ours.transform.boxes_to_model(boxes_rc, (h, w)), dtype=torch.float32),
        multimask=True,
    )
    ref_boxes = ref.transform.apply_boxes_torch(
        torch.as_tensor(_box_xyxy(boxes_rc), dtype=torch.float32), ref.original_size
    )
    with torch.no_grad():
        theirs = ref.predict_torch(None, None, boxes=ref_boxes, multimask_output=True)
    _assert_masks_match(mine[0].numpy(), theirs[0].numpy())
    _assert_close(mine[1].numpy(), theirs[1].numpy())
    _assert_close(mine[2].numpy(), theirs[2].numpy())
    # and the numpy batched API agrees with predict_torch
    batched = ours.predict(box=boxes_rc)
    _assert_masks_match(batched.masks, theirs[0].numpy())


def test_reference_decoder_path_matches_too(pair):
    """The model's own decoder (fast path off) also matches the reference."""
    ours, ref = pair
    image = IMAGES["rgb_uint8_150x230"]
    ours.set_image(image)
    ref.set_image(image)
    kw = _prompts(ours.original_size)["box_points"]
    ours.use_fast_decoder = False
    try:
        mine = ours.predict(**kw)
    finally:
        ours.use_fast_decoder = True
    theirs = ref.predict(_xy(kw["points"]), np.asarray(kw["labels"]), _box_xyxy(kw["box"]))
    _assert_masks_match(mine.masks, theirs[0])
    _assert_close(mine.logits, theirs[2])
