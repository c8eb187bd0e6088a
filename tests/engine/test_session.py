"""The interactive session: the prompt -> prediction rule, without Qt or napari."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.engine.predictor import Predictor
from napari_sam.engine.session import InteractiveSession
from napari_sam.errors import InvalidInputError


class _Recording:
    """Wraps a predictor and records the keyword arguments of every ``predict``."""

    def __init__(self, predictor: Predictor) -> None:
        self.inner = predictor
        self.calls: list[dict] = []

    def predict(self, **kw):
        self.calls.append(kw)
        return self.inner.predict(**kw)


@pytest.fixture
def session(tiny_sam):
    p = Predictor(tiny_sam)
    rng = np.random.default_rng(0)
    p.set_image(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    return InteractiveSession(_Recording(p))


def test_one_click_gives_three_candidates_and_selects_the_best(session):
    pred = session.update([[20, 30]], [1])
    assert pred.masks.shape == (3, 60, 80)
    call = session.predictor.calls[-1]
    assert call["multimask"] and call["mask_input"] is None
    assert session.candidate == int(np.argmax(pred.scores))
    np.testing.assert_array_equal(session.mask, pred.masks[session.candidate])
    req = session.last_request
    assert req.multimask and not req.refine
    np.testing.assert_array_equal(req.points, [[20, 30]])


def test_appended_point_feeds_back_the_selected_candidates_logits(session):
    first = session.update([[20, 30]], [1])
    session.select(2)
    session.update([[20, 30], [40, 10]], [1, 0])
    call = session.predictor.calls[-1]
    assert not call["multimask"]
    np.testing.assert_array_equal(call["mask_input"], first.logits[2][None])
    assert session.last_request.refine and session.masks.shape == (1, 60, 80)


@pytest.mark.parametrize(
    ("points", "labels", "box"),
    [
        ([[21, 30], [40, 10]], [1, 0], None),  # the first point moved
        ([[20, 30], [40, 10]], [0, 0], None),  # its label changed
        ([[20, 30], [40, 10]], [1, 0], [5, 5, 50, 70]),  # a box was added
        ([[20, 30]], [1], None),  # nothing appended
    ],
)
def test_any_other_change_starts_afresh(session, points, labels, box):
    session.update([[20, 30]], [1])
    session.update(points, labels, box)
    assert session.predictor.calls[-1]["mask_input"] is None
    assert not session.last_request.refine


def test_box_gives_one_mask_and_reset_forgets(session):
    session.update(None, None, [5, 5, 50, 70])
    assert not session.last_request.multimask and session.masks.shape == (1, 60, 80)
    session.update([[20, 30]], [1], [5, 5, 50, 70])  # a point with a box: still one mask
    assert not session.last_request.multimask
    session.reset()
    assert session.mask is None and session.last_request is None
    session.update([[20, 30], [40, 10]], [1, 0], [5, 5, 50, 70])
    assert session.predictor.calls[-1]["mask_input"] is None


def test_select_and_empty_prompts_are_typed_errors(session):
    with pytest.raises(InvalidInputError, match="no prediction"):
        session.select(0)
    with pytest.raises(InvalidInputError, match="No prompt"):
        session.update(np.zeros((0, 2)), np.zeros(0))
    session.update([[20, 30]], [1])
    with pytest.raises(InvalidInputError, match="Candidate 3"):
        session.select(3)


def test_batch_rows_follow_the_rule_and_keep_drops_rows(session):
    pts = np.array([[[20.0, 30.0]], [[40.0, 60.0]], [[10.0, 10.0]]])
    first = session.update(pts, np.ones((3, 1)))
    assert session.masks.shape == (3, 3, 60, 80) and session.mask.shape == (3, 60, 80)
    best = first.scores.argmax(1)
    session.keep(np.array([0, 2]))
    more = np.concatenate([pts[[0, 2]], [[[30.0, 30.0]], [[12.0, 50.0]]]], 1)
    session.update(more, [[1, 0], [1, 1]])
    call = session.predictor.calls[-1]
    expected = first.logits[[0, 2], best[[0, 2]]][:, None]
    np.testing.assert_array_equal(call["mask_input"], expected)
    assert not call["multimask"] and session.mask.shape == (2, 60, 80)
    # rows predicted one by one with the same rule give the same masks
    single = InteractiveSession(session.predictor.inner)
    single.update(pts[2], [1])
    single.update(more[1], [1, 1])
    np.testing.assert_array_equal(single.mask, session.mask[1])
