"""Behaviour of engine.predictor.Predictor on a tiny random-weight model."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_sam.engine.cache import EmbeddingCache
from napari_sam.engine.predictor import Prediction, Predictor
from napari_sam.engine.upsample import upscale_logits
from napari_sam.errors import InvalidInputError
from napari_sam.models.fast_decoder import FactoredBackend, ReferenceBackend

RNG = np.random.default_rng(0)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 4 : w // 2] = (250, 20, 20)  # some structure
    return img


@pytest.fixture
def predictor(tiny_sam) -> Predictor:
    p = Predictor(tiny_sam)
    p.set_image(_image(60, 90))
    return p


def _count_encoder_calls(model) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    model.image_encoder.register_forward_hook(hook)
    return calls


# ----------------------------------------------------------------------------- shapes


def test_single_point_shapes_and_types(predictor):
    low = 4 * predictor.features.shape[-1]
    pred = predictor.predict(points=[[30, 45]])
    assert isinstance(pred, Prediction)
    assert pred.masks.shape == (3, 60, 90) and pred.masks.dtype == np.bool_
    assert pred.scores.shape == (3,) and pred.scores.dtype == np.float32
    assert pred.logits.shape == (3, low, low) and pred.logits.dtype == np.float32
    single = predictor.predict(points=[[30, 45]], multimask=False)
    assert single.masks.shape == (1, 60, 90) and single.scores.shape == (1,)
    assert not np.array_equal(single.logits[0], pred.logits[0])


@pytest.mark.parametrize("shape", [(60, 90), (90, 60), (128, 128), (200, 37), (7, 5)])
def test_non_square_images(tiny_sam, shape):
    p = Predictor(tiny_sam)
    p.set_image(_image(*shape))
    assert p.original_size == shape
    assert max(p.input_size) == 128
    pred = p.predict(points=[[shape[0] - 1, 0]], box=[0, 0, shape[0] - 1, shape[1] - 1])
    assert pred.masks.shape == (3, *shape)


def test_return_logits_threshold_gives_masks(predictor):
    pred = predictor.predict(points=[[10, 20], [40, 70]], labels=[1, 0])
    logit = predictor.predict(points=[[10, 20], [40, 70]], labels=[1, 0], return_logits=True)
    assert logit.masks.dtype == np.float32 and logit.masks.shape == pred.masks.shape
    np.testing.assert_array_equal(logit.masks > predictor.model.mask_threshold, pred.masks)
    np.testing.assert_array_equal(logit.scores, pred.scores)


def test_labels_default_to_foreground(predictor):
    a = predictor.predict(points=[[10, 20], [40, 70]])
    b = predictor.predict(points=[[10, 20], [40, 70]], labels=[1, 1])
    c = predictor.predict(points=[[10, 20], [40, 70]], labels=[1, 0])
    np.testing.assert_array_equal(a.logits, b.logits)
    assert not np.allclose(a.logits, c.logits)


def test_mask_input_feedback_changes_result(predictor):
    first = predictor.predict(points=[[30, 45]])
    best = first.logits[first.scores.argmax()][None]
    again = predictor.predict(points=[[30, 45]], mask_input=best, multimask=False)
    plain = predictor.predict(points=[[30, 45]], multimask=False)
    assert again.masks.shape == (1, 60, 90)
    assert not np.allclose(again.logits, plain.logits)
    # a (4E, 4E) mask is accepted as (1, 4E, 4E)
    np.testing.assert_allclose(
        predictor.predict(points=[[30, 45]], mask_input=best[0], multimask=False).logits,
        again.logits,
    )


def test_mask_input_alone_is_a_prompt(predictor):
    low = 4 * predictor.features.shape[-1]
    pred = predictor.predict(mask_input=np.zeros((1, low, low), np.float32))
    assert pred.masks.shape == (3, 60, 90)


def test_inverted_box_is_sorted(predictor):
    a = predictor.predict(box=[10, 20, 50, 80])
    b = predictor.predict(box=[50, 80, 10, 20])
    c = predictor.predict(box=[10, 80, 50, 20])
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.logits, c.logits)


# ----------------------------------------------------------------------------- batching


def test_batched_points_match_single(predictor):
    pts = np.array([[[10, 20], [40, 70]], [[30, 45], [5, 5]], [[59, 89], [0, 0]]], float)
    lab = np.array([[1, 0], [1, 1], [1, 0]])
    batch = predictor.predict(points=pts, labels=lab)
    assert batch.masks.shape == (3, 3, 60, 90) and batch.scores.shape == (3, 3)
    for i in range(3):
        one = predictor.predict(points=pts[i], labels=lab[i])
        np.testing.assert_allclose(batch.logits[i], one.logits, atol=1e-4)
        np.testing.assert_allclose(batch.scores[i], one.scores, atol=1e-5)
        assert (batch.masks[i] == one.masks).mean() > 0.999


def test_batched_boxes_with_broadcast_point(predictor):
    boxes = np.array([[0, 0, 30, 40], [20, 30, 59, 89]], float)
    batch = predictor.predict(points=[[25, 35]], box=boxes, multimask=False)
    assert batch.masks.shape == (2, 1, 60, 90)
    for i in range(2):
        one = predictor.predict(points=[[25, 35]], box=boxes[i], multimask=False)
        np.testing.assert_allclose(batch.logits[i], one.logits, atol=1e-4)


def test_batched_mask_input(predictor):
    first = predictor.predict(points=[[[10, 20]], [[40, 70]]])
    masks = first.logits[:, :1]  # (B, 1, 4E, 4E)
    batch = predictor.predict(points=[[[10, 20]], [[40, 70]]], mask_input=masks, multimask=False)
    one = predictor.predict(points=[[40, 70]], mask_input=masks[1], multimask=False)
    np.testing.assert_allclose(batch.logits[1], one.logits, atol=1e-4)


def test_batch_size_disagreement_raises(predictor):
    with pytest.raises(InvalidInputError, match="batch size"):
        predictor.predict(points=np.zeros((2, 1, 2)), box=np.array([[0, 0, 5, 5]] * 3))


# ----------------------------------------------------------------------------- fast decoder


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(points=[[30, 45]]),
        dict(points=[[10, 20], [40, 70]], labels=[1, 0], multimask=False),
        dict(box=[5, 10, 50, 80]),
        dict(points=np.array([[[10, 20]], [[40, 70]]]), box=[[0, 0, 30, 40], [20, 30, 59, 89]]),
    ],
)
def test_fast_decoder_matches_model_decoder(tiny_sam, predictor, kwargs):
    assert predictor.decoder.kind == "factored"  # "auto" on SAM's decoder layout
    fast = predictor.predict(**kwargs)
    fast_mask = predictor.predict(**kwargs, mask_input=fast.logits.reshape(-1, 1, 32, 32)[:1][0])
    predictor = Predictor(tiny_sam, decoder="reference")
    predictor.set_image(_image(60, 90))
    slow = predictor.predict(**kwargs)
    slow_mask = predictor.predict(**kwargs, mask_input=fast.logits.reshape(-1, 1, 32, 32)[:1][0])
    for a, b in ((fast, slow), (fast_mask, slow_mask)):
        span = float(b.logits.max() - b.logits.min())
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-5 * span)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        assert (a.masks == b.masks).mean() > 0.999


def test_mask_head_follows_in_place_weight_updates(tiny_sam, predictor):
    """The mask head's convolution weights are kept between clicks; an in-place update
    of the parameters (an optimiser step, load_state_dict) is picked up."""
    before = predictor.predict(points=[[30, 45]])
    conv = predictor.model.mask_decoder.output_upscaling[3]
    with torch.no_grad():
        conv.weight.mul_(-1.5)
        conv.bias.add_(0.25)
    after = predictor.predict(points=[[30, 45]])
    reference = Predictor(tiny_sam, decoder="reference")
    reference.set_image(_image(60, 90))
    direct = reference.predict(points=[[30, 45]])
    assert np.abs(after.logits - before.logits).max() > 1e-3
    span = float(direct.logits.max() - direct.logits.min())
    np.testing.assert_allclose(after.logits, direct.logits, atol=1e-5 * span)


def _decoder_stages(predictor: Predictor, **kwargs) -> tuple[Prediction, set[str]]:
    """A prediction and the decoder stages it ran (torch.profiler markers)."""
    with torch.profiler.profile() as prof:
        out = predictor.predict(**kwargs)
    return out, {e.name for e in prof.events() if e.name.startswith("napari_sam.")}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(points=[[30, 45]]),
        dict(points=[[10, 20], [40, 70]], labels=[1, 0], multimask=False),
        dict(points=[[10, 20], [40, 70]], labels=[1, 0], box=[5, 10, 50, 80]),
        dict(points=np.array([[[10, 20]], [[40, 70]]])),
    ],
)
def test_factored_mask_head_matches_direct(tiny_sam_config, kwargs):
    """At SAM's decoder width (256) few-token prompts take the factored first
    convolution of the mask head; it must agree with the direct one."""
    from reference_utils import build_random_sam

    model = build_random_sam(replace(tiny_sam_config, prompt_embed_dim=256), seed=3)
    p = Predictor(model)  # "auto": low-rank form where it pays
    never = Predictor(model, decoder=FactoredBackend(model, low_rank=False))
    for pred in (p, never):
        pred.set_image(_image(60, 90))
    factored, stages = _decoder_stages(p, **kwargs)
    direct, direct_stages = _decoder_stages(never, **kwargs)
    assert "napari_sam.decoder.transformer_factored" in stages  # auto chose the low-rank form
    assert "napari_sam.decoder.transformer_factored" not in direct_stages
    span = float(direct.logits.max() - direct.logits.min())
    np.testing.assert_allclose(factored.logits, direct.logits, rtol=0, atol=1e-5 * span)
    np.testing.assert_allclose(factored.scores, direct.scores, atol=1e-6)
    assert (factored.masks == direct.masks).mean() > 0.9999


@pytest.mark.parametrize("depth, heads", [(1, 8), (2, 8), (3, 4)])
def test_factored_decoding_matches_model_decoder(tiny_sam_config, depth, heads):
    """Few-token prompts at width 256 are decoded with the image tokens in factored
    form (every block after the first, the final attention, the mask head); it must
    agree with the model's own decoder for any decoder depth, batched prompts too."""
    from reference_utils import build_random_sam

    config = replace(tiny_sam_config, prompt_embed_dim=256, decoder_depth=depth,
                     decoder_num_heads=heads)
    model = build_random_sam(config, seed=depth)
    p = Predictor(model)  # "auto" takes the low-rank form for these prompts
    ref = Predictor(model, decoder="reference")
    for pred in (p, ref):
        pred.set_image(_image(70, 50))
    prompts = [
        dict(points=[[30, 25]]),
        dict(points=[[10, 20], [40, 30]], labels=[1, 0], multimask=False),
        dict(box=[5, 10, 50, 45]),
        dict(points=np.array([[[10, 20]], [[60, 40]]])),
    ]
    for kwargs in prompts:
        fast, stages = _decoder_stages(p, **kwargs)
        assert "napari_sam.decoder.transformer_factored" in stages  # the low-rank path ran
        assert "napari_sam.decoder.transformer" not in stages
        slow = ref.predict(**kwargs)
        span = float(slow.logits.max() - slow.logits.min())
        np.testing.assert_allclose(fast.logits, slow.logits, rtol=0, atol=1e-5 * span)
        np.testing.assert_allclose(fast.scores, slow.scores, atol=1e-5)
        assert (fast.masks == slow.masks).mean() > 0.9999


