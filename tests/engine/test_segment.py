"""engine/segment.py: the object-painting rule of ``napari-sam segment``, without the CLI."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_sam.engine.io import PromptObject
from napari_sam.engine.segment import segment_objects
from napari_sam.errors import InvalidInputError


class _Predictor:
    """Answers each predict() with the next (masks, scores) and records its keywords."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []

    def predict(self, points=None, labels=None, box=None, multimask=True):
        self.calls.append(dict(points=points, labels=labels, box=box, multimask=multimask))
        masks, scores = self.answers.pop(0)
        if box is not None and np.asarray(box)[0] < 0:
            raise InvalidInputError("box lies outside the image.")
        return SimpleNamespace(masks=np.asarray(masks, bool), scores=np.asarray(scores, float))


def _rect(r0, c0, r1, c1, shape=(8, 8)):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def _obj(name, points=(), labels=(), box=None):
    box = None if box is None else np.asarray(box, float)
    return PromptObject(name, np.asarray(points, float).reshape(-1, 2),
                        np.asarray(labels, np.int64), box)


def test_object_k_gets_label_k_and_earlier_objects_keep_overlaps():
    a, b = _rect(0, 0, 4, 4), _rect(2, 2, 6, 6)
    predictor = _Predictor([
        ([np.zeros((8, 8)), a, b], [0.1, 0.9, 0.5]),  # best candidate: a
        ([b], [0.7]),
        ([_rect(0, 0, 2, 2)], [0.8]),  # entirely under object 1
        ([np.zeros((8, 8))], [0.2]),  # empty
    ])
    objects = [_obj("1", [[1, 1]], [1]), _obj("cell", box=[2, 2, 5, 5]), _obj("3", [[0, 0]], [1]),
               _obj("4", [[7, 7]], [1])]
    seen = []
    result = segment_objects(predictor, objects, (8, 8), on_object=lambda o, r: seen.append(r))
    want = np.zeros((8, 8), np.uint32)
    want[b] = 2
    want[a] = 1  # object 1 keeps the overlap
    np.testing.assert_array_equal(result.labels, want)
    assert result.labels.dtype == np.uint32
    assert [(r.number, r.area, r.empty, r.covered) for r in result.objects] == [
        (1, 16, False, False), (2, 12, False, False), (3, 0, False, True), (4, 0, True, False)]
    assert result.objects[0].score == pytest.approx(0.9) and seen == result.objects
    # points only where given; a box-only object sends no points
    assert predictor.calls[1]["points"] is None and predictor.calls[1]["labels"] is None
    assert all(call["multimask"] for call in predictor.calls)


def test_select_single_and_errors_name_the_object():
    predictor = _Predictor([([_rect(0, 0, 2, 2)], [0.5])])
    segment_objects(predictor, [_obj("1", [[1, 1]], [1])], (8, 8), select="single")
    assert predictor.calls[0]["multimask"] is False
    with pytest.raises(InvalidInputError, match="select must be one of best, single"):
        segment_objects(predictor, [], (8, 8), select="all")
    bad = _Predictor([([_rect(0, 0, 2, 2)], [0.5])])
    with pytest.raises(InvalidInputError, match=r"^object 1 \('nucleus'\): box lies outside"):
        segment_objects(bad, [_obj("nucleus", box=[-5, 0, 2, 2])], (8, 8))


def test_no_objects_give_an_empty_label_image():
    result = segment_objects(_Predictor([]), [], (5, 7))
    assert result.labels.shape == (5, 7) and not result.labels.any() and result.objects == []
