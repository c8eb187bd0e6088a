"""The "Segment Everything" dock widget in a real napari viewer (run under xvfb-run)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

pytest.importorskip("napari")

from qtpy.QtCore import Qt  # noqa: E402

pytestmark = pytest.mark.napari

TIMEOUT = 120
# low thresholds: the tiny random model's masks have low scores
FAST = dict(
    points_per_side=4, points_per_batch=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
    box_nms_thresh=0.7, crop_n_layers=0, min_mask_region_area=0,
)


def _image(shape=(48, 64), seed=0):
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[: shape[-2], : shape[-1]]
    blob = 150 * (((rr - 20) ** 2 + (cc - 30) ** 2) < 120)
    return (40 + blob + rng.integers(0, 30, shape)).astype(np.uint8)


def _open(viewer, tiny_sam):
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Everything")
    widget.set_model(tiny_sam)
    widget.set_params(**FAST)
    return widget


def test_run_makes_new_labels_layer(make_napari_viewer, tiny_sam):
    viewer = make_napari_viewer()
    image = viewer.add_image(_image(), name="img", scale=(2, 0.5), translate=(3, 4))
    mine = viewer.add_labels(np.zeros((48, 64), np.uint8), name="img everything")
    widget = _open(viewer, tiny_sam)
    widget.set_image_layer(image)
    assert widget.params == FAST
    assert widget.run() is not None
    assert widget.wait(TIMEOUT)
    layer = widget.result_layer
    assert layer is not None and layer is not mine
    assert layer.name == "img everything [2]"  # unique; the user's layer is untouched
    assert not mine.data.any()
    assert layer.data.shape == (48, 64)
    assert layer.data.max() >= 1
    np.testing.assert_allclose(layer.scale, image.scale)
    np.testing.assert_allclose(layer.translate, image.translate)
    assert layer.metadata["napari_sam"]["complete"] is True
    assert widget.progress_bar.value() == 1000

    # matches the engine called directly
    from napari_sam.engine.everything import AutomaticMaskGenerator, records_to_labels

    records = AutomaticMaskGenerator(tiny_sam, **FAST).generate(
        image.data, contrast_limits=image.contrast_limits
    )
    np.testing.assert_array_equal(layer.data, records_to_labels(records, (48, 64)))

    # a second run: another new layer
    widget.run()
    assert widget.wait(TIMEOUT)
    assert widget.result_layer.name == "img everything [3]"


def test_whole_stack_fills_every_slice_with_unique_ids(make_napari_viewer, tiny_sam):
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([_image(seed=s) for s in range(3)]), name="stack")
    widget = _open(viewer, tiny_sam)
    progress = []
    widget.set_scope("whole stack")
    widget.link_check.setChecked(False)  # the per-plane rule (linking: the CLI id test)
    worker = widget.run()
    worker.yielded.connect(lambda msg: progress.append(msg[:2]))
    assert widget.wait(TIMEOUT)
    layer = widget.result_layer
    assert layer.data.shape == (3, 48, 64)
    ids = [set(np.unique(layer.data[k])) - {0} for k in range(3)]
    assert all(ids)
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    # progress per batch and a result per slice
    assert [m for m in progress if m[0] == "slice"] == [("slice", 0), ("slice", 1), ("slice", 2)]
    assert sum(m[0] == "progress" for m in progress) >= 3


def test_current_slice_of_stack(make_napari_viewer, tiny_sam):
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([_image(seed=s) for s in range(3)]), name="stack")
    viewer.dims.set_current_step(0, 1)
    widget = _open(viewer, tiny_sam)
    assert widget.scope == "current slice"
    widget.run()
    assert widget.wait(TIMEOUT)
    layer = widget.result_layer
    assert layer.data.shape == (3, 48, 64)
    assert layer.data[1].any() and not layer.data[0].any() and not layer.data[2].any()


def test_cancel_immediately_leaves_no_layer_and_widget_usable(make_napari_viewer, tiny_sam):
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="img")
    widget = _open(viewer, tiny_sam)
    n_layers = len(viewer.layers)
    widget.run()
    widget.cancel()
    assert widget.wait(TIMEOUT)
    assert not widget.running
    assert len(viewer.layers) == n_layers
    assert widget.result_layer is None
    assert "Cancelled" in widget.status.text()
    assert widget.run_button.isEnabled()
    # usable again
    widget.run()
    assert widget.wait(TIMEOUT)
    assert widget.result_layer is not None and widget.result_layer.data.any()


def test_cancel_during_stack_keeps_partial_layer(make_napari_viewer, tiny_sam, monkeypatch):
    from napari_sam.engine import everything as engine

    viewer = make_napari_viewer()
    viewer.add_image(np.stack([_image(seed=s) for s in range(4)]), name="stack")
    widget = _open(viewer, tiny_sam)
    widget.set_scope("whole stack")

    # press Cancel while slice 1 starts (deterministic: set the flag from the job itself)
    real_generate = engine.AutomaticMaskGenerator.iter_generate
    calls = []

    def iter_generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            widget._cancel.set()
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(engine.AutomaticMaskGenerator, "iter_generate", iter_generate)
    widget.run()
    assert widget.wait(TIMEOUT)
    assert len(calls) == 2
    layer = widget.result_layer
    assert layer is not None and layer.name == "stack everything (partial)"
    assert layer.metadata["napari_sam"]["complete"] is False
    assert layer.data[0].any()
    assert not layer.data[1:].any()
    assert "Cancelled after 1 of 4" in widget.status.text()
    assert widget.run_button.isEnabled()


def test_errors_are_notified_and_widget_recovers(make_napari_viewer, tiny_sam, tmp_path,
                                                 monkeypatch):
    from napari_sam.widgets import everything

    errors = []
    monkeypatch.setattr(everything, "show_error", lambda msg: errors.append(msg))
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="img")
    widget = _open(viewer, tiny_sam)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    widget.set_model(str(bad))
    widget.run()
    assert widget.wait(TIMEOUT)
    assert errors and "broken.safetensors" in errors[-1]
    assert widget.result_layer is None and widget.run_button.isEnabled()
    widget.set_model(tiny_sam)
    widget.run()
    assert widget.wait(TIMEOUT)
    assert widget.result_layer is not None


def test_device_change_keeps_a_model_given_as_object(make_napari_viewer, tiny_sam):
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="img")
    widget = _open(viewer, tiny_sam)
    picker = widget.model_picker
    picker.device_combo.setCurrentText("cpu")
    picker.changed.emit(picker.name, "cpu")
    widget.run()
    assert widget.wait(TIMEOUT)
    assert widget.last_error is None and widget.result_layer is not None


def test_recommended_thresholds_follow_the_model(make_napari_viewer):
    from napari_sam.models.zoo import recommended_everything_settings

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Everything")
    rec = recommended_everything_settings("default")
    assert rec == {"pred_iou_thresh": 0.6, "stability_score_thresh": 0.85}
    assert {k: widget.params[k] for k in rec} == pytest.approx(rec)  # the default model
    widget.set_model("vit_b")  # official SAM: the official defaults
    assert (widget.params["pred_iou_thresh"], widget.params["stability_score_thresh"]) == (
        pytest.approx(0.88), pytest.approx(0.95))
    widget.set_model("default")
    assert {k: widget.params[k] for k in rec} == pytest.approx(rec)


def test_cancel_stops_between_batches_and_resets_the_progress_bar(
    make_napari_viewer, tiny_sam, monkeypatch
):
    """Cancel pressed while a batch is decoded: that batch ends, no other starts, and the
    progress bar goes back to 0 at once (review: it stayed at its last value)."""
    import threading

    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    from napari_sam.engine import everything as engine
    from napari_sam.widgets._common import process_events_until

    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="img")
    widget = _open(viewer, tiny_sam)
    widget.set_params(points_per_side=8, points_per_batch=4)  # 16 batches
    n_layers = len(viewer.layers)
    real_batch = engine.AutomaticMaskGenerator._process_batch
    batches = []

    def batch(self, *args, **kwargs):
        batches.append(threading.current_thread())
        if len(batches) == 2:  # the user presses Cancel while batch 2 runs
            widget._cancel.wait(30)
        return real_batch(self, *args, **kwargs)

    monkeypatch.setattr(engine.AutomaticMaskGenerator, "_process_batch", batch)
    widget.run()
    assert process_events_until(lambda: widget.progress_bar.value() > 0, TIMEOUT)
    QTest.mouseClick(widget.cancel_button, Qt.MouseButton.LeftButton)
    assert widget.progress_bar.value() == 0
    assert "Cancelling" in widget.status.text()
    assert widget.wait(TIMEOUT)
    assert len(batches) == 2  # the batch running at Cancel finished; no third started
    assert widget.progress_bar.value() == 0
    assert "Cancelled" in widget.status.text()
    assert len(viewer.layers) == n_layers and widget.result_layer is None
    assert widget.run_button.isEnabled()


def test_activity_bar_follows_the_widget_bar(make_napari_viewer, tiny_sam):
    """Review: the activity dock's bar lagged the widget's and ended past its total."""
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([_image(seed=s) for s in range(3)]), name="stack")
    widget = _open(viewer, tiny_sam)
    widget.set_scope("whole stack")
    seen = []
    worker = widget.run()
    worker.yielded.connect(
        lambda msg: seen.append((worker.pbar.n, widget.progress_bar.value(), worker.pbar.total))
    )
    assert widget.wait(TIMEOUT)
    assert seen and all(n == value and total == 1000 for n, value, total in seen), seen
    assert seen[-1][0] == 1000


def test_everything_job_runs_in_the_workers_own_thread(tiny_sam, monkeypatch):
    """The worker body is a plain generator over iter_generate: the masks are made in
    the thread that iterates it (no helper thread), progress arrives per batch."""
    import threading

    from napari_sam.engine import everything as engine
    from napari_sam.widgets.everything import _everything_job

    seen = []
    real = engine.AutomaticMaskGenerator._iter_plain_records

    def spy(self, *args, **kwargs):
        seen.append(threading.current_thread())
        return (yield from real(self, *args, **kwargs))

    monkeypatch.setattr(engine.AutomaticMaskGenerator, "_iter_plain_records", spy)
    before = threading.active_count()
    msgs = list(_everything_job(tiny_sam, None, _image(), [()], None,
                                {"points_per_side": 4, "points_per_batch": 8},
                                threading.Event()))
    assert seen == [threading.current_thread()]
    assert threading.active_count() == before
    kinds = [m[0] for m in msgs]
    assert kinds == ["progress", "progress", "slice"]
    assert msgs[-1][3].shape == _image().shape[:2]


@pytest.mark.parametrize("link, min_planes", [(True, None), (False, None), (True, 1),
                                              (True, 3)])
def test_whole_stack_ids_match_the_cli(make_napari_viewer, tiny_sam, tmp_path, link,
                                       min_planes):
    """The widget and ``napari-sam everything`` number the same stack the same way, with
    the planes linked into 3D objects (both by default) or not, and the linked objects
    shorter than the least number of planes dropped (the CLI's default
    ``MIN_PLANES``, or as given)."""
    import tifffile

    from napari_sam.cli import main
    from napari_sam.engine.io import read_labels
    from napari_sam.engine.stack import MIN_PLANES
    from napari_sam.models.checkpoint import save_model

    stack = np.stack([_image(seed=s) for s in range(3)])
    options = [] if link else ["--no-link-planes"]
    if min_planes is not None:
        # three equal planes and a shifted one; at link IoU 1 only equal masks link, so
        # the last plane's objects are one plane long and those before three
        stack = np.stack([stack[0]] * 3 + [np.roll(_image(seed=1), 24, axis=1)])
        options += ["--min-planes", str(min_planes), "--link-iou", "1"]
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    model_path = save_model(tiny_sam, tmp_path / "tiny.safetensors")
    out = tmp_path / "stack_labels.tif"
    assert main(["everything", str(tmp_path / "stack.tif"), "--out", str(out),
                 "--model", str(model_path), "--device", "cpu", "--points-per-side", "4",
                 "--points-per-batch", "8", "--pred-iou-thresh", "0",
                 "--stability-score-thresh", "0", *options]) == 0
    cli = read_labels(out)

    viewer = make_napari_viewer()
    viewer.add_image(stack, name="stack", contrast_limits=(0, 255))  # uint8: as the CLI
    widget = _open(viewer, tiny_sam)
    widget.set_scope("whole stack")
    assert widget.link_check.isChecked()  # linking is the default, as in the CLI
    assert widget.min_planes.value() == MIN_PLANES and widget.min_planes.isEnabled()
    widget.link_check.setChecked(link)
    assert widget.min_planes.isEnabled() is link  # only linked objects have a length
    if min_planes is not None:
        widget.min_planes.setValue(min_planes)
        widget.link_iou.setValue(1.0)
    widget.run()
    assert widget.wait(TIMEOUT)
    got = widget.result_layer.data
    assert cli.shape == got.shape == (len(stack), 48, 64)
    assert len(np.unique(cli[1])) > 1  # not vacuous: later planes hold objects
    np.testing.assert_array_equal(got, cli)
    if link:
        least = MIN_PLANES if min_planes is None else min_planes
        spans = [int((got == i).any((1, 2)).sum()) for i in np.unique(got[got > 0])]
        assert min(spans) >= least
        assert np.unique(got[got > 0]).tolist() == list(range(1, len(spans) + 1))
        if min_planes == 1:  # not vacuous: without the filter, short objects are there
            assert min(spans) == 1 and max(spans) == 3
        if min_planes == 3:
            assert not got[3].any()  # the last plane's one-plane objects are gone


# ---------------------------------------------------------------- modes: AMG / AIS


@pytest.fixture
def tiny_sam_with_head(tiny_sam_config):
    """The tiny model with a random AIS head (as tests/engine/test_ais.py builds it)."""
    import dataclasses

    import torch

    from napari_sam.models.build import build_sam

    torch.manual_seed(1)
    return build_sam(dataclasses.replace(tiny_sam_config, ais_head_hidden=16)).eval()


def _ais_thresholds(model, image):
    """Thresholds at which the random head finds several objects in ``image`` (2 decimals,
    as the form holds them)."""
    from napari_sam.engine.ais import InstanceSegmenter
    from napari_sam.engine.image import to_rgb_uint8

    maps = InstanceSegmenter(model).maps(to_rgb_uint8(image, contrast_limits=(0, 255)))
    return dict(
        foreground_threshold=round(float(np.quantile(maps[0], 0.4)), 2),
        center_threshold=round(float(np.quantile(maps[2], 0.8)), 2),
        min_size=3,
    )


def _visible(widget, names):
    boxes = {**widget.param_widgets, **widget.ais_param_widgets}
    return {name: not boxes[name].isHidden() for name in names}


def _click(button):
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    QTest.mouseClick(button, Qt.MouseButton.LeftButton)


@contextlib.contextmanager
def _notifications():
    """napari's notification hooks installed (as in the app); yields (problems, infos):
    functions listing the warning/error and the info notifications since entering."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    with notification_manager:
        start = len(notification_manager.records)

        def of(*severities):
            return lambda: [n.message for n in notification_manager.records[start:]
                            if n.severity in severities]

        yield (of(NotificationSeverity.ERROR, NotificationSeverity.WARNING),
               of(NotificationSeverity.INFO))


