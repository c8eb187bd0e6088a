"""Progress and cancellation of the engine's long-running generators.

Everything-mode (:meth:`~napari_sam.engine.everything.AutomaticMaskGenerator.iter_generate`)
and AIS (:meth:`~napari_sam.engine.ais.InstanceSegmenter.iter_generate`) do their work in
generators that yield :class:`~napari_sam.engine.everything.EverythingProgress` steps and
return their result; a widget's worker consumes them directly, the blocking ``generate``
methods run them with :func:`run_steps`. Both poll a ``cancel`` callable between steps
through :func:`check_cancel`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from napari_sam.errors import CancelledError

__all__ = ["check_cancel", "run_steps"]


def run_steps(
    steps: Generator[Any, None, Any], progress: Callable[[int, int], Any] | None = None
) -> Any:
    """Run a generator of progress steps (each with ``done`` and ``total``) to its end.

    ``progress(done, total)`` is called after each step. Returns the generator's
    return value.
    """
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(step.done, step.total)


def check_cancel(cancel: Callable[[], bool] | None, what: str) -> None:
    """Raise :class:`~napari_sam.errors.CancelledError` ("``what`` was cancelled.") when
    ``cancel`` is given and returns True."""
    if cancel is not None and cancel():
        raise CancelledError(f"{what} was cancelled.")
