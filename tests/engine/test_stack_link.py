"""Linking per-plane objects into 3D objects / tracks (napari_sam.engine.stack.link_planes)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.engine.stack import LINK_IOU, link_planes, linked_ids
from napari_sam.errors import InvalidInputError


def _planes(*planes) -> np.ndarray:
    return np.stack([np.array(p, np.uint16) for p in planes])


def test_overlapping_objects_of_neighbouring_planes_share_one_id():
    # plane ids are per plane (1, 2 in each): linking does not need them unique
    stack = _planes(
        [[1, 1, 0, 2], [1, 1, 0, 2]],
        [[2, 2, 0, 1], [2, 2, 0, 1]],
        [[0, 0, 0, 1], [0, 0, 0, 1]],
    )
    out = link_planes(stack)
    assert out.dtype == np.uint32
    assert out.tolist() == [
        [[1, 1, 0, 2], [1, 1, 0, 2]],
        [[1, 1, 0, 2], [1, 1, 0, 2]],
        [[0, 0, 0, 2], [0, 0, 0, 2]],
    ]


def test_the_iou_threshold_decides_and_is_settable():
    a = np.zeros((2, 1, 10), np.uint8)
    a[0, 0, 0:4] = 1
    a[1, 0, 2:6] = 1  # IoU 2 / 6 = 0.33
    assert LINK_IOU == 0.3
    assert np.unique(link_planes(a)[a > 0]).tolist() == [1]
    out = link_planes(a, iou_threshold=0.5)
    assert out[0, 0, 0] == 1 and out[1, 0, 2] == 2
    # touching is not overlapping, even at threshold 0
    b = np.zeros((2, 1, 10), np.uint8)
    b[0, 0, 0:3] = 1
    b[1, 0, 3:6] = 1
    assert np.unique(link_planes(b, iou_threshold=0.0)[b > 0]).tolist() == [1, 2]


def test_matching_is_one_to_one_and_maximises_the_total_iou():
    # plane 0: A = cols 0..9, D = 10..15; plane 1: B = 4..12, C = 0..3.
    # IoU A-B 0.46, A-C 0.4, D-B 0.25, D-C 0. Greedy (largest first) would link A-B and
    # leave C and D unmatched; the Hungarian matching links A-C and D-B (sum 0.65).
    p0 = np.zeros((1, 16), np.uint8)
    p1 = np.zeros((1, 16), np.uint8)
    p0[0, 0:10], p0[0, 10:16] = 1, 2
    p1[0, 4:13], p1[0, 0:4] = 1, 2
    out = link_planes(np.stack([p0, p1]), iou_threshold=0.2)
    assert out[1, 0, 0] == out[0, 0, 0] == 1  # C continues A
    assert out[1, 0, 5] == out[0, 0, 12] == 2  # B continues D
    # at the default threshold D-B (0.25) is too weak: B starts a new object
    out = link_planes(np.stack([p0, p1]))
    assert out[1, 0, 0] == 1 and out[1, 0, 5] == 3


def test_a_division_keeps_the_id_on_the_daughter_that_overlaps_most():
    mother = np.zeros((1, 10), np.uint8)
    mother[0, 1:9] = 1
    daughters = np.zeros((1, 10), np.uint8)
    daughters[0, 1:6] = 1  # overlaps the mother more
    daughters[0, 7:9] = 2
    out = link_planes(np.stack([mother, daughters]))
    assert out[1, 0, 1] == out[0, 0, 1] == 1 and out[1, 0, 7] == 2


def test_a_gap_is_not_bridged_and_ids_follow_first_appearance():
    stack = _planes([[5, 0]], [[0, 0]], [[3, 0]])
    assert link_planes(stack).tolist() == [[[1, 0]], [[0, 0]], [[2, 0]]]


def test_the_axis_is_explicit_and_other_stack_axes_are_linked_separately():
    # (T=2, Z=2, H, W): linking along z (axis -1 = the stack axis next to the planes)
    stack = np.zeros((2, 2, 1, 4), np.uint8)
    stack[:, :, 0, 0:2] = 1
    out = link_planes(stack, axis=-1)
    assert out[0, 0, 0, 0] == out[0, 1, 0, 0] == 1
    assert out[1, 0, 0, 0] == out[1, 1, 0, 0] == 2  # another time point: another object
    along_t = link_planes(stack, axis=0)
    assert along_t[0, 0, 0, 0] == along_t[1, 0, 0, 0] != along_t[0, 1, 0, 0]
    # the same data with the stack axes swapped gives the same objects
    swapped = np.moveaxis(stack, 0, 1)  # (Z, T, H, W)
    assert np.array_equal(link_planes(swapped, axis=0), np.moveaxis(out, 0, 1))


@pytest.mark.parametrize(("labels", "kwargs", "match"), [
    (np.zeros((4, 4), np.uint8), {}, "stack axis"),
    (np.zeros((2, 4, 4), np.float32), {}, "integer"),
    (np.full((2, 4, 4), -1, np.int32), {}, ">= 0"),
    (np.zeros((2, 4, 4), np.uint8), {"axis": 1}, "not a stack axis"),
    (np.zeros((2, 4, 4), np.uint8), {"axis": 0.5}, "axis must be an integer"),
    (np.zeros((2, 4, 4), np.uint8), {"iou_threshold": 1.5}, r"\[0, 1\]"),
    (np.zeros((2, 4, 4), np.uint8), {"iou_threshold": "x"}, r"\[0, 1\]"),
])
def test_bad_input_gets_typed_errors(labels, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        link_planes(labels, **kwargs)


def test_linked_ids_maps_old_to_new():
    before = np.array([[0, 4, 4, 9]])
    after = np.array([[0, 1, 1, 1]])
    assert linked_ids(before, after) == {4: 1, 9: 1}
    assert linked_ids(np.zeros((2, 2)), np.zeros((2, 2))) == {}
    with pytest.raises(InvalidInputError, match="shape"):
        linked_ids(before, after[:, :2])


class _ShiftingGenerator:
    """Per plane k: a 4 x 4 object shifted by k columns (overlapping its neighbours), a
    small one only in plane 0, and an empty record."""

    def __init__(self):
        self.plane = 0

    def generate(self, image, cancel=None, use_cache=True):
        k = self.plane
        self.plane += 1
        big = np.zeros(image.shape[:2], bool)
        big[2:6, 2 + k:6 + k] = True
        recs = [{"segmentation": big, "area": 16}]
        if k == 0:
            small = np.zeros_like(big)
            small[8:10, 8:10] = True
            recs.append({"segmentation": small, "area": 4})
        return recs + [{"segmentation": np.zeros_like(big), "area": 0}]


def test_everything_labels_links_planes_and_relabels_the_records(tmp_path):
    import tifffile

    from napari_sam.engine.batch import everything_labels
    from napari_sam.engine.io import read_image

    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 12, 12), np.uint16) + 5,
                     photometric="minisblack")
    image = read_image(tmp_path / "s.tif")
    labels, records = everything_labels(_ShiftingGenerator(), image, link_axis=0)
    assert [sorted(np.unique(labels[k]).tolist()) for k in range(3)] == [[0, 1, 2], [0, 1],
                                                                        [0, 1]]
    assert [[r["label"] for r in recs] for _, recs in records] == [[1, 2, 0], [1, 0], [1, 0]]
    # unlinked (the library default): plane ids apart
    labels, records = everything_labels(_ShiftingGenerator(), image)
    assert [[r["label"] for r in recs] for _, recs in records] == [[1, 2, 0], [3, 0], [4, 0]]


def test_run_batch_checks_the_link_threshold_before_any_image(tmp_path):
    from napari_sam.engine.batch import run_batch

    with pytest.raises(InvalidInputError, match=r"linking IoU threshold must be in \[0, 1\]"):
        run_batch([tmp_path / "missing.tif"], tmp_path / "out", link_axis=0, link_iou=2.0)
    assert not (tmp_path / "out").exists()


def test_plane_linker_gives_link_planes_ids_one_plane_at_a_time():
    """The widget's online linker numbers a (T, Z) stack exactly as link_planes(axis=-1)."""
    from itertools import product

    from napari_sam.engine.stack import PlaneLinker, link_planes

    rng = np.random.default_rng(3)
    # blobs that drift a little from plane to plane, so that some link and some do not
    stack = np.zeros((2, 5, 24, 24), np.uint16)
    for t, z in product(range(2), range(5)):
        for k in range(1, 5):
            r, c = 3 + 5 * k + int(rng.integers(-2, 3)), 4 + 4 * k + int(rng.integers(-3, 4))
            stack[t, z, max(r - 2, 0):r + 2, max(c - 2, 0):c + 2] = (k * 7 + z) % 5 + 1
    expected = link_planes(stack, axis=-1, iou_threshold=0.3)
    linker = PlaneLinker(0.3)
    got = np.zeros_like(expected)
    for index in product(range(2), range(5)):
        got[index] = linker.add(index, stack[index])
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(expected)) - 1 < len(np.unique(stack)) * 10  # some objects linked


