"""The interactive widget driven by real key and mouse events on napari's canvas.

Keys are sent with ``QTest.keyClick`` to the canvas widget, so they go through
napari's whole ``KeymapHandler.on_key_press`` path (the path that failed in napari
0.9.2 on ``functools.partial`` bindings), with napari's notification hooks
installed: an exception anywhere in a key handler becomes an error notification,
and none is allowed. Clicks are real mouse clicks at the canvas position of an
image pixel. Run under xvfb-run (napari canvases need an X display).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import NotificationSeverity, notification_manager  # noqa: E402
from qtpy.QtCore import QPoint, Qt  # noqa: E402
from qtpy.QtTest import QTest  # noqa: E402

from napari_sam.widgets._common import process_events_until  # noqa: E402

pytestmark = pytest.mark.napari

TIMEOUT = 60
CTRL = Qt.KeyboardModifier.ControlModifier
SHIFT = Qt.KeyboardModifier.ShiftModifier


def _blob_image(shape=(64, 80), seed=0):
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    img = 40 + 150 * (((rr - shape[0] / 2) ** 2 + (cc - shape[1] / 3) ** 2) < 150)
    return (img + rng.integers(0, 30, shape)).astype(np.uint8)


@contextlib.contextmanager
def napari_notifications():
    """Install napari's hooks (as the app does) and yield a function that lists the
    warning and error notifications since entering."""
    with notification_manager:
        start = len(notification_manager.records)

        def problems() -> list[str]:
            return [
                f"{n.severity}: {n.message}"
                for n in notification_manager.records[start:]
                if n.severity in (NotificationSeverity.ERROR, NotificationSeverity.WARNING)
            ]

        yield problems


def _canvas(viewer):
    return viewer.window._qt_viewer.canvas.native


def _press(viewer, key, modifier=Qt.KeyboardModifier.NoModifier):
    """A real key press and release on the canvas, then the events it queued."""
    QTest.keyClick(_canvas(viewer), key, modifier)
    process_events_until(lambda: False, 0.05)


def _canvas_point(viewer, world_rc) -> QPoint:
    """Canvas widget position (x, y) of a 2D world position (row, col)."""
    vispy = viewer.window._qt_viewer.canvas
    transform = vispy.view.transform * vispy.view.scene.transform
    x, y = transform.map([float(world_rc[1]), float(world_rc[0])])[:2]
    return QPoint(int(round(x)), int(round(y)))


def _mouse_click(viewer, widget, row, col):
    """Left click on image pixel (row, col), as the user does; waits for the preview."""
    world = widget.image_layer.data_to_world([row, col])
    QTest.mouseClick(_canvas(viewer), Qt.MouseButton.LeftButton, pos=_canvas_point(viewer, world))
    process_events_until(lambda: False, 0.05)
    assert widget.wait_for_prediction(TIMEOUT)


def _open(make_napari_viewer, tiny_sam):
    viewer = make_napari_viewer(show=True)
    viewer.add_image(_blob_image(), name="img")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Anything")
    widget.set_model(tiny_sam)
    assert widget.wait_for_embedding(TIMEOUT), widget.status.text()
    viewer.reset_view()
    _canvas(viewer).setFocus()
    process_events_until(lambda: False, 0.1)
    return viewer, widget


def test_plugin_keys_work_through_napari_key_handling(make_napari_viewer, tiny_sam):
    viewer, widget = _open(make_napari_viewer, tiny_sam)
    pts = widget.points_layer
    assert viewer.layers.selection.active is pts
    with napari_notifications() as problems:
        # T toggles the polarity of the next clicks
        _press(viewer, Qt.Key.Key_T)
        assert widget.negative_radio.isChecked()
        _mouse_click(viewer, widget, 50, 10)
        assert pts.features["positive"].tolist() == [False]
        _press(viewer, Qt.Key.Key_T)
        assert widget.positive_radio.isChecked()
        # X clears, Escape clears
        _press(viewer, Qt.Key.Key_X)
        assert len(pts.data) == 0 and widget.preview is None
        _mouse_click(viewer, widget, 30, 25)
        assert pts.features["positive"].tolist() == [True]
        assert widget.preview is not None
        _press(viewer, Qt.Key.Key_Escape)
        assert len(pts.data) == 0 and widget.preview is None

        # one click: 3 candidates; 1/2/3 choose
        _mouse_click(viewer, widget, 30, 25)
        np.testing.assert_allclose(widget.last_request.points, [[30, 25]], atol=0.6)
        assert widget.scores.shape == (3,)
        for key, index in ((Qt.Key.Key_2, 1), (Qt.Key.Key_3, 2), (Qt.Key.Key_1, 0)):
            _press(viewer, key)
            assert widget.candidate == index
            np.testing.assert_array_equal(widget.preview, widget.masks[index])
        _press(viewer, Qt.Key.Key_2)
        chosen = widget.preview.copy()

        # C commits the chosen candidate and clears the prompts
        _press(viewer, Qt.Key.Key_C)
        labels = widget.labels_layer
        assert labels is not None
        np.testing.assert_array_equal(labels.data == 1, chosen)
        assert len(pts.data) == 0 and widget.preview is None
        assert viewer.layers.selection.active is pts

        # Ctrl+Z on SAM points undoes the commit; Ctrl+Shift+Z redoes it
        _press(viewer, Qt.Key.Key_Z, CTRL)
        assert not labels.data.any()
        assert viewer.layers.selection.active is pts
        _press(viewer, Qt.Key.Key_Z, CTRL | SHIFT)
        np.testing.assert_array_equal(labels.data == 1, chosen)

        # Enter commits too
        _mouse_click(viewer, widget, 10, 70)
        second = widget.preview & (labels.data == 0)
        _press(viewer, Qt.Key.Key_Return)
        np.testing.assert_array_equal(labels.data == 2, second)
        assert problems() == []


def test_napari_keys_still_work_on_the_prompt_layers(make_napari_viewer, tiny_sam):
    viewer, widget = _open(make_napari_viewer, tiny_sam)
    pts, boxes = widget.points_layer, widget.boxes_layer
    with napari_notifications() as problems:
        # napari's own keys on SAM points: S select, Z pan/zoom, P add
        _press(viewer, Qt.Key.Key_S)
        assert pts.mode == "select"
        _press(viewer, Qt.Key.Key_Z)
        assert pts.mode == "pan_zoom"
        _press(viewer, Qt.Key.Key_P)
        assert pts.mode == "add"
        # Space (hold to pan) and the arrow keys pass through without error
        _press(viewer, Qt.Key.Key_Space)
        _press(viewer, Qt.Key.Key_Up)
        assert pts.mode == "add"
        # the help line advertises the keys that work, not the digits the plugin rebinds
        assert "P: add points" in viewer.help and "use <3>" not in viewer.help
        _press(viewer, Qt.Key.Key_S)  # a mode change makes napari rewrite the help line
        assert "T: +/- polarity" in viewer.help and "use <2>" not in viewer.help
        _press(viewer, Qt.Key.Key_P)
        assert pts.mode == "add", pts.mode

        # the widget's box button selects SAM boxes in rectangle mode
        QTest.mouseClick(widget.box_radio, Qt.MouseButton.LeftButton)
        assert viewer.layers.selection.active is boxes
        assert boxes.mode == "add_rectangle"
        _press(viewer, Qt.Key.Key_S)
        assert boxes.mode == "select"
        _press(viewer, Qt.Key.Key_R)
        assert boxes.mode == "add_rectangle"
        assert "R: rectangle" in viewer.help

        # plugin keys on SAM boxes: a box gives one mask; C commits, X clears, Ctrl+Z undoes
        boxes.add_rectangles(np.array([[20, 10], [45, 45]]))
        assert widget.wait_for_prediction(TIMEOUT)
        assert widget.preview is not None and widget.scores.shape == (1,)
        _press(viewer, Qt.Key.Key_3)  # no third candidate: a message, no error
        assert widget.candidate == 0
        mask = widget.preview.copy()
        _press(viewer, Qt.Key.Key_C)
        labels = widget.labels_layer
        np.testing.assert_array_equal(labels.data == 1, mask)
        assert boxes.nshapes == 0
        assert viewer.layers.selection.active is boxes
        _press(viewer, Qt.Key.Key_Z, CTRL)
        assert not labels.data.any()
        boxes.add_rectangles(np.array([[20, 10], [45, 45]]))
        assert widget.wait_for_prediction(TIMEOUT)
        _press(viewer, Qt.Key.Key_X)
        assert boxes.nshapes == 0 and widget.preview is None

        # back to points with the widget's button
        QTest.mouseClick(widget.points_radio, Qt.MouseButton.LeftButton)
        assert viewer.layers.selection.active is pts and pts.mode == "add"
        assert problems() == []


def test_keys_on_other_layers_are_napari_s(make_napari_viewer, tiny_sam):
    """The plugin binds its keys on its own layers only: C on the image is napari's."""
    viewer, widget = _open(make_napari_viewer, tiny_sam)
    image = widget.image_layer
    with napari_notifications() as problems:
        _mouse_click(viewer, widget, 30, 25)
        viewer.layers.selection.active = image
        _press(viewer, Qt.Key.Key_C)  # napari: auto-contrast once
        _press(viewer, Qt.Key.Key_X)
        assert widget.labels_layer is None  # nothing was committed
        assert len(widget.points_layer.data) == 1  # nor cleared
        viewer.layers.selection.active = widget.points_layer
        assert widget.wait_for_embedding(TIMEOUT) and widget.wait_for_prediction(TIMEOUT)
        _press(viewer, Qt.Key.Key_C)
        assert widget.labels_layer is not None and widget.labels_layer.data.max() == 1
        assert problems() == []


