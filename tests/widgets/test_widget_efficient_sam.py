"""The interactive widget with a random-weight EfficientSAM, driven by real clicks and keys.

EfficientSAM has no mask prompt and takes at most 6 points: the widget says so in
its status line, corrections decode all points afresh (no logits fed back), and
beyond 6 points the first and the latest ones are used (the status line and a
warning say which). Run under xvfb-run.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from qtpy.QtCore import Qt  # noqa: E402
from test_widget_keyboard import (  # noqa: E402
    TIMEOUT,
    _blob_image,
    _canvas,
    _mouse_click,
    _press,
    napari_notifications,
)

from napari_sam.engine.predictor import Predictor  # noqa: E402
from napari_sam.widgets._common import process_events_until  # noqa: E402
from reference_utils import build_random_efficient_sam  # noqa: E402

pytestmark = pytest.mark.napari


def test_clicks_with_efficient_sam_points_only_and_the_six_point_limit(make_napari_viewer):
    model = build_random_efficient_sam()
    image = _blob_image()
    viewer = make_napari_viewer(show=True)
    viewer.add_image(image, name="img")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Anything")
    widget.set_model(model, label="EfficientSAM (random)")
    assert widget.wait_for_embedding(TIMEOUT), widget.status.text()
    viewer.reset_view()
    _canvas(viewer).setFocus()
    process_events_until(lambda: False, 0.1)
    assert "refines with points only" in widget.status.text()
    assert "at most 6 points" in widget.status.text()

    direct = Predictor(model)
    direct.set_image(image)
    clicks = [(30, 25, True), (50, 10, False), (10, 70, True), (40, 60, False),
              (20, 40, True), (55, 70, False), (35, 30, True)]
    with napari_notifications() as problems:
        for k, (row, col, positive) in enumerate(clicks, start=1):
            if widget.positive_radio.isChecked() != positive:
                _press(viewer, Qt.Key.Key_T)
            _mouse_click(viewer, widget, row, col)
            request = widget.last_request
            assert request.mask_input is None and not request.refine
            if k == 1:
                assert widget.scores.shape == (3,)
            if k == 2:  # a correction click: both points decoded afresh
                want = direct.predict(points=request.points, labels=request.labels,
                                      multimask=False)
                np.testing.assert_array_equal(widget.preview, want.masks[0])
        assert len(request.points) == 7
        status = widget.status.text()
        assert "at most 6 prompt points" in status and "the first and the latest 5" in status
        keep = [0, 2, 3, 4, 5, 6]
        want = direct.predict(points=request.points[keep], labels=request.labels[keep],
                              multimask=False)
        np.testing.assert_array_equal(widget.preview, want.masks[0])
        chosen = widget.preview.copy()
        _press(viewer, Qt.Key.Key_C)
        np.testing.assert_array_equal(widget.labels_layer.data == 1, chosen & True)
        got = problems()
    # the only notification is the warning about the dropped point; no error
    assert got and all(p.startswith("warning") and "at most 6 prompt points" in p for p in got)


def test_segment_everything_widget_with_efficient_sam(make_napari_viewer):
    from napari_sam.engine.everything import AutomaticMaskGenerator, records_to_labels

    model = build_random_efficient_sam()
    params = dict(points_per_side=4, points_per_batch=8, pred_iou_thresh=0.0,
                  stability_score_thresh=0.0, box_nms_thresh=0.7, crop_n_layers=0,
                  min_mask_region_area=0)
    viewer = make_napari_viewer()
    image = viewer.add_image(_blob_image(), name="img")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Everything")
    widget.set_model(model)
    widget.set_params(**params)
    widget.set_image_layer(image)
    with napari_notifications() as problems:
        assert widget.run() is not None
        assert widget.wait(TIMEOUT)
        assert problems() == []
    layer = widget.result_layer
    assert layer is not None and layer.data.max() >= 1
    records = AutomaticMaskGenerator(model, **params).generate(
        image.data, contrast_limits=image.contrast_limits
    )
    np.testing.assert_array_equal(layer.data, records_to_labels(records, image.data.shape))