def test_factored_mask_head_is_skipped_for_many_tokens(tiny_sam_config):
    from reference_utils import build_random_sam

    model = build_random_sam(replace(tiny_sam_config, prompt_embed_dim=256), seed=3)
    p = Predictor(model)
    p.set_image(_image(60, 90))
    p.predict(points=[[10, 10]])  # builds the per-image context
    fast = p.decoder
    with torch.inference_mode():
        for n_points, expected in ((1, True), (12, False)):
            pts = torch.rand(1, n_points, 2) * 100
            sparse, _ = model.prompt_encoder(
                points=(pts, torch.ones(1, n_points, dtype=torch.int64)), boxes=None, masks=None
            )
            assert fast.factor_pays(sparse.shape[1]) is expected
            assert fast.uses_low_rank(sparse.shape[1]) is expected


def test_decoder_is_chosen_at_construction(tiny_sam):
    assert isinstance(Predictor(tiny_sam).decoder, FactoredBackend)
    assert isinstance(Predictor(tiny_sam, decoder="factored").decoder, FactoredBackend)
    assert isinstance(Predictor(tiny_sam, decoder="reference").decoder, ReferenceBackend)
    backend = FactoredBackend(tiny_sam, low_rank=False)
    assert Predictor(tiny_sam, decoder=backend).decoder is backend
    for bad in ("fast", "", None, 3):
        with pytest.raises(InvalidInputError, match="decoder must be one of"):
            Predictor(tiny_sam, decoder=bad)