def test_closing_the_widget_unbinds_its_keys(make_napari_viewer, tiny_sam):
    viewer, widget = _open(make_napari_viewer, tiny_sam)
    pts = widget.points_layer
    widget.shutdown()
    with napari_notifications() as problems:
        _press(viewer, Qt.Key.Key_3)  # napari's select mode again
        assert pts.mode == "select"
        assert problems() == []


def test_ctrl_z_after_napari_mode_keys_leaves_the_mode_alone(make_napari_viewer, tiny_sam):
    """napari replays the release callback of a key's previous press: Ctrl+Z after Z
    (pan/zoom) must not run napari's "back to the previous mode" of that Z press."""
    viewer, widget = _open(make_napari_viewer, tiny_sam)
    pts = widget.points_layer
    with napari_notifications() as problems:
        _press(viewer, Qt.Key.Key_S)
        _press(viewer, Qt.Key.Key_Z)
        _press(viewer, Qt.Key.Key_P)
        assert pts.mode == "add"
        _mouse_click(viewer, widget, 30, 25)
        _press(viewer, Qt.Key.Key_C)
        assert widget.labels_layer.data.any()
        _press(viewer, Qt.Key.Key_Z, CTRL)
        assert not widget.labels_layer.data.any()
        assert pts.mode == "add"
        assert problems() == []


