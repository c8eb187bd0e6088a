"""PromptLayers (the interactive widget's own layers) on its own, in a real viewer.

No model and no widget: the layers are edited as a user edits them (points added to the
Points layer, rectangles drawn into the Shapes layer, layers added and deleted in the
layer list, keys pressed on the canvas), and what PromptLayers reports back is recorded.
Run under xvfb-run (napari canvases need an X display).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtTest import QTest  # noqa: E402

from napari_sam.widgets._common import process_events_until  # noqa: E402
from napari_sam.widgets._prompt_layers import (  # noqa: E402
    BOXES_NAME,
    POINTS_NAME,
    PREVIEW_NAME,
    PROMPT_BOX,
    PROMPT_POINTS,
    PromptLayers,
)
from napari_sam.widgets.keys import keys_for  # noqa: E402

pytestmark = pytest.mark.napari


def _pump(seconds=0.05):
    process_events_until(lambda: False, seconds)


class _Owner:
    """Stands in for the widget: the plane it shows and what PromptLayers told it."""

    def __init__(self, image, slice_index=()):
        self.image = image
        self.slice_index = slice_index
        self.changes = 0
        self.keys: list[tuple[str, int | None]] = []
        self.modes: list[str] = []

    def plane(self):
        return self.image, self.slice_index

    def on_change(self):
        self.changes += 1

    def on_key(self, action, argument):
        self.keys.append((action, argument))

    def on_mode(self, mode):
        self.modes.append(mode)


def _setup(make_napari_viewer, **transform):
    """A viewer with a 40 x 60 image ``img`` (``transform``: its scale, translate...) and
    PromptLayers made for it; returns (viewer, image, owner, layers)."""
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((40, 60), np.uint8), name="img", **transform)
    owner = _Owner(image)
    layers = PromptLayers(viewer, owner.plane, owner.on_change, owner.on_key, owner.on_mode)
    layers.ensure(image, ())
    return viewer, image, owner, layers


def _names(viewer):
    return [layer.name for layer in viewer.layers]


def test_layers_are_created_on_top_and_follow_the_image_transform(make_napari_viewer):
    viewer, image, owner, layers = _setup(make_napari_viewer, scale=(2, 0.5), translate=(3, 4))
    assert _names(viewer) == ["img", PREVIEW_NAME, BOXES_NAME, POINTS_NAME]
    assert viewer.layers.selection.active is layers.points
    assert layers.points.mode == "add" and layers.boxes.mode == "add_rectangle"
    np.testing.assert_allclose(layers.points.scale, image.scale)
    np.testing.assert_allclose(layers.boxes.translate, image.translate)

    # the image moves: ensure re-fits the same layers
    points = layers.points
    image.translate = (10, 20)
    layers.ensure(image, ())
    assert layers.points is points
    np.testing.assert_allclose(points.translate, (10, 20))


def test_a_clicked_point_is_a_prompt_in_image_pixels(make_napari_viewer):
    viewer, image, owner, layers = _setup(make_napari_viewer, scale=(2, 0.5), translate=(3, 4))
    # a user's click adds a point at a world position; the layer stores its data coords
    world = image.data_to_world([12, 30])
    layers.points.add(layers.points.world_to_data(world))
    _pump()
    assert owner.changes == 1
    prompts = layers.prompts()
    np.testing.assert_allclose(prompts.points, [[12, 30]])
    np.testing.assert_array_equal(prompts.labels, [1])

    # negative next: the next click is background
    layers.set_polarity(False)
    layers.points.add(layers.points.world_to_data(image.data_to_world([5, 6])))
    _pump()
    assert owner.changes == 2
    np.testing.assert_array_equal(layers.prompts().labels, [1, 0])

    layers.clear_data()
    assert layers.prompts().empty


def test_only_the_latest_rectangle_stays(make_napari_viewer):
    viewer, image, owner, layers = _setup(make_napari_viewer)
    layers.boxes.add_rectangles(np.array([[2, 3], [10, 12]]))
    _pump()
    layers.boxes.add_rectangles(np.array([[5, 6], [30, 40]]))
    process_events_until(lambda: layers.boxes.nshapes == 1, 5)
    assert layers.boxes.nshapes == 1
    assert owner.changes >= 2
    np.testing.assert_allclose(layers.prompts().box, [5, 6, 30, 40])


def test_new_layers_go_below_and_deleted_ones_come_back(make_napari_viewer):
    viewer, image, owner, layers = _setup(make_napari_viewer)
    viewer.add_image(np.ones((40, 60), np.uint8), name="other")
    process_events_until(lambda: _names(viewer)[-1] == POINTS_NAME, 5)
    assert _names(viewer) == ["img", "other", PREVIEW_NAME, BOXES_NAME, POINTS_NAME]

    viewer.layers.remove(layers.points)
    assert layers.points is None and layers.missing()
    layers.ensure(image, ())
    assert layers.points is not None and POINTS_NAME in _names(viewer)
    assert _names(viewer)[-1] == POINTS_NAME


def test_selecting_a_prompt_layer_sets_the_mode(make_napari_viewer):
    viewer, image, owner, layers = _setup(make_napari_viewer)
    viewer.layers.selection.active = layers.boxes
    assert layers.mode == PROMPT_BOX and owner.modes[-1] == PROMPT_BOX
    viewer.layers.selection.active = layers.points
    assert layers.mode == PROMPT_POINTS and owner.modes[-1] == PROMPT_POINTS
    layers.set_mode(PROMPT_BOX)
    layers.select_prompt_layer(plane_shown=True)
    assert viewer.layers.selection.active is layers.boxes


def test_keys_on_the_canvas_reach_the_owner_until_closed(make_napari_viewer):
    viewer, image, owner, layers = _setup(make_napari_viewer)
    canvas = viewer.window._qt_viewer.canvas.native
    commit = next(k for k in keys_for("points") if k.action == "commit")
    assert commit.key.lower() == "c"
    QTest.keyClick(canvas, Qt.Key.Key_C)
    _pump()
    assert owner.keys == [("commit", None)]

    layers.close()
    QTest.keyClick(canvas, Qt.Key.Key_C)
    _pump()
    assert owner.keys == [("commit", None)]  # unbound: nothing more


def test_layers_do_not_keep_their_owner_alive(make_napari_viewer):
    import gc
    import weakref

    viewer, image, owner, layers = _setup(make_napari_viewer)
    ref = weakref.ref(owner)
    del owner
    gc.collect()
    assert ref() is None
    layers.points.add([[3, 4]])  # an edit after the owner is gone: no error
    _pump()
