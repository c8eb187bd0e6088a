"""Stacks in the interactive widget, driven as a user does: real clicks and key presses on
napari's canvas (with napari's notification hooks: no error or warning allowed), real
files in tmp_path. Run under xvfb-run.

The model is the tiny random one; where the masks must be right, its decoder is replaced
by a stand-in that segments the bright connected part under the prompt (the
encoder still runs, so embeddings, the cache and the store are real). The synthetic
volume is a bright ellipsoid on a dark background.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("napari")

from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtTest import QTest  # noqa: E402
from scipy import ndimage  # noqa: E402
from test_widget_keyboard import (  # noqa: E402
    CTRL,
    SHIFT,
    _canvas,
    _canvas_point,
    _press,
    napari_notifications,
)

from napari_sam.engine.predictor import Prediction, Predictor  # noqa: E402
from napari_sam.widgets._common import process_events_until  # noqa: E402

pytestmark = pytest.mark.napari

TIMEOUT = 60
SHAPE = (9, 48, 56)  # (z, y, x)


def ellipsoid(shape=SHAPE, centre=(4, 22, 26), radii=(3.6, 12, 15)) -> np.ndarray:
    """(Z, Y, X) bool ellipsoid."""
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    return ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + (
        (xx - centre[2]) / radii[2]) ** 2 <= 1


def volume(obj: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (30 + 180 * obj + rng.integers(0, 20, obj.shape)).astype(np.uint8)


@pytest.fixture
def threshold_decoder(monkeypatch):
    """Replace the decoder: a prompt gets the bright connected part under its first
    positive point (else the part the box overlaps most). Encoder outputs are
    remembered with their plane, so the stand-in sees the plane it predicts on.
    Returns a dict whose ``"delay"`` (s) slows every prediction down."""
    planes: dict[bytes, np.ndarray] = {}
    state = {"delay": 0.0}
    encode = Predictor.compute_embedding

    def compute_embedding(self, rgb):
        out = encode(self, rgb)
        planes[out.detach().cpu().numpy().tobytes()] = np.asarray(rgb[..., 0]) > 128
        return out

    def predict(self, points=None, labels=None, box=None, mask_input=None, multimask=True,
                **_):
        time.sleep(state["delay"])
        bright = planes[self.features.detach().cpu().numpy().tobytes()]
        parts, _n = ndimage.label(bright)
        part = 0
        if points is not None and len(points):
            pos = np.asarray(points)[np.asarray(labels) > 0] if labels is not None else points
            if len(pos):
                r, c = np.clip(np.round(pos[0]).astype(int), 0, np.array(bright.shape) - 1)
                part = parts[r, c]
        if not part and box is not None:
            r0, c0, r1, c1 = np.round(box).astype(int)
            inside = parts[r0:r1 + 1, c0:c1 + 1]
            counts = np.bincount(inside.ravel(), minlength=2)[1:]
            part = int(np.argmax(counts)) + 1 if counts.any() else 0
        mask = (parts == part) if part else np.zeros_like(bright)
        n = 3 if multimask else 1
        e4 = 4 * self.features.shape[-1]
        return Prediction(np.repeat(mask[None], n, 0), np.full(n, 0.95, np.float32),
                          np.zeros((n, e4, e4), np.float32))

    monkeypatch.setattr(Predictor, "compute_embedding", compute_embedding)
    monkeypatch.setattr(Predictor, "predict", predict)
    return state


def _open_widget(viewer, tiny_sam):
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Anything")
    widget.set_model(tiny_sam)
    assert widget.wait_for_embedding(TIMEOUT), widget.status.text()
    viewer.reset_view()
    _canvas(viewer).setFocus()
    process_events_until(lambda: False, 0.1)
    return widget


def _mouse_click(viewer, widget, row, col):
    """Left click on pixel (row, col) of the shown plane, as the user does; waits for the
    preview."""
    layer = widget.image_layer
    world = layer.data_to_world([*widget.slice_index, row, col])[-2:]
    QTest.mouseClick(_canvas(viewer), Qt.MouseButton.LeftButton, pos=_canvas_point(viewer, world))
    process_events_until(lambda: False, 0.05)
    assert widget.wait_for_prediction(TIMEOUT)
    np.testing.assert_allclose(widget.last_request.points[-1], [row, col], atol=0.75)


def _goto(viewer, widget, axis, index):
    """Move the slider of ``axis`` to data index ``index`` (as dragging it does)."""
    layer = widget.image_layer
    point = list(viewer.dims.point)
    world = layer.data_to_world([index if a == axis else 0 for a in range(layer.ndim)])
    point[axis] = world[axis]
    viewer.dims.point = point
    process_events_until(lambda: False, 0.05)
    assert widget.wait_for_embedding(TIMEOUT), widget.status.text()


def test_g_propagates_through_z_and_one_commit_one_undo(make_napari_viewer, tiny_sam,
                                                          threshold_decoder):
    """Click in plane 4 of an anisotropic stack, G, scroll, C, Ctrl+Z, Ctrl+Shift+Z."""
    obj = ellipsoid()
    viewer = make_napari_viewer(show=True)
    viewer.add_image(volume(obj), name="vol", scale=(4, 1, 0.5), translate=(0, 10, -5),
                     contrast_limits=(0, 255))
    widget = _open_widget(viewer, tiny_sam)
    _goto(viewer, widget, 0, 4)
    assert widget.slice_index == (4,)
    assert widget.stack.axis_combo.currentText() == "axis 0: 9 planes"
    with napari_notifications() as problems:
        _mouse_click(viewer, widget, 22, 26)  # world: (row 22 -> 32, col 26 -> 8)
        np.testing.assert_array_equal(widget.preview, obj[4])
        _press(viewer, Qt.Key.Key_G)
        assert widget.stack.running == "propagate"
        assert widget.wait_for_propagation(TIMEOUT), widget.status.text()
        assert "computed on demand" in widget.status.text()
        found = widget.propagated
        assert found is not None and found.extent == (1, 7)
        assert found.result.stopped == {"forward": "empty", "backward": "empty"}
        # the preview layer shows every plane of the object, on the image's voxels
        preview, image = widget.preview_layer, widget.image_layer
        assert preview.data.ndim == 3 and preview.data.shape[0] == 7
        for corner in ([0, 0, 0], [1, 2, 3]):
            np.testing.assert_allclose(
                preview.data_to_world(corner),
                image.data_to_world(np.add(found.offset, corner)), atol=1e-9)
        # scrolling through z keeps the 3D preview
        _goto(viewer, widget, 0, 2)
        assert widget.propagated is found
        _press(viewer, Qt.Key.Key_C)
        labels = widget.labels_layer
        assert labels is not None and widget.propagated is None
        np.testing.assert_array_equal(labels.data == 1, obj)
        assert set(np.unique(labels.data)) == {0, 1}
        # one undo removes the whole 3D object; one redo brings it back
        _press(viewer, Qt.Key.Key_Z, CTRL)
        assert not labels.data.any()
        _press(viewer, Qt.Key.Key_Z, CTRL | SHIFT)
        np.testing.assert_array_equal(labels.data == 1, obj)
        assert problems() == []


def test_tracking_along_t_keeps_the_id_and_the_axis_is_chosen(make_napari_viewer, tiny_sam,
                                                                threshold_decoder):
    """A (t, z, y, x) image: the default axis is t (the first non-displayed); the user
    picks z in the box instead, then t: each object keeps one id on every plane."""
    n_t = 5
    frames = np.stack([ellipsoid(centre=(4, 22, 14 + 5 * t)) for t in range(n_t)])
    viewer = make_napari_viewer(show=True)
    viewer.add_image(volume(frames), name="movie", contrast_limits=(0, 255),
                     axis_labels=("t", "z", "y", "x"))
    widget = _open_widget(viewer, tiny_sam)
    combo = widget.stack.axis_combo
    assert [combo.itemText(i) for i in range(combo.count())] == [
        "axis 0 (t): 5 planes", "axis 1 (z): 9 planes"]
    assert combo.currentIndex() == 0
    _goto(viewer, widget, 0, 2)
    _goto(viewer, widget, 1, 4)
    assert widget.slice_index == (2, 4)
    with napari_notifications() as problems:
        combo.setCurrentIndex(1)  # z
        _mouse_click(viewer, widget, 22, 24)
        QTest.mouseClick(widget.stack.propagate_button, Qt.MouseButton.LeftButton)
        assert widget.wait_for_propagation(TIMEOUT), widget.status.text()
        first = widget.commit()
        labels = widget.labels_layer.data
        np.testing.assert_array_equal(labels == first, np.eye(n_t, dtype=bool)[2][
            :, None, None, None] & frames)
        combo.setCurrentIndex(0)  # t: track the object of plane z = 4 through time
        _goto(viewer, widget, 1, 4)
        _mouse_click(viewer, widget, 22, 24)
        widget.overwrite_check.setChecked(True)
        _press(viewer, Qt.Key.Key_G)
        assert widget.wait_for_propagation(TIMEOUT), widget.status.text()
        assert widget.propagated.extent == (0, n_t - 1)
        second = widget.commit()
        assert second == first + 1
        track = widget.labels_layer.data[:, 4] == second
        np.testing.assert_array_equal(track, frames[:, 4])  # the drifting blob, one id
        assert problems() == []


def test_cancel_leaves_no_partial_commit(make_napari_viewer, tiny_sam, threshold_decoder):
    obj = ellipsoid()
    viewer = make_napari_viewer(show=True)
    viewer.add_image(volume(obj), name="vol", contrast_limits=(0, 255))
    widget = _open_widget(viewer, tiny_sam)
    _goto(viewer, widget, 0, 4)
    with napari_notifications() as problems:
        _mouse_click(viewer, widget, 22, 26)
        threshold_decoder["delay"] = 0.3
        _press(viewer, Qt.Key.Key_G)
        assert process_events_until(lambda: widget.stack.progress.value() >= 2, TIMEOUT)
        assert widget.commit() == 0  # not while it runs
        QTest.mouseClick(widget.stack.cancel_button, Qt.MouseButton.LeftButton)
        assert widget.wait_for_propagation(TIMEOUT)
        assert "cancelled" in widget.status.text() and widget.propagated is None
        assert widget.labels_layer is None  # nothing was written
        threshold_decoder["delay"] = 0.0
        # the 2D preview is still there: C commits that plane only
        _press(viewer, Qt.Key.Key_C)
        data = widget.labels_layer.data
        np.testing.assert_array_equal(data[4] == 1, obj[4])
        assert not np.delete(data, 4, axis=0).any()
        assert problems() == []


def test_a_committed_object_is_extended_keeping_its_id(make_napari_viewer, tiny_sam,
                                                         threshold_decoder):
    """No preview: the selected label of the labels layer, on the shown plane, is the seed."""
    obj = ellipsoid()
    viewer = make_napari_viewer(show=True)
    viewer.add_image(volume(obj), name="vol", contrast_limits=(0, 255))
    labels = viewer.add_labels(np.zeros(SHAPE, np.uint16), name="mine")
    rows, cols = np.nonzero(obj[4])
    labels.data_setitem((np.full(rows.shape, 4), rows, cols), 7)  # the user's object 7, plane 4
    widget = _open_widget(viewer, tiny_sam)
    widget.set_labels_layer(labels)
    _goto(viewer, widget, 0, 4)
    labels.selected_label = 7
    viewer.layers.selection.active = widget.points_layer
    with napari_notifications() as problems:
        _press(viewer, Qt.Key.Key_G)
        assert widget.wait_for_propagation(TIMEOUT), widget.status.text()
        assert widget.commit() == 7
        np.testing.assert_array_equal(labels.data == 7, obj)
        widget.undo()
        np.testing.assert_array_equal(labels.data == 7, obj & (np.arange(9) == 4)[:, None, None])
        assert problems() == []


def test_a_3d_view_and_back_resumes_prompting_on_a_stack(make_napari_viewer, tiny_sam,
                                                         threshold_decoder):
    obj = ellipsoid()
    viewer = make_napari_viewer(show=True)
    viewer.add_image(volume(obj), name="vol", scale=(3, 1, 1), contrast_limits=(0, 255))
    widget = _open_widget(viewer, tiny_sam)
    _goto(viewer, widget, 0, 4)
    with napari_notifications() as problems:
        _mouse_click(viewer, widget, 22, 26)
        _press(viewer, Qt.Key.Key_G)
        assert widget.wait_for_propagation(TIMEOUT)
        viewer.dims.ndisplay = 3  # look at the 3D preview
        process_events_until(lambda: False, 0.2)
        assert widget.propagated is not None and widget.preview_layer.data.ndim == 3
        viewer.dims.ndisplay = 2
        assert widget.wait_for_embedding(TIMEOUT), widget.status.text()
        process_events_until(lambda: False, 0.2)
        assert widget.points_layer.mode == "add"
        _goto(viewer, widget, 0, 4)  # (napari may leave the slider elsewhere after 3D)
        _press(viewer, Qt.Key.Key_X)  # discard, then prompt again
        assert widget.propagated is None
        _mouse_click(viewer, widget, 22, 26)
        np.testing.assert_array_equal(widget.preview, obj[4])
        # roll the axes and back: prompting resumes too
        order = tuple(viewer.dims.order)
        viewer.dims.roll()
        process_events_until(lambda: False, 0.1)
        assert not widget.ready
        while tuple(viewer.dims.order) != order:
            viewer.dims.roll()
        assert widget.wait_for_embedding(TIMEOUT), widget.status.text()
        _press(viewer, Qt.Key.Key_X)
        _mouse_click(viewer, widget, 22, 26)
        np.testing.assert_array_equal(widget.preview, obj[4])
        assert problems() == []


def test_precompute_stores_beside_the_file_and_a_new_widget_reads_it(
        make_napari_viewer, tiny_sam, tmp_path, monkeypatch):
    obj = ellipsoid(shape=(4, 40, 48), centre=(2, 20, 24), radii=(2, 10, 12))
    path = tmp_path / "stack.npy"
    np.save(path, volume(obj))
    viewer = make_napari_viewer(show=True)
    viewer.open(str(path), plugin="napari")
    widget = _open_widget(viewer, tiny_sam)
    with napari_notifications() as problems:
        QTest.mouseClick(widget.stack.precompute_button, Qt.MouseButton.LeftButton)
        assert widget.stack.running == "precompute"
        assert widget.wait_for_propagation(TIMEOUT), widget.status.text()
        store = tmp_path / "stack.npy.sam.zarr"
        assert store.is_dir()
        assert "beside the image" in widget.status.text() and str(store) in widget.status.text()
        assert problems() == []

    # a new viewer and widget: the store is found and read; the encoder must not run
    def no_encoder(self, rgb):
        raise AssertionError("the encoder ran although the store holds this plane")

    monkeypatch.setattr(Predictor, "compute_embedding", no_encoder)
    viewer2 = make_napari_viewer(show=True)
    viewer2.open(str(path), plugin="napari")
    with napari_notifications() as problems:
        widget2 = _open_widget(viewer2, tiny_sam)
        assert f"reading embeddings from {store}" in widget2.status.text()
        _goto(viewer2, widget2, 0, 3)
        _mouse_click(viewer2, widget2, 20, 24)
        assert widget2.masks is not None  # a prediction appeared
        _press(viewer2, Qt.Key.Key_G)  # every plane comes from the store
        assert widget2.wait_for_propagation(TIMEOUT), widget2.status.text()
        assert widget2.propagated is not None
        assert "computed on demand" not in widget2.status.text()
        assert problems() == []


def test_precompute_without_a_file_uses_the_cache_folder_cancel_and_resume(
        make_napari_viewer, tiny_sam, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path))
    viewer = make_napari_viewer(show=True)
    viewer.add_image(volume(ellipsoid(shape=(6, 32, 32), centre=(2, 16, 16), radii=(2, 8, 8))),
                     name="in memory")
    widget = _open_widget(viewer, tiny_sam)
    encode = Predictor.compute_embedding

    def slow(self, rgb):
        time.sleep(0.3)
        return encode(self, rgb)

    with napari_notifications() as problems:
        monkeypatch.setattr(Predictor, "compute_embedding", slow)
        assert widget.precompute()
        assert process_events_until(lambda: widget.stack.progress.value() >= 1, TIMEOUT)
        QTest.mouseClick(widget.stack.cancel_button, Qt.MouseButton.LeftButton)
        assert widget.wait_for_propagation(TIMEOUT)
        assert "cancelled" in widget.status.text() and "kept" in widget.status.text()
        assert widget._predictor.store is None
        monkeypatch.setattr(Predictor, "compute_embedding", encode)
        assert widget.precompute()  # resumes: only the missing planes are computed
        assert widget.wait_for_propagation(TIMEOUT), widget.status.text()
        assert "of 6 embeddings computed" in widget.status.text()
        assert "6 of 6" not in widget.status.text()
        stores = list((tmp_path / "embeddings").glob("in_memory-*.sam.zarr"))
        assert len(stores) == 1
        assert "napari-sam cache folder" in widget.status.text()
        assert widget._predictor.store is not None
        assert problems() == []
