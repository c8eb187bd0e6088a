"""Propagation through z and tracking through t (napari_sam.engine.propagate).

The rules are tested with a stand-in predictor that returns planted masks per
plane (a tiny random model segments nothing reliably); one smoke test runs the
real Predictor with a tiny random model end to end.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

from napari_sam.engine.cache import EmbeddedImage
from napari_sam.engine.propagate import (
    PropagationProgress,
    PropagationResult,
    PropagationSettings,
    innermost_pixel,
    iter_propagate,
    mask_contrast,
    propagate,
    propagate_volume,
    track_object,
)
from napari_sam.errors import CancelledError, InvalidInputError


class _Pred(NamedTuple):
    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray


class PlantedPredictor:
    """Returns, for the plane whose embedding is set, the planted mask and score.

    The "features" of plane k are a (1, 1, 1, 1) tensor holding k. Every call to
    ``predict`` is recorded with its plane and prompts.
    """

    def __init__(self, masks: np.ndarray, scores=None):
        self.masks = np.asarray(masks, bool)
        n = len(self.masks)
        self.scores = np.full(n, 0.9) if scores is None else np.asarray(scores, float)
        self.plane: int | None = None
        self.calls: list[tuple[int, dict]] = []
        self.features = None
        self.size = self.masks.shape[1:]

    @property
    def embedding(self):
        if self.features is None:
            return None
        return EmbeddedImage(self.features, self.size, self.size)

    def embed(self, rgb):
        """The plane index is the image's value (see :func:`indexed_volume`)."""
        return EmbeddedImage(torch.full((1, 1, 1, 1), float(rgb[0, 0, 0])), self.size, self.size)

    def set_embedding(self, features, original_size, input_size, image=None):
        self.features = features
        self.plane = int(features.flatten()[0])

    def predict(self, points=None, labels=None, box=None, mask_input=None, multimask=True):
        self.calls.append((self.plane, dict(points=points, labels=labels, box=box,
                                            mask_input=mask_input, multimask=multimask)))
        mask = self.masks[self.plane]
        logits = np.full((1, 8, 8), float(self.plane), np.float32)
        return _Pred(mask[None], np.array([self.scores[self.plane]], np.float32), logits)


def provider_for(n: int, calls: list[int] | None = None):
    def provider(index: int) -> EmbeddedImage:
        if calls is not None:
            calls.append(index)
        return EmbeddedImage(torch.full((1, 1, 1, 1), float(index)), (1, 1), (1, 1))
    return provider