def test_auto_runs_ais_with_a_head_and_amg_on_request(make_napari_viewer, tiny_sam_with_head):
    from napari_sam.engine.ais import InstanceSegmenter
    from napari_sam.engine.everything import AutomaticMaskGenerator, records_to_labels

    viewer = make_napari_viewer()
    image = viewer.add_image(_image(), name="img", contrast_limits=(0, 255))
    widget = _open(viewer, tiny_sam_with_head)
    assert widget.mode == "auto"
    # Auto with a head: the AIS parameters show, the grid ones do not
    assert _visible(widget, ["foreground_threshold", "min_size", "points_per_side"]) == {
        "foreground_threshold": True, "min_size": True, "points_per_side": False}
    thresholds = _ais_thresholds(tiny_sam_with_head, image.data)
    widget.set_params(**thresholds)
    assert widget.ais_params == thresholds
    with _notifications() as (problems, _):
        _click(widget.run_button)
        assert widget.wait(TIMEOUT)
    assert problems() == []
    layer = widget.result_layer
    expected = InstanceSegmenter(tiny_sam_with_head, **thresholds).generate_labels(
        image.data, contrast_limits=(0, 255))
    assert expected.max() >= 2  # not vacuous: several objects
    np.testing.assert_array_equal(layer.data, expected)
    assert layer.metadata["napari_sam"]["mode"] == "ais"
    assert layer.metadata["napari_sam"]["params"] == thresholds
    assert widget.status.text().startswith("Done (AIS):")  # untiled: 48 x 64 < 128 px

    # AMG chosen: the grid prompts run, as AutomaticMaskGenerator gives
    widget.mode_combo.setCurrentIndex(list(widget.mode_combo.itemData(i) for i in range(3))
                                      .index("amg"))
    assert _visible(widget, ["foreground_threshold", "points_per_side"]) == {
        "foreground_threshold": False, "points_per_side": True}
    _click(widget.run_button)
    assert widget.wait(TIMEOUT)
    records = AutomaticMaskGenerator(tiny_sam_with_head, **FAST).generate(
        image.data, contrast_limits=(0, 255))
    assert widget.result_layer is not layer
    np.testing.assert_array_equal(widget.result_layer.data, records_to_labels(records, (48, 64)))
    assert widget.result_layer.metadata["napari_sam"]["mode"] == "amg"
    assert widget.status.text().startswith("Done (AMG):")


