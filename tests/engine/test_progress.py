"""engine.progress: the one runner and cancel check of the engine's progress generators."""

from __future__ import annotations

import pytest

from napari_sam.engine.everything import EverythingProgress
from napari_sam.engine.progress import check_cancel, run_steps
from napari_sam.errors import CancelledError


def _steps(n):
    for k in range(n):
        yield EverythingProgress(k + 1, n)
    return "result"


def test_run_steps_reports_each_step_and_returns_the_result():
    seen = []
    assert run_steps(_steps(3), lambda done, total: seen.append((done, total))) == "result"
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert run_steps(_steps(2)) == "result"  # no progress callback


def test_check_cancel_raises_only_when_asked():
    check_cancel(None, "Work")
    check_cancel(lambda: False, "Work")
    with pytest.raises(CancelledError, match=r"^Everything-mode was cancelled\.$"):
        check_cancel(lambda: True, "Everything-mode")


def test_a_cancelled_everything_run_says_what_was_cancelled(tiny_sam):
    import numpy as np

    from napari_sam.engine.everything import AutomaticMaskGenerator

    gen = AutomaticMaskGenerator(tiny_sam, points_per_side=2, auto_tile=False)
    with pytest.raises(CancelledError, match=r"^Everything-mode was cancelled\.$"):
        gen.generate(np.zeros((16, 16), np.uint8), cancel=lambda: True)