def test_use_fast_decoder_is_a_deprecated_alias(tiny_sam):
    p = Predictor(tiny_sam)
    assert p.use_fast_decoder
    with pytest.warns(DeprecationWarning, match="decoder="):
        p.use_fast_decoder = False
    assert isinstance(p.decoder, ReferenceBackend) and not p.use_fast_decoder
    with pytest.warns(DeprecationWarning):
        p.use_fast_decoder = True
    assert isinstance(p.decoder, FactoredBackend)


def test_fast_decoder_falls_back_for_unknown_decoders(tiny_sam):
    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    tiny_sam.mask_decoder = Wrapped(tiny_sam.mask_decoder)
    p = Predictor(tiny_sam)
    assert isinstance(p.decoder, ReferenceBackend)
    p.set_image(_image(40, 40))
    assert p.predict(points=[[20, 20]]).masks.shape == (3, 40, 40)
    with pytest.raises(InvalidInputError, match="no fast path"):
        Predictor(tiny_sam, decoder="factored")


# ----------------------------------------------------------------------------- postprocessing


@pytest.mark.parametrize(
    ("input_size", "original_size"),
    [
        ((128, 128), (128, 128)),
        ((85, 128), (60, 90)),
        ((128, 3), (1000, 21)),
        ((77, 128), (77, 128)),
        ((128, 128), (1, 1)),
    ],
)
def test_postprocess_matches_upsample_crop_resize(input_size, original_size):
    low = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 5
    x = F.interpolate(low, (128, 128), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    x = F.interpolate(x, original_size, mode="bilinear", align_corners=False)
    y = upscale_logits(low, 128, input_size, original_size)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x, rtol=0, atol=2e-5)
    assert ((y > 0) == (x > 0)).float().mean() > 0.9999


