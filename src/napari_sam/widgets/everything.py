"""The "Segment Everything" dock widget: automatic masks for a slice or a whole stack.

Two modes (the "mode" choice): AMG, :class:`napari_sam.engine.everything.AutomaticMaskGenerator`
(a grid of point prompts), and AIS, :class:`napari_sam.engine.ais.InstanceSegmenter` (the
model's AIS head + a seeded watershed; planes larger than the model's input are cut into
tiles of that size at native scale). "Auto" runs AIS when the model has a head, else AMG.
Either runs in a napari ``thread_worker`` that yields progress (per batch of prompt points,
per AIS tile) and one label image per finished slice; the main thread writes them into a
NEW Labels layer (``"<image> everything"``, made unique), never into a user's layer.
Cancel stops the run at the next batch (AIS: the next tile): a single slice
then leaves no layer, a stack keeps the finished slices in a layer named ``... (partial)``
with ``metadata["complete"] = False``.

Scripting API: ``set_model(...)``, ``set_image_layer(layer)``, ``set_params(**kw)``,
``params`` (AMG), ``ais_params`` (AIS), ``mode``/``set_mode(...)``, ``scope``, ``run()``,
``cancel()``, ``wait(timeout)``, ``running``, ``result_layer``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from functools import partial
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_sam.engine.ais import MODES as MODE_NAMES
from napari_sam.engine.ais import (
    NO_HEAD_MESSAGE,
    has_ais_head,
    make_segmenter,
    resolve_mode,
)
from napari_sam.engine.everything_settings import SAM_THRESHOLDS, EverythingSettings
from napari_sam.engine.stack import LINK_IOU, MIN_PLANES, PlaneLinker, StackLabeller
from napari_sam.errors import CancelledError, InvalidInputError
from napari_sam.widgets import layers as L
from napari_sam.widgets._common import (
    DEFAULT_MODEL,
    LayerCombo,
    ModelPicker,
    error_message,
    process_events_until,
    scrollable,
)
from napari_sam.widgets._model_control import ModelController
from napari_sam.widgets.forms import (
    FLOAT_DECIMALS,
    NumberField,
    ais_fields,
    amg_fields,
    check_ais_params,
    check_amg_params,
)

__all__ = ["AIS_FIELDS", "AMG_FIELDS", "MODES", "SegmentEverythingWidget"]

CURRENT_SLICE = "current slice"
WHOLE_STACK = "whole stack"
# mode value (engine.ais.MODES) -> the text shown in the "mode" box
MODES: dict[str, str] = dict(zip(MODE_NAMES, (
    "Auto (the model's best)", "AMG (grid of prompts)", "AIS (instance head)"), strict=True))
# what the widget says when AIS is chosen for a model without a head (the engine's error)
NO_HEAD = NO_HEAD_MESSAGE
# the form's minimum height in a dock (its first rows stay visible; the rest scrolls)
MIN_FORM_HEIGHT = 200

# the form's rows, generated from EverythingSettings (AMG) and AisSettings (AIS)
AMG_FIELDS: dict[str, NumberField] = {f.name: f for f in amg_fields()}
AIS_FIELDS: dict[str, NumberField] = {f.name: f for f in ais_fields()}


def _everything_job(
    model: Any,
    device: str | None,
    data: Any,
    slices: list[tuple[int, ...]],
    contrast_limits: tuple[float, float] | None,
    params: dict[str, Any],
    cancel: threading.Event,
    mode: str = "amg",
    ais_params: dict[str, Any] | None = None,
    source: str | None = None,
) -> Iterator[tuple]:
    """Worker body (generator).

    Yields ``("model", model)`` after loading a named model, then ``("mode", mode)``
    with the mode that runs (``"amg"``/``"ais"``; ``mode`` may be ``"auto"``), or
    ``("refused", message)`` and nothing more when the model cannot run it (AIS
    without a head); a model given as an object must come with its mode resolved
    (see :func:`~napari_sam.engine.ais.resolve_mode`). For AIS ``("tiles", k,
    tile_size, n_tiles)`` per slice (tile_size None: untiled);
    ``("progress", k, n, done, total)`` per decoded batch of prompts (AMG) or tile
    (AIS) of slice ``k`` of ``n``, and ``("slice", k, index, labels)`` with each
    finished (H, W) uint32 label image (AIS: the ids of
    :meth:`InstanceSegmenter.generate_labels`). The engine's generators
    (``iter_generate``) report the progress, so this runs entirely in the worker's
    thread. ``source``: the image's file; the embedding store beside it (``napari-sam
    embed``) is read when it fits, with ``("store", note)`` saying so.
    """
    from napari_sam.engine.everything import EverythingProgress, records_to_labels

    sam = model
    if isinstance(sam, str):
        from napari_sam.models.zoo import load_model

        sam = load_model(sam, device=device)
        yield ("model", sam)
        try:
            mode = resolve_mode(sam, mode)
        except InvalidInputError as err:
            yield ("refused", str(err))
            return
        yield ("mode", mode)
    elif mode not in ("amg", "ais"):
        raise InvalidInputError(f"Resolve the mode of a given model first, got {mode!r}.")
    runner = make_segmenter(
        sam, mode, amg_kwargs={**params, "output_mode": "cropped_mask"},
        ais_kwargs={**(ais_params or {}), "output_mode": "cropped_mask"},
    )
    if source is not None:
        from napari_sam.engine.store import use_store_beside

        note = use_store_beside(runner.predictor, source)
        if note is not None:
            yield ("store", note)
    # AIS records come in id order (ids 1..N of generate_labels); AMG paints largest first
    order = "input" if mode == "ais" else "area_desc"
    n = len(slices)
    for k, index in enumerate(slices):
        if cancel.is_set():
            raise CancelledError("Segment Everything was cancelled.")
        plane = np.asarray(data[index] if index else data)
        if mode == "ais":
            shape = plane.shape[:2]
            yield ("tiles", k, runner.tile_size_for(shape), runner.n_tiles(shape))
        records: list = []
        for item in runner.iter_generate(plane, contrast_limits=contrast_limits,
                                         cancel=cancel.is_set):
            if isinstance(item, EverythingProgress):
                yield ("progress", k, n, item.done, item.total)
            else:
                records = item
        yield ("slice", k, index, records_to_labels(records, plane.shape[:2], order=order))


class SegmentEverythingWidget(QWidget):
    """Automatic mask generation for the shown slice or every slice of an image layer."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.result_layer: Any = None
        self.last_error: BaseException | None = None
        # the model given or loaded by the last run (a named one is loaded on Run)
        self.models = ModelController(self)
        self._worker: Any = None
        self._cancel = threading.Event()
        self._run_state: dict[str, Any] = {}
        self._life = {"closed": False}
        life = self._life
        self.destroyed.connect(lambda *_: life.update(closed=True))
        self._build_ui()
        self._apply_recommended(self.model_picker.name or DEFAULT_MODEL)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        active = self.viewer.layers.selection.active
        if isinstance(active, Image):
            self.image_combo.set_layer(active)
        self._update_mode_ui()

    # ------------------------------------------------------------------ UI

    def _build_ui(self) -> None:
        content = QWidget(self)
        self.model_picker = ModelPicker(content)
        self.model_picker.changed.connect(self._on_model_picked)
        self.image_combo = LayerCombo(self.viewer, Image, parent=content)
        self.image_combo.setToolTip("The image to segment.")
        self.scope_combo = QComboBox(content)
        self.scope_combo.addItems([CURRENT_SLICE, WHOLE_STACK])
        self.scope_combo.setToolTip(
            "Current slice: the 2D plane shown in the viewer. Whole stack: every 2D plane of an "
            "nD image, one after the other; with 'link planes', objects of neighbouring planes "
            "that overlap keep one id (3D objects through z, tracks through t), as "
            "'napari-sam everything' does."
        )
        self.link_check = QCheckBox("link planes", content)
        self.link_check.setChecked(True)
        self.link_check.setToolTip(
            "Whole stack: give an object of one plane and the object it overlaps most in the "
            "next plane along the last stack axis one id (Hungarian matching, IoU at least the "
            "threshold), as the CLI's --link-planes. Off: every plane's objects get new ids.")
        self.link_iou = QDoubleSpinBox(content)
        self.link_iou.setRange(0.0, 1.0)
        self.link_iou.setSingleStep(0.05)
        self.link_iou.setDecimals(2)
        self.link_iou.setValue(LINK_IOU)
        self.link_iou.setToolTip("The least IoU of two objects of neighbouring planes that are "
                                 "one object (the CLI's --link-iou).")
        self.min_planes = QSpinBox(content)
        self.min_planes.setRange(1, 100_000)
        self.min_planes.setValue(MIN_PLANES)
        self.min_planes.setPrefix("min planes ")
        self.min_planes.setToolTip(
            "Drop linked objects that span fewer planes than this along the last stack axis "
            "(out-of-focus blur segmented in one plane; on a time-lapse, tracks shorter than "
            "this), as the CLI's --min-planes. Applied when the whole stack is done: a "
            "cancelled run's partial layer keeps every object. 1 keeps all.")
        self.link_check.toggled.connect(self.link_iou.setEnabled)
        self.link_check.toggled.connect(self.min_planes.setEnabled)
        link_row = QHBoxLayout()
        link_row.addWidget(self.link_check)
        link_row.addWidget(self.link_iou)
        link_row.addWidget(self.min_planes)
        self.mode_combo = QComboBox(content)
        for value, text in MODES.items():
            self.mode_combo.addItem(text, value)
        self.mode_combo.setToolTip(
            "Auto: AIS when the model has an AIS head, else AMG. AMG: SAM's grid of point "
            "prompts (any model; slower, tunable). AIS: the model's instance head and a "
            "watershed (one pass, tiles on large images; needs a head)."
        )
        self.mode_combo.currentIndexChanged.connect(lambda *_: self._update_mode_ui())
        form = QFormLayout()
        form.addRow("model", self.model_picker)
        form.addRow("image", self.image_combo)
        form.addRow("scope", self.scope_combo)
        form.addRow("", link_row)
        form.addRow("mode", self.mode_combo)
        # (label, box, advanced) of each row, to show the rows of the mode that runs
        self._rows: dict[str, list[tuple[QWidget, QWidget, bool]]] = {"amg": [], "ais": []}
        self.more_check = QCheckBox("more AMG parameters", content)
        self.more_check.setToolTip("Show the AMG parameters that SAM rarely needs changed.")
        self.more_check.toggled.connect(lambda *_: self._update_mode_ui())
        self.param_widgets = self._add_param_rows(form, content, AMG_FIELDS, "amg")
        self.ais_param_widgets = self._add_param_rows(form, content, AIS_FIELDS, "ais")

        self.run_button = QPushButton("Run", content)
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel", content)
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress_bar = QProgressBar(content)
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setValue(0)
        self.status = QLabel("", content)
        self.status.setWordWrap(True)
        lay = QVBoxLayout(content)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.progress_bar)
        lay.addWidget(self.status)
        lay.addStretch(1)
        self.scroll_area = scrollable(content, self, MIN_FORM_HEIGHT)

    def _add_param_rows(
        self, form: QFormLayout, parent: QWidget, rows: dict[str, NumberField], mode: str
    ) -> dict[str, QSpinBox | QDoubleSpinBox]:
        """One spin box per field (its range, step, default and tooltip); the advanced
        fields come after a "more parameters" check box."""
        boxes: dict[str, QSpinBox | QDoubleSpinBox] = {}
        fields = sorted(rows.values(), key=lambda f: f.advanced)  # stable: order kept
        for spec in fields:
            if spec.advanced and mode == "amg" and not any(a for *_, a in self._rows[mode]):
                form.addRow(self.more_check)
                self._rows[mode].append((self.more_check, self.more_check, False))
            box = QSpinBox(parent) if spec.kind is int else QDoubleSpinBox(parent)
            if spec.kind is float:
                box.setDecimals(FLOAT_DECIMALS)
            box.setRange(spec.minimum, spec.maximum)
            box.setSingleStep(spec.step)
            box.setValue(spec.default)
            box.setToolTip(spec.tooltip)
            label = QLabel(spec.label, parent)
            label.setToolTip(spec.tooltip)
            form.addRow(label, box)
            boxes[spec.name] = box
            self._rows[mode].append((label, box, spec.advanced))
        return boxes

    def _refresh_layers(self, event: Any = None) -> None:
        if not self._life["closed"]:
            self.image_combo.refresh()

    def _set_status(self, text: str) -> None:
        if not self._life["closed"]:
            self.status.setText(text)

    # -------------------------------------------------------------- settings

    @property
    def params(self) -> dict[str, Any]:
        """The AutomaticMaskGenerator keyword arguments set in the form (AMG).

        Every shown field, and the "more parameters" fields whose value differs from
        their default (the generator's own default applies to the others).
        """
        out = {}
        for name, box in self.param_widgets.items():
            spec = AMG_FIELDS[name]
            value = spec.kind(box.value())
            if not spec.advanced or value != spec.shown_default():
                out[name] = value
        return out

    @property
    def ais_params(self) -> dict[str, Any]:
        """The :class:`~napari_sam.engine.ais.AisSettings` fields set in the form (AIS)."""
        return {
            name: AIS_FIELDS[name].kind(box.value())
            for name, box in self.ais_param_widgets.items()
        }

    def set_params(self, **kwargs: Any) -> None:
        """Set form parameters by name (see :data:`AMG_FIELDS` and :data:`AIS_FIELDS`).

        Values are checked as the CLI checks them (``EverythingSettings``,
        ``AisSettings``) before any box changes.

        Raises:
          InvalidInputError: an unknown name, or a value the settings refuse (the
            settings' message), or one beyond the form's box.
        """
        boxes = {**self.param_widgets, **self.ais_param_widgets}
        for name in kwargs:
            if name not in boxes:
                raise InvalidInputError(
                    f"Unknown parameter {name!r}; choose from {', '.join(boxes)}."
                )
        amg = {k: v for k, v in kwargs.items() if k in self.param_widgets}
        ais = {k: v for k, v in kwargs.items() if k in self.ais_param_widgets}
        checked = {**check_amg_params({**self.params, **amg}),
                   **check_ais_params({**self.ais_params, **ais})}
        for name in kwargs:
            box = boxes[name]
            if not box.minimum() <= checked[name] <= box.maximum():
                raise InvalidInputError(
                    f"{name} must be at most {box.maximum():g} in this form, got "
                    f"{checked[name]!r}."
                )
        for name, value in kwargs.items():
            boxes[name].setValue(value)

    @property
    def mode(self) -> str:
        """The chosen mode: ``"auto"``, ``"amg"`` or ``"ais"``."""
        return str(self.mode_combo.currentData())

    def set_mode(self, mode: str) -> None:
        """Choose ``"auto"`` (AIS when the model has a head, else AMG), ``"amg"`` or ``"ais"``."""
        if mode not in MODES:
            raise InvalidInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
        self.mode_combo.setCurrentIndex(list(MODES).index(mode))

    def _model_has_head(self) -> bool | None:
        """Whether the model has an AIS head (None: a named model, known once loaded)."""
        model = self.models.model
        return None if model is None else has_ais_head(model)

    def _update_mode_ui(self) -> None:
        """Show the parameters of the mode that will run; explain AIS without a head."""
        if self._life["closed"]:
            return
        head = self._model_has_head()
        mode = self.mode
        shown = {"amg", "ais"} if (mode == "auto" and head is None) else (
            {mode} if mode != "auto" else {"ais" if head else "amg"})
        more = self.more_check.isChecked()
        for group, rows in self._rows.items():
            for label, box, advanced in rows:
                visible = group in shown and (more or not advanced)
                label.setVisible(visible)
                box.setVisible(visible)
        ais_index = list(MODES).index("ais")
        auto_index = list(MODES).index("auto")
        if head is False:
            self.mode_combo.setItemData(ais_index, NO_HEAD, Qt.ItemDataRole.ToolTipRole)
            self.mode_combo.setItemData(auto_index, "This model has no AIS head: Auto runs AMG.",
                                        Qt.ItemDataRole.ToolTipRole)
            if mode == "ais":
                self._set_status(NO_HEAD)
            elif self.status.text() == NO_HEAD:
                self._set_status("")
        else:
            self.mode_combo.setItemData(ais_index, "The model's AIS head and a watershed.",
                                        Qt.ItemDataRole.ToolTipRole)
            self.mode_combo.setItemData(
                auto_index,
                "AIS: this model has an AIS head." if head else
                "AIS when the model has an AIS head, else AMG (known once it is loaded).",
                Qt.ItemDataRole.ToolTipRole,
            )
            if self.status.text() == NO_HEAD:
                self._set_status("")

    @property
    def scope(self) -> str:
        """``"current slice"`` or ``"whole stack"``."""
        return self.scope_combo.currentText()

    def set_scope(self, scope: str) -> None:
        """Run on ``"current slice"`` or ``"whole stack"``."""
        if scope not in (CURRENT_SLICE, WHOLE_STACK):
            raise InvalidInputError(f"scope must be {CURRENT_SLICE!r} or {WHOLE_STACK!r}.")
        self.scope_combo.setCurrentText(scope)

    @property
    def image_layer(self) -> Image | None:
        return self.image_combo.layer

    def set_image_layer(self, layer: Image) -> None:
        self.image_combo.set_layer(layer)

    def set_model(self, model: Any, device: str | None = None, label: str | None = None) -> None:
        """Use ``model``: a Sam instance, or a zoo name / checkpoint path (loaded on Run).

        ``label`` names a Sam instance in the model box (default: its class name).
        """
        if isinstance(model, (str, Path)):
            self.models.forget()
            self.model_picker.show_model(str(model))
            self._apply_recommended(str(model))
        else:
            self.models.set_model(model, device, label)
            self.model_picker.show_model(self.models.instance_label)
        self._update_mode_ui()

    def _on_model_picked(self, name: str, device: str) -> None:
        if self.models.model is not None and name == self.models.instance_label:
            return  # the same object; it is moved to the chosen device on Run
        self.models.forget()  # loaded (in the worker) on the next run
        self._apply_recommended(name)
        self._update_mode_ui()

    def _apply_recommended(self, name: str) -> None:
        """Set the thresholds a zoo model recommends (SAM's otherwise), as the CLI does."""
        recommended = EverythingSettings.recommended_for(name)
        for key in SAM_THRESHOLDS:
            self.param_widgets[key].setValue(getattr(recommended, key))

    # ------------------------------------------------------------------- run

    @property
    def running(self) -> bool:
        return self._worker is not None

    def run(self) -> Any:
        """Start a run in a worker thread; returns the worker (or None if it could not start)."""
        if self._worker is not None:
            show_info("Segment Everything is already running; cancel it first.")
            return None
        image = self.image_layer
        try:
            if image is None:
                raise InvalidInputError("Add or select an image layer first.")
            L.check_segmentable(image)
            slices = self._slices(image)
            if self.mode != "ais":
                check_amg_params(self.params)  # as the CLI checks them, before any work
        except InvalidInputError as err:
            show_error(str(err))
            self._set_status(str(err))
            return None
        model: Any = self.models.model
        mode = self.mode  # a named model's is resolved in the worker, once it is loaded
        if model is not None:
            try:
                mode = resolve_mode(model, mode)
            except InvalidInputError as err:
                self._refuse(str(err))
                return None
        device = self.model_picker.device
        if model is None:
            model = self.model_picker.name or DEFAULT_MODEL
        elif self.models.instance_label is not None and device is not None:
            try:
                model = self.models.model = model.to(device)
            except Exception as err:
                show_error(f"Could not move the model to {device}: {error_message(err)}")
                return None
        self.last_error = None
        self.result_layer = None
        self._cancel = threading.Event()
        self._run_state = {
            "image": image,
            "slices": slices,
            "done_slices": 0,
            "layer": None,
            # ids over the stack: the rule of napari_sam.engine.stack, as the CLI's
            "labeller": (PlaneLinker(self.link_iou.value(), self.min_planes.value())
                         if self.scope == WHOLE_STACK and self.link_check.isChecked() and slices[0]
                         else StackLabeller()),
            "cancelled": False,
            "mode": mode if model is not None else None,  # named: said by the worker
            "tiles": None,
            "name": L.unique_name((x.name for x in self.viewer.layers), f"{image.name} everything"),
        }
        limits = tuple(float(v) for v in image.contrast_limits)
        worker = create_worker(
            _everything_job, model, device, image.data, slices, limits, self.params, self._cancel,
            mode, self.ais_params, L.source_path(image),
            _progress={"desc": "SAM: segment everything"},
            _ignore_errors=True,
        )
        pbar = getattr(worker, "pbar", None)
        if pbar is not None:
            # the total is set here, not through _progress: with one, napari also adds 1
            # per yielded message, so the activity bar lagged the widget's and ran past its
            # total; it follows the batch counts instead (see _on_yielded)
            pbar.total = 1000
        worker.yielded.connect(self._on_yielded)
        worker.errored.connect(self._on_error)
        worker.finished.connect(partial(self._on_finished, worker))
        self._worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setValue(0)
        self._set_status(f"Running on {len(slices)} slice(s)…")
        worker.start()
        return worker

    def _refuse(self, message: str) -> None:
        """Say why the chosen mode cannot run (a notice, not an error: nothing failed)."""
        show_info(message)
        self._set_status(message)

    def _mode_text(self) -> str:
        """``"AMG"``, ``"AIS"`` or ``"AIS, 12 tiles of 256 px"`` for the status line."""
        state = self._run_state
        mode = state.get("mode")
        if mode != "ais":
            return "AMG" if mode == "amg" else "?"
        tiles = state.get("tiles")
        if tiles and tiles[0]:
            return f"AIS, {tiles[1]} tile{'s' * (tiles[1] != 1)} of {tiles[0]} px"
        return "AIS"

    def _slices(self, image: Image) -> list[tuple[int, ...]]:
        lead = L.spatial_shape(image)[:-2]
        if self.scope == WHOLE_STACK:
            return [tuple(i) for i in product(*(range(n) for n in lead))]
        L.check_plane_displayed(image, self.viewer.dims)
        return [L.current_slice_index(image, self.viewer.dims.point)]

    def cancel(self) -> None:
        """Ask the running job to stop before its next batch of prompts.

        The batch being decoded finishes (it cannot be interrupted); no further batch
        or slice starts. The progress bar goes back to 0 at once.
        """
        if self._worker is None:
            return
        self._cancel.set()
        self._run_state["cancelled"] = True
        with contextlib.suppress(Exception):
            self._worker.quit()
        self.cancel_button.setEnabled(False)
        self._reset_progress()
        self._set_status("Cancelling: the run stops after the current batch…")

    def _reset_progress(self) -> None:
        if self._life["closed"]:
            return
        self.progress_bar.setValue(0)
        pbar = getattr(self._worker, "pbar", None)
        if pbar is not None:
            with contextlib.suppress(Exception):
                pbar.n = 0
                pbar.refresh()

    def wait(self, timeout: float = 120.0) -> bool:
        """Process Qt events until the run has finished (or ``timeout`` s); for scripts/tests."""
        return process_events_until(lambda: self._worker is None, timeout)

    def _on_yielded(self, msg: tuple) -> None:
        if self._life["closed"]:
            return
        kind = msg[0]
        state = self._run_state
        if kind == "model":
            # reused by later runs until another model is picked
            self.models.install(msg[1], self.model_picker.name or DEFAULT_MODEL)
            self._update_mode_ui()
        elif kind == "refused":
            state["refused"] = True
            self._refuse(msg[1])
        elif kind == "mode":
            state["mode"] = msg[1]
        elif kind == "tiles":
            state["tiles"] = msg[2:]
        elif kind == "store":
            state["store"] = msg[1]
            self._set_status(msg[1][0].upper() + msg[1][1:] + ".")
        elif kind == "progress":
            if state.get("cancelled"):
                return  # the bar was reset; the last batch is finishing
            _, k, n, done, total = msg
            frac = (k + (done / total if total else 1.0)) / max(n, 1)
            value = int(round(1000 * frac))
            self.progress_bar.setValue(value)
            pbar = getattr(self._worker, "pbar", None)
            if pbar is not None:
                with contextlib.suppress(Exception):
                    pbar.n = value
                    pbar.refresh()
            step = "batch" if state.get("mode") == "amg" else "tile"
            self._set_status(
                f"{self._mode_text()}: slice {k + 1} of {n}, {step} {done} of {total}"
            )
        elif kind == "slice":
            _, k, index, labels = msg
            self._write_slice(state, index, labels)
            state["done_slices"] = k + 1

    def _write_slice(
        self, state: dict[str, Any], index: tuple[int, ...], labels: np.ndarray
    ) -> None:
        image = state["image"]
        layer = state["layer"]
        if layer is None or layer not in self.viewer.layers:
            layer = L.make_labels_layer(image, state["name"])
            params = self.params if state.get("mode") == "amg" else self.ais_params
            layer.metadata["napari_sam"] = {
                "mode": state.get("mode"), "params": params, "complete": False
            }
            self.viewer.add_layer(layer)
            state["layer"] = layer
            self.result_layer = layer
        labeller = state["labeller"]
        out = (labeller.add(index, labels) if isinstance(labeller, PlaneLinker)
               else labeller.add(labels)[0]).astype(layer.data.dtype, copy=False)
        if index:
            layer.data[index] = out
        else:
            layer.data[...] = out
        layer.refresh()

    def _on_error(self, err: BaseException) -> None:
        if isinstance(err, CancelledError):
            self._run_state["cancelled"] = True
            return
        self.last_error = err
        msg = f"Segment Everything failed: {error_message(err)}"
        if not self._life["closed"]:
            show_error(msg)
            self.progress_bar.setValue(0)
        self._set_status(msg)

    def _on_finished(self, worker: Any) -> None:
        if worker is not self._worker:
            return
        self._worker = None
        if self._life["closed"]:
            return
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        state = self._run_state
        layer = state.get("layer")
        n = len(state.get("slices", ()))
        done = state.get("done_slices", 0)
        if state.get("cancelled") and done < n:
            self.progress_bar.setValue(0)
            if layer is not None and layer in self.viewer.layers:
                layer.name = L.unique_name(
                    (x.name for x in self.viewer.layers), f"{state['name']} (partial)"
                )
                self._set_status(
                    f"Cancelled after {done} of {n} slices: {layer.name!r} is partial."
                )
            else:
                self.result_layer = None
                self._set_status("Cancelled; no layer was created.")
            return
        if self.last_error is not None or state.get("refused"):
            self.progress_bar.setValue(0)
            return
        if layer is not None:
            labeller = state.get("labeller")
            if isinstance(labeller, PlaneLinker) and labeller.min_planes > 1:
                # an object's length is known once the stack is done (see PlaneLinker)
                layer.data[...] = labeller.finish(layer.data)
                layer.refresh()
            layer.metadata["napari_sam"]["complete"] = True
            count = len(np.unique(layer.data)) - 1
            self.progress_bar.setValue(1000)
            store = state.get("store")
            self._set_status(f"Done ({self._mode_text()}): {count} object(s) in {layer.name!r}"
                             + (f"; {store}." if store else "."))