def test_plane_linker_refuses_planes_out_of_order():
    from napari_sam.engine.stack import PlaneLinker
    from napari_sam.errors import InvalidInputError

    linker = PlaneLinker()
    linker.add((1,), np.ones((4, 4), np.uint8))
    with pytest.raises(InvalidInputError, match="stack order"):
        linker.add((0,), np.ones((4, 4), np.uint8))


# ---------------------------------------------------------------- min_planes: short objects


def _fragment_and_nucleus() -> np.ndarray:
    """(7, 8, 8) per-plane labels: a 'nucleus' (plane id 1) on planes 1..5, a one-plane
    fragment (plane id 2) on plane 0, and another one (plane id 3) on plane 6."""
    stack = np.zeros((7, 8, 8), np.uint16)
    stack[1:6, 2:6, 2:6] = 1
    stack[0, 0:2, 6:8] = 2
    stack[6, 6:8, 0:2] = 3
    return stack


def test_min_planes_drops_one_plane_fragments_and_keeps_ids_consecutive():
    from napari_sam.engine.stack import MIN_PLANES

    stack = _fragment_and_nucleus()
    everything = link_planes(stack)  # default 1: linking only
    assert np.unique(everything).tolist() == [0, 1, 2, 3]  # fragment 1, nucleus 2, fragment 3
    for n in (2, 3, 5):
        out = link_planes(stack, min_planes=n)
        assert out.dtype == np.uint32
        assert np.unique(out).tolist() == [0, 1]  # ids 1..n: the nucleus is 1 now
        np.testing.assert_array_equal(out > 0, stack == 1)
    # a 5-plane object is kept at 5, dropped at 6
    assert not link_planes(stack, min_planes=6).any()
    assert MIN_PLANES >= 1