def test_postprocess_rejects_bad_geometry():
    with pytest.raises(InvalidInputError, match="geometry"):
        upscale_logits(torch.zeros(1, 1, 32, 32), 128, (200, 128), (10, 10))


def test_predict_torch_without_upscale_and_upscale_logits(predictor):
    xy = torch.tensor([[[30.0, 40.0]]])
    lab = torch.ones(1, 1, dtype=torch.int64)
    masks, iou, low = predictor.predict_torch(xy, lab, upscale=False)
    assert masks is None and iou.shape == (1, 3) and low.shape == (1, 3, 32, 32)
    full = predictor.upscale_logits(low)
    assert full.shape == (1, 3, 60, 90)
    masks2, _, _ = predictor.predict_torch(xy, lab)
    assert torch.equal(masks2, full > predictor.model.mask_threshold)


def test_predict_torch_requires_labels_with_coords(predictor):
    with pytest.raises(InvalidInputError, match="together"):
        predictor.predict_torch(torch.zeros(1, 1, 2), None)


# ----------------------------------------------------------------------------- embedding cache


def test_second_set_image_reuses_the_cached_embedding(tiny_sam):
    calls = _count_encoder_calls(tiny_sam)
    p = Predictor(tiny_sam)
    img = _image(60, 90)
    p.set_image(img)
    first = p.features
    p.set_image(img.copy())
    assert calls[0] == 1 and p.features is first
    p.set_image(_image(60, 90, seed=1))
    assert calls[0] == 2
    p.set_image(img, contrast_limits=(0, 100))  # different normalised image
    assert calls[0] == 3
    p.set_image(img)
    assert calls[0] == 3 and p.features is first


