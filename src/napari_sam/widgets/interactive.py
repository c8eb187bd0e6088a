"""The "Segment Anything" dock widget: click/box prompts -> live mask preview -> commit.

Thin glue between napari layers and :class:`napari_sam.engine.predictor.Predictor`:

* The widget owns a Points layer ``SAM points`` (green = positive, red = negative),
  a Shapes layer ``SAM boxes`` (rectangles) and a 2D Labels layer ``SAM preview``.
  Prompt layers copy the image layer's transform, so clicks land on image pixels;
  prompts are still read through the layers' transforms (:mod:`.layers`).
* The image embedding of the shown 2D plane is computed in a napari
  ``thread_worker`` (never on the UI thread) and kept in an
  :class:`~napari_sam.engine.cache.EmbeddingCache`, so going back to a slice is
  instant. A generation counter drops results of stale workers (image, slice,
  contrast or model changed meanwhile).
* Every prompt change re-runs the (cheap) mask decoder on the main thread and
  shows the chosen candidate in the preview layer. Committing writes a new
  instance id into the target Labels layer through napari's undo-aware
  ``data_setitem`` (one Ctrl+Z removes it) and clears the prompts.

Keys (while ``SAM points`` or ``SAM boxes`` is the active layer): ``T`` toggles the
polarity of the next points, ``1``/``2``/``3`` pick a candidate mask, ``C`` (or
Enter on the points layer) commits, ``X`` (or Escape on the points layer) clears.

Scripting API: ``points_layer``, ``boxes_layer``, ``preview``, ``scores``,
``commit()``, ``clear()``, ``select_candidate(i)``, ``set_model(...)``,
``set_image_layer(layer)``, ``wait_for_embedding(timeout)``.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from napari_sam.errors import InvalidInputError, NapariSamError
from napari_sam.widgets import layers as L
from napari_sam.widgets._common import (
    DEFAULT_MODEL,
    LayerCombo,
    ModelPicker,
    error_message,
    process_events_until,
)

__all__ = ["SegmentAnythingWidget"]

POINTS_NAME = "SAM points"
BOXES_NAME = "SAM boxes"
PREVIEW_NAME = "SAM preview"
N_CANDIDATES = 3
# embedding requests are debounced: dragging a contrast slider or scrolling a stack
# starts one encoder run when the user pauses, not one per event
EMBED_DELAY_MS = 150
CACHE_BYTES = 512 * 2**20

KEYS_HELP = (
    "Click: add point (T toggles +/-) · draw rectangles in 'SAM boxes' · "
    "1/2/3: candidate · C: commit · X: clear · Ctrl+Z on the labels layer: undo"
)


def _embed_plane(
    data: Any,
    slice_index: tuple[int, ...],
    contrast_limits: tuple[float, float] | None,
    predictor: Any,
) -> Any:
    """Worker body: read one plane, normalise it, return its (cached or new) CacheEntry."""
    from napari_sam.engine.image import to_rgb_uint8

    plane = np.asarray(data[slice_index] if slice_index else data)
    return predictor.embed(to_rgb_uint8(plane, contrast_limits))


def _load(name: str, device: str | None) -> Any:
    from napari_sam.models.zoo import load_model

    return load_model(name, device=device)


class SegmentAnythingWidget(QWidget):
    """Interactive SAM segmentation of the shown 2D plane of an image layer."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        from napari_sam.engine.cache import EmbeddingCache

        self.cache = EmbeddingCache(CACHE_BYTES)
        self.points_layer: Points | None = None
        self.boxes_layer: Shapes | None = None
        self.preview_layer: Labels | None = None
        self.preview: np.ndarray | None = None  # (H, W) bool, chosen candidate
        self.scores: np.ndarray | None = None  # (C,) predicted IoU of each candidate
        self.masks: np.ndarray | None = None  # (C, H, W) bool
        self.candidate: int | None = None
        self.slice_index: tuple[int, ...] = ()
        self.last_prompts: dict[str, Any] | None = None  # what predict() last received

        self._model: Any = None
        self._model_label = ""
        self._instance_label: str | None = None  # label of a model given as an object
        self._predictor: Any = None
        self._model_gen = 0  # bumps on every model change: stale loads are dropped
        self._emb_gen = 0  # bumps on every embedding request: stale embeddings are dropped
        self._loading = False
        self._ready = False
        self._image: Image | None = None
        self._image_ok = False
        self._logits: np.ndarray | None = None
        self._workers: set[Any] = set()
        self._positive_next = True
        self._updating_layers = False

        # Qt deletes the C++ widget when the viewer closes; late worker results then
        # find ``_closed`` set (a plain dict survives the deletion)
        self._life = {"closed": False}
        life = self._life
        self.destroyed.connect(lambda *_: life.update(closed=True))
        self._build_ui()
        self._embed_timer = QTimer(self)
        self._embed_timer.setSingleShot(True)
        self._embed_timer.setInterval(EMBED_DELAY_MS)
        self._embed_timer.timeout.connect(self._start_embedding)

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

        active = layers.selection.active
        self.image_combo.set_layer(active if isinstance(active, Image) else self.image_combo.layer)
        self._set_image(self.image_combo.layer)
        QTimer.singleShot(0, self._autoload_default_model)

    # ------------------------------------------------------------------ UI

    def _build_ui(self) -> None:
        self.model_picker = ModelPicker(self)
        self.model_picker.changed.connect(self._on_model_picked)
        self.image_combo = LayerCombo(
            self.viewer, Image, accept=lambda layer: layer.name != PREVIEW_NAME, parent=self
        )
        self.image_combo.setToolTip("The image to segment (its shown 2D slice).")
        self.image_combo.layer_changed.connect(self._set_image)
        self.labels_combo = LayerCombo(
            self.viewer,
            Labels,
            none_text="(new layer on commit)",
            accept=self._labels_acceptable,
            parent=self,
        )
        self.labels_combo.setToolTip(
            "Committed objects go here, one new id each. Only labels layers with the image's "
            "shape are listed; '(new layer…)' creates '<image> objects' on the first commit."
        )

        self.positive_radio = QRadioButton("positive", self)
        self.negative_radio = QRadioButton("negative", self)
        self.positive_radio.setChecked(True)
        self.positive_radio.setToolTip("Next clicks mark the object (green). Key: T toggles.")
        self.negative_radio.setToolTip("Next clicks mark background (red). Key: T toggles.")
        self.positive_radio.toggled.connect(lambda on: self.set_polarity(bool(on)))
        polarity = QHBoxLayout()
        polarity.addWidget(self.positive_radio)
        polarity.addWidget(self.negative_radio)

        self.candidate_group = QButtonGroup(self)
        self.candidate_buttons: list[QRadioButton] = []
        cand = QHBoxLayout()
        for i in range(N_CANDIDATES):
            b = QRadioButton(f"{i + 1}: –", self)
            b.setEnabled(False)
            b.setToolTip(f"Show candidate mask {i + 1} (key {i + 1}); the number is its score.")
            self.candidate_group.addButton(b, i)
            self.candidate_buttons.append(b)
            cand.addWidget(b)
        self.candidate_group.idClicked.connect(self.select_candidate)

        self.overwrite_check = QCheckBox("overwrite existing labels", self)
        self.overwrite_check.setToolTip(
            "Off: a committed mask only fills unlabelled pixels. On: it replaces what is there."
        )
        self.commit_button = QPushButton("Commit (C)", self)
        self.commit_button.clicked.connect(self.commit)
        self.clear_button = QPushButton("Clear (X)", self)
        self.clear_button.clicked.connect(self.clear)
        buttons = QHBoxLayout()
        buttons.addWidget(self.commit_button)
        buttons.addWidget(self.clear_button)

        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        keys = QLabel(KEYS_HELP, self)
        keys.setWordWrap(True)

        form = QFormLayout()
        form.addRow("model", self.model_picker)
        form.addRow("image", self.image_combo)
        form.addRow("labels", self.labels_combo)
        form.addRow("next points", polarity)
        form.addRow("candidates", cand)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.overwrite_check)
        lay.addLayout(buttons)
        lay.addWidget(self.status)
        lay.addWidget(keys)
        lay.addStretch(1)

    @property
    def _closed(self) -> bool:
        return self._life["closed"]

    def _set_status(self, text: str) -> None:
        if not self._closed:
            self.status.setText(text)

    # ---------------------------------------------------------------- model

    @property
    def model(self) -> Any:
        """The current Sam model (or None while none is loaded)."""
        return self._model

    def set_model(self, model: Any, device: str | None = None, label: str | None = None) -> None:
        """Use ``model``: a Sam instance, a zoo name or a checkpoint path (loaded now).

        ``label`` names a Sam instance in the model box (default: its class name).

        Raises the loader's typed errors (ModelNotFoundError, CheckpointError,
        DownloadError) after showing them as a notification; the previous model
        stays in use.
        """
        if isinstance(model, (str, Path)):
            try:
                loaded = _load(str(model), device)
            except Exception as err:
                self._model_failed(str(model), err)
                raise
            self._install_model(loaded, str(model))
        else:
            if device is not None and hasattr(model, "to"):
                model = model.to(device)
            label = label or f"<{type(model).__name__} object>"
            self._install_model(model, label)
            self._instance_label = label

    def _autoload_default_model(self) -> None:
        if self._model_gen == 0 and self._model is None and not self._closed:
            self._load_model_async(DEFAULT_MODEL, self.model_picker.device)

    def _on_model_picked(self, name: str, device: str) -> None:
        if self._model is not None and name == self._instance_label:
            # a model given as an object (no name to reload): move it to the new device
            try:
                from napari_sam.models.zoo import resolve_device

                model = self._model.to(resolve_device(device or None))
            except Exception as err:
                show_error(f"Could not move the model to {device or 'auto'}: {error_message(err)}")
                return
            self._install_model(model, name)
            self._instance_label = name
            return
        self._load_model_async(name, device or None)

    def _load_model_async(self, name: str, device: str | None) -> None:
        self._model_gen += 1
        gen = self._model_gen
        self._loading = True
        self._set_status(f"Loading model {name!r}…")
        worker = create_worker(
            _load, name, device, _progress={"desc": f"SAM: loading {name}"}, _ignore_errors=True
        )
        worker.returned.connect(partial(self._on_model_loaded, gen, name))
        worker.errored.connect(partial(self._on_model_error, gen, name))
        self._start(worker)

    def _on_model_loaded(self, gen: int, name: str, model: Any) -> None:
        if gen != self._model_gen or self._closed:
            return
        self._loading = False
        self._install_model(model, name)

    def _on_model_error(self, gen: int, name: str, err: BaseException) -> None:
        if gen != self._model_gen or self._closed:
            return
        self._loading = False
        self._model_failed(name, err)

    def _model_failed(self, name: str, err: BaseException) -> None:
        msg = f"Could not load model {name!r}: {error_message(err)}"
        if name == DEFAULT_MODEL:
            msg += (
                " The plugin's embedded default model is missing or broken; pick another model "
                "(vit_t is small and downloads once) or 'Browse…' to a local checkpoint."
            )
        if self._model is not None:
            msg += f" Still using {self._model_label}."
            self.model_picker.show_model(self._model_label)
        (show_warning if name == DEFAULT_MODEL else show_error)(msg)
        self._set_status(msg)

    def _install_model(self, model: Any, label: str) -> None:
        from napari_sam.engine.predictor import Predictor

        self._model_gen += 1
        self._loading = False
        self._model = model
        self._model_label = label
        self._instance_label = None
        self._predictor = Predictor(model, cache=self.cache)
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
        if layer is self.preview_layer or layer.name == PREVIEW_NAME:
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
            for ev in ("contrast_limits", "data"):
                with contextlib.suppress(Exception):
                    getattr(old.events, ev).disconnect(self._on_image_content)
            for ev in ("scale", "translate", "rotate", "shear", "affine"):
                with contextlib.suppress(Exception):
                    getattr(old.events, ev).disconnect(self._on_image_transform)
        self._image = layer
        self._image_ok = False
        self._ready = False
        self._emb_gen += 1
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
        layer.events.contrast_limits.connect(self._on_image_content)
        layer.events.data.connect(self._on_image_content)
        for ev in ("scale", "translate", "rotate", "shear", "affine"):
            getattr(layer.events, ev).connect(self._on_image_transform)
        self._clear_prompt_data()
        self._ensure_layers()
        self._update_slice(force=True)

    def _on_image_content(self, event: Any = None) -> None:
        self._reset_prediction()
        self._request_embedding()

    def _on_image_transform(self, event: Any = None) -> None:
        self._ensure_layers()
        self._update_preview()

    def _on_layers_changed(self, event: Any = None) -> None:
        if self._updating_layers or self._closed:
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
        if layer is self.points_layer:
            self.points_layer = None
        elif layer is self.boxes_layer:
            self.boxes_layer = None
        elif layer is self.preview_layer:
            self.preview_layer = None
        elif layer is self._image:
            self._set_image(self.image_combo.layer)

    def _on_active_layer(self, event: Any = None) -> None:
        active = self.viewer.layers.selection.active
        if self._image is None and isinstance(active, Image) and active.name != PREVIEW_NAME:
            self.set_image_layer(active)

    # ------------------------------------------------------- owned layers

    def _ensure_layers(self) -> None:
        """Create (or re-fit) the prompt and preview layers for the current image."""
        image = self._image
        if image is None or not self._image_ok or self._closed:
            return
        ndim = len(L.spatial_shape(image))
        transform = {
            "scale": image.scale,
            "translate": image.translate,
            "rotate": image.rotate,
            "shear": image.shear,
            "affine": image.affine.affine_matrix,
        }
        h, w = L.image_plane_shape(image)
        size = max(3.0, max(h, w) / 80)
        self._updating_layers = True
        try:
            active = self.viewer.layers.selection.active
            created = False
            if self.preview_layer is None or self.preview_layer not in self.viewer.layers:
                self.preview_layer = L.make_plane_labels_layer(
                    image, self.slice_index, PREVIEW_NAME
                )
                self.preview_layer.opacity = 0.5
                self.viewer.add_layer(self.preview_layer)
                created = True
            if (
                self.boxes_layer is None
                or self.boxes_layer not in self.viewer.layers
                or self.boxes_layer.ndim != ndim
            ):
                self._remove_owned(self.boxes_layer)
                self.boxes_layer = Shapes(
                    ndim=ndim, name=BOXES_NAME, edge_color="yellow", face_color="transparent",
                    edge_width=max(1.0, size / 4), **transform,
                )
                self.viewer.add_layer(self.boxes_layer)
                self.boxes_layer.mode = "add_rectangle"
                self.boxes_layer.events.data.connect(self._on_prompts_changed)
                self._bind_keys(self.boxes_layer, points=False)
                created = True
            else:
                self._apply_transform(self.boxes_layer, transform)
            if (
                self.points_layer is None
                or self.points_layer not in self.viewer.layers
                or self.points_layer.ndim != ndim
            ):
                self._remove_owned(self.points_layer)
                self.points_layer = Points(
                    np.empty((0, ndim)), ndim=ndim, name=POINTS_NAME,
                    features={L.POSITIVE_FEATURE: np.zeros(0, dtype=bool)},
                    feature_defaults={L.POSITIVE_FEATURE: self._positive_next},
                    face_color=L.POSITIVE_FEATURE,
                    face_color_cycle={True: "lime", False: "red"},
                    border_color="white", size=size, **transform,
                )
                self.viewer.add_layer(self.points_layer)
                self.points_layer.mode = "add"
                self.points_layer.events.data.connect(self._on_prompts_changed)
                self._bind_keys(self.points_layer, points=True)
                created = True
            else:
                self._apply_transform(self.points_layer, transform)
                self.points_layer.size = size
            self.preview_layer.affine = L.plane_affine(image, self.slice_index)
            if created:
                self.viewer.layers.selection.active = self.points_layer
            elif active is not None and active in self.viewer.layers:
                self.viewer.layers.selection.active = active
        finally:
            self._updating_layers = False
        self.image_combo.refresh()
        self.labels_combo.refresh()

    @staticmethod
    def _apply_transform(layer: Any, transform: dict[str, Any]) -> None:
        for key, value in transform.items():
            setattr(layer, key, value)

    def _remove_owned(self, layer: Any) -> None:
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)

    def _bind_keys(self, layer: Any, points: bool) -> None:
        keys: dict[str, Any] = {
            "c": lambda _: self.commit(),
            "x": lambda _: self.clear(),
        }
        for i in range(N_CANDIDATES):
            keys[str(i + 1)] = partial(self._key_candidate, i)
        if points:
            keys["t"] = lambda _: self.set_polarity(not self._positive_next)
            keys["Enter"] = keys["c"]
            keys["Escape"] = keys["x"]
        for key, func in keys.items():
            layer.bind_key(key, func, overwrite=True)

    def _key_candidate(self, i: int, layer: Any = None) -> None:
        if self.masks is not None and i < len(self.masks):
            self.select_candidate(i)

    def set_polarity(self, positive: bool) -> None:
        """Make the next clicked points positive (True) or negative (False)."""
        self._positive_next = bool(positive)
        if self.points_layer is not None:
            self.points_layer.feature_defaults = {L.POSITIVE_FEATURE: self._positive_next}
        radio = self.positive_radio if self._positive_next else self.negative_radio
        if not radio.isChecked():
            radio.blockSignals(True)
            radio.setChecked(True)
            radio.blockSignals(False)

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
            self._reset_prediction()
            self._ready = False
            self._emb_gen += 1
            self._set_status(str(err))
            return
        if index == self.slice_index and not force:
            return
        self.slice_index = index
        self._reset_prediction()
        if self.preview_layer is not None:
            self.preview_layer.affine = L.plane_affine(image, index)
        self._request_embedding(immediate=force)

    # -------------------------------------------------------- embedding

    def _request_embedding(self, immediate: bool = False) -> None:
        """Invalidate the current embedding and compute the shown plane's (debounced)."""
        self._ready = False
        self._emb_gen += 1
        if self._predictor is None or self._image is None or not self._image_ok:
            if self._predictor is None and not self._loading:
                self._set_status("No model loaded: pick one in the model box.")
            return
        self._set_status("Computing the image embedding…")
        if immediate:
            self._embed_timer.stop()
            self._start_embedding()
        else:
            self._embed_timer.start()

    def _start_embedding(self) -> None:
        image, predictor = self._image, self._predictor
        if image is None or predictor is None or self._closed or not self._image_ok:
            return
        gen = self._emb_gen
        limits = tuple(float(v) for v in image.contrast_limits)
        worker = create_worker(
            _embed_plane, image.data, self.slice_index, limits, predictor,
            _progress={"desc": "SAM: image embedding"}, _ignore_errors=True,
        )
        worker.returned.connect(partial(self._on_embedding, gen, predictor))
        worker.errored.connect(partial(self._on_embedding_error, gen))
        self._start(worker)

    def _on_embedding(self, gen: int, predictor: Any, entry: Any) -> None:
        if gen != self._emb_gen or predictor is not self._predictor or self._closed:
            return  # stale: the image, slice, contrast or model changed meanwhile
        predictor.set_embedding(entry.features, entry.original_size, entry.input_size)
        self._ready = True
        self._set_status(f"Ready ({self._model_label}): click on the object.")
        self._update_preview()

    def _on_embedding_error(self, gen: int, err: BaseException) -> None:
        if gen != self._emb_gen or self._closed:
            return
        msg = f"Could not compute the image embedding: {error_message(err)}"
        show_error(msg)
        self._set_status(msg)

    def _start(self, worker: Any) -> None:
        self._workers.add(worker)
        worker.finished.connect(partial(self._workers.discard, worker))
        worker.start()

    @property
    def ready(self) -> bool:
        """Whether the shown plane's embedding is set and prompts give previews."""
        return self._ready

    def wait_for_embedding(self, timeout: float = 60.0) -> bool:
        """Process Qt events until the embedding is ready (or ``timeout`` s); for scripts/tests."""
        if self._embed_timer.isActive():
            self._embed_timer.stop()
            self._start_embedding()
        return process_events_until(lambda: self._ready or self._closed, timeout)

    # ------------------------------------------------------- prediction

    def _on_prompts_changed(self, event: Any = None) -> None:
        action = str(getattr(event, "action", "changed"))
        if action in ("adding", "removing", "changing"):
            return
        self._update_preview()

    def _prompts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        image = self._image
        pts = np.zeros((0, 2))
        labels = np.zeros((0,), dtype=np.int32)
        box = None
        if self.points_layer is not None:
            pts, labels = L.points_to_prompts(self.points_layer, image, self.slice_index)
        if self.boxes_layer is not None:
            boxes = L.shapes_to_boxes(self.boxes_layer, image, self.slice_index)
            if len(boxes):
                box = boxes[-1]  # the most recent rectangle
        return pts, labels, box

    def _update_preview(self) -> None:
        if not self._ready or self._image is None or self._predictor is None:
            return
        pts, labels, box = self._prompts()
        if len(pts) == 0 and box is None:
            self._reset_prediction()
            self._set_status(f"Ready ({self._model_label}): click on the object.")
            return
        # Refinement: when points were only added (same box), feed the previous
        # low-res logits back as mask_input; one point alone is ambiguous -> 3 candidates.
        prev = self.last_prompts
        mask_input = None
        if (
            prev is not None
            and self._logits is not None
            and self.candidate is not None
            and len(pts) > len(prev["points"])
            and np.array_equal(pts[: len(prev["points"])], prev["points"])
            and np.array_equal(labels[: len(prev["labels"])], prev["labels"])
            and _same_box(box, prev["box"])
        ):
            mask_input = self._logits[self.candidate][None]
        multimask = len(pts) == 1 and box is None
        try:
            pred = self._predictor.predict(
                points=pts if len(pts) else None,
                labels=labels if len(pts) else None,
                box=box,
                mask_input=mask_input,
                multimask=multimask,
            )
        except NapariSamError as err:
            self._set_status(f"Prediction failed: {err}")
            show_warning(f"Segment Anything: {err}")
            return
        self.last_prompts = {
            "points": pts.copy(),
            "labels": labels.copy(),
            "box": None if box is None else np.asarray(box, dtype=float).copy(),
            "mask_input": mask_input is not None,
            "multimask": multimask,
        }
        self.masks = np.asarray(pred.masks, dtype=bool)
        self.scores = np.asarray(pred.scores, dtype=float).reshape(-1)
        self._logits = np.asarray(pred.logits)
        self._show_candidate(int(np.argmax(self.scores)))

    def select_candidate(self, i: int) -> None:
        """Show candidate mask ``i`` (0-based) as the preview."""
        if self.masks is None:
            raise InvalidInputError("There is no prediction yet: add a point or a box first.")
        if not 0 <= i < len(self.masks):
            raise InvalidInputError(
                f"Candidate {i} does not exist; this prediction has {len(self.masks)}."
            )
        self._show_candidate(int(i))

    def _show_candidate(self, i: int) -> None:
        self.candidate = i
        self.preview = self.masks[i]
        for k, b in enumerate(self.candidate_buttons):
            has = self.scores is not None and k < len(self.scores)
            b.setEnabled(has)
            b.setText(f"{k + 1}: {self.scores[k]:.2f}" if has else f"{k + 1}: –")
        self.candidate_buttons[i].setChecked(True)
        self._show_preview()
        n = int(self.preview.sum())
        self._set_status(
            f"Candidate {i + 1} of {len(self.masks)} (score {self.scores[i]:.2f}, {n} px). "
            "C commits, X clears."
        )

    def _show_preview(self) -> None:
        layer = self.preview_layer
        if layer is None or layer not in self.viewer.layers:
            return
        if self.preview is None:
            shape = L.image_plane_shape(self._image) if self._image is not None else (1, 1)
            layer.data = np.zeros(shape, dtype=np.uint8)
        else:
            layer.data = self.preview.astype(np.uint8)

    def _reset_prediction(self) -> None:
        self.preview = None
        self.scores = None
        self.masks = None
        self.candidate = None
        self._logits = None
        self.last_prompts = None
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

        Returns the new label id, or 0 when there was nothing to write.
        """
        if self.preview is None or not self.preview.any() or self._image is None:
            show_info("Nothing to commit: click on an object first (or pick another candidate).")
            return 0
        labels = self._target_labels()
        new_id = L.commit_mask(
            labels, self.preview, self.slice_index, overwrite=self.overwrite_check.isChecked()
        )
        if new_id == 0:
            show_info(
                "Nothing was written: every pixel of the mask already has a label. Tick "
                "'overwrite existing labels' to replace them."
            )
            return 0
        self.clear()
        self._set_status(f"Committed object {new_id} to {labels.name!r} (Ctrl+Z there undoes).")
        return new_id

    def _target_labels(self) -> Labels:
        layer = self.labels_combo.layer
        image = self._image
        if layer is not None and layer in self.viewer.layers and L.labels_fit_image(layer, image):
            return layer
        names = [lay.name for lay in self.viewer.layers]
        layer = L.make_labels_layer(image, L.unique_name(names, f"{image.name} objects"))
        active = self.viewer.layers.selection.active
        self.viewer.add_layer(layer)
        # keep the prompt layers on top of the new labels layer
        idx = self.viewer.layers.index(layer)
        below = [
            self.viewer.layers.index(x)
            for x in (self.preview_layer, self.boxes_layer, self.points_layer)
            if x is not None and x in self.viewer.layers
        ]
        if below:
            self.viewer.layers.move(idx, min(below))
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active
        self.labels_combo.refresh()
        self.labels_combo.set_layer(layer)
        return layer

    def _clear_prompt_data(self) -> None:
        if self.points_layer is not None and len(self.points_layer.data):
            self.points_layer.data = np.empty((0, self.points_layer.ndim))
        if self.boxes_layer is not None and self.boxes_layer.nshapes:
            self.boxes_layer.data = []

    def clear(self) -> None:
        """Remove all prompts and the preview; committed labels are untouched."""
        self._clear_prompt_data()
        self._reset_prediction()
        if None in (self.points_layer, self.boxes_layer, self.preview_layer):
            self._ensure_layers()  # the user deleted one of them: bring it back
        if self._ready:
            self._set_status(f"Ready ({self._model_label}): click on the object.")

    # ------------------------------------------------------------ close

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Disconnect from the viewer and stop listening to workers."""
        if self._closed:
            return
        self._life["closed"] = True
        self._embed_timer.stop()
        self._emb_gen += 1
        self._model_gen += 1
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
        for worker in list(self._workers):
            with contextlib.suppress(Exception):
                worker.quit()


def _same_box(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.allclose(a, b))