def test_ais_tiles_planes_larger_than_the_model_input(make_napari_viewer, tiny_sam_with_head):
    """A 200 x 300 plane with a 128 px model: tiles of 128 px at native scale, progress per
    tile, said in the status line; the labels are the engine's (which tiles the same way)."""
    from napari_sam.engine.ais import InstanceSegmenter
    from napari_sam.engine.tiles import tile_boxes

    viewer = make_napari_viewer()
    data = _image((200, 300))
    viewer.add_image(data, name="big", contrast_limits=(0, 255))
    widget = _open(viewer, tiny_sam_with_head)
    widget.set_mode("ais")
    widget.set_params(**_ais_thresholds(tiny_sam_with_head, data))
    statuses = []
    worker = widget.run()
    worker.yielded.connect(lambda _msg: statuses.append(widget.status.text()))
    assert widget.wait(TIMEOUT)
    from napari_sam.engine.ais import AIS_TILE_OVERLAP

    n_tiles = len(tile_boxes((200, 300), tile_size=128, overlap=AIS_TILE_OVERLAP))
    assert n_tiles > 1
    assert f"Done (AIS, {n_tiles} tiles of 128 px)" in widget.status.text()
    tiles_seen = [s for s in statuses if s.startswith(f"AIS, {n_tiles} tiles of 128 px: slice 1")]
    assert [s.rsplit(", ", 1)[1] for s in dict.fromkeys(tiles_seen)] == [
        f"tile {i} of {n_tiles}" for i in range(1, n_tiles + 1)]  # progress per tile
    expected = InstanceSegmenter(tiny_sam_with_head, **widget.ais_params).generate_labels(
        data, contrast_limits=(0, 255))
    assert expected.max() >= 2
    np.testing.assert_array_equal(widget.result_layer.data, expected)


