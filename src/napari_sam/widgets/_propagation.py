"""The interactive widget's stack tools: propagate an object through z or t, and the
embedding store ("precompute all planes"). Qt wiring only; the rules are in
:mod:`.volume` and the engine (:mod:`napari_sam.engine.propagate`,
:mod:`napari_sam.engine.store`).

:class:`StackPanel` is a row of the widget's form (the stack-axis box, *Propagate (G)*,
*Precompute all planes*, *Cancel* and a progress bar) and runs both jobs in napari
``thread_worker``\\ s with progress and cancel:

* **propagate**: the seed is the shown plane's preview (the chosen candidate) or, when
  there is none, the committed object of the target labels layer's selected label on
  the shown plane (then the commit extends that object, keeping its id). A worker
  walks the chosen stack axis with a Predictor of its own (sharing the widget's
  embedding cache and store); planes without an embedding are computed on demand,
  and the status line says so. The result (:class:`~.volume.PropagatedObject`) is the
  widget's 3D preview until it is committed (one undo step), discarded (X, a prompt
  edit, another candidate, image or model) or replaced.
* **precompute**: :func:`~napari_sam.engine.store.iter_precompute` writes every
  plane's embedding to a store beside the image file, or in the napari-sam cache
  folder for a layer without a file (:func:`~.volume.store_location`); the widget's
  predictor then reads it. A store found beside an image file is used automatically
  (:meth:`StackPanel.attach_store`).

A generation counter drops the results of jobs that a newer request made stale.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QProgressBar, QPushButton, QWidget

from napari_sam.engine.propagate import PropagationProgress, PropagationSettings
from napari_sam.errors import CancelledError
from napari_sam.widgets import layers as L
from napari_sam.widgets import preview as P
from napari_sam.widgets._common import process_events_until, report_failure
from napari_sam.widgets.volume import (
    PropagatedObject,
    StackWalk,
    default_stack_axis,
    iter_walk,
    stack_axes,
    store_location,
)

if TYPE_CHECKING:
    from napari.layers import Image

__all__ = ["StackPanel"]


def _propagation_job(predictor: Any, data: Any, walk: StackWalk, seed: np.ndarray,
                     style: str, width: int, **kwargs: Any) -> Any:
    """Worker body: yields progress, returns ``(object, preview pixels)``."""
    for item in iter_walk(predictor, data, walk, seed, **kwargs):
        if isinstance(item, PropagatedObject):
            return item, _render(item, style, width)
        yield item
    raise AssertionError("iter_walk ended without a result")  # pragma: no cover


def _render(obj: PropagatedObject, style: str, width: int) -> np.ndarray:
    """Preview pixels of a propagated object (each plane drawn as the 2D preview is)."""
    stacked = np.moveaxis(obj.mask, obj.axis, 0)
    out = np.empty(stacked.shape, dtype=np.uint8)
    flat = out.reshape(stacked.shape[0], *stacked.shape[-2:])
    for k, (_, plane) in enumerate(obj.planes()):
        flat[k] = P.render_preview(plane, style, width)
    return np.moveaxis(out, 0, obj.axis)


def _precompute_job(predictor: Any, layer_data: Any, source: str | None, name: str,
                    cache_folder: Any, **kwargs: Any) -> Any:
    """Worker body: yields ``(path, beside)`` first, then the store's progress; returns
    the :class:`~napari_sam.engine.store.EmbedResult`."""
    from napari_sam.engine.store import image_checksum, iter_precompute

    path, beside = store_location(source, name, lambda: image_checksum(layer_data),
                                  cache_folder)
    yield path, beside
    return (yield from iter_precompute(predictor, layer_data, path, **kwargs))


class StackPanel(QWidget):
    """Stack-axis box, Propagate / Precompute / Cancel buttons and a progress bar.

    Args:
      host: the :class:`~.interactive.SegmentAnythingWidget` (held weakly); the panel
        reads its image, shown plane, preview, labels, model, cache and predictor, and
        calls its ``_set_status`` and ``_show_preview``.

    Attributes:
      result: the propagated object shown as the 3D preview, or None.
      settings: the stop rules of propagation (scripts may replace them).
    """

    #: emitted from the propagation worker before the encoder runs for a plane
    computing = Signal(int)

    def __init__(self, host: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._host = weakref.ref(host)
        self.result: PropagatedObject | None = None
        self.settings = PropagationSettings()
        self._pixels: np.ndarray | None = None  # preview pixels of ``result``
        self._pixels_style: str | None = None
        self._gen = 0  # bumps on every start, drop and close: stale results are dropped
        self._cancel = threading.Event()
        self._job: str | None = None  # "propagate", "precompute" or None
        self._workers: set[Any] = set()
        self._store_paths: weakref.WeakKeyDictionary[Any, Path] = weakref.WeakKeyDictionary()
        self.closed = False

        self.axis_combo = QComboBox(self)
        self.axis_combo.setToolTip(
            "The stack axis to propagate along: z for a volume, t to track an object through "
            "time (it keeps its id on every frame). Default: the first axis not displayed.")
        self.propagate_button = QPushButton("Propagate (G)", self)
        self.propagate_button.setToolTip(
            "Carry the object of the shown plane (the preview, or the selected committed label) "
            "up and down the stack axis; C then commits it as one object (one undo step).")
        self.propagate_button.clicked.connect(self.propagate)
        self.precompute_button = QPushButton("Precompute all planes", self)
        self.precompute_button.setToolTip(
            "Compute the embedding of every plane once and store it on disk (beside the image "
            "file, or in the napari-sam cache folder); planes are then read, not recomputed.")
        self.precompute_button.clicked.connect(self.precompute)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar(self)
        self.progress.setVisible(False)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        for w in (self.axis_combo, self.propagate_button, self.precompute_button,
                  self.cancel_button):
            lay.addWidget(w)
        self.computing.connect(self._on_computing)
        self.set_image(None)

    # ------------------------------------------------------------------ state

    @property
    def running(self) -> str | None:
        """``"propagate"``, ``"precompute"`` or None."""
        return self._job

    @property
    def axis(self) -> int | None:
        """The chosen stack axis (a leading data axis of the image), or None (2D image)."""
        index = self.axis_combo.currentIndex()
        return None if index < 0 else index

    def set_axis(self, axis: int) -> None:
        """Propagate along stack axis ``axis`` from now on."""
        from napari_sam.errors import InvalidInputError

        if not 0 <= int(axis) < self.axis_combo.count():
            raise InvalidInputError(
                f"Stack axis {axis} does not exist; this image has {self.axis_combo.count()} "
                "stack axes (the plane is its last two).")
        self.axis_combo.setCurrentIndex(int(axis))

    def set_image(self, image: Image | None) -> None:
        """List the image's stack axes and choose the default; discard a result."""
        self.drop()
        self.axis_combo.clear()
        host = self._host()
        shape = () if image is None else L.spatial_shape(image)
        if len(shape) >= 2 and host is not None:
            self.axis_combo.addItems(stack_axes(shape, tuple(getattr(image, "axis_labels", ()))))
            dims = host.viewer.dims
            shift = dims.ndim - len(shape)
            default = default_stack_axis(shape, tuple(d - shift for d in dims.displayed))
            if default is not None:
                self.axis_combo.setCurrentIndex(default)
        stack = self.axis_combo.count() > 0
        self.axis_combo.setEnabled(stack)
        self.propagate_button.setEnabled(stack and self._job is None)
        self.precompute_button.setEnabled(image is not None and self._job is None)

    def _set_busy(self, job: str | None) -> None:
        self._job = job
        self.cancel_button.setEnabled(job is not None)
        self.propagate_button.setEnabled(job is None and self.axis_combo.count() > 0)
        self.precompute_button.setEnabled(job is None)
        self.progress.setVisible(job is not None)
        if job is not None:
            self.progress.setRange(0, 0)

    def _status(self, text: str) -> None:
        host = self._host()
        if host is not None:
            host._set_status(text)

    def wait(self, timeout: float = 60.0) -> bool:
        """Process Qt events until no job runs (or ``timeout`` s); True when none runs."""
        return process_events_until(lambda: self._job is None or self.closed, timeout)

    def cancel(self) -> None:
        """Ask the running job to stop (between planes); nothing is committed."""
        self._cancel.set()

    def drop(self) -> None:
        """Cancel a running propagation and discard the 3D preview."""
        if self._job == "propagate":
            self._gen += 1
            self._cancel.set()
            self._set_busy(None)
            self._status("Propagation cancelled; nothing was committed.")
        had = self.result is not None
        self.result = None
        self._pixels = None
        host = self._host()
        if had and host is not None:
            host._show_preview()

    def preview_pixels(self, style: str, width: int) -> np.ndarray | None:
        """The 3D preview's pixels in ``style`` (drawn again only when the style changed)."""
        if self.result is None:
            return None
        if self._pixels is None or self._pixels_style != style:
            self._pixels = _render(self.result, style, width)
            self._pixels_style = style
        return self._pixels

    # -------------------------------------------------------------- propagate

    def propagate(self) -> bool:
        """Start propagating the shown plane's object; False (with a message) when there is
        nothing to propagate or a job runs. Scripts then call :meth:`wait`."""
        host = self._idle_host()
        if host is None:
            return False
        image, predictor, axis = host.image_layer, host._predictor, self.axis
        if image is None or predictor is None or not host._plane_shown:
            show_info("Propagation needs a model and an image shown as a 2D plane.")
            return False
        if axis is None:
            show_info("Propagation needs a stack (z or t); this image is a single 2D plane.")
            return False
        host._wait_prediction()
        seed, object_id = self._seed(host)
        if seed is None:
            show_info(
                "Nothing to propagate: click on the object first, or select a committed "
                "object's label (in the labels layer) that is on this plane.")
            return False
        walk = StackWalk.make(L.spatial_shape(image), host.slice_index, axis)
        from napari_sam.engine.predictor import Predictor

        # a Predictor of the worker's own (it sets one plane after another), sharing the
        # widget's embedding cache and store (checked against this model already)
        worker_predictor = Predictor(predictor.model, cache=host.cache)
        worker_predictor.store = predictor.store
        self.drop()
        self._cancel = threading.Event()
        self._gen += 1
        gen = self._gen
        width = P.outline_width(L.image_plane_shape(image))
        style = host.preview_style
        worker = create_worker(
            _propagation_job, worker_predictor, image.data, walk, seed, style,
            width, contrast_limits=tuple(float(v) for v in image.contrast_limits),
            rgb=bool(image.rgb), settings=self.settings, object_id=object_id,
            cancel=self._cancel.is_set, on_compute=self.computing.emit,
            _progress={"desc": "SAM: propagation"}, _ignore_errors=True,
        )
        worker.yielded.connect(lambda step: self._on_step(gen, axis, step))
        worker.returned.connect(lambda out: self._on_propagated(gen, style, out))
        worker.errored.connect(lambda err: self._on_failed(gen, "Propagation", err))
        self._start(worker, "propagate")
        self._status(f"Propagating along axis {axis} from plane {walk.start}…")
        return True

    def _idle_host(self) -> Any:
        """The host widget when no job runs (else None, with a message)."""
        host = self._host()
        if host is None or self.closed:
            return None
        if self._job is not None:
            show_info(f"Wait for the running {self._job} to finish, or cancel it.")
            return None
        return host

    def _seed(self, host: Any) -> tuple[np.ndarray | None, int | None]:
        """The shown plane's preview, else the selected committed label on this plane."""
        if host.preview is not None and np.any(host.preview):
            return np.asarray(host.preview, dtype=bool), None
        labels = host.labels_layer
        if labels is None or labels not in host.viewer.layers or not L.labels_fit_image(
                labels, host.image_layer):
            return None, None
        chosen = int(labels.selected_label)
        index = host.slice_index
        plane = np.asarray(labels.data[index] if index else labels.data)
        mask = plane == chosen
        return (mask, chosen) if chosen > 0 and mask.any() else (None, None)

    def _start(self, worker: Any, job: str) -> None:
        self._workers.add(worker)
        worker.finished.connect(lambda: self._workers.discard(worker))
        self._set_busy(job)
        worker.start()

    def _on_step(self, gen: int, axis: int, step: Any) -> None:
        if gen != self._gen or self.closed:
            return
        if isinstance(step, PropagationProgress):
            self.progress.setRange(0, step.total)
            self.progress.setValue(step.done)
            self._status(f"Propagating along axis {axis}: plane {step.index} done, {step.done} "
                         f"of at most {step.total} planes visited…")

    def _on_computing(self, plane: int) -> None:
        if self._job == "propagate" and not self.closed:
            self._status(f"Propagating: computing the embedding of plane {plane} (not "
                         "precomputed; 'Precompute all planes' stores them)…")

    def _on_propagated(self, gen: int, style: str, out: Any) -> None:
        if gen != self._gen or self.closed:
            return
        self._set_busy(None)
        obj, pixels = out
        self.result, self._pixels, self._pixels_style = obj, pixels, style
        host = self._host()
        if host is None:
            return
        host._show_preview()
        stops = ", ".join(f"{d}: {r}" for d, r in obj.result.stopped.items())
        computed = f"; {obj.computed} embeddings computed on demand" if obj.computed else ""
        self._status(
            f"Propagated along axis {obj.axis} through planes {obj.extent[0]}-{obj.extent[1]} "
            f"({obj.n_planes} planes; stopped {stops}{computed}). C commits it as one object, "
            "X discards it.")

    def _on_failed(self, gen: int, what: str, err: BaseException) -> None:
        if gen != self._gen or self.closed:
            return
        self._set_busy(None)
        if isinstance(err, CancelledError):
            self._status(f"{what} cancelled; nothing was committed." if what == "Propagation"
                         else f"{what} cancelled: {err}")
        else:
            report_failure(what, err, self._status)

    # ------------------------------------------------------------- the store

    def precompute(self) -> bool:
        """Start computing every plane's embedding into a store; False (with a message)
        when no model or image is set or a job runs. Scripts then call :meth:`wait`."""
        host = self._idle_host()
        if host is None:
            return False
        image, predictor = host.image_layer, host._predictor
        if image is None or predictor is None:
            show_info("Precomputing needs a model and an image.")
            return False
        from napari_sam.engine.predictor import Predictor
        from napari_sam.models.zoo import cache_dir

        worker_predictor = Predictor(predictor.model, cache=host.cache)
        self._cancel = threading.Event()
        self._gen += 1
        gen = self._gen
        target: dict[str, Any] = {}
        worker = create_worker(
            _precompute_job, worker_predictor, image.data, L.source_path(image), image.name,
            cache_dir, rgb=bool(image.rgb),
            contrast_limits=tuple(float(v) for v in image.contrast_limits),
            model_name=host.models.label, cancel=self._cancel.is_set,
            _progress={"desc": "SAM: precompute embeddings"}, _ignore_errors=True,
        )
        worker.yielded.connect(lambda step: self._on_store_step(gen, target, step))
        worker.returned.connect(
            lambda res: self._on_precomputed(gen, image, predictor, target, res))
        worker.errored.connect(lambda err: self._on_failed(gen, "Precomputing", err))
        self._start(worker, "precompute")
        self._status("Precomputing the embeddings of all planes…")
        return True

    @staticmethod
    def _where(path: Path, beside: bool) -> str:
        return f"beside the image, {path}" if beside else f"in the napari-sam cache folder, {path}"

    def _on_store_step(self, gen: int, target: dict[str, Any], step: Any) -> None:
        if gen != self._gen or self.closed:
            return
        if isinstance(step, tuple):
            target["path"], target["beside"] = step
            self._status(f"Precomputing all planes into a store {self._where(*step)}…")
            return
        self.progress.setRange(0, step.total)
        self.progress.setValue(step.done)
        self._status(f"Precomputing: {step.done} of {step.total} embeddings stored "
                     f"{self._where(target['path'], target['beside'])}…")

    def _on_precomputed(self, gen: int, image: Any, predictor: Any, target: dict[str, Any],
                        result: Any) -> None:
        if gen != self._gen or self.closed:
            return
        self._set_busy(None)
        self._store_paths[image] = result.path
        host = self._host()
        note = None
        if host is not None and host._predictor is predictor:
            note = self.attach_store(predictor, image)
            host._store_note = note
        done = "already complete" if result.status == "up to date" else (
            f"{result.computed} of {result.total} embeddings computed")
        self._status(f"Precomputed all planes ({done}), stored "
                     f"{self._where(result.path, target.get('beside', False))}"
                     + (f"; {note}." if note else "."))

    def attach_store(self, predictor: Any, image: Any) -> str | None:
        """Make ``predictor`` read the image's store: the one precomputed in this session,
        else one found beside the image file. Returns a line for the status (or None
        when there is no store)."""
        from napari_sam.engine.store import EmbeddingStore, use_store_beside
        from napari_sam.errors import InvalidInputError

        predictor.use_store(None)
        if image is None:
            return None
        path = self._store_paths.get(image)
        if path is not None and Path(path).exists():
            try:
                predictor.use_store(EmbeddingStore.open(path))
            except InvalidInputError as err:
                return f"not using the precomputed embeddings: {err}"
            return f"reading embeddings from {path}"
        source = L.source_path(image)
        return None if source is None else use_store_beside(predictor, source)

    # ------------------------------------------------------------------ close

    def close_jobs(self) -> None:
        """Stop listening to workers and ask them to stop."""
        self.closed = True
        self._gen += 1
        self._cancel.set()
        for worker in list(self._workers):
            with contextlib.suppress(Exception):
                worker.quit()