def test_cache_shared_between_predictors_and_disabled_cache(tiny_sam):
    calls = _count_encoder_calls(tiny_sam)
    cache = EmbeddingCache()
    img = _image(50, 50)
    Predictor(tiny_sam, cache=cache).set_image(img)
    Predictor(tiny_sam, cache=cache).set_image(img)
    assert calls[0] == 1 and len(cache) == 1
    p = Predictor(tiny_sam, cache_bytes=0)
    p.set_image(img)
    p.set_image(img)
    assert calls[0] == 3


def test_grayscale_and_rgb_versions_share_an_embedding(tiny_sam):
    calls = _count_encoder_calls(tiny_sam)
    p = Predictor(tiny_sam)
    gray = np.random.default_rng(3).integers(0, 256, (40, 30), dtype=np.uint8)
    p.set_image(gray)
    p.set_image(np.repeat(gray[..., None], 3, axis=2))
    assert calls[0] == 1


def test_embed_in_worker_thread_then_set_embedding(tiny_sam):
    p = Predictor(tiny_sam)
    p.set_image(_image(60, 90))
    before = p.predict(points=[[30, 45]])
    other = _image(70, 40, seed=5)
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("entry", p.embed(other)))
    th.start()
    th.join()
    assert p.original_size == (60, 90)  # embed did not touch the current image
    np.testing.assert_array_equal(p.predict(points=[[30, 45]]).logits, before.logits)
    entry = result["entry"]
    p.set_embedding(entry.features, entry.original_size, entry.input_size)
    ref = Predictor(tiny_sam)
    ref.set_image(other)
    np.testing.assert_allclose(
        p.predict(points=[[3, 4]]).logits, ref.predict(points=[[3, 4]]).logits, atol=1e-6
    )


def test_compute_embedding_is_pure(tiny_sam):
    p = Predictor(tiny_sam)
    feats = p.compute_embedding(_image(30, 20))
    assert not p.is_image_set and len(p.cache) == 0
    assert feats.shape[:2] == (1, tiny_sam.prompt_encoder.embed_dim)


def test_set_embedding_validates(tiny_sam):
    with pytest.raises(InvalidInputError, match="features"):
        Predictor(tiny_sam).set_embedding(np.zeros((1, 64, 8, 8)), (8, 8), (128, 128))


# ----------------------------------------------------------------------------- odd images


def test_one_pixel_image_gives_one_pixel_masks(tiny_sam):
    """Documented: a 1x1 image is upscaled to a full model input; it works."""
    p = Predictor(tiny_sam)
    p.set_image(np.array([[200]], np.uint8))
    assert p.input_size == (128, 128)
    pred = p.predict(points=[[0, 0]])
    assert pred.masks.shape == (3, 1, 1)


def test_too_wide_image_raises(tiny_sam):
    p = Predictor(tiny_sam)
    with pytest.raises(InvalidInputError, match="too elongated"):
        p.set_image(np.zeros((1, 300), np.uint8))
    assert not p.is_image_set


def test_channel_axis_and_contrast_limits_are_passed_through(tiny_sam):
    p = Predictor(tiny_sam)
    data = np.random.default_rng(1).uniform(0, 1000, (3, 20, 30))
    p.set_image(data, contrast_limits=(0, 1000), channel_axis=0)
    assert p.original_size == (20, 30)


# ----------------------------------------------------------------------------- input errors