def test_ais_without_a_head_is_explained_not_an_error(make_napari_viewer, tiny_sam, tmp_path):
    from napari_sam.models.checkpoint import save_model
    from napari_sam.widgets.everything import NO_HEAD

    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="img")
    widget = _open(viewer, tiny_sam)
    ais = list(widget.mode_combo.itemData(i) for i in range(3)).index("ais")
    assert "no AIS head" in widget.mode_combo.itemData(ais, Qt.ItemDataRole.ToolTipRole)
    # Auto on a head-less model: the grid parameters only
    assert _visible(widget, ["points_per_side", "center_threshold"]) == {
        "points_per_side": True, "center_threshold": False}
    n_layers = len(viewer.layers)
    with _notifications() as (problems, infos):
        widget.mode_combo.setCurrentIndex(ais)
        assert widget.status.text() == NO_HEAD  # said on choosing, before any run
        _click(widget.run_button)
        assert not widget.running
        assert widget.status.text() == NO_HEAD
        # a named model is loaded in the worker: refused there, the same way
        widget.set_model(str(save_model(tiny_sam, tmp_path / "tiny.safetensors")))
        assert widget.mode == "ais"
        _click(widget.run_button)
        assert widget.wait(TIMEOUT)
    assert problems() == []
    assert infos() == [NO_HEAD, NO_HEAD]
    assert widget.status.text() == NO_HEAD and widget.last_error is None
    assert len(viewer.layers) == n_layers and widget.result_layer is None
    assert widget.run_button.isEnabled() and widget.progress_bar.value() == 0
    # Auto then runs AMG with the loaded model
    widget.set_mode("auto")
    assert widget.status.text() == ""
    widget.run()
    assert widget.wait(TIMEOUT)
    assert widget.result_layer.metadata["napari_sam"]["mode"] == "amg"