def test_min_planes_counts_planes_along_the_linked_axis_only():
    # (T=2, Z=3): along z (axis -1) object A spans 3 planes at t=0, 1 plane at t=1
    stack = np.zeros((2, 3, 4, 4), np.uint8)
    stack[0, :, 0:2, 0:2] = 1
    stack[1, 1, 0:2, 0:2] = 1
    out = link_planes(stack, axis=-1, min_planes=2)
    np.testing.assert_array_equal(out[0] > 0, stack[0] > 0)
    assert not out[1].any()
    # along t (axis 0): the z = 1 line holds A at both times (kept), z = 0 and 2 only at
    # t = 0 (dropped)
    along_t = link_planes(stack, axis=0, min_planes=2)
    np.testing.assert_array_equal(along_t[:, 1] > 0, stack[:, 1] > 0)
    assert not along_t[:, [0, 2]].any()


def test_drop_short_objects_of_any_labels():
    from napari_sam.engine.stack import drop_short_objects

    labels = np.zeros((3, 2, 3), np.int64)
    labels[:, 0, 0] = 7  # 3 planes
    labels[0, 1, 1] = 4  # 1 plane
    labels[1:, 1, 2] = 2**40  # 2 planes, a huge id (the sparse path)
    out = drop_short_objects(labels, axis=0, min_planes=2)
    assert out.dtype == np.uint32
    # kept objects renumbered 1..n in the order of their ids: 7 -> 1, 2**40 -> 2
    assert out[:, 0, 0].tolist() == [1, 1, 1] and out[1:, 1, 2].tolist() == [2, 2]
    assert out[0, 1, 1] == 0
    np.testing.assert_array_equal(drop_short_objects(labels[:, :, :2], min_planes=1) > 0,
                                  labels[:, :, :2] > 0)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", None])