def test_predict_without_image_raises(tiny_sam):
    p = Predictor(tiny_sam)
    with pytest.raises(InvalidInputError, match="set_image"):
        p.predict(points=[[1, 1]])
    with pytest.raises(InvalidInputError, match="set_image"):
        p.upscale_logits(torch.zeros(1, 1, 32, 32))


def test_reset_image(predictor):
    predictor.reset_image()
    assert not predictor.is_image_set and predictor.features is None
    with pytest.raises(InvalidInputError, match="set_image"):
        predictor.predict(points=[[1, 1]])


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(points=np.zeros((0, 2))), dict(points=[], labels=[], box=np.zeros((0, 4)))],
)
def test_no_prompt_raises(predictor, kwargs):
    with pytest.raises(InvalidInputError, match="add at least one point"):
        predictor.predict(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(points=[[1, 2]], labels=[1, 0]), "one label"),
        (dict(points=[[1, 2], [3, 4]], labels=[1]), "one label"),
        (dict(points=[[1, 2]], labels=[2]), "1 \\(foreground\\) or 0"),
        (dict(points=[[1, 2]], labels=[-1]), "1 \\(foreground\\) or 0"),
        (dict(points=[[1, 2]], labels=[0.5]), "1 \\(foreground\\) or 0"),
        (dict(points=[[1, 2, 3]]), "shape \\(N, 2\\)"),
        (dict(points=[1, 2]), "shape \\(N, 2\\)"),
        (dict(points=[["a", "b"]]), "numeric"),
        (dict(points=[[np.nan, 2]]), "NaN"),
        (dict(labels=[1]), "without points"),
        (dict(box=[1, 2, 3]), "shape \\(4,\\)"),
        (dict(box=[1, 2, np.nan, 4]), "NaN"),
        (dict(box=[10, 20, 10, 40]), "zero height or width"),
        (dict(box=[10, 20, 30, 20]), "zero height or width"),
        (dict(box=[100, 0, 200, 10]), "does not overlap"),
        (dict(points=[[1, 2]], mask_input=np.zeros((1, 16, 16))), "mask_input must be"),
        (dict(points=[[1, 2]], mask_input=np.zeros((2, 32, 32))), "mask_input must be"),
        (dict(points=[[1, 2]], mask_input=np.full((1, 32, 32), np.nan)), "NaN"),
    ],
)
def test_bad_prompts_raise(predictor, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        predictor.predict(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # D9 / 1b row 15: numpy's ValueError "setting an array element with a sequence"
        (dict(points=[[1, 2], [3]]), "points is ragged"),
        (dict(points=[[[1, 2]], [[3, 4], [5, 6]]]), "points is ragged"),
        (dict(points=[[1, 2]], labels=[[1], []]), "labels is ragged"),
        (dict(box=[[1, 2, 3, 4], [1, 2]]), "box is ragged"),
        # D10 / 1b row 61: the imaginary part was dropped with a ComplexWarning
        (dict(points=[[10 + 5j, 20]]), "points must be real numbers"),
        (dict(points=np.array([[10, 20]], np.complex128)), "points must be real numbers"),
        (dict(box=np.array([1, 2, 30, 40], np.complex64)), "box must be real numbers"),
        (dict(points=[[1, 2]], labels=np.array([1 + 0j])), "labels must be real numbers"),
        # 1b row 53: a batch of zero point prompts beside a box gave the box's result
        (dict(points=np.zeros((0, 1, 2)), box=[10, 10, 50, 80]), "batch of 0 prompts"),
        (dict(points=np.zeros((0, 1, 2))), "batch of 0 prompts"),
        # a box touching the image only along its top edge covers no pixel
        (dict(box=[-10, 10, 0, 50]), "does not overlap"),
    ],
)
def test_malformed_prompts_raise_typed_one_line_errors(predictor, kwargs, match):
    with pytest.raises(InvalidInputError, match=match) as err:
        predictor.predict(**kwargs)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_long_bad_prompts_are_quoted_briefly(predictor):
    with pytest.raises(InvalidInputError, match="points is ragged") as err:
        predictor.predict(points=[[1, 2]] * 5000 + [[3]])
    assert len(str(err.value)) < 300
    with pytest.raises(InvalidInputError, match="numeric") as err:
        predictor.predict(points=[["a", "b"]] * 5000)
    assert len(str(err.value)) < 300