def test_cancel_during_ais(make_napari_viewer, tiny_sam_with_head, monkeypatch):
    """Cancel pressed while AIS embeds a tile: that tile finishes, no other starts (a single
    slice leaves no layer; a stack keeps the finished slices, marked partial)."""
    import threading

    from napari_sam.engine import ais as engine
    from napari_sam.widgets._common import process_events_until

    viewer = make_napari_viewer()
    big = viewer.add_image(_image((200, 300)), name="big", contrast_limits=(0, 255))
    viewer.add_image(np.stack([_image(seed=s) for s in range(3)]), name="stack",
                     contrast_limits=(0, 255))
    widget = _open(viewer, tiny_sam_with_head)
    widget.set_params(**_ais_thresholds(tiny_sam_with_head, _image(seed=0)))
    real_tile = engine.InstanceSegmenter._image_maps  # one embedding: a tile or a small plane
    calls = []
    wait_at = {2}

    def tile(self, *args, **kwargs):
        calls.append(threading.current_thread())
        if len(calls) in wait_at:  # the user presses Cancel while this one is computed
            widget._cancel.wait(30)
        return real_tile(self, *args, **kwargs)

    monkeypatch.setattr(engine.InstanceSegmenter, "_image_maps", tile)
    n_layers = len(viewer.layers)
    widget.set_image_layer(big)  # tiled: cancel stops between tiles
    widget.run()
    assert process_events_until(lambda: len(calls) == 2, TIMEOUT)
    _click(widget.cancel_button)
    assert widget.progress_bar.value() == 0
    assert widget.wait(TIMEOUT)
    assert len(calls) == 2  # the tile running at Cancel finished; no third started
    assert widget.result_layer is None and len(viewer.layers) == n_layers
    assert "Cancelled; no layer" in widget.status.text()

    calls.clear()
    widget.set_image_layer(viewer.layers["stack"])
    widget.set_scope("whole stack")
    widget.run()
    assert process_events_until(lambda: len(calls) == 2, TIMEOUT)  # slice 2 of 3
    _click(widget.cancel_button)
    assert widget.wait(TIMEOUT)
    assert len(calls) == 2  # no third slice started
    layer = widget.result_layer
    assert layer.name == "stack everything (partial)"
    assert layer.data[0].any() and not layer.data[1:].any()
    assert "Cancelled after 1 of 3" in widget.status.text()
    assert widget.run_button.isEnabled()


