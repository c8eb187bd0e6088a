"""Model lifecycle of a dock widget: load (off the UI thread), install, move, fail.

:class:`ModelController` owns the current model and its label, the generation
counter that drops results of stale loads, and the closed flag that drops results
arriving after the widget was closed. It only reports (signals ``ready`` and
``failed``); the widget decides what to show.

Running load workers are kept alive by this module until they finish, not by the
widget: a widget deleted while a load runs (the viewer was closed) cannot take
the worker's signal object with it while the thread still emits on it.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, Signal

from napari_sam.widgets._common import DEFAULT_MODEL, error_message

if TYPE_CHECKING:
    from napari_sam.models.sam import Sam

__all__ = ["ModelController", "load_model_by_name"]

# load workers still running (module-owned: they outlive a deleted widget)
_RUNNING: set[Any] = set()


def load_model_by_name(name: str, device: str | None) -> Sam:
    """Worker body: a zoo name or checkpoint path -> Sam on ``device``."""
    from napari_sam.models.zoo import load_model

    return load_model(name, device=device)


class ModelController(QObject):
    """The current model of a widget and its (asynchronous) loading.

    Signals:
      ready(model, label): a model was installed (loaded, given or moved).
      failed(name, message): loading ``name`` failed; ``message`` is one line for
        the user and says which model stays in use.
    """

    ready = Signal(object, str)
    failed = Signal(str, str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.model: Sam | None = None
        self.label = ""
        self.instance_label: str | None = None  # label of a model given as an object
        self.generation = 0  # bumps on every model change: stale loads are dropped
        self.loading = False
        # a plain dict survives the C++ object's deletion; late results check it
        self._life = {"closed": False}
        life = self._life
        self.destroyed.connect(lambda *_: life.update(closed=True))
        self._workers: set[Any] = set()

    @property
    def closed(self) -> bool:
        return self._life["closed"]

    def set_model(self, model: Any, device: str | None = None, label: str | None = None) -> None:
        """Install ``model`` now: a Sam instance, or a zoo name / checkpoint path (loaded here).

        Raises the loader's typed errors after emitting ``failed``; the previous
        model stays in use.
        """
        if isinstance(model, (str, Path)):
            try:
                loaded = load_model_by_name(str(model), device)
            except Exception as err:
                self._fail(str(model), err)
                raise
            self.install(loaded, str(model))
        else:
            if device is not None and hasattr(model, "to"):
                model = model.to(device)
            label = label or f"<{type(model).__name__} object>"
            self.install(model, label)
            self.instance_label = label

    def pick(self, name: str, device: str | None) -> str | None:
        """The user picked ``name`` on ``device``: move a given model, or load in a worker.

        Returns a one-line error when a given model could not be moved (it stays
        where it was), else None.
        """
        if self.model is not None and name == self.instance_label:
            # a model given as an object (no name to reload): move it to the new device
            try:
                from napari_sam.models.zoo import resolve_device

                model = self.model.to(resolve_device(device or None))
            except Exception as err:
                return f"Could not move the model to {device or 'auto'}: {error_message(err)}"
            self.install(model, name)
            self.instance_label = name
            return None
        self.load_async(name, device or None)
        return None

    def load_async(self, name: str, device: str | None) -> None:
        """Load ``name`` in a napari worker; ``ready`` or ``failed`` follows."""
        self.generation += 1
        gen = self.generation
        self.loading = True
        worker = create_worker(
            load_model_by_name, name, device,
            _progress={"desc": f"SAM: loading {name}"}, _ignore_errors=True,
        )
        worker.returned.connect(partial(self._on_loaded, self._life, gen, name))
        worker.errored.connect(partial(self._on_error, self._life, gen, name))
        _RUNNING.add(worker)
        self._workers.add(worker)
        worker.finished.connect(partial(_forget, worker, self._workers))
        worker.start()

    def install(self, model: Any, label: str) -> None:
        """Make ``model`` current (drops loads still running) and emit ``ready``."""
        self.generation += 1
        self.loading = False
        self.model = model
        self.label = label
        self.instance_label = None
        self.ready.emit(model, label)

    def forget(self) -> None:
        """No current model (e.g. a name picked that a later run loads); drops running loads."""
        self.generation += 1
        self.loading = False
        self.model = None
        self.instance_label = None

    def close(self) -> None:
        """Drop every later result and ask running loads to stop reporting."""
        self._life["closed"] = True
        self.generation += 1
        for worker in list(self._workers):
            with contextlib.suppress(Exception):
                worker.quit()

    def _on_loaded(self, life: dict, gen: int, name: str, model: Any) -> None:
        if life["closed"] or gen != self.generation:
            return
        self.install(model, name)

    def _on_error(self, life: dict, gen: int, name: str, err: BaseException) -> None:
        if life["closed"] or gen != self.generation:
            return
        self.loading = False
        self._fail(name, err)

    def _fail(self, name: str, err: BaseException) -> None:
        msg = f"Could not load model {name!r}: {error_message(err)}"
        if name == DEFAULT_MODEL:
            msg += (
                " The plugin's embedded default model is missing or broken; pick another model "
                "(vit_t is small and downloads once) or 'Browse…' to a local checkpoint."
            )
        if self.model is not None:
            msg += f" Still using {self.label}."
        self.failed.emit(name, msg)


def _forget(worker: Any, owner: set[Any], *_: Any) -> None:
    _RUNNING.discard(worker)
    owner.discard(worker)
