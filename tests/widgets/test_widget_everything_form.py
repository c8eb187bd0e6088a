"""The Segment Everything widget's AMG form, generated from EverythingSettings (xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import NotificationSeverity, notification_manager  # noqa: E402

from napari_sam.engine.everything_settings import EverythingSettings  # noqa: E402
from napari_sam.errors import InvalidInputError  # noqa: E402

pytestmark = pytest.mark.napari


def _open(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Everything")
    return widget


def test_each_everything_setting_has_a_box_with_its_range_and_help(make_napari_viewer):
    widget = _open(make_napari_viewer())
    for f in EverythingSettings.cli_fields():
        meta = f.metadata
        box = widget.param_widgets[f.name]
        assert box.minimum() == meta["min"], f.name
        if meta["max"] is not None and not meta["max_open"]:
            assert box.maximum() == meta["max"], f.name
        elif meta["max_open"]:
            assert box.maximum() < meta["max"], f.name
        assert box.singleStep() == pytest.approx(meta["step"]), f.name
        assert meta["help"][1:] in box.toolTip(), f.name


def test_more_parameters_show_on_demand_and_reach_params_when_changed(make_napari_viewer):
    widget = _open(make_napari_viewer())
    box = widget.param_widgets["crop_nms_thresh"]
    assert box.isHidden() and not widget.param_widgets["points_per_side"].isHidden()
    assert "crop_nms_thresh" not in widget.params  # the generator's default applies
    widget.more_check.setChecked(True)
    assert not box.isHidden()
    box.setValue(0.5)  # as the user types it
    assert widget.params["crop_nms_thresh"] == 0.5
    widget.more_check.setChecked(False)
    assert box.isHidden() and widget.params["crop_nms_thresh"] == 0.5


def test_out_of_range_values_are_refused_as_the_cli_refuses_them(make_napari_viewer):
    widget = _open(make_napari_viewer())
    before = widget.params
    with pytest.raises(InvalidInputError) as gui:
        widget.set_params(points_per_side=300)
    with pytest.raises(InvalidInputError) as settings:
        EverythingSettings.from_kwargs({"points_per_side": 300})
    assert str(gui.value) == str(settings.value)
    assert "from 1 to 256" in str(gui.value)
    with pytest.raises(InvalidInputError, match="prompts per image"):
        widget.set_params(points_per_side=256, crop_n_layers=4)
    assert widget.params == before  # nothing was set


def test_run_refuses_a_combination_the_generator_refuses(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.uint8), name="img")
    widget = _open(viewer)
    # each value fits its box; together they ask for millions of prompts
    widget.param_widgets["points_per_side"].setValue(256)
    widget.param_widgets["crop_n_layers"].setValue(4)
    with notification_manager:
        start = len(notification_manager.records)
        assert widget.run() is None
        errors = [n.message for n in notification_manager.records[start:]
                  if n.severity == NotificationSeverity.ERROR]
    assert not widget.running
    assert errors and "prompts per image" in errors[-1]
    assert "prompts per image" in widget.status.text()