def test_whole_stack_reads_the_store_beside_the_file(make_napari_viewer, tiny_sam, tmp_path):
    """A stack opened from a file with `napari-sam embed`'s store beside it: Segment
    Everything reads every plane's embedding from the store (the encoder never runs),
    says so, and gives the labels it gives without the store."""
    import tifffile

    from napari_sam.engine.io import read_image
    from napari_sam.engine.predictor import Predictor
    from napari_sam.engine.store import embed_to_store, store_path_for

    stack = np.stack([_image(seed=s) for s in range(3)]).astype(np.uint16) * 40
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    loaded = read_image(path)
    assert loaded.contrast_limits() is not None  # a 16-bit stack: one range for all planes
    embed_to_store(Predictor(tiny_sam), loaded.data, store_path_for(path),
                   contrast_limits=loaded.contrast_limits())
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari")
    image = viewer.layers["stack"]
    image.contrast_limits = loaded.contrast_limits()  # the file's range, as the store's
    widget = _open(viewer, tiny_sam)
    widget.set_image_layer(image)
    widget.set_scope("whole stack")
    calls = []
    hook = tiny_sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        widget.run()
        assert widget.wait(TIMEOUT)
    finally:
        hook.remove()
    assert calls == []
    assert "reading embeddings from" in widget.status.text()
    with_store = widget.result_layer.data.copy()
    import shutil

    shutil.rmtree(store_path_for(path))
    widget.run()
    assert widget.wait(TIMEOUT)
    assert "reading embeddings" not in widget.status.text()
    np.testing.assert_array_equal(widget.result_layer.data, with_store)
