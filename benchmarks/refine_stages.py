"""Where a refined click's time goes: decoder, window, features, refiner, paste.

    OMP_NUM_THREADS=2 python benchmarks/refine_stages.py [--shape 512 512] [--repeats 30]

The embedded default model (it has a mask refiner) on the image of
``bench_click.py``, one foreground point, multimask (3 candidates refined).
Each stage is timed on its own, ``--repeats`` times after 3 untimed calls, and
its median printed in ms, on the threads the predictor's ``compute_threads``
chooses at that moment (fewer on a busy machine; printed beside each figure):

- ``decoder``: ``Predictor(refine=False).predict`` (full-size logits);
- ``windows``: the 3 windows from the logits;
- ``features``: the refiner's (3, 6, 64, 64) input;
- ``refiner forward`` / ``refiner infer``: the plain eval-mode forward and
  the inference path (:meth:`MaskRefiner.infer`) on that input;
- ``paste``: the refined windows back into the logits (in place);
- ``refine_logits``: the last four together, as the predictor runs them;
- ``click``: ``Predictor.predict`` with the refiner (boolean masks).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_click import _image  # noqa: E402

from napari_sam.engine import refine  # noqa: E402
from napari_sam.engine.predictor import Predictor  # noqa: E402
from napari_sam.engine.threads import compute_threads  # noqa: E402
from napari_sam.models.zoo import load_model  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)

    model = load_model("default", device="cpu")
    refiner = model.mask_refiner
    shape = tuple(args.shape)
    image = _image(shape)
    plain, refined = Predictor(model, refine=False), Predictor(model)
    plain.set_image(image)
    refined.set_image(image)
    point = np.array([[shape[0] * 0.4, shape[1] * 0.55]])
    label = np.array([1])
    threshold = float(model.mask_threshold)
    logits = plain.predict(points=point, labels=label, return_logits=True).masks  # (3, H, W)
    candidates = list(logits)
    n = len(candidates)

    def windows():
        return [refine._logit_window(m, threshold, point, None) for m in candidates]

    wins = windows()

    def features():
        return refine._batch_features(image, candidates, wins, [point] * n, [None] * n)

    x = features()
    with torch.inference_mode():
        out = refiner.infer(x)[:, 0]

    work = logits.copy()  # the predictor pastes into its own fresh logits, no copy

    def paste():
        for k, window in enumerate(wins):
            refine._paste_into(work[k], out[k], window)

    stages = {
        "decoder": lambda: plain.predict(points=point, labels=label, return_logits=True),
        "windows": windows,
        "features": features,
        "refiner forward": lambda: refiner(x),
        "refiner infer": lambda: refiner.infer(x),
        "paste": paste,
        "refine_logits": lambda: refine.refine_logits(refiner, image, logits[None],
                                                      point[None], label[None], None,
                                                      threshold),
        "click": lambda: refined.predict(points=point, labels=label),
    }
    print(f"default model, image {shape[0]} x {shape[1]}, one point, {n} candidates; windows "
          f"{wins}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    # the stages on the threads the predictor would use now (it adapts them to the load)
    with torch.inference_mode():
        for name, fn in stages.items():
            with compute_threads() as threads:
                ms = _median_ms(fn, args.repeats)
            print(f"{name:>16}: {ms:7.2f} ms  ({threads} threads)", flush=True)


if __name__ == "__main__":
    main()
