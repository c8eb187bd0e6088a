"""Qt pieces shared by the two dock widgets: model/device pickers, layer combos, helpers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QCoreApplication, QObject, Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from napari_sam.models import DEFAULT_MODEL

__all__ = [
    "BROWSE",
    "DEFAULT_MODEL",
    "LatestJobRunner",
    "LayerCombo",
    "ModelPicker",
    "available_devices",
    "error_message",
    "process_events_until",
    "scrollable",
    "unwrap",
]

BROWSE = "Browse…"
CUSTOM_PREFIX = "file: "


def available_devices() -> list[str]:
    """``auto`` plus the torch devices usable here (``cpu``, ``cuda``, ``mps``)."""
    from napari_sam.models.zoo import available_devices as torch_devices

    return ["auto", *torch_devices()]


def model_names() -> list[str]:
    """Names from the model zoo, ``default`` first."""
    from napari_sam.models.zoo import list_models

    names = list(list_models())
    if DEFAULT_MODEL in names:
        names.remove(DEFAULT_MODEL)
    return [DEFAULT_MODEL, *names]


def _model_tooltip(name: str) -> str:
    try:
        from napari_sam.models.zoo import model_info

        info = model_info(name)
    except Exception:
        return name
    size = f" ({info.size_mb:.0f} MB download, once)" if info.size_mb else ""
    return f"{info.description}{size}"


def error_message(err: BaseException) -> str:
    """A one-paragraph message for a notification (typed errors carry advice already)."""
    from napari_sam.errors import NapariSamError

    if isinstance(err, NapariSamError):
        return str(err)
    if isinstance(err, MemoryError):
        return "Out of memory. Use a smaller model (vit_t or default), a smaller image, or a GPU."
    return f"{type(err).__name__}: {err}"


def report_failure(what: str, err: BaseException, set_status: Callable[[str], Any]) -> None:
    """Show a failed job: a typed error (bad input, with its advice) as a warning, anything
    else as an error notification; the status line says ``"<what> failed: ..."``."""
    from napari.utils.notifications import show_error, show_warning

    from napari_sam.errors import NapariSamError

    if isinstance(err, NapariSamError):
        set_status(f"{what} failed: {err}")
        show_warning(f"Segment Anything: {err}")
    else:
        msg = f"{what} failed: {error_message(err)}"
        set_status(msg)
        show_error(msg)


def unwrap(obj: Any) -> Any:
    """The napari object behind ``obj``.

    napari hands plugin widgets a proxy of the viewer, and attribute access through
    it (``viewer.layers.selection.active``) returns a new proxy each time, so ``is``
    never matches the layer itself; unwrap before comparing or storing.
    """
    return getattr(obj, "__wrapped__", obj)


def process_events_until(done: Callable[[], bool], timeout: float) -> bool:
    """Process Qt events until ``done()`` is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        QCoreApplication.processEvents()
        if done():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


def scrollable(content: QWidget, parent: QWidget, min_height: int) -> QScrollArea:
    """Put ``content`` in a frameless vertical scroll area inside ``parent``'s layout.

    napari stacks dock widgets in one column: without a scroll area Qt squeezes a
    form below its rows' minimum heights (unreadable slivers) when two docks share
    the height. In the scroll area the rows keep their size and a scroll bar
    appears; ``min_height`` (capped at the content's own height) keeps the first
    rows visible when the dock is made small. The area is as wide as the form's
    minimum width, so nothing is cut off on the right.
    """
    area = QScrollArea(parent)
    area.setWidget(content)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setMinimumHeight(min(min_height, content.sizeHint().height()))
    # as wide as the form needs (no horizontal scrolling: the dock grows instead)
    area.setMinimumWidth(
        content.minimumSizeHint().width() + area.verticalScrollBar().sizeHint().width()
    )
    lay = QVBoxLayout(parent)
    lay.setContentsMargins(0, 0, 0, 0)
    lay.addWidget(area)
    return area


