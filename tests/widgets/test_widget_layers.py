"""Pure tests of napari_sam.widgets.layers (napari layers, no viewer, no Qt)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.layers import Image, Labels, Points, Shapes  # noqa: E402

from napari_sam.errors import InvalidInputError  # noqa: E402
from napari_sam.widgets import layers as L  # noqa: E402


def _points(coords, positive, **kwargs):
    coords = np.asarray(coords, dtype=float)
    return Points(
        coords,
        ndim=coords.shape[1],
        features={"positive": np.asarray(positive, dtype=bool)},
        **kwargs,
    )


def test_points_identity_transform():
    img = Image(np.zeros((20, 30)))
    pts = _points([[3, 4], [10.5, 20.2]], [True, False])
    coords, labels = L.points_to_prompts(pts, img)
    np.testing.assert_allclose(coords, [[3, 4], [10.5, 20.2]])
    np.testing.assert_array_equal(labels, [1, 0])


def test_points_map_world_to_image_data_with_scale_translate():
    # image pixel (r, c) sits at world (10 + 2 r, -5 + 0.5 c)
    img = Image(np.zeros((20, 30)), scale=(2, 0.5), translate=(10, -5))
    # a points layer with identity transform: its data coords are world coords
    pts = _points([[10 + 2 * 7, -5 + 0.5 * 12]], [True])
    coords, labels = L.points_to_prompts(pts, img)
    np.testing.assert_allclose(coords, [[7, 12]])
    np.testing.assert_array_equal(labels, [1])

    # a points layer with its own (different) transform
    pts2 = _points([[2, 3]], [False], scale=(3, 1), translate=(1, 1))
    coords2, labels2 = L.points_to_prompts(pts2, img)
    # world = (1 + 3*2, 1 + 3) = (7, 4) -> image data ((7-10)/2, (4+5)/0.5)
    np.testing.assert_allclose(coords2, [[-1.5, 18]])
    np.testing.assert_array_equal(labels2, [0])


def test_points_without_feature_are_positive_and_empty_layer():
    img = Image(np.zeros((8, 8)))
    coords, labels = L.points_to_prompts(Points([[1, 2], [3, 4]]), img)
    np.testing.assert_array_equal(labels, [1, 1])
    coords, labels = L.points_to_prompts(Points(np.empty((0, 2))), img)
    assert coords.shape == (0, 2) and labels.shape == (0,)


def test_points_on_other_slices_are_ignored():
    img = Image(np.zeros((5, 20, 30)), scale=(3, 1, 1))
    # points layer in world coords: z world = 3 * z data
    pts = _points([[6, 1, 2], [9, 3, 4], [6.4, 5, 6]], [True, True, False])
    coords, labels = L.points_to_prompts(pts, img, slice_index=(2,))
    np.testing.assert_allclose(coords, [[1, 2], [5, 6]])
    np.testing.assert_array_equal(labels, [1, 0])
    coords, _ = L.points_to_prompts(pts, img, slice_index=(3,))
    np.testing.assert_allclose(coords, [[3, 4]])
    # a 2D points layer over a 3D image applies to every slice
    coords, _ = L.points_to_prompts(_points([[1, 1]], [True]), img, slice_index=(4,))
    np.testing.assert_allclose(coords, [[1, 1]])


def test_rgb_image_plane_and_points():
    img = Image(np.zeros((4, 10, 12, 3), dtype=np.uint8), rgb=True)
    assert L.spatial_shape(img) == (4, 10, 12)
    assert L.image_plane_shape(img) == (10, 12)
    assert L.get_image_plane(img, (1,)).shape == (10, 12, 3)
    coords, _ = L.points_to_prompts(_points([[1, 2, 3]], [True]), img, (1,))
    np.testing.assert_allclose(coords, [[2, 3]])


def test_boxes_from_rectangles_and_rotated_shapes():
    img = Image(np.zeros((40, 40)), scale=(2, 2), translate=(1, 1))
    shapes = Shapes(ndim=2)
    # world rectangle (11, 21) - (31, 41) -> data (5, 10) - (15, 20), given in any vertex order
    shapes.add_rectangles(np.array([[31, 41], [11, 21]]))
    # a diamond (rotated square) -> its bounding box
    shapes.add_polygons([np.array([[21, 1], [31, 11], [21, 21], [11, 11]])])
    boxes = L.shapes_to_boxes(shapes, img)
    np.testing.assert_allclose(boxes, [[5, 10, 15, 20], [5, 0, 15, 10]])
    assert L.shapes_to_boxes(Shapes(ndim=2), img).shape == (0, 4)


def test_boxes_on_other_slices_are_ignored():
    img = Image(np.zeros((3, 20, 20)))
    shapes = Shapes(ndim=3)
    shapes.add_rectangles(np.array([[1, 2, 2], [1, 2, 8], [1, 6, 8], [1, 6, 2]]))
    shapes.add_rectangles(np.array([[2, 1, 1], [2, 1, 3], [2, 3, 3], [2, 3, 1]]))
    np.testing.assert_allclose(L.shapes_to_boxes(shapes, img, (1,)), [[2, 2, 6, 8]])
    np.testing.assert_allclose(L.shapes_to_boxes(shapes, img, (2,)), [[1, 1, 3, 3]])
    assert L.shapes_to_boxes(shapes, img, (0,)).shape == (0, 4)


def test_current_slice_index_through_transform():
    img = Image(np.zeros((4, 6, 10, 10)), scale=(1, 2, 1, 1), translate=(0, 10, 0, 0))
    assert L.current_slice_index(img, [3, 14, 0, 0]) == (3, 2)
    # the viewer may have more dims than the layer (leading ones are ignored)
    assert L.current_slice_index(img, [7, 1, 20, 0, 0]) == (1, 5)
    assert L.current_slice_index(Image(np.zeros((5, 5))), [3, 0, 0]) == ()
    with pytest.raises(InvalidInputError, match="outside"):
        L.current_slice_index(img, [0, 30, 0, 0])


def test_check_plane_displayed():
    class Dims:
        ndim, ndisplay, displayed = 3, 2, (1, 2)

    img = Image(np.zeros((3, 8, 8)))
    L.check_plane_displayed(img, Dims())
    Dims.displayed = (0, 2)
    with pytest.raises(InvalidInputError, match="roll"):
        L.check_plane_displayed(img, Dims())
    Dims.ndisplay, Dims.displayed = 3, (0, 1, 2)
    with pytest.raises(InvalidInputError, match="2D"):
        L.check_plane_displayed(img, Dims())


def test_make_labels_layer_copies_shape_and_transform():
    img = Image(np.zeros((3, 10, 12, 3), np.uint8), rgb=True, scale=(1, 2, 0.5),
                translate=(0, 10, -5))
    lab = L.make_labels_layer(img, "objects")
    assert lab.data.shape == (3, 10, 12) and lab.data.dtype == np.uint32
    assert not lab.data.any()
    np.testing.assert_allclose(lab.scale, img.scale)
    np.testing.assert_allclose(lab.translate, img.translate)
    np.testing.assert_allclose(lab.data_to_world([1, 2, 3]), img.data_to_world([1, 2, 3]))
    assert L.labels_fit_image(lab, img)
    assert not L.labels_fit_image(Labels(np.zeros((10, 12), np.uint8)), img)


def test_unique_name():
    assert L.unique_name(["a"], "b") == "b"
    assert L.unique_name(["a", "b"], "b") == "b [2]"
    assert L.unique_name(["b", "b [2]"], "b") == "b [3]"


def test_commit_mask_fresh_ids_no_overwrite_and_undo():
    labels = Labels(np.zeros((10, 10), dtype=np.uint16))
    labels.data[0, 0] = 5  # an existing object
    m1 = np.zeros((10, 10), bool)
    m1[0:3, 0:3] = True
    id1 = L.commit_mask(labels, m1)
    assert id1 == 6
    assert labels.data[0, 0] == 5  # existing label kept
    assert (labels.data[0:3, 0:3] == 6).sum() == 8

    m2 = np.zeros((10, 10), bool)
    m2[2:5, 2:5] = True
    id2 = L.commit_mask(labels, m2)
    assert id2 == 7
    assert labels.data[2, 2] == 6  # first object not overwritten
    assert (labels.data == 7).sum() == 8

    labels.undo()
    assert not (labels.data == 7).any()
    assert (labels.data == 6).sum() == 8 and labels.data[0, 0] == 5
    labels.undo()
    assert set(np.unique(labels.data)) == {0, 5}


def test_commit_mask_overwrite_and_empty():
    labels = Labels(np.zeros((6, 6), dtype=np.uint32))
    labels.data[1, 1] = 3
    mask = np.zeros((6, 6), bool)
    assert L.commit_mask(labels, mask) == 0
    mask[1, 1] = True
    assert L.commit_mask(labels, mask) == 0  # only pixel already taken
    assert L.commit_mask(labels, mask, overwrite=True) == 4
    assert labels.data[1, 1] == 4


def test_commit_mask_nd_writes_only_the_slice():
    labels = Labels(np.zeros((2, 3, 5, 5), dtype=np.uint32))
    mask = np.zeros((5, 5), bool)
    mask[1:3, 1:4] = True
    new_id = L.commit_mask(labels, mask, (1, 2))
    assert new_id == 1
    assert (labels.data[1, 2] == 1).sum() == 6
    assert (labels.data == 1).sum() == 6
    with pytest.raises(InvalidInputError):
        L.commit_mask(labels, mask, (1,))
    with pytest.raises(InvalidInputError):
        L.commit_mask(labels, np.ones((4, 5), bool), (1, 2))
    with pytest.raises(InvalidInputError):
        L.commit_mask(labels, mask, (2, 0))


def test_commit_mask_full_dtype_raises():
    labels = Labels(np.full((4, 4), 255, dtype=np.uint8))
    labels.data[0, 0] = 0
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    with pytest.raises(InvalidInputError, match="uint32"):
        L.commit_mask(labels, mask)


def test_commit_mask_crop_with_offset_matches_the_full_mask_and_undoes_exactly():
    before = np.zeros((3, 40, 50), dtype=np.uint16)
    before[1, 12:16, 20:30] = 4
    full = np.zeros((40, 50), bool)
    full[10:20, 15:35] = True
    full[18, 40] = True  # a far pixel: the crop spans it
    rows, cols = np.nonzero(full)
    crop = full[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    a = Labels(before.copy())
    b = Labels(before.copy())
    assert L.commit_mask(a, full, (1,)) == 5
    assert L.commit_mask(b, crop, (1,), offset=(rows.min(), cols.min())) == 5
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(b.data[1] == 5, full & (before[1] == 0))
    b.undo()
    np.testing.assert_array_equal(b.data, before)
    # a crop that does not fit the plane at its offset is refused, not clipped
    with pytest.raises(InvalidInputError, match="offset"):
        L.commit_mask(b, crop, (1,), offset=(35, 0))
    with pytest.raises(InvalidInputError):
        L.commit_mask(b, crop, (1,), offset=(-1, 0))
    # without an offset the mask must be the whole plane
    with pytest.raises(InvalidInputError):
        L.commit_mask(b, crop, (1,))


def test_shapes_on_plane():
    img = Image(np.zeros((4, 20, 30)))
    def rect(z, r0, c0, r1, c1):
        return np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], dtype=float)

    shapes = Shapes(
        [rect(1, 2, 3, 8, 9), rect(2, 2, 3, 8, 9), rect(1, 5, 5, 9, 9)],
        shape_type="rectangle", ndim=3,
    )
    np.testing.assert_array_equal(L.shapes_on_plane(shapes, img, (1,)), [True, False, True])
    boxes = L.shapes_to_boxes(shapes, img, (1,))
    np.testing.assert_allclose(boxes, [[2, 3, 8, 9], [5, 5, 9, 9]])