def disk_stack(radii, size: int = 32, centres=None) -> np.ndarray:
    """(len(radii), size, size) bool: a disk of radius r per plane (0: empty)."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((len(radii), size, size), bool)
    for k, r in enumerate(radii):
        cy, cx = (size // 2, size // 2) if centres is None else centres[k]
        if r > 0:
            out[k] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return out


def run(pred, start, **kwargs):
    n = len(pred.masks)
    return propagate(pred, provider_for(n), n, start, **kwargs)


def test_an_ellipsoid_is_followed_up_and_down_and_stops_where_it_ends():
    radii = [0, 0, 4, 6, 8, 9, 8, 6, 4, 0, 0]
    planted = disk_stack(radii)
    pred = PlantedPredictor(planted)
    res = run(pred, 5, points=[[16, 16]])
    assert np.array_equal(res.masks, planted)
    assert res.extent == (2, 8)
    assert res.stopped == {"forward": "empty", "backward": "empty"}
    assert [p.status for p in res.planes] == (
        ["empty"] + ["kept"] * 3 + ["seed"] + ["kept"] * 3 + ["empty"])
    # forward first (6, 7, ...), then backward (4, 3, ...)
    assert [plane for plane, _ in pred.calls] == [5, 6, 7, 8, 9, 4, 3, 2, 1]


def test_each_plane_is_prompted_from_the_previous_mask():
    planted = disk_stack([5, 7, 7])
    planted[2] = False
    planted[2, 10:20, 4:12] = True  # the next plane's mask: a rectangle overlapping the disk
    pred = PlantedPredictor(planted)
    run(pred, 1, box=[9, 9, 23, 23], settings=PropagationSettings(use_mask=True,
                                                                  min_overlap=0.0))
    seed_call = pred.calls[0][1]
    assert seed_call["multimask"] is False and seed_call["mask_input"] is None
    plane, call = pred.calls[1]  # plane 2 from plane 1's disk of radius 7 at (16, 16)
    assert plane == 2
    assert call["box"].tolist() == [9, 9, 23, 23]  # inclusive corners of the disk
    assert call["points"].tolist() == [[16, 16]] and call["labels"].tolist() == [1]
    assert np.all(call["mask_input"] == 1.0)  # plane 1's low-res logits
    assert call["multimask"] is False
    # points only: a single click is ambiguous, so multimask
    pred = PlantedPredictor(planted)
    run(pred, 1, points=[[16, 16]], settings=PropagationSettings(use_box=False))
    assert pred.calls[1][1]["box"] is None and pred.calls[1][1]["multimask"] is True


def test_a_one_pixel_thin_mask_prompts_the_next_plane_with_a_box_that_has_area():
    """A plane's mask one column wide (a nucleus's tip on 1135_mini) gave the next plane a
    zero-width box, which the Predictor refuses: propagation raised mid-volume."""
    planted = np.zeros((3, 16, 16), bool)
    planted[0, 4:10, 4:10] = True
    planted[1, 4:9, 7] = True  # one column, five rows
    planted[2, 4:9, 7] = True
    pred = PlantedPredictor(planted)
    run(pred, 0, points=[[6, 6]], settings=PropagationSettings(min_overlap=0.0,
                                                               max_area_ratio=100.0))
    plane, call = pred.calls[2]
    assert plane == 2
    assert call["box"].tolist() == [4, 7, 8, 8]  # one column more: a box with area


def test_a_committed_mask_seeds_without_a_prediction_in_its_plane():
    planted = disk_stack([4, 6, 4])
    pred = PlantedPredictor(planted)
    seed = disk_stack([5])[0]
    res = run(pred, 1, mask=seed, settings=PropagationSettings(use_mask=True))
    assert np.array_equal(res.masks[1], seed)  # the user's mask, not the planted one
    assert [plane for plane, _ in pred.calls] == [2, 0]
    assert pred.calls[0][1]["mask_input"] is None  # a committed mask has no logits
    assert math.isnan(res.planes[1].score)


@pytest.mark.parametrize(("scores", "setting", "reason"), [
    ([0.9, 0.9, 0.9, 0.2, 0.9], {}, "low_score"),
    ([0.9, 0.9, 0.9, 0.2, 0.9], {"min_score": 0.1}, "end"),
])
def test_low_predicted_iou_stops(scores, setting, reason):
    planted = disk_stack([6, 6, 6, 6, 6])
    res = run(PlantedPredictor(planted, scores), 1, points=[[16, 16]],
              settings=PropagationSettings(**setting))
    assert res.stopped["forward"] == reason
    assert res.masks[3].any() == (reason == "end")
    assert res.stopped["backward"] == "end"


def test_area_change_and_overlap_stop_and_their_thresholds_are_settable():
    planted = disk_stack([4, 4, 12])  # area grows about 9x
    res = run(PlantedPredictor(planted), 0, points=[[16, 16]])
    assert res.stopped["forward"] == "area_change" and not res.masks[2].any()
    assert res.planes[2].area_ratio > 3
    res = run(PlantedPredictor(planted), 0, points=[[16, 16]],
              settings=PropagationSettings(max_area_ratio=20, min_overlap=0.0))
    assert res.stopped["forward"] == "end" and res.masks[2].any()
    # a jump to another place: no overlap with the previous plane
    moved = disk_stack([5, 5, 5], centres=[(8, 8), (8, 8), (24, 24)])
    res = run(PlantedPredictor(moved), 0, points=[[8, 8]])
    assert res.stopped["forward"] == "low_overlap" and res.planes[2].overlap == 0.0


def test_an_object_that_fades_out_stops_on_low_contrast():
    """The model keeps segmenting the blur where a nucleus ends; the contrast says it ended."""
    planted = disk_stack([6] * 5)
    volume = np.full((5, 32, 32), 10, np.uint8)
    for k, brightness in enumerate([200, 200, 200, 40, 200]):
        volume[k][planted[k]] = brightness
    volume[:, 0, 0] = np.arange(5)  # the plane index, read back by PlantedPredictor.embed
    res = propagate_volume(PlantedPredictor(planted), volume, 1, points=[[16, 16]],
                           contrast_limits=(0, 255))
    assert res.stopped == {"forward": "low_contrast", "backward": "end"}
    assert res.extent == (0, 2) and res.planes[3].status == "low_contrast"
    res = propagate_volume(PlantedPredictor(planted), volume, 1, points=[[16, 16]],
                           contrast_limits=(0, 255), settings=PropagationSettings(min_contrast=0))
    assert res.stopped["forward"] == "end"
    # a dark object in a bright surround has a negative contrast: judged against the seed's
    inverted = 255 - volume
    inverted[:, 0, 0] = np.arange(5)
    res = propagate_volume(PlantedPredictor(planted), inverted, 1, points=[[16, 16]],
                           contrast_limits=(0, 255))
    assert res.stopped["forward"] == "low_contrast"
    assert mask_contrast(volume[1], planted[1]) > 0 > mask_contrast(inverted[1], planted[1])


def test_max_planes_limits_each_direction():
    planted = disk_stack([6] * 9)
    res = run(PlantedPredictor(planted), 4, points=[[16, 16]],
              settings=PropagationSettings(max_planes=2))
    assert res.extent == (2, 6)
    assert res.stopped == {"forward": "max_planes", "backward": "max_planes"}


def test_only_the_part_overlapping_the_previous_mask_is_kept():
    planted = disk_stack([6, 6])
    planted[1, 0:4, 0:4] = True  # a separate speck in plane 1
    res = run(PlantedPredictor(planted), 0, points=[[16, 16]])
    assert not res.masks[1, 0:4, 0:4].any() and res.masks[1, 16, 16]
    res = run(PlantedPredictor(planted), 0, points=[[16, 16]],
              settings=PropagationSettings(single_component=False))
    assert res.masks[1, 0:4, 0:4].all()


def test_progress_and_cancel():
    planted = disk_stack([6] * 6)
    items = list(iter_propagate(PlantedPredictor(planted), provider_for(6), 6, 2,
                                points=[[16, 16]]))
    assert isinstance(items[-1], PropagationResult)
    progress = items[:-1]
    assert all(isinstance(p, PropagationProgress) for p in progress)
    assert [p.index for p in progress] == [2, 3, 4, 5, 1, 0]
    assert [p.done for p in progress] == [1, 2, 3, 4, 5, 6] and progress[0].total == 6
    polls = iter(range(100))
    with pytest.raises(CancelledError):
        run(PlantedPredictor(planted), 2, points=[[16, 16]], cancel=lambda: next(polls) >= 3)


def test_the_predictors_own_image_is_put_back():
    pred = PlantedPredictor(disk_stack([6, 6, 6]))
    pred.set_embedding(torch.full((1, 1, 1, 1), 1.0), (32, 32), (32, 32))
    run(pred, 0, points=[[16, 16]])
    assert pred.plane == 1


def test_embeddings_are_asked_for_on_demand_in_walking_order():
    planted = disk_stack([0, 4, 6, 6, 4, 0, 0, 0])
    asked: list[int] = []
    propagate(PlantedPredictor(planted), provider_for(8, asked), 8, 2, points=[[16, 16]])
    assert asked == [2, 3, 4, 5, 1, 0]  # planes 6 and 7 are never embedded


def test_directions_can_be_restricted():
    planted = disk_stack([6] * 5)
    res = run(PlantedPredictor(planted), 2, points=[[16, 16]], directions=("backward",))
    assert res.extent == (0, 2) and res.stopped == {"backward": "end"}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"min_score": 1.5}, "min_score must be in"),
    ({"min_overlap": -0.1}, "min_overlap"),
    ({"max_area_ratio": 0.5}, "max_area_ratio must be in"),
    ({"min_area": 0}, "min_area"),
    ({"min_area": 2.5}, "whole number"),
    ({"max_planes": 0}, "max_planes"),
    ({"min_score": "high"}, "must be a number"),
    ({"min_score": float("nan")}, "min_score"),
    ({"use_box": 1}, "True or False"),
    ({"use_box": False, "use_point": False, "use_mask": False}, "at least one"),
])
def test_settings_are_validated_with_typed_errors(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        PropagationSettings(**kwargs)


def test_bad_calls_get_typed_errors():
    pred = PlantedPredictor(disk_stack([6, 6]))
    with pytest.raises(InvalidInputError, match="outside the stack"):
        run(pred, 5, points=[[16, 16]])
    with pytest.raises(InvalidInputError, match="No prompt"):
        run(pred, 0)
    with pytest.raises(InvalidInputError, match="not both"):
        run(pred, 0, points=[[1, 1]], mask=np.ones((32, 32), bool))
    with pytest.raises(InvalidInputError, match="seed mask has shape"):
        run(pred, 0, mask=np.ones((8, 8), bool))
    with pytest.raises(InvalidInputError, match="empty"):
        run(pred, 0, mask=np.zeros((32, 32), bool))
    with pytest.raises(InvalidInputError, match="directions"):
        run(pred, 0, points=[[1, 1]], directions=("up",))
    with pytest.raises(InvalidInputError, match="EmbeddedImage"):
        propagate(pred, lambda k: "features", 2, 0, points=[[1, 1]])
    with pytest.raises(InvalidInputError, match="start must be an integer"):
        run(pred, 0.5, points=[[1, 1]])


def test_innermost_pixel_is_the_deepest():
    m = np.zeros((10, 20), bool)
    m[2:9, 3:10] = True  # 7 x 7: centre (5, 6)
    m[0:3, 12:20] = True  # a thin bar: shallower
    assert innermost_pixel(m) == (5, 6)


# ----------------------------------------------------------------- tracking along t


def indexed_volume(n: int, size: int = 32) -> np.ndarray:
    """(n, size, size) uint8 whose plane k holds the value k (read back by ``embed``)."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, size, size)).copy()


