"""The interactive widget's prediction job without Qt: decode, crop and draw candidates."""

from __future__ import annotations

import numpy as np

from napari_sam.engine.predictor import Predictor
from napari_sam.engine.session import InteractiveSession
from napari_sam.widgets import preview as P
from napari_sam.widgets.prediction import predict_candidates
from napari_sam.widgets.prompting import mask_bbox


def _image():
    rr, cc = np.mgrid[:48, :64]
    return (40 + 150 * (((rr - 20) ** 2 + (cc - 30) ** 2) < 120)).astype(np.uint8)


def test_candidates_match_the_predictor_and_are_cropped_and_drawn(tiny_sam):
    image = _image()
    predictor = Predictor(tiny_sam)
    entry = predictor.embed(np.repeat(image[..., None], 3, axis=2))
    session = InteractiveSession(predictor)
    applied: dict = {}
    request = session.request(np.array([[20.0, 30.0]]), np.array([1]), None)
    out = predict_candidates(session, applied, entry, request, "outline", 2)
    assert applied["entry"] is entry and out.prompts is request.prompts

    ref = Predictor(tiny_sam)
    ref.set_image(image)
    best = ref.predict(points=np.array([[20, 30]]), multimask=True)
    np.testing.assert_array_equal(out.masks, np.asarray(best.masks, bool))
    assert out.masks.shape[0] == 3 and out.style == "outline"
    for mask, box, crop in zip(out.masks, out.boxes, out.crops, strict=True):
        assert box == mask_bbox(mask)
        if box is None:
            assert crop is None
        else:
            np.testing.assert_array_equal(crop, P.render_preview(mask[box], "outline", 2))


def test_the_embedding_is_set_only_when_it_changes(tiny_sam):
    predictor = Predictor(tiny_sam)
    entry = predictor.embed(np.repeat(_image()[..., None], 3, axis=2))
    calls = []
    real = predictor.set_embedding

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    predictor.set_embedding = spy
    session = InteractiveSession(predictor)
    applied: dict = {}
    for point in ([20.0, 30.0], [21.0, 31.0]):
        request = session.request(np.array([point]), np.array([1]), None)
        predict_candidates(session, applied, entry, request, "fill", 1)
    assert len(calls) == 1
