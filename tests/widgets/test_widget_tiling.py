"""The interactive widget on a large image: native-scale tiles by itself, said in its status
line, and a switch that turns them off (issue 15, item 3). Real viewer, real clicks on the
canvas and on the check box; run under xvfb-run.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from qtpy.QtCore import QPoint, Qt  # noqa: E402
from qtpy.QtTest import QTest  # noqa: E402
from test_widget_keyboard import (  # noqa: E402
    TIMEOUT,
    _canvas,
    _mouse_click,
    _press,
    napari_notifications,
)

from napari_sam.engine.predictor import Predictor  # noqa: E402
from napari_sam.engine.tiled import TiledEmbedding  # noqa: E402
from napari_sam.widgets._common import process_events_until  # noqa: E402

pytestmark = pytest.mark.napari


def _large_image(size=300, seed=0):
    """Bright discs on a noisy background, longer than 2 x the tiny model's 128 px input."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:size, :size]
    img = 40 + rng.integers(0, 30, (size, size))
    for r, c in ((60, 70), (150, 160), (240, 90)):
        img[(rr - r) ** 2 + (cc - c) ** 2 < 15 ** 2] = 200
    return img.astype(np.uint8)


def _click_box(check):
    """A left click on a check box's indicator (its left end: the box may be wider than
    its text), then the events it queued."""
    QTest.mouseClick(check, Qt.MouseButton.LeftButton, pos=QPoint(8, check.height() // 2))
    process_events_until(lambda: False, 0.05)


def test_large_image_is_tiled_by_itself_said_in_the_status_and_switched_off(
    make_napari_viewer, tiny_sam
):
    image = _large_image()
    viewer = make_napari_viewer(show=True)
    viewer.add_image(image, name="big")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Anything")
    widget.set_model(tiny_sam)
    assert widget.wait_for_embedding(TIMEOUT), widget.status.text()
    viewer.reset_view()
    _canvas(viewer).setFocus()
    process_events_until(lambda: False, 0.1)

    with napari_notifications() as problems:
        # on by default: 16 native-scale tiles, and the status line says so
        assert widget.tiling_check.isChecked()
        assert isinstance(widget._entry, TiledEmbedding)
        assert "Large image tiled: 16 tiles of 128 px at native scale" in widget.status.text()
        _mouse_click(viewer, widget, 150, 160)
        assert "Candidate" in widget.status.text()
        assert "Predicted in tile" in widget.status.text()
        clicked = widget.last_request.points
        direct = Predictor(tiny_sam, tiling="auto")
        direct.set_image(image)
        np.testing.assert_array_equal(widget.masks, direct.predict(points=clicked).masks)

        # the switch, clicked as the user does: the plane is embedded whole and the same
        # click predicted again on it
        hits = widget.cache.hits
        _click_box(widget.tiling_check)
        assert not widget.tiling_check.isChecked()
        assert widget.wait_for_embedding(TIMEOUT), widget.status.text()
        assert widget.wait_for_prediction(TIMEOUT)
        assert widget._predictor.tiling == "off" and not isinstance(widget._entry, TiledEmbedding)
        whole = Predictor(tiny_sam)
        whole.set_image(image)
        np.testing.assert_array_equal(widget.masks, whole.predict(points=clicked).masks)
        assert "Candidate" in widget.status.text()
        assert "Predicted in tile" not in widget.status.text()
        _press(viewer, Qt.Key.Key_X)  # clear: the status line says what the plane is
        assert widget.preview is None
        assert "Large image embedded whole (tiling is off)" in widget.status.text()

        # back on: the tiles come from the cache, not from the encoder again
        _click_box(widget.tiling_check)
        assert widget.wait_for_embedding(TIMEOUT), widget.status.text()
        assert isinstance(widget._entry, TiledEmbedding)
        assert widget.cache.hits >= hits + 16
        assert "Large image tiled" in widget.status.text()
        assert problems() == []


def test_a_small_image_is_never_tiled_and_says_nothing_about_tiles(make_napari_viewer, tiny_sam):
    viewer = make_napari_viewer()
    viewer.add_image(_large_image(size=200), name="small")  # <= 2 x 128
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Anything")
    widget.set_model(tiny_sam)
    assert widget.wait_for_embedding(TIMEOUT), widget.status.text()
    assert not isinstance(widget._entry, TiledEmbedding)
    assert "tile" not in widget.status.text().lower()
    widget.set_tiling(False)
    assert widget.wait_for_embedding(TIMEOUT)
    assert "tile" not in widget.status.text().lower()


def test_a_stale_tiled_embedding_run_stops_between_tiles(tiny_sam):
    """The embedding worker polls the scheduler's staleness between tiles: a run that a newer
    request made stale stops instead of embedding the remaining tiles."""
    from napari_sam.errors import CancelledError
    from napari_sam.widgets._embedding import EmbedJob, _embed_plane

    image = _large_image()
    predictor = Predictor(tiny_sam, tiling="auto")
    runs = []
    hook = tiny_sam.image_encoder.register_forward_hook(lambda *_: runs.append(1))
    try:
        job = EmbedJob(image, (), None, predictor)
        polls = []
        with pytest.raises(CancelledError):
            _embed_plane(job, lambda: polls.append(1) or len(polls) > 3)
        assert len(runs) == 3  # three tiles, then the run saw it was stale
        assert isinstance(_embed_plane(job, lambda: False), TiledEmbedding)
        assert len(runs) == 16  # the 3 embedded tiles came from the cache
    finally:
        hook.remove()
