"""The "Segment Anything" dock widget: click/box prompts -> live mask preview -> commit.

Thin glue between napari layers and :class:`napari_sam.engine.predictor.Predictor`:
the widget's own layers (their creation, events and keys) are managed by
:class:`~._prompt_layers.PromptLayers`, the embedding runs by
:class:`~._embedding.EmbeddingScheduler`, model loading by
:class:`~._model_control.ModelController`; the prediction job
(:mod:`.prediction`) and the rules (:mod:`.prompting`, :mod:`.preview`, :mod:`.keys`,
:mod:`.layers`) are Qt-free.

* The widget owns a Points layer ``SAM points`` (lime = positive, red = negative),
  a Shapes layer ``SAM boxes`` (rectangles) and a 2D Labels layer ``SAM preview``.
  They stay on top of the layer list (a new image does not hide them). Prompt layers
  copy the image layer's transform; prompts are read through the layers' transforms.
* The *prompt* buttons switch between clicking points and drawing a box (they
  select the layer and its mode). Only the latest rectangle of a plane is a prompt,
  so older ones are removed.
* The image embedding of the shown 2D plane is computed in a napari
  ``thread_worker`` and kept in an :class:`~napari_sam.engine.cache.EmbeddingCache`.
  A generation counter drops results of stale workers.
* Every prompt change asks for a prediction. Decoding and postprocessing (which on
  an 8000 x 8000 plane takes hundreds of ms) run in one background thread
  (:class:`~._common.LatestJobRunner`): the latest request wins, waiting ones are
  dropped, stale results ignored. The main thread only shows the result: the
  preview layer holds just the mask's bounding box, in one fixed colour with an
  outline (:mod:`.preview`), so it never looks like a committed object.
* Committing writes a new instance id into the target Labels layer through napari's
  undo-aware ``data_setitem``, touching only the mask's bounding box; *Undo* (or
  Ctrl+Z on the prompt layers) undoes it without changing the selected layer.
* Stacks (:class:`~._propagation.StackPanel`): *Propagate* (G) carries the object
  through z or t in a worker; the result is a 3D preview, committed as one object in
  one undo step. *Precompute all planes* writes an embedding store, which the predictor
  then reads; a store beside the image file is used automatically.

Keys (while ``SAM points`` or ``SAM boxes`` is the selected layer): see :mod:`.keys`.

Scripting API: ``points_layer``, ``boxes_layer``, ``preview``, ``masks``, ``scores``,
``last_request``, ``commit()``, ``clear()``, ``undo()``, ``redo()``, ``select_candidate(i)``,
``set_polarity(b)``, ``set_prompt_mode(m)``, ``set_model(...)``,
``set_image_layer(layer)``, ``wait_for_embedding(timeout)``,
``wait_for_prediction(timeout)``, ``propagate()``, ``wait_for_propagation(timeout)``,
``cancel()``, ``precompute()``, ``set_stack_axis(axis)``, ``stack`` (the panel).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from napari_sam.engine.session import InteractiveSession, PromptRequest
from napari_sam.errors import InvalidInputError
from napari_sam.widgets import layers as L
from napari_sam.widgets import preview as P
from napari_sam.widgets._common import (
    DEFAULT_MODEL,
    LatestJobRunner,
    LayerCombo,
    ModelPicker,
    error_message,
    process_events_until,
    report_failure,
    scrollable,
    unwrap,
)
from napari_sam.widgets._embedding import EmbeddingScheduler, EmbedJob
from napari_sam.widgets._model_control import ModelController
from napari_sam.widgets._prompt_layers import (
    PREVIEW_NAME,
    PROMPT_BOX,
    PROMPT_POINTS,
    PromptLayers,
)
from napari_sam.widgets._propagation import StackPanel
from napari_sam.widgets.keys import widget_help
from napari_sam.widgets.prediction import CandidateMasks, predict_candidates
from napari_sam.widgets.prompting import Prompts, mask_bbox

if TYPE_CHECKING:
    from napari_sam.engine.cache import CacheEntry
    from napari_sam.engine.predictor import Predictor
    from napari_sam.models.sam import Sam

__all__ = ["SegmentAnythingWidget"]

N_CANDIDATES = 3
# commit() waits at most this long for a prediction still being computed
PREDICTION_WAIT_S = 60.0
# the form's minimum height in a dock (its first rows stay visible; the rest scrolls)
MIN_FORM_HEIGHT = 240
# new labels layers: uint16 holds 65535 objects, and napari draws it without the
# per-pixel colour hashing a uint32 layer needs (seconds on 8000 x 8000 planes)
NEW_LABELS_DTYPE = np.uint16

KEYS_HELP = widget_help()


@contextlib.contextmanager
def _signals_blocked(*widgets: QWidget) -> Any:
    """Block the widgets' signals while the UI is updated to match the state."""
    old = [w.blockSignals(True) for w in widgets]
    try:
        yield
    finally:
        for w, was in zip(widgets, old, strict=True):
            w.blockSignals(was)