class LatestJobRunner(QObject):
    """Runs jobs one at a time in a daemon thread, and only the latest one.

    ``submit(job)`` queues ``job()`` and returns its ticket. A job still waiting when
    another is submitted is dropped without running; a job already running is let
    finish, but its result is stale: ``done(ticket, result, error)`` is emitted (on
    the main thread) only for the latest ticket. ``invalidate()`` makes the
    running and waiting jobs stale without submitting a new one.

    ``pending`` is True from ``submit`` until the latest job's result is delivered
    (or invalidated). Tickets, ``pending`` and the signal live on the main thread;
    the thread only sees the waiting slot, under a lock.
    """

    done = Signal(int, object, object)
    _finished = Signal(int, object, object)

    def __init__(self, parent: QObject | None = None, name: str = "napari-sam-jobs") -> None:
        super().__init__(parent)
        self._name = name
        self._cond = threading.Condition()
        self._slot: tuple[int, Callable[[], Any]] | None = None
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._latest = 0
        self._pending: int | None = None
        self._finished.connect(self._deliver)

    @property
    def pending(self) -> bool:
        """A submitted job's result is still to come."""
        return self._pending is not None

    @property
    def latest(self) -> int:
        """The ticket of the latest submission (or invalidation)."""
        return self._latest

    def submit(self, job: Callable[[], Any]) -> int:
        """Queue ``job`` (replacing a waiting one); returns its ticket."""
        self._latest += 1
        self._pending = self._latest
        with self._cond:
            self._slot = (self._latest, job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return self._latest

    def invalidate(self) -> None:
        """Drop the waiting job and ignore the running one's result."""
        self._latest += 1
        self._pending = None
        with self._cond:
            self._slot = None

    def stop(self) -> None:
        """Invalidate and end the thread (after its running job, if any)."""
        self.invalidate()
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._slot is None and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                ticket, job = self._slot
                self._slot = None
            result = error = None
            try:
                result = job()
            except Exception as err:  # delivered to the main thread, shown there
                error = err
            try:
                self._finished.emit(ticket, result, error)
            except RuntimeError:  # the Qt object is gone (the widget was closed)
                return

    def _deliver(self, ticket: int, result: Any, error: Any) -> None:
        if ticket != self._latest:
            return  # stale: a newer job was submitted, or the state changed
        self._pending = None
        self.done.emit(ticket, result, error)


class ModelPicker(QWidget):
    """Model combo (zoo names + local files via Browse…) and device combo.

    Emits ``changed(name_or_path, device)`` when the user picks a model or device.
    """

    changed = Signal(str, str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model_combo = QComboBox(self)
        self.model_combo.setToolTip(
            "SAM model: 'default' is the small model shipped with the plugin; vit_b/l/h are the "
            "official SAM models and vit_t is MobileSAM (downloaded on first use). "
            "Browse… loads a local .pth/.pt/.safetensors checkpoint."
        )
        try:
            names = model_names()
        except Exception:  # the zoo failed to import: still offer Browse…
            names = [DEFAULT_MODEL]
        self.model_combo.addItems([*names, BROWSE])
        for i, name in enumerate(names):
            self.model_combo.setItemData(i, _model_tooltip(name), Qt.ItemDataRole.ToolTipRole)
        self.device_combo = QComboBox(self)
        self.device_combo.addItems(available_devices())
        self.device_combo.setToolTip("Where the model runs; 'auto' picks a GPU when there is one.")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.model_combo, 3)
        lay.addWidget(self.device_combo, 1)
        self._last_index = 0
        self.model_combo.activated.connect(self._on_model_activated)
        self.device_combo.activated.connect(lambda _: self.changed.emit(self.name, self.device))

    @property
    def name(self) -> str:
        """The chosen zoo name or local checkpoint path."""
        text = self.model_combo.currentText()
        return text[len(CUSTOM_PREFIX):] if text.startswith(CUSTOM_PREFIX) else text

    @property
    def device(self) -> str | None:
        """The chosen device, or None for automatic."""
        text = self.device_combo.currentText()
        return None if text == "auto" else text

    def show_model(self, label: str) -> None:
        """Show ``label`` (a zoo name, a path, or a description) without emitting ``changed``."""
        self.model_combo.blockSignals(True)
        idx = self.model_combo.findText(label)
        if idx < 0:
            idx = self.model_combo.count() - 1  # before Browse…
            self.model_combo.insertItem(idx, label)
        self.model_combo.setCurrentIndex(idx)
        self._last_index = idx
        self.model_combo.blockSignals(False)

    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemText(index) == BROWSE:
            path, _ = QFileDialog.getOpenFileName(
                self, "SAM checkpoint", "", "Checkpoints (*.pth *.pt *.safetensors);;All files (*)"
            )
            if not path:
                self.model_combo.setCurrentIndex(self._last_index)
                return
            self.show_model(CUSTOM_PREFIX + path)
        self._last_index = self.model_combo.currentIndex()
        self.changed.emit(self.name, self.device or "")


class LayerCombo(QComboBox):
    """Combo box of the viewer's layers of one type, kept in sync with the layer list.

    ``none_text`` adds a first entry meaning "no layer" (e.g. "new layer").
    """

    layer_changed = Signal(object)

    def __init__(
        self,
        viewer: Any,
        layer_type: type,
        none_text: str | None = None,
        accept: Callable[[Any], bool] | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._viewer = viewer
        self._type = layer_type
        self._none_text = none_text
        self._accept = accept or (lambda layer: True)
        self._layers: list[Any] = []
        self.refresh()
        self.currentIndexChanged.connect(lambda _: self.layer_changed.emit(self.layer))

    def _candidates(self) -> list[Any]:
        return [
            layer
            for layer in self._viewer.layers
            if isinstance(layer, self._type) and self._accept(layer)
        ]

    @property
    def layer(self) -> Any:
        """The selected layer or None."""
        i = self.currentIndex() - (1 if self._none_text is not None else 0)
        return self._layers[i] if 0 <= i < len(self._layers) else None

    def set_layer(self, layer: Any) -> None:
        """Select ``layer`` (None selects the "no layer" entry if there is one)."""
        self.refresh()
        offset = 1 if self._none_text is not None else 0
        if layer is None:
            self.setCurrentIndex(0 if self._none_text is not None else -1)
        elif layer in self._layers:
            self.setCurrentIndex(self._layers.index(layer) + offset)

    def refresh(self) -> None:
        """Re-list the layers, keeping the selection when it still exists."""
        current = self.layer
        layers = self._candidates()
        self.blockSignals(True)
        self.clear()
        if self._none_text is not None:
            self.addItem(self._none_text)
        for layer in layers:
            self.addItem(layer.name)
        self._layers = layers
        offset = 1 if self._none_text is not None else 0
        if current in layers:
            self.setCurrentIndex(layers.index(current) + offset)
        elif self._none_text is not None:
            self.setCurrentIndex(0)
        elif layers:
            self.setCurrentIndex(len(layers) - 1)
        self.blockSignals(False)
        if self.layer is not current:
            self.layer_changed.emit(self.layer)