def test_tracking_follows_a_drifting_blob_in_time_and_keeps_its_id():
    centres = [(10, 8 + 2 * t) for t in range(8)]
    planted = disk_stack([5] * 8, centres=centres)
    pred = PlantedPredictor(planted)
    res = track_object(pred, indexed_volume(8), 3, points=[centres[3]], contrast_limits=(0, 255))
    assert np.array_equal(res.masks, planted)
    labels = res.labels(7)
    assert labels.dtype == np.uint32 and set(np.unique(labels)) == {0, 7}
    assert all((labels[t] == 7).sum() == planted[t].sum() for t in range(8))
    assert [plane for plane, _ in pred.calls] == [3, 4, 5, 6, 7, 2, 1, 0]
    # forward only
    pred = PlantedPredictor(planted)
    res = track_object(pred, indexed_volume(8), 3, points=[centres[3]], backward=False,
                       contrast_limits=(0, 255))
    assert res.extent == (3, 7) and list(res.stopped) == ["forward"]
    with pytest.raises(InvalidInputError, match="object_id"):
        res.labels(0)


def test_at_a_division_the_track_follows_the_daughter_overlapping_most():
    mother = disk_stack([7], centres=[(16, 14)])[0]
    daughters = disk_stack([5, 4], centres=[(16, 10), (16, 24)])
    planted = np.stack([mother, daughters[0] | daughters[1]])
    res = run(PlantedPredictor(planted), 0, points=[[16, 14]])
    assert np.array_equal(res.masks[1], daughters[0])  # the left one overlaps the mother