class SegmentAnythingWidget(QWidget):
    """Interactive SAM segmentation of the shown 2D plane of an image layer."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        from napari_sam.engine.cache import EmbeddingCache

        self.cache = EmbeddingCache(EmbeddingCache.DEFAULT_BYTES)
        # the prompt and preview layers, their events and keys
        self.layers = PromptLayers(
            napari_viewer, self._shown_plane, self._on_prompts_edited, self._run_key_action,
            self._show_prompt_mode,
        )
        self.preview: np.ndarray | None = None  # (H, W) bool, chosen candidate
        self.scores: np.ndarray | None = None  # (C,) predicted IoU of each candidate
        self.masks: np.ndarray | None = None  # (C, H, W) bool
        self.candidate: int | None = None
        self.slice_index: tuple[int, ...] = ()
        self.session: InteractiveSession | None = None  # the decoding rule and its state

        self._predictor: Predictor | None = None
        self._predictor_state: dict[str, Any] = {}  # the embedding the predictor holds
        self._image: Image | None = None
        self._image_ok = False
        self._plane_shown = False  # the viewer shows a 2D plane of the image
        self._result: CandidateMasks | None = None
        self._requested: Prompts | None = None  # prompts of the latest request
        self._committing = False
        self._commit_layers: list[Labels] = []  # layers that received commits (for undo)
        self._preview_style = P.DEFAULT_STYLE
        self._store_note: str | None = None  # which embedding store the predictor reads

        # Qt deletes the C++ widget when the viewer closes; late worker results then
        # find ``_closed`` set (a plain dict survives the deletion)
        self._life = {"closed": False}
        life = self._life
        self.destroyed.connect(lambda *_: life.update(closed=True))
        self.models = ModelController(self)  # the model, its loading and its generation
        self.models.loading = True  # the default model is loaded as soon as the widget shows
        self.models.ready.connect(self._on_model_ready)
        self.models.failed.connect(self._on_model_failed)
        self._runner = LatestJobRunner(self, name="napari-sam-predict")
        self._runner.done.connect(self._on_prediction)
        self._build_ui()
        self._set_status(f"Loading model {DEFAULT_MODEL!r}…")
        # the shown plane's embedding: debounced runs in a worker, stale ones dropped
        self.embedding = EmbeddingScheduler(
            self._embed_job, self._on_embedding, self._on_embedding_error, parent=self
        )

        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layers_changed)
        layers.events.removed.connect(self._on_layers_changed)
        layers.events.removed.connect(self._on_layer_removed)
        layers.selection.events.active.connect(self._on_active_layer)
        self.viewer.dims.events.current_step.connect(self._on_dims_changed)
        self.viewer.dims.events.ndisplay.connect(self._on_dims_changed)
        self.viewer.dims.events.order.connect(self._on_dims_changed)
        for layer in layers:
            layer.events.name.connect(self._on_layers_changed)

        active = unwrap(layers.selection.active)
        self.image_combo.set_layer(active if isinstance(active, Image) else self.image_combo.layer)
        self._set_image(self.image_combo.layer)
        QTimer.singleShot(0, self._autoload_default_model)

    # ------------------------------------------------------------------ UI

    def _build_ui(self) -> None:
        content = QWidget(self)
        self.model_picker = ModelPicker(content)
        self.model_picker.changed.connect(self._on_model_picked)
        self.image_combo = LayerCombo(
            self.viewer, Image, accept=lambda layer: layer.name != PREVIEW_NAME, parent=content
        )
        self.image_combo.setToolTip("The image to segment (its shown 2D slice).")
        self.image_combo.layer_changed.connect(self._set_image)
        self.labels_combo = LayerCombo(
            self.viewer,
            Labels,
            none_text="(new layer on commit)",
            accept=self._labels_acceptable,
            parent=content,
        )
        self.labels_combo.setToolTip(
            "Committed objects go here, one new id each. Only labels layers with the image's "
            "shape are listed; '(new layer…)' creates '<image> objects' on the first commit."
        )

        self.points_radio = QRadioButton("points", content)
        self.box_radio = QRadioButton("box", content)
        self.points_radio.setChecked(True)
        self.points_radio.setToolTip("Click to add points (selects the 'SAM points' layer).")
        self.box_radio.setToolTip(
            "Drag a rectangle around the object (selects the 'SAM boxes' layer); only the "
            "latest rectangle is used, together with the points."
        )
        self.prompt_group = QButtonGroup(content)
        self.prompt_group.addButton(self.points_radio)
        self.prompt_group.addButton(self.box_radio)
        self.box_radio.toggled.connect(
            lambda on: self.set_prompt_mode(PROMPT_BOX if on else PROMPT_POINTS)
        )
        prompt = QHBoxLayout()
        prompt.addWidget(self.points_radio)
        prompt.addWidget(self.box_radio)

        self.positive_radio = QRadioButton("positive", content)
        self.negative_radio = QRadioButton("negative", content)
        self.positive_radio.setChecked(True)
        self.positive_radio.setToolTip("Next clicks mark the object (lime). Key: T toggles.")
        self.negative_radio.setToolTip("Next clicks mark background (red). Key: T toggles.")
        self.polarity_group = QButtonGroup(content)
        self.polarity_group.addButton(self.positive_radio)
        self.polarity_group.addButton(self.negative_radio)
        self.positive_radio.toggled.connect(lambda on: self.set_polarity(bool(on)))
        polarity = QHBoxLayout()
        polarity.addWidget(self.positive_radio)
        polarity.addWidget(self.negative_radio)

        self.candidate_group = QButtonGroup(content)
        self.candidate_buttons: list[QRadioButton] = []
        cand = QHBoxLayout()
        for i in range(N_CANDIDATES):
            b = QRadioButton(f"{i + 1}: –", content)
            b.setEnabled(False)
            b.setToolTip(f"Show candidate mask {i + 1} (key {i + 1}); the number is its score.")
            self.candidate_group.addButton(b, i)
            self.candidate_buttons.append(b)
            cand.addWidget(b)
        self.candidate_group.idClicked.connect(self.select_candidate)

        self.style_combo = QComboBox(content)
        self.style_combo.addItems(list(P.PREVIEW_STYLES))
        self.style_combo.setCurrentText(self._preview_style)
        self.style_combo.setToolTip(
            "How the preview is drawn: always in cyan with an outline, so it never looks "
            "like a committed object."
        )
        self.style_combo.currentTextChanged.connect(self.set_preview_style)

        self.tiling_check = QCheckBox("tile large images", content)
        self.tiling_check.setChecked(True)
        self.tiling_check.setToolTip(
            "On: an image longer than 2x the model's input is embedded at native scale in "
            "overlapping tiles (in the background, cached) so small objects are not lost; "
            "each prompt goes to its tile and masks are stitched across tiles. Off: the "
            "whole image is resized to the model input."
        )
        self.tiling_check.toggled.connect(lambda on: self.set_tiling(bool(on)))
        self.overwrite_check = QCheckBox("overwrite existing labels", content)
        self.overwrite_check.setToolTip(
            "Off: a committed mask only fills unlabelled pixels. On: it replaces what is there."
        )
        self.commit_button = QPushButton("Commit (C)", content)
        self.commit_button.clicked.connect(self.commit)
        self.clear_button = QPushButton("Clear (X)", content)
        self.clear_button.clicked.connect(self.clear)
        self.undo_button = QPushButton("Undo", content)
        self.undo_button.setToolTip(
            "Undo the last change of the labels layer that received the last commit "
            "(Ctrl+Z there, or on the SAM layers; Ctrl+Shift+Z redoes)."
        )
        self.undo_button.setEnabled(False)
        self.undo_button.clicked.connect(self.undo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.commit_button)
        buttons.addWidget(self.clear_button)
        buttons.addWidget(self.undo_button)

        self.stack = StackPanel(self, content)

        self.status = QLabel("", content)
        self.status.setWordWrap(True)
        keys = QLabel(KEYS_HELP, content)
        keys.setWordWrap(True)

        form = QFormLayout()
        form.addRow("model", self.model_picker)
        form.addRow("image", self.image_combo)
        form.addRow("labels", self.labels_combo)
        form.addRow("prompt", prompt)
        form.addRow("next points", polarity)
        form.addRow("candidates", cand)
        form.addRow("preview", self.style_combo)
        form.addRow("stack", self.stack)
        lay = QVBoxLayout(content)
        lay.addLayout(form)
        lay.addWidget(self.tiling_check)
        lay.addWidget(self.overwrite_check)
        lay.addLayout(buttons)
        lay.addWidget(self.stack.progress)
        lay.addWidget(self.status)
        lay.addWidget(keys)
        lay.addStretch(1)
        self.scroll_area = scrollable(content, self, MIN_FORM_HEIGHT)

    @property
    def _closed(self) -> bool:
        return self._life["closed"]

    def _set_status(self, text: str) -> None:
        if not self._closed:
            self.status.setText(text)

    def _ready_text(self) -> str:
        limits = None if self.session is None else self.session.limits_note  # EfficientSAM
        store = f" ({self._store_note})" if self._store_note else ""
        return f"Ready ({self.models.label}): click on the object.{store}" + (
            f" {limits}" if limits else "") + self._tiling_text()

    def _tiling_text(self) -> str:
        """What the status line says about tiles: "" for an image that fits the model."""
        from napari_sam.engine.tiled import TiledEmbedding, model_input_size, tiling_for

        entry, predictor = self._entry, self._predictor
        if isinstance(entry, TiledEmbedding):
            return (f" Large image {entry.description} (switch off: 'tile large "
                    "images').")
        if predictor is None or entry is None or self.tiling_mode == "auto":
            return ""
        if tiling_for(entry.original_size, model_input_size(predictor.model), "auto"):
            return (" Large image embedded whole (tiling is off): small objects may be "
                    "lost; tick 'tile large images'.")
        return ""

    # ---------------------------------------------------------------- tiling

    @property
    def tiling_mode(self) -> str:
        """``"auto"`` (large images in native-scale tiles) or ``"off"``: the switch."""
        return "auto" if self.tiling_check.isChecked() else "off"

    def set_tiling(self, on: bool) -> None:
        """Tile large images (True, the default) or embed every image whole (False);
        re-embeds the shown plane when it changes anything."""
        if self.tiling_check.isChecked() != bool(on):
            self.tiling_check.setChecked(bool(on))  # emits toggled: back here
            return
        predictor = self._predictor
        if predictor is None or predictor.tiling == self.tiling_mode:
            return
        predictor.tiling = self.tiling_mode
        self._reset_prediction()
        self._request_embedding(immediate=True)

    # ---------------------------------------------------------------- model

    @property
    def model(self) -> Sam | None:
        """The current Sam model (or None while none is loaded)."""
        return self.models.model

    def set_model(self, model: Any, device: str | None = None, label: str | None = None) -> None:
        """Use ``model``: a Sam instance, a zoo name or a checkpoint path (loaded now).

        ``label`` names a Sam instance in the model box (default: its class name).

        Raises the loader's typed errors (ModelNotFoundError, CheckpointError,
        DownloadError) after showing them as a notification; the previous model
        stays in use.
        """
        self.models.set_model(model, device, label)

    def _autoload_default_model(self) -> None:
        models = self.models
        if models.generation == 0 and models.model is None and not self._closed:
            self._load_model_async(DEFAULT_MODEL, self.model_picker.device)

    def _on_model_picked(self, name: str, device: str) -> None:
        if self.models.model is not None and name == self.models.instance_label:
            error = self.models.pick(name, device or None)
            if error is not None:
                show_error(error)
            return
        self._load_model_async(name, device or None)

    def _load_model_async(self, name: str, device: str | None) -> None:
        self._set_status(f"Loading model {name!r}…")
        self.models.load_async(name, device)

    def _on_model_failed(self, name: str, message: str) -> None:
        if self.models.model is not None:
            self.model_picker.show_model(self.models.label)
        (show_warning if name == DEFAULT_MODEL else show_error)(message)
        self._set_status(message)

    def _on_model_ready(self, model: Sam, label: str) -> None:
        from napari_sam.engine.predictor import Predictor

        self._predictor = Predictor(model, cache=self.cache, tiling=self.tiling_mode)
        self.stack.drop()
        self._store_note = self.stack.attach_store(self._predictor, self._image)
        self.session = InteractiveSession(self._predictor)
        self._predictor_state = {}
        self.model_picker.show_model(label)
        self._reset_prediction()
        self._request_embedding(immediate=True)

    # ---------------------------------------------------------------- image

    @property
    def image_layer(self) -> Image | None:
        """The image layer being segmented."""
        return self._image

    def set_image_layer(self, layer: Image | None) -> None:
        """Segment ``layer`` (an Image layer in the viewer)."""
        self.image_combo.set_layer(layer)
        if self._image is not layer:
            self._set_image(layer)

    def _labels_acceptable(self, layer: Labels) -> bool:
        if self.layers.owns(layer):
            return False
        return self._image is None or L.labels_fit_image(layer, self._image)

    @property
    def labels_layer(self) -> Labels | None:
        """The target Labels layer (None: one is created on the first commit)."""
        return self.labels_combo.layer

    def set_labels_layer(self, layer: Labels | None) -> None:
        """Commit into ``layer`` (must have the image's shape), or None for a new layer."""
        if layer is not None and self._image is not None and not L.labels_fit_image(
            layer, self._image
        ):
            raise InvalidInputError(
                f"Labels layer {layer.name!r} has shape {layer.data.shape}, the image "
                f"{self._image.name!r} has {L.spatial_shape(self._image)}; pick a matching layer."
            )
        self.labels_combo.set_layer(layer)

    def _set_image(self, layer: Image | None) -> None:
        if layer is self._image:
            return
        old = self._image
        if old is not None:
            with contextlib.suppress(Exception):
                old.events.contrast_limits.disconnect(self._on_contrast_limits)
            with contextlib.suppress(Exception):
                old.events.data.disconnect(self._on_image_content)
            for ev in ("scale", "translate", "rotate", "shear", "affine"):
                with contextlib.suppress(Exception):
                    getattr(old.events, ev).disconnect(self._on_image_transform)
        self._image = layer
        self._image_ok = False
        self._plane_shown = False
        self.stack.set_image(None)
        self.embedding.invalidate()
        self._reset_prediction()
        self.labels_combo.refresh()
        if layer is None:
            self._set_status("Add or select an image layer.")
            return
        try:
            L.check_segmentable(layer)
        except InvalidInputError as err:
            show_warning(str(err))
            self._set_status(str(err))
            return
        self._image_ok = True
        self.stack.set_image(layer)
        if self._predictor is not None:
            self._store_note = self.stack.attach_store(self._predictor, layer)
        layer.events.contrast_limits.connect(self._on_contrast_limits)
        layer.events.data.connect(self._on_image_content)
        for ev in ("scale", "translate", "rotate", "shear", "affine"):
            getattr(layer.events, ev).connect(self._on_image_transform)
        self.layers.clear_data()
        self._ensure_layers()
        self._update_slice(force=True)

    def _on_image_content(self, event: Any = None) -> None:
        self.stack.drop()
        self._reset_prediction()
        self._request_embedding()

    def _on_contrast_limits(self, event: Any = None) -> None:
        image = self._image
        limits = None if image is None else tuple(float(v) for v in image.contrast_limits)
        if limits == self.embedding.limits and self._ready:
            return  # e.g. napari's auto-contrast left them as they were
        self._on_image_content(event)

    def _on_image_transform(self, event: Any = None) -> None:
        self._ensure_layers()
        self._requested = None  # same prompts, new mapping: predict again
        self._update_preview()

    def _on_layers_changed(self, event: Any = None) -> None:
        if self.layers.updating or self._closed:
            return
        if event is not None and getattr(event, "type", "") == "inserted":
            with contextlib.suppress(Exception):
                event.value.events.name.connect(self._on_layers_changed)
        self.image_combo.refresh()
        self.labels_combo.refresh()
        if self._image is None and self.image_combo.layer is not None:
            self._set_image(self.image_combo.layer)

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        if layer is self._image:
            self._set_image(self.image_combo.layer)
        if layer in self._commit_layers:
            self._commit_layers = [x for x in self._commit_layers if x is not layer]
            self._update_undo_button()

    def _on_active_layer(self, event: Any = None) -> None:
        active = unwrap(self.viewer.layers.selection.active)
        if self._image is None and isinstance(active, Image) and active.name != PREVIEW_NAME:
            self.set_image_layer(active)

    # ------------------------------------------------------- own layers

    @property
    def points_layer(self) -> Points | None:
        """The ``SAM points`` layer (None until an image is set, or after it was removed)."""
        return self.layers.points

    @property
    def boxes_layer(self) -> Shapes | None:
        """The ``SAM boxes`` layer (None until an image is set, or after it was removed)."""
        return self.layers.boxes

    @property
    def preview_layer(self) -> Labels | None:
        """The ``SAM preview`` layer (None until an image is set, or after it was removed)."""
        return self.layers.preview

    def _shown_plane(self) -> tuple[Image | None, tuple[int, ...]]:
        """The image layer and the slice index of the shown plane (read by the layers)."""
        return self._image, self.slice_index

    def _ensure_layers(self) -> None:
        """Create (or re-fit) the prompt and preview layers for the current image."""
        image = self._image
        if image is None or not self._image_ok or self._closed:
            return
        self.layers.ensure(image, self.slice_index)
        self._show_preview()
        self.image_combo.refresh()
        self.labels_combo.refresh()

    # ------------------------------------------------------------ keys

    def _run_key_action(self, action: str, argument: int | None) -> None:
        """Run a shortcut's action; "nothing to do" is a message, never an error."""
        if action == "toggle_polarity":
            self.set_polarity(not self.layers.positive_next)
        elif action == "candidate":
            self._wait_prediction()
            if self.masks is not None and argument is not None and argument < len(self.masks):
                self.select_candidate(argument)
            elif self.masks is not None:
                self._set_status(
                    f"This prediction has one mask (several points or a box); "
                    f"candidate {(argument or 0) + 1} does not exist."
                )
        elif action == "commit":
            self.commit()
        elif action == "clear":
            self.clear()
        elif action == "propagate":
            self.propagate()
        elif action == "undo":
            self.undo()
        elif action == "redo":
            self.redo()

    def set_polarity(self, positive: bool) -> None:
        """Make the next clicked points positive (True) or negative (False)."""
        self.layers.set_polarity(positive)
        radio = self.positive_radio if self.layers.positive_next else self.negative_radio
        if not radio.isChecked():
            with _signals_blocked(self.positive_radio, self.negative_radio):
                radio.setChecked(True)

    # ------------------------------------------------------- prompt mode

    @property
    def prompt_mode(self) -> str:
        """``"points"`` (clicks add points) or ``"box"`` (drag a rectangle)."""
        return self.layers.mode

    def set_prompt_mode(self, mode: str) -> None:
        """Click points (``"points"``) or draw a box (``"box"``): selects the prompt layer
        and puts it in its drawing mode."""
        self.layers.set_mode(mode)
        self._show_prompt_mode(mode)
        if None in (self.points_layer, self.boxes_layer) and self._image_ok:
            self._ensure_layers()
        self.layers.select_prompt_layer(self._plane_shown)

    def _show_prompt_mode(self, mode: str) -> None:
        """Check the radio button of prompt mode ``mode``."""
        radio = self.box_radio if mode == PROMPT_BOX else self.points_radio
        if not radio.isChecked():
            with _signals_blocked(self.points_radio, self.box_radio):
                radio.setChecked(True)

    def _restore_prompt_modes(self) -> None:
        """Put the prompt layers back in their drawing modes (napari switches them to
        pan/zoom in a 3D view)."""
        if not self._closed:
            self.layers.restore_draw_modes(self._plane_shown)

    # ---------------------------------------------------------- slicing

    def _on_dims_changed(self, event: Any = None) -> None:
        self._update_slice()

    def _update_slice(self, force: bool = False) -> None:
        image = self._image
        if image is None or not self._image_ok:
            return
        try:
            L.check_plane_displayed(image, self.viewer.dims)
            index = L.current_slice_index(image, self.viewer.dims.point)
        except InvalidInputError as err:
            # 3D view, rolled axes or off the image: wait; back on a plane, resume
            self._plane_shown = False
            self._reset_prediction()
            self.embedding.invalidate()
            self._set_status(str(err))
            return
        was_hidden = not self._plane_shown
        self._plane_shown = True
        if was_hidden:
            # napari makes the layers editable again while it re-slices them
            QTimer.singleShot(0, self._restore_prompt_modes)
        if index == self.slice_index and not force and not was_hidden:
            return
        self.slice_index = index
        self._reset_prediction()  # also moves the (empty) preview to the new plane
        self._request_embedding(immediate=force)

    # -------------------------------------------------------- embedding

    @property
    def _ready(self) -> bool:
        return self.embedding.entry is not None

    @property
    def _entry(self) -> CacheEntry | None:
        """The shown plane's embedding (the prediction thread gives it to the predictor)."""
        return self.embedding.entry

    @property
    def _emb_gen(self) -> int:
        """Bumps on every embedding request: stale embeddings are dropped."""
        return self.embedding.generation

    def _request_embedding(self, immediate: bool = False) -> None:
        """Invalidate the current embedding and compute the shown plane's (debounced)."""
        self.embedding.invalidate()
        self._runner.invalidate()
        if self._predictor is None or self._image is None or not self._image_ok:
            if self._predictor is None:
                self._set_status(
                    f"Loading model {self.model_picker.name!r}…" if self.models.loading
                    else "No model loaded: pick one in the model box."
                )
            return
        if not self._plane_shown:
            return
        self._set_status("Computing the image embedding…")
        self.embedding.schedule(immediate)

    def _embed_job(self) -> EmbedJob | None:
        """What the scheduler embeds now: the shown plane (None: nothing to embed)."""
        image, predictor = self._image, self._predictor
        if image is None or predictor is None or self._closed or not self._image_ok:
            return None
        if not self._plane_shown:
            return None
        limits = tuple(float(v) for v in image.contrast_limits)
        return EmbedJob(image.data, self.slice_index, limits, predictor)

    def _on_embedding(self, predictor: Any, entry: Any) -> None:
        if predictor is not self._predictor or self._closed:
            return  # stale: the model changed meanwhile
        self.embedding.entry = entry
        self._set_status(self._ready_text())
        self._requested = None
        self._update_preview()

    def _on_embedding_error(self, err: BaseException) -> None:
        if self._closed:
            return
        msg = f"Could not compute the image embedding: {error_message(err)}"
        show_error(msg)
        self._set_status(msg)

    @property
    def ready(self) -> bool:
        """Whether the shown plane's embedding is set and prompts give previews."""
        return self._ready

    def wait_for_embedding(self, timeout: float = 60.0) -> bool:
        """Process Qt events until the embedding is ready (or ``timeout`` s); for scripts/tests."""
        self.embedding.flush()
        return process_events_until(lambda: self._ready or self._closed, timeout)

    # ------------------------------------------------------- stacks

    def propagate(self) -> bool:
        """Propagate the shown plane's object along the stack axis, in a worker.

        The seed is the preview (the chosen candidate) or, without one, the target
        labels layer's selected label on the shown plane. Returns False (with a message)
        when there is nothing to propagate; call :meth:`wait_for_propagation`, then
        :meth:`commit` writes the 3D object (one undo step).
        """
        return self.stack.propagate()

    def wait_for_propagation(self, timeout: float = 60.0) -> bool:
        """Process Qt events until no propagation or precompute runs (or ``timeout`` s)."""
        return self.stack.wait(timeout)

    def cancel(self) -> None:
        """Cancel a running propagation or precompute; nothing is committed."""
        self.stack.cancel()

    def precompute(self) -> bool:
        """Store every plane's embedding on disk (beside the image file, or in the
        napari-sam cache folder), in a worker; the predictor then reads the store."""
        return self.stack.precompute()

    def set_stack_axis(self, axis: int) -> None:
        """Propagate along leading data axis ``axis`` (z, or t to track)."""
        self.stack.set_axis(axis)

    @property
    def propagated(self) -> Any:
        """The propagated object shown as the 3D preview (:class:`~.volume.PropagatedObject`)."""
        return self.stack.result

    def _on_prompts_edited(self) -> None:
        self.stack.drop()  # the seed changed: the propagated object is stale
        self._update_preview()

    # ------------------------------------------------------- prediction

    @property
    def prediction_pending(self) -> bool:
        """A prediction for the current prompts is still being computed."""
        return self._runner.pending

    def wait_for_prediction(self, timeout: float = 60.0) -> bool:
        """Process Qt events until the preview matches the prompts (or ``timeout`` s).

        Predictions run in a background thread; scripts call this after changing
        prompts and before reading ``preview``, ``masks`` or ``scores``.
        """
        return process_events_until(lambda: not self._runner.pending or self._closed, timeout)

    def _wait_prediction(self) -> None:
        if self._runner.pending:
            process_events_until(lambda: not self._runner.pending or self._closed,
                                 PREDICTION_WAIT_S)

    def _update_preview(self) -> None:
        """Ask the prediction thread for masks of the current prompts."""
        if not self._ready or self._image is None or self._predictor is None:
            return
        if self._entry is None:
            return
        prompts = self.layers.prompts()
        if prompts.empty:
            self._requested = None
            self._reset_prediction()
            self._set_status(self._ready_text())
            return
        if prompts.same_as(self._requested):
            return  # e.g. an older rectangle was removed: nothing the model sees changed
        request = self.session.request(prompts.points, prompts.labels, prompts.box)
        self._requested = prompts
        job = partial(
            predict_candidates, self.session, self._predictor_state, self._entry, request,
            self._preview_style, P.outline_width(L.image_plane_shape(self._image)),
        )
        self._runner.submit(job)

    def _on_prediction(self, ticket: int, result: CandidateMasks | None, error: Any) -> None:
        if self._closed:
            return
        if error is not None:
            self._requested = None
            report_failure("Prediction", error, self._set_status)
            return
        if result is None or result.session is not self.session:
            return
        self.session.accept(result.request, result.prediction)
        self._result = result
        self.masks = result.masks
        self.scores = self.session.scores
        self._show_candidate(self.session.candidate)
        if result.route:  # a tiled image: which tile(s), or the whole-image fallback
            self._set_status(f"{self.status.text()} {result.route}")
        if result.request.note:  # e.g. EfficientSAM dropped points beyond its limit
            self._set_status(f"{self.status.text()} {result.request.note}")

    @property
    def last_request(self) -> PromptRequest | None:
        """The request of the shown prediction (prompts, multimask, refine), or None."""
        return None if self.session is None else self.session.last_request

    def select_candidate(self, i: int) -> None:
        """Show candidate mask ``i`` (0-based) as the preview."""
        self._wait_prediction()
        self.stack.drop()
        if self.masks is None:
            raise InvalidInputError("There is no prediction yet: add a point or a box first.")
        if not 0 <= i < len(self.masks):
            raise InvalidInputError(
                f"Candidate {i} does not exist; this prediction has {len(self.masks)}."
            )
        self._show_candidate(int(i))

    def _show_candidate(self, i: int) -> None:
        self.candidate = i
        if self.session is not None and self.session.masks is not None:
            self.session.select(i)
        self.preview = self.masks[i]
        for k, b in enumerate(self.candidate_buttons):
            has = self.scores is not None and k < len(self.scores)
            b.setEnabled(has)
            b.setText(f"{k + 1}: {self.scores[k]:.2f}" if has else f"{k + 1}: –")
        self.candidate_buttons[i].setChecked(True)
        self._show_preview()
        box = self._preview_box()
        n = 0 if box is None else int(self.preview[box].sum())
        self._set_status(
            f"Candidate {i + 1} of {len(self.masks)} (score {self.scores[i]:.2f}, {n} px). "
            "C commits, X clears."
        )

    def _preview_box(self) -> tuple[slice, slice] | None:
        """Bounding box of the shown preview (computed by the prediction thread)."""
        res = self._result
        if self.preview is None:
            return None
        if res is not None and self.candidate is not None and self.preview is res.masks[
            self.candidate
        ]:
            return res.boxes[self.candidate]
        return mask_bbox(self.preview)  # set by a script: compute it

    @property
    def preview_style(self) -> str:
        """How the preview is drawn (a key of ``napari_sam.widgets.preview.PREVIEW_STYLES``)."""
        return self._preview_style

    def set_preview_style(self, style: str) -> None:
        """Draw the preview as ``"outline + fill"`` (default), ``"outline"`` or ``"fill"``."""
        if style not in P.PREVIEW_STYLES:
            raise InvalidInputError(
                f"Unknown preview style {style!r}; choose from {', '.join(P.PREVIEW_STYLES)}."
            )
        self._preview_style = style
        if self.style_combo.currentText() != style:
            self.style_combo.blockSignals(True)
            self.style_combo.setCurrentText(style)
            self.style_combo.blockSignals(False)
        self._show_preview()

    def _show_preview(self) -> None:
        """Put the preview's bounding box (drawn per the style) in the preview layer."""
        layer, image = self.preview_layer, self._image
        if layer is None or layer not in self.viewer.layers or image is None:
            return
        width = P.outline_width(L.image_plane_shape(image))
        propagated = self.stack.result
        if propagated is not None:  # the 3D preview: every plane of the object
            pixels = self.stack.preview_pixels(self._preview_style, width)
            self.layers.show_preview(pixels, L.data_affine(image, propagated.offset))
            return
        box = self._preview_box()
        offset = (0, 0)
        if box is None:
            pixels = np.zeros((1, 1), dtype=np.uint8)
        else:
            offset = (box[0].start, box[1].start)
            res = self._result
            cached = (
                res is not None and res.style == self._preview_style
                and self.candidate is not None and self.preview is res.masks[self.candidate]
            )
            pixels = res.crops[self.candidate] if cached else P.render_preview(
                self.preview[box], self._preview_style, width,
            )
        shift = np.eye(3)
        shift[:2, 2] = offset
        self.layers.show_preview(pixels, L.plane_affine(image, self.slice_index) @ shift)

    def _reset_prediction(self) -> None:
        self._runner.invalidate()
        self._requested = None
        self._result = None
        if self.session is not None:
            self.session.reset()
        self.preview = None
        self.scores = None
        self.masks = None
        self.candidate = None
        self.candidate_group.setExclusive(False)
        for k, b in enumerate(self.candidate_buttons):
            b.setChecked(False)
            b.setEnabled(False)
            b.setText(f"{k + 1}: –")
        self.candidate_group.setExclusive(True)
        if self._image is not None and self.preview_layer is not None:
            with contextlib.suppress(Exception):
                self._show_preview()

    # ------------------------------------------------------ commit/clear

    def commit(self) -> int:
        """Write the preview into the labels layer as a new object (undoable); clear prompts.

        Waits for a prediction still being computed. Returns the new label id, or 0
        when there was nothing to write.
        """
        if self._committing:
            return 0
        if self.stack.running == "propagate":
            show_info("Propagation is running: wait for it (or cancel it) before committing.")
            return 0
        self._committing = True
        try:
            self._wait_prediction()
            return self._commit()
        finally:
            self._committing = False

    def _commit(self) -> int:
        propagated = self.stack.result if self._image is not None else None
        box = self._preview_box() if self._image is not None else None
        if box is None and propagated is None:
            show_info("Nothing to commit: click on an object first (or pick another candidate).")
            return 0
        labels = self._target_labels()
        if propagated is not None:  # the whole 3D object in one undo step
            new_id = L.commit_object(
                labels, propagated.mask, propagated.offset,
                overwrite=self.overwrite_check.isChecked(), label_id=propagated.object_id,
            )
        else:
            new_id = L.commit_mask(
                labels, self.preview[box], self.slice_index,
                overwrite=self.overwrite_check.isChecked(), offset=(box[0].start, box[1].start),
            )
        if new_id == 0:
            show_info(
                "Nothing was written: every pixel of the mask already has a label. Tick "
                "'overwrite existing labels' to replace them."
            )
            return 0
        self._commit_layers = [x for x in self._commit_layers if x is not labels] + [labels]
        self._update_undo_button()
        self.clear()
        self._set_status(f"Committed object {new_id} to {labels.name!r} (Undo or Ctrl+Z undoes).")
        return new_id

    def _target_labels(self) -> Labels:
        layer = self.labels_combo.layer
        image = self._image
        if layer is not None and layer in self.viewer.layers and L.labels_fit_image(layer, image):
            return layer
        names = [lay.name for lay in self.viewer.layers]
        layer = L.make_labels_layer(
            image, L.unique_name(names, f"{image.name} objects"), dtype=NEW_LABELS_DTYPE
        )
        active = self.viewer.layers.selection.active
        self.viewer.add_layer(layer)
        # right above its image: visible over it, under the prompt layers
        layers = self.viewer.layers
        if image in layers:
            layers.move(layers.index(layer), layers.index(image) + 1)
        self.layers.raise_to_top()
        if active is not None and active in layers:
            layers.selection.active = active
        self.labels_combo.refresh()
        self.labels_combo.set_layer(layer)
        return layer

    def _undo_target(self) -> Labels | None:
        for layer in reversed(self._commit_layers):
            if layer in self.viewer.layers:
                return layer
        return None

    def _update_undo_button(self) -> None:
        if not self._closed:
            self.undo_button.setEnabled(self._undo_target() is not None)

    def undo(self) -> bool:
        """Undo the last change of the labels layer that received the last commit.

        The same as Ctrl+Z with that layer selected (napari's undo history), without
        changing the selected layer. Returns False when no layer received a commit.
        """
        return self._history("undo", "Undid the last change of {name!r} (Ctrl+Shift+Z redoes).")

    def redo(self) -> bool:
        """Redo what :meth:`undo` (or Ctrl+Z on the labels layer) undid last."""
        return self._history("redo", "Redid the last undone change of {name!r}.")

    def _history(self, step: str, done: str) -> bool:
        """Run ``layer.undo``/``layer.redo`` (``step``) on the last commit's layer."""
        layer = self._undo_target()
        if layer is None:
            show_info(f"Nothing to {step}: no object was committed yet.")
            return False
        getattr(layer, step)()
        self._set_status(done.format(name=layer.name))
        return True

    def clear(self) -> None:
        """Remove all prompts and the preview (a running propagation is cancelled, a 3D
        preview discarded); committed labels are untouched."""
        self.stack.drop()
        self.layers.clear_data()
        self._reset_prediction()
        if self.layers.missing():
            self._ensure_layers()  # the user deleted one of them: bring it back
        if self._ready:
            self._set_status(self._ready_text())

    # ------------------------------------------------------------ close

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Disconnect from the viewer, unbind the keys and stop listening to workers."""
        if self._closed:
            return
        self.layers.close()
        self._life["closed"] = True
        self.stack.close_jobs()
        self.embedding.close()
        self._runner.stop()
        self.models.close()
        ev = self.viewer.layers.events
        for sig, slot in (
            (ev.inserted, self._on_layers_changed),
            (ev.removed, self._on_layers_changed),
            (ev.removed, self._on_layer_removed),
            (self.viewer.layers.selection.events.active, self._on_active_layer),
            (self.viewer.dims.events.current_step, self._on_dims_changed),
            (self.viewer.dims.events.ndisplay, self._on_dims_changed),
            (self.viewer.dims.events.order, self._on_dims_changed),
        ):
            with contextlib.suppress(Exception):
                sig.disconnect(slot)
