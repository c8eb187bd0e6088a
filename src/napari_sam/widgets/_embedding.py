"""Embedding of the shown plane for the interactive widget: debounced, off the UI thread.

:class:`EmbeddingScheduler` owns the image-encoder runs of
:class:`~napari_sam.widgets.interactive.SegmentAnythingWidget`:

* a request invalidates the current embedding at once and starts a run after
  :data:`EMBED_DELAY_MS` (dragging a contrast slider or scrolling a stack starts one
  encoder run when the user pauses, not one per event), or immediately;
* each run reads one plane, normalises it and embeds it through the predictor (and its
  :class:`~napari_sam.engine.cache.EmbeddingCache`) in a napari ``thread_worker``: whole,
  or in native-scale tiles when the predictor tiles a plane that large
  (:meth:`~napari_sam.engine.predictor.Predictor.prepare_image`);
* a generation counter, bumped by every request and invalidation, drops the results of
  runs that a newer request made stale;
* closing stops the timer and the workers' reports.

What to embed (the image data, the slice, the contrast limits and the predictor) is
asked from the widget when a run starts, so a run always embeds what is shown then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, QTimer

__all__ = ["EMBED_DELAY_MS", "EmbedJob", "EmbeddingScheduler"]

# embedding requests are debounced: dragging a contrast slider or scrolling a stack
# starts one encoder run when the user pauses, not one per event
EMBED_DELAY_MS = 150


@dataclass(frozen=True)
class EmbedJob:
    """One encoder run: plane ``slice_index`` of ``data`` with ``contrast_limits``."""

    data: Any  # the image layer's data (any array-like; read in the worker)
    slice_index: tuple[int, ...]  # leading indices of the plane; () for a 2D image
    contrast_limits: tuple[float, float] | None
    predictor: Any  # napari_sam.engine.predictor.Predictor


def _embed_plane(job: EmbedJob, cancel: Callable[[], bool] | None = None) -> Any:
    """Worker body: read one plane, normalise it, return its (cached or new) embedding:
    a CacheEntry, or a :class:`~napari_sam.engine.tiled.TiledEmbedding` of a large plane
    (``cancel`` is polled between tiles: a stale run stops early)."""
    from napari_sam.engine.image import to_rgb_uint8

    data, index = job.data, job.slice_index
    plane = np.asarray(data[index] if index else data)
    return job.predictor.prepare_image(to_rgb_uint8(plane, job.contrast_limits), cancel=cancel)


class EmbeddingScheduler(QObject):
    """Debounced, cancellable-by-generation embedding runs.

    Args:
      job: returns what to embed now, or None when nothing can be embedded (no model,
        no usable image, no 2D plane shown).
      on_ready: called on the main thread with ``(predictor, entry)`` when the latest
        run finished (a :class:`~napari_sam.engine.cache.CacheEntry`).
      on_error: called on the main thread with the exception of the latest run.
      parent: the owning widget (owns the timer).

    Attributes:
      generation: bumps on every request and invalidation; older runs' results are
        dropped.
      entry: the shown plane's embedding once accepted (the owner sets it), else None.
      limits: the contrast limits of the last started run.
    """

    def __init__(
        self,
        job: Callable[[], EmbedJob | None],
        on_ready: Callable[[Any, Any], None],
        on_error: Callable[[BaseException], None],
        parent: QObject | None = None,
        delay_ms: int = EMBED_DELAY_MS,
    ) -> None:
        super().__init__(parent)
        self.generation = 0
        self.entry: Any = None
        self.limits: tuple[float, ...] | None = None
        self._job = job
        self._on_ready = on_ready
        self._on_error = on_error
        self._closed = False
        self._workers: set[Any] = set()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(delay_ms)
        self._timer.timeout.connect(self.start)

    @property
    def pending(self) -> bool:
        """A debounced request waits for its timer."""
        return self._timer.isActive()

    def invalidate(self) -> None:
        """Forget the current embedding; results of runs started before are dropped."""
        self.entry = None
        self.generation += 1

    def schedule(self, immediate: bool = False) -> None:
        """Start a run after the debounce delay (restarting it), or now."""
        if immediate:
            self._timer.stop()
            self.start()
        else:
            self._timer.start()

    def flush(self) -> None:
        """Start a debounced run now (scripts and tests wait for it)."""
        if self._timer.isActive():
            self._timer.stop()
            self.start()

    def start(self) -> None:
        """Start a run of what :attr:`job` gives now (nothing when it gives None)."""
        if self._closed:
            return
        job = self._job()
        if job is None:
            return
        gen = self.generation
        self.limits = job.contrast_limits
        worker = create_worker(
            _embed_plane, job, partial(self._stale, gen),
            _progress={"desc": "SAM: image embedding"}, _ignore_errors=True,
        )
        worker.returned.connect(partial(self._done, gen, job.predictor))
        worker.errored.connect(partial(self._failed, gen))
        self._workers.add(worker)
        worker.finished.connect(partial(self._workers.discard, worker))
        worker.start()

    def _stale(self, gen: int) -> bool:
        return gen != self.generation or self._closed

    def _done(self, gen: int, predictor: Any, entry: Any) -> None:
        if not self._stale(gen):  # else the image, slice, contrast or model changed meanwhile
            self._on_ready(predictor, entry)

    def _failed(self, gen: int, err: BaseException) -> None:
        if not self._stale(gen):
            self._on_error(err)

    def close(self) -> None:
        """Stop the timer, drop every later result and ask running workers to quit."""
        self._closed = True
        self._timer.stop()
        self.generation += 1
        for worker in list(self._workers):
            with contextlib.suppress(Exception):
                worker.quit()