def test_a_bad_min_planes_gets_a_typed_error(value):
    from napari_sam.engine.stack import PlaneLinker, drop_short_objects

    stack = _fragment_and_nucleus()
    with pytest.raises(InvalidInputError, match="integer >= 1"):
        link_planes(stack, min_planes=value)
    with pytest.raises(InvalidInputError, match="integer >= 1"):
        drop_short_objects(stack, min_planes=value)
    with pytest.raises(InvalidInputError, match="integer >= 1"):
        PlaneLinker(min_planes=value)


def test_plane_linker_finish_drops_short_objects_as_link_planes_does():
    from itertools import product

    from napari_sam.engine.stack import PlaneLinker

    rng = np.random.default_rng(5)
    stack = np.zeros((2, 6, 24, 24), np.uint16)
    for t, z in product(range(2), range(6)):
        for k in range(1, 5):
            r, c = 3 + 5 * k + int(rng.integers(-2, 3)), 4 + 4 * k + int(rng.integers(-3, 4))
            stack[t, z, max(r - 2, 0):r + 2, max(c - 2, 0):c + 2] = k
    for n in (1, 2, 3):
        linker = PlaneLinker(0.3, min_planes=n)
        got = np.zeros(stack.shape, np.uint32)
        for index in product(range(2), range(6)):
            got[index] = linker.add(index, stack[index])
        expected = link_planes(stack, axis=-1, min_planes=n)
        np.testing.assert_array_equal(linker.finish(got), expected)
    assert np.unique(link_planes(stack, axis=-1)).size > np.unique(expected).size  # not vacuous


def test_everything_labels_drops_short_objects_and_their_records(tmp_path):
    import tifffile

    from napari_sam.engine.batch import everything_labels
    from napari_sam.engine.io import read_image

    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 12, 12), np.uint16) + 5,
                     photometric="minisblack")
    image = read_image(tmp_path / "s.tif")
    labels, records = everything_labels(_ShiftingGenerator(), image, link_axis=0, min_planes=2)
    # the small object of plane 0 is gone from the labels and the records; the empty
    # record (label 0, covered) stays as without min_planes
    assert [sorted(np.unique(labels[k]).tolist()) for k in range(3)] == [[0, 1]] * 3
    assert [[r["label"] for r in recs] for _, recs in records] == [[1, 0], [1, 0], [1, 0]]
    assert [[int(r["area"]) for r in recs] for _, recs in records] == [[16, 0]] * 3


def test_run_batch_checks_min_planes_before_any_image(tmp_path):
    from napari_sam.engine.batch import run_batch

    with pytest.raises(InvalidInputError, match="integer >= 1"):
        run_batch([tmp_path / "missing.tif"], tmp_path / "out", link_axis=0, min_planes=0)
    assert not (tmp_path / "out").exists()