def _mouse_drag(viewer, widget, start_rc, end_rc, steps=5):
    """Press, move and release the left button between two image pixels, as a drag does."""
    from qtpy.QtCore import QPointF
    from qtpy.QtGui import QMouseEvent
    from qtpy.QtWidgets import QApplication

    canvas = _canvas(viewer)
    image = widget.image_layer
    a = _canvas_point(viewer, image.data_to_world(start_rc))
    b = _canvas_point(viewer, image.data_to_world(end_rc))
    QTest.mousePress(canvas, Qt.MouseButton.LeftButton, pos=a)
    for k in range(1, steps + 1):
        p = QPointF(a.x() + (b.x() - a.x()) * k / steps, a.y() + (b.y() - a.y()) * k / steps)
        move = QMouseEvent(
            QMouseEvent.Type.MouseMove, p, canvas.mapToGlobal(p), Qt.MouseButton.NoButton,
            Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
        )
        QApplication.sendEvent(canvas, move)
        process_events_until(lambda: False, 0.02)
    QTest.mouseRelease(canvas, Qt.MouseButton.LeftButton, pos=b)
    process_events_until(lambda: False, 0.1)


def test_box_mode_button_and_drawn_rectangles(make_napari_viewer, tiny_sam):
    """Box prompts are drawn with the mouse after the widget's box button; a newer
    rectangle replaces the older one; Undo undoes a commit without changing layers."""
    viewer, widget = _open(make_napari_viewer, tiny_sam)
    boxes = widget.boxes_layer
    with napari_notifications() as problems:
        QTest.mouseClick(widget.box_radio, Qt.MouseButton.LeftButton)
        assert viewer.layers.selection.active is boxes and boxes.mode == "add_rectangle"
        _mouse_drag(viewer, widget, (5, 5), (40, 40))
        assert boxes.nshapes == 1
        assert widget.wait_for_prediction(TIMEOUT)
        np.testing.assert_allclose(widget.last_request.box, [5, 5, 40, 40], atol=1)
        _mouse_drag(viewer, widget, (20, 30), (60, 75))
        process_events_until(lambda: boxes.nshapes == 1, 5)
        assert boxes.nshapes == 1  # the older rectangle is gone
        assert widget.wait_for_prediction(TIMEOUT)
        np.testing.assert_allclose(widget.last_request.box, [20, 30, 60, 75], atol=1)
        mask = widget.preview.copy()
        QTest.mouseClick(widget.commit_button, Qt.MouseButton.LeftButton)
        labels = widget.labels_layer
        np.testing.assert_array_equal(labels.data == 1, mask)
        assert viewer.layers.selection.active is boxes
        QTest.mouseClick(widget.undo_button, Qt.MouseButton.LeftButton)
        assert not labels.data.any()
        assert viewer.layers.selection.active is boxes
        # selecting SAM points in the layer list switches the buttons back
        viewer.layers.selection.active = widget.points_layer
        assert widget.points_radio.isChecked() and widget.prompt_mode == "points"
        assert problems() == []