def test_a_box_beyond_the_image_is_clipped_to_it():
    # D10 / 1b row 38: a box enclosing the whole image gave 3 empty masks
    from napari_sam import load_model
    from napari_sam.sample_data import nuclei

    image = nuclei()[0][0]
    H, W = image.shape[:2]
    p = Predictor(load_model(device="cpu"))
    p.set_image(image)
    whole = p.predict(box=[0, 0, H, W])
    assert whole.masks.any(axis=(1, 2)).all()
    for box in ([-1e6, -1e6, 1e6, 1e6], [-5, -5, H + 5, W + 5], [1e308, 1e308, -1e308, -1e308]):
        pred = p.predict(box=box)
        np.testing.assert_array_equal(pred.masks, whole.masks)
        np.testing.assert_array_equal(pred.scores, whole.scores)
    # a box partly outside is cut at the image border
    part = p.predict(box=[[-40, 100, 60, 200], [0, 100, 60, 200]], multimask=False)
    np.testing.assert_array_equal(part.masks[0], part.masks[1])


@pytest.mark.parametrize("point", [[60, 10], [10, 90], [-1, 10], [10, -0.5], [60.0, 90.0]])
def test_point_outside_image_names_point_and_shape(predictor, point):
    with pytest.raises(InvalidInputError, match=r"outside the image of shape \(60, 90\)") as err:
        predictor.predict(points=[[5, 5], point], labels=[1, 0])
    assert "Point (1,)" in str(err.value)


def test_points_on_the_last_pixel_are_inside(predictor):
    pred = predictor.predict(points=[[59.9, 89.9], [0, 0]])
    assert pred.masks.shape == (3, 60, 90)


def test_errors_are_value_errors(predictor):
    with pytest.raises(ValueError):
        predictor.predict()


def test_results_do_not_share_reused_scratch_memory(predictor):
    first = predictor.predict(points=[[30, 45]])
    saved = Prediction(*(a.copy() for a in first))
    predictor.predict(points=[[5, 80], [50, 10]], labels=[1, 0], box=[0, 0, 59, 89])
    predictor.predict(points=[[[1, 1]], [[20, 20]]])  # batched: other scratch shapes
    for a, b in zip(first, saved, strict=True):
        np.testing.assert_array_equal(a, b)


def test_concurrent_predictions_on_one_predictor(predictor):
    prompts = [[[10 + 4 * i, 20 + 6 * i]] for i in range(6)]
    expected = [predictor.predict(points=pt).logits for pt in prompts]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = predictor.predict(points=prompts[i]).logits

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(6):
        np.testing.assert_allclose(results[i], expected[i], atol=1e-6)


def test_few_prompt_decodes_use_one_thread_and_restore_the_count(monkeypatch):
    import torch

    from napari_sam.models import kernels as P

    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    seen = []
    before = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    with P.threads_for_small_batches(1):
        seen.append("inside")
    assert calls == [1, 2]  # one thread for a click, then the count is restored
    calls.clear()
    with P.threads_for_small_batches(P.SINGLE_THREAD_MAX_BATCH + 1):
        pass
    assert calls == []  # large batches keep every thread
    with pytest.raises(RuntimeError), P.threads_for_small_batches(1):
        raise RuntimeError("boom")
    assert calls == [1, 2]  # restored on errors too
    assert seen == ["inside"] and before >= 1
    calls.clear()
    for policy in ("ACTIVE", ""):  # threads that spin before sleeping: keep them all
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
        with P.threads_for_small_batches(1):
            pass
    monkeypatch.delenv("OMP_WAIT_POLICY")
    with P.threads_for_small_batches(1):
        pass
    assert calls == []
