"""The stack id rule (napari_sam.engine.stack), shared by the widget and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.engine.stack import StackLabeller, label_planes
from napari_sam.errors import InvalidInputError


def test_ids_are_shifted_by_the_largest_id_of_the_planes_before():
    p0 = np.array([[0, 1], [2, 2]], np.uint32)
    p1 = np.array([[1, 0], [0, 0]], np.uint32)
    p2 = np.zeros((2, 2), np.uint32)  # no object: the next plane continues from 2... 3
    p3 = np.array([[3, 1], [0, 0]], np.uint32)  # object 2 was covered: its id is unused
    out = dict(label_planes([((0,), p0), ((1,), p1), ((2,), p2), ((3,), p3)]))
    assert out[(0,)].tolist() == [[0, 1], [2, 2]]
    assert out[(1,)].tolist() == [[3, 0], [0, 0]]
    assert not out[(2,)].any()
    assert out[(3,)].tolist() == [[6, 4], [0, 0]]
    assert all(v.dtype == np.uint32 for v in out.values())


def test_new_ids_map_plane_objects_and_mark_covered_ones():
    lab = StackLabeller(start=10)
    labels, new_ids = lab.add(np.array([[1, 3], [0, 3]], np.uint16))
    assert new_ids.tolist() == [0, 11, 0, 13]  # object 2 has no pixel
    assert labels.tolist() == [[11, 13], [0, 13]] and lab.last_id == 13


def test_a_single_plane_keeps_its_ids_and_negative_labels_are_refused():
    plane = np.array([[0, 2, 5]], np.int32)
    assert StackLabeller().add(plane)[0].tolist() == [[0, 2, 5]]
    with pytest.raises(InvalidInputError, match=">= 0"):
        StackLabeller().add(np.array([[-1, 0]]))


class _FakeGenerator:
    """Per plane: one 2 x 2 object and an empty mask (area 0; painted last, no pixel)."""

    def generate(self, image, cancel=None, use_cache=True):
        obj = np.zeros(image.shape[:2], bool)
        obj[1:3, 1:3] = True
        empty = np.zeros_like(obj)
        return [{"segmentation": obj, "area": 4}, {"segmentation": empty, "area": 0}]


def test_cli_stack_ids_follow_the_rule(tmp_path):
    """``everything_labels`` (the CLI's) continues after the largest id used, not after
    the number of records: a mask without pixels takes no id in the next plane."""
    import tifffile

    from napari_sam.engine.batch import everything_labels
    from napari_sam.engine.io import read_image

    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 6, 7), np.uint16) + 5,
                     photometric="minisblack")
    labels, records = everything_labels(_FakeGenerator(), read_image(tmp_path / "s.tif"))
    assert [int(labels[k].max()) for k in range(3)] == [1, 2, 3]
    assert [[r["label"] for r in recs] for _, recs in records] == [[1, 0], [2, 0], [3, 0]]
