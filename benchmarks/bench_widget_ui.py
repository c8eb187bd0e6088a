"""How long the "Segment Anything" widget blocks napari's UI thread on a large plane.

A QTimer ticks every 5 ms on the main thread; any gap between two ticks is time
the UI could not respond (no repaint, no input). The script opens a real viewer
with a synthetic ``--size`` x ``--size`` uint8 image (default 8000, about the
largest plane the widget accepts), docks the widget with the embedded default
model (or ``--random`` for a tiny random-weight model), then measures the largest
gap during each step a user takes:

* the embedding (computed in a worker),
* ``--clicks`` clicks on a bright disc (each: the point is added, the prediction
  runs in the widget's background thread, the preview is shown),
* the first commit (which creates the ``<image> objects`` labels layer),
* a second click and commit into that layer,
* Undo.

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_widget_ui.py \
        [--size 8000] [--clicks 3] [--random]

Run it by hand (it is not a test); timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


class GapMeter:
    """Largest interval between ticks of a 5 ms main-thread timer."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.last = time.perf_counter()
        self.max_gap = 0.0
        self.timer = QTimer()
        self.timer.setInterval(5)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.max_gap = max(self.max_gap, now - self.last)
        self.last = now

    def reset(self) -> None:
        self.last = time.perf_counter()
        self.max_gap = 0.0

    def settle(self, seconds: float = 0.3) -> float:
        """Process events for ``seconds`` more; return the largest gap since ``reset``."""
        from napari_sam.widgets._common import process_events_until

        process_events_until(lambda: False, seconds)
        return self.max_gap


def _disc_image(size: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    rng = np.random.default_rng(0)
    img = rng.integers(20, 60, (size, size), dtype=np.uint8)
    rr, cc = np.ogrid[:size, :size]
    centres = [(size // 3, size // 3), (2 * size // 3, size // 2)]
    for r, c in centres:
        img[(rr - r) ** 2 + (cc - c) ** 2 < (size // 12) ** 2] = 200
    return img, centres


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--random", action="store_true", help="tiny random-weight model")
    args = parser.parse_args(argv)

    import napari

    viewer = napari.Viewer(show=True)
    image, centres = _disc_image(args.size)
    viewer.add_image(image, name="big")
    meter = GapMeter()
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam-kit", "Segment Anything")
    if args.random:
        sys.path.insert(0, "tests")
        from reference_utils import build_random_sam, tiny_vit_sam_config

        widget.set_model(build_random_sam(tiny_vit_sam_config(), seed=0), label="random tiny")
    results: list[tuple[str, float]] = []

    meter.reset()
    if not widget.wait_for_embedding(600):
        print("the embedding did not finish", file=sys.stderr)
        return 1
    results.append(("embedding (worker)", meter.settle()))

    (r, c), (r2, c2) = centres
    for k in range(args.clicks):
        meter.reset()
        widget.points_layer.add([[r + 5 * k, c + 5 * k]])
        widget.wait_for_prediction(600)
        results.append((f"click {k + 1}", meter.settle()))
    meter.reset()
    widget.commit()
    results.append(("first commit (new labels layer)", meter.settle(1.0)))
    meter.reset()
    widget.points_layer.add([[r2, c2]])
    widget.wait_for_prediction(600)
    results.append(("click on a second object", meter.settle()))
    meter.reset()
    widget.commit()
    results.append(("second commit", meter.settle()))
    meter.reset()
    widget.undo()
    results.append(("undo", meter.settle()))

    print(f"image {args.size} x {args.size}, model {widget.model_picker.name}")
    print(f"{'step':34s} max main-thread gap")
    for name, gap in results:
        print(f"{name:34s} {gap * 1000:8.0f} ms")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
