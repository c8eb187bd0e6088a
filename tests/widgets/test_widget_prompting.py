"""Pure rules of the interactive widget: prompts, decoding plan, boxes, preview, keys.

No Qt and no viewer: these are the functions the widget only wires to napari.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.widgets import keys as K
from napari_sam.widgets import preview as P
from napari_sam.widgets.prompting import (
    Prompts,
    crop_mask,
    mask_bbox,
    plan_decode,
    superseded_boxes,
)


def _p(points, labels=None, box=None):
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    labels = np.ones(len(points), dtype=np.int32) if labels is None else labels
    return Prompts.make(points, labels, box)


def test_prompts_copy_their_arrays_and_compare():
    pts = np.array([[1.0, 2.0]])
    p = Prompts.make(pts, [1], [0, 0, 5, 5])
    pts[0, 0] = 99  # the layer changes later: the request keeps what was asked
    assert p.points.tolist() == [[1.0, 2.0]]
    assert p.same_as(_p([[1, 2]], box=[0, 0, 5, 5]))
    assert not p.same_as(_p([[1, 2]]))
    assert not p.same_as(_p([[1, 2]], [0], box=[0, 0, 5, 5]))
    assert not p.same_as(None)
    assert _p(np.zeros((0, 2))).empty and not _p(np.zeros((0, 2)), box=[0, 0, 1, 1]).empty


def test_plan_one_click_gives_three_candidates_more_gives_one():
    one = _p([[10, 10]])
    assert plan_decode(one, None, have_logits=False).multimask
    assert not plan_decode(_p([[10, 10], [12, 12]]), None, False).multimask
    assert not plan_decode(_p([[10, 10]], box=[0, 0, 20, 20]), None, False).multimask
    assert not plan_decode(_p(np.zeros((0, 2)), box=[0, 0, 20, 20]), None, False).multimask


def test_plan_refines_only_when_points_were_added():
    first = _p([[10, 10]])
    more = _p([[10, 10], [12, 12]], [1, 0])
    assert plan_decode(more, first, have_logits=True).refine
    assert not plan_decode(more, first, have_logits=False).refine  # nothing to feed back
    assert not plan_decode(first, more, have_logits=True).refine  # a point was removed
    moved = _p([[11, 10], [12, 12]])
    assert not plan_decode(moved, first, have_logits=True).refine
    boxed = _p([[10, 10], [12, 12]], box=[0, 0, 30, 30])
    assert not plan_decode(boxed, first, have_logits=True).refine  # the box changed
    relabelled = _p([[10, 10], [12, 12]], [0, 1])
    assert not plan_decode(relabelled, first, have_logits=True).refine


def test_mask_bbox_and_crop():
    mask = np.zeros((50, 60), dtype=bool)
    assert mask_bbox(mask) is None
    crop, offset = crop_mask(mask)
    assert crop.shape == (0, 0) and offset == (0, 0)
    mask[10:20, 30:33] = True
    mask[25, 5] = True
    rows, cols = mask_bbox(mask)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (10, 26, 5, 33)
    crop, offset = crop_mask(mask)
    assert offset == (10, 5) and crop.shape == (16, 28)
    restored = np.zeros_like(mask)
    restored[10:26, 5:33] = crop
    np.testing.assert_array_equal(restored, mask)


def test_only_the_latest_box_of_the_plane_stays():
    assert superseded_boxes([]) == []
    assert superseded_boxes([True]) == []
    assert superseded_boxes([True, True, True]) == [0, 1]
    # boxes of other planes are theirs to keep
    assert superseded_boxes([True, False, True, False]) == [0]


@pytest.mark.parametrize("width", [1, 2, 5])
def test_render_preview_outline_and_fill(width):
    from scipy import ndimage

    mask = np.zeros((30, 40), dtype=bool)
    mask[3:27, 5:35] = True
    mask[10:15, 12:20] = False  # a hole: it has a border too
    out = P.render_preview(mask, "outline + fill", width)
    assert out.dtype == np.uint8 and out.shape == mask.shape
    inner = ndimage.binary_erosion(mask, np.ones((3, 3)), iterations=width, border_value=0)
    np.testing.assert_array_equal(out == P.OUTLINE, mask & ~inner)
    np.testing.assert_array_equal(out == P.FILL, inner)
    np.testing.assert_array_equal(P.render_preview(mask, "outline", width) > 0, mask & ~inner)
    np.testing.assert_array_equal(P.render_preview(mask, "fill", width), mask * P.FILL)
    assert not P.render_preview(np.zeros((0, 0), bool)).size
    with pytest.raises(ValueError, match="Unknown preview style"):
        P.render_preview(mask, "glow")


def test_preview_colour_differs_from_the_points_and_is_opaque_on_the_outline():
    pytest.importorskip("napari")
    from napari.utils.colormaps.standardize_color import transform_color

    colors = P.preview_colors()
    assert colors[0][3] == 0 and colors[None][3] == 0
    assert colors[P.OUTLINE] == (*P.PREVIEW_RGB, 1.0)
    assert 0 < colors[P.FILL][3] < 1
    for name in (P.POSITIVE_COLOR, P.NEGATIVE_COLOR):
        rgb = transform_color(name)[0][:3]
        assert np.abs(rgb - np.asarray(P.PREVIEW_RGB)).max() > 0.5
    assert P.outline_width((64, 80)) == 1
    assert P.outline_width((8000, 8000)) == 20


def test_key_table_help_and_docs_agree():
    from pathlib import Path

    points = {k.key for k in K.keys_for(K.POINTS)}
    boxes = {k.key for k in K.keys_for(K.BOXES)}
    assert points == {"T", "1", "2", "3", "C", "Enter", "X", "Escape", "G", "Control-Z",
                      "Control-Shift-Z"}
    assert boxes == {"1", "2", "3", "C", "X", "G", "Control-Z", "Control-Shift-Z"}
    # napari's help line for the layers lists the letters that still work, not the digits
    assert "P: add points" in K.layer_help(K.POINTS) and "3" not in K.layer_help(K.POINTS)[-60:]
    assert "R: rectangle" in K.layer_help(K.BOXES)
    # the user guide's keyboard table names every key the widget binds
    guide = (Path(__file__).resolve().parents[2] / "docs" / "user_guide.md").read_text()
    table = guide[guide.index("### Keyboard shortcuts"):guide.index("### Committing")]
    for shown in ("**T**", "**1**, **2**, **3**", "**C**", "**Enter**", "**X**", "**Escape**",
                  "**G**", "**Ctrl+Z**", "**Ctrl+Shift+Z**"):
        assert shown in table, shown


def test_preview_colour_is_far_from_napari_label_colours():
    """The preview never shares its colour with a committed object (napari's default
    label colormap, first 2000 ids)."""
    pytest.importorskip("napari")
    from napari.layers import Labels

    colors = Labels(np.zeros((2, 2), np.uint16)).colormap.map(np.arange(1, 2001))[:, :3]
    distance = np.linalg.norm(colors - np.asarray(P.PREVIEW_RGB), axis=1)
    assert distance.min() > 0.35