def test_the_stack_axis_is_explicit_and_masks_come_back_in_the_input_layout():
    planted = disk_stack([4, 6, 6, 4, 0])  # (z, y, x)
    volume_yzx = np.moveaxis(indexed_volume(5), 0, 1)  # (y, z, x)
    res = propagate_volume(PlantedPredictor(planted), volume_yzx, 1, z_axis=1,
                           points=[[16, 16]], contrast_limits=(0, 255))
    assert res.masks.shape == (32, 5, 32) and res.axis == 1
    assert np.array_equal(res.masks, np.moveaxis(planted, 0, 1))
    with pytest.raises(InvalidInputError, match="stack axis must be"):
        propagate_volume(PlantedPredictor(planted), volume_yzx, 1, z_axis=3, points=[[16, 16]])
    with pytest.raises(InvalidInputError, match="must be"):
        propagate_volume(PlantedPredictor(planted), volume_yzx[0], 1, points=[[16, 16]])


def test_end_to_end_with_a_tiny_random_model(tiny_sam):
    """The real Predictor: embeddings computed on demand for the planes visited only,
    every mask (Z, H, W) bool, reports for the planes visited."""
    from napari_sam.engine.predictor import Predictor

    rng = np.random.default_rng(0)
    volume = rng.integers(0, 255, size=(4, 40, 48), dtype=np.uint8)
    volume[:, 10:30, 12:36] = 250
    predictor = Predictor(tiny_sam)
    res = propagate_volume(predictor, volume, 1, box=[10, 12, 29, 35],
                           settings=PropagationSettings(min_score=0.0, min_overlap=0.0,
                                                        max_area_ratio=1e6, min_area=1,
                                                        min_contrast=0.0))
    assert res.masks.shape == (4, 40, 48) and res.masks.dtype == bool
    assert res.planes[0].index in (0, 1) and res.planes[-1].index <= 3
    assert {p.status for p in res.planes} <= {"seed", "kept", "empty"}
    assert not predictor.is_image_set  # nothing was set before, nothing is left set


@pytest.mark.parametrize("points", [[[1, 2], [3]], [1, 2, 3], [[50, 50]]])
def test_malformed_seed_points_get_the_predictors_typed_errors(tiny_sam, points):
    from napari_sam.engine.predictor import Predictor

    volume = np.zeros((3, 20, 20), np.uint8)
    with pytest.raises(InvalidInputError, match="points|Point"):
        propagate_volume(Predictor(tiny_sam), volume, 1, points=points)
