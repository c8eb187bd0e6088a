"""The widget's stack rules without Qt: axes, the walk, the crop of a propagated object,
the nD preview placement and the one-step nD commit (napari_sam.widgets.volume/layers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.engine.cache import EmbeddedImage
from napari_sam.engine.propagate import PropagationProgress
from napari_sam.errors import CancelledError, InvalidInputError
from napari_sam.widgets import layers as L
from napari_sam.widgets.volume import (
    PropagatedObject,
    StackWalk,
    default_stack_axis,
    iter_walk,
    stack_axes,
    store_location,
)


def test_stack_axes_and_default():
    assert stack_axes((20, 30)) == []
    assert stack_axes((5, 9, 20, 30), ("t", "-3", "y", "x")) == [
        "axis 0 (t): 5 planes", "axis 1: 9 planes"]
    assert default_stack_axis((20, 30)) is None
    assert default_stack_axis((5, 9, 20, 30), displayed=(2, 3)) == 0
    assert default_stack_axis((5, 9, 20, 30), displayed=(0, 2, 3)) == 1


def test_walk_checks_its_axis():
    walk = StackWalk.make((5, 9, 20, 30), (2, 4), axis=1)
    assert (walk.start, walk.n_planes, walk.plane_index(7)) == (4, 9, (2, 7))
    with pytest.raises(InvalidInputError, match="single 2D plane"):
        StackWalk.make((20, 30), (), 0)
    with pytest.raises(InvalidInputError, match="0..1"):
        StackWalk.make((5, 9, 20, 30), (2, 4), 2)


class _Stand:
    """Predictor stand-in: a plane's mask is where its pixels are bright."""

    def __init__(self):
        self.features = None

    @property
    def embedding(self):
        if self.features is None:
            return None
        size = tuple(self.features.shape[-2:])
        return EmbeddedImage(self.features, size, size)

    def reset_image(self):
        self.features = None

    def compute_embedding(self, rgb):
        return torch.from_numpy(rgb[..., 0].astype(np.float32).copy())[None, None]

    def embed(self, rgb):
        size = rgb.shape[:2]
        return EmbeddedImage(self.compute_embedding(rgb), size, size)

    def set_embedding(self, features, original_size, input_size, image=None):
        self.features = features

    def predict(self, multimask=False, **_):
        from napari_sam.engine.predictor import Prediction

        mask = self.features[0, 0].numpy() > 128
        return Prediction(mask[None], np.array([0.9], np.float32), np.zeros((1, 8, 8), np.float32))


def _movie():
    """(t=3, z=5, 12, 14): at t = 1 a box spans z 1..3 (rows 4..7, cols 5..9)."""
    data = np.zeros((3, 5, 12, 14), np.uint8)
    data[1, 1:4, 4:8, 5:10] = 200
    return data


def test_the_walk_crops_the_object_in_the_image_layout_and_reports_computed_planes():
    data = _movie()
    walk = StackWalk.make(data.shape, (1, 2), axis=1)
    seed = data[1, 2] > 128
    computing: list[int] = []
    items = list(iter_walk(_Stand(), data, walk, seed, contrast_limits=(0, 255),
                           object_id=7, on_compute=computing.append))
    assert all(isinstance(i, PropagationProgress) for i in items[:-1])
    obj = items[-1]
    assert isinstance(obj, PropagatedObject)
    assert obj.extent == (1, 3) and obj.object_id == 7 and obj.axis == 1
    assert obj.mask.shape == (1, 3, 4, 5) and obj.mask.all()
    assert obj.offset == (1, 1, 4, 5)
    assert sorted(computing) == [0, 1, 2, 3, 4] and obj.computed == 5
    assert [k for k, _ in obj.planes()] == [1, 2, 3]
    # written back with its offset it is exactly the object
    out = np.zeros(data.shape, bool)
    out[tuple(slice(o, o + n) for o, n in zip(obj.offset, obj.mask.shape, strict=True))] = obj.mask
    np.testing.assert_array_equal(out, data > 128)


def test_the_walk_is_cancelled_between_planes():
    data = _movie()
    walk = StackWalk.make(data.shape, (1, 2), axis=1)
    with pytest.raises(CancelledError):
        list(iter_walk(_Stand(), data, walk, data[1, 2] > 128, contrast_limits=(0, 255),
                       cancel=lambda: True))


def test_store_location(tmp_path):
    beside = store_location(str(tmp_path / "a.tif"), "a", lambda: 1 / 0, lambda: tmp_path)
    assert beside == (tmp_path / "a.tif.sam.zarr", True)
    path, is_beside = store_location(None, "my cells/1", lambda: "blake2b:0123456789abcdef99",
                                     lambda: tmp_path / "cache")
    assert not is_beside
    assert path == tmp_path / "cache" / "embeddings" / "my_cells_1-0123456789abcdef.sam.zarr"


def test_data_affine_places_a_crop_on_anisotropic_voxels():
    from napari.layers import Image, Labels

    image = Image(np.zeros((6, 20, 30)), scale=(4, 1, 0.5), translate=(2, 10, -5),
                  rotate=0)
    crop = Labels(np.zeros((2, 3, 4), np.uint8), affine=L.data_affine(image, (3, 5, 7)))
    for point in ([0, 0, 0], [1, 2, 3]):
        np.testing.assert_allclose(crop.data_to_world(point),
                                   image.data_to_world(np.add((3, 5, 7), point)))
    with pytest.raises(InvalidInputError, match="3 values"):
        L.data_affine(image, (1, 2))


def test_commit_object_is_one_undo_step_and_can_keep_an_id():
    from napari.layers import Labels

    labels = Labels(np.zeros((5, 8, 8), np.uint16))
    labels.data_setitem((np.array([2]), np.array([3]), np.array([3])), 4)
    crop = np.ones((3, 2, 2), bool)
    assert L.commit_object(labels, crop, (1, 3, 3), label_id=4) == 4
    assert int((labels.data == 4).sum()) == 12
    assert L.commit_object(labels, crop, (1, 5, 5)) == 5  # a new id: max + 1
    labels.undo()
    assert not (labels.data == 5).any() and int((labels.data == 4).sum()) == 12
    labels.undo()  # the whole 3D object goes in one step
    assert int((labels.data == 4).sum()) == 1
    with pytest.raises(InvalidInputError, match="does not fit"):
        L.commit_object(labels, crop, (4, 0, 0))
