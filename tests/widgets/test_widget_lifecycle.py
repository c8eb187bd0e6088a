"""Closing napari while the widget's model is still loading (a real subprocess).

Guards the report that closing the viewer during a model load aborted the process
("WorkerBaseSignals has been deleted"): the viewer is closed while a slow load runs,
then the process keeps running Qt events past the load's end, or exits at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("napari")

pytestmark = pytest.mark.napari

SCRIPT = textwrap.dedent(
    """
    import gc, sys, time
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication
    from reference_utils import build_random_sam, tiny_vit_sam_config
    import napari_sam.widgets._model_control as wi

    model = build_random_sam(tiny_vit_sam_config(), seed=0)

    def slow_load(name, device):
        time.sleep(2.0)
        return model

    wi.load_model_by_name = slow_load

    def pump(seconds):
        end = time.time() + seconds
        while time.time() < end:
            QApplication.processEvents()
            time.sleep(0.01)

    viewer = napari.Viewer(show=True)
    viewer.add_image(np.zeros((40, 50), np.uint8))
    # built directly: the subprocess must not depend on the installed plugin entry point
    from napari_sam.widgets.interactive import SegmentAnythingWidget
    viewer.window.add_dock_widget(SegmentAnythingWidget(viewer), name="Segment Anything")
    pump(0.5)  # the load has started and sleeps
    viewer.close()
    del viewer
    gc.collect()
    if sys.argv[1] == "wait":
        pump(3.0)  # the load ends and its worker reports to a closed widget
    print("survived")
    """
)


# Reproduced on 2026-12-03 (superqt: "WorkerBaseSignals has been deleted" from the
# load worker's finished.emit after the viewer closed), not fixed yet: the worker is
# referenced until it finishes, so something else deletes its signals object.
@pytest.mark.xfail(reason="closing the viewer during a model load can abort; open", strict=False)
@pytest.mark.parametrize("after_close", ["wait", "exit"])
def test_closing_the_viewer_while_the_model_loads(tmp_path, after_close):
    script = tmp_path / "close_during_load.py"
    script.write_text(SCRIPT)
    tests = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tests.parent / "src"), str(tests), os.environ.get("PYTHONPATH", "")]
    ))
    res = subprocess.run([sys.executable, str(script), after_close], env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "survived" in res.stdout
    assert "has been deleted" not in res.stderr
