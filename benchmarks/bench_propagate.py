"""Time to propagate one object through a volume (issue 16): embeddings computed on
demand vs read from an embedding store.

A synthetic volume: ``--planes`` + 8 planes of ``--size`` x ``--size`` pixels holding a
bright ellipsoid (on a noisy background) that spans ``--planes`` planes (z semi-axis
``--planes`` / 2). The object is clicked once at its centre in its middle plane and
propagated up and down with :func:`napari_sam.engine.propagate.propagate_volume`
(default settings) until it ends. Two ways to get the planes' embeddings, in one run,
alternating ``--repeats`` times:

- **on demand**: the predictor's embedding cache is cleared before each run, so every
  plane visited is embedded by the encoder during the propagation;
- **from store**: the volume's planes were written once to a zarr store
  (:func:`napari_sam.engine.store.embed_to_store`, timed separately) which the predictor
  reads (``Predictor.use_store``); the cache is cleared before each run too.

Reports the median / min time of each, their ratio, the planes reached, the 3D IoU of
the result with the ellipsoid, the store's hits (planes read from it) and the time to
write the store.

    python benchmarks/bench_propagate.py [--planes 40] [--size 256] [--repeats 3]
        [--model default] [--threads N] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def ellipsoid_volume(planes: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(volume uint16 (Z, Y, X), truth bool (Z, Y, X)), Z = planes + 8: a bright ellipsoid
    of z semi-axis planes / 2 and yx semi-axes size / 5, size / 6, centred, plus noise."""
    rng = np.random.default_rng(seed)
    n = planes + 8
    zz, yy, xx = np.mgrid[0:n, 0:size, 0:size].astype(np.float32)
    r = (((zz - (n - 1) / 2) / (planes / 2)) ** 2 + ((yy - size / 2) / (size / 5)) ** 2
         + ((xx - size / 2) / (size / 6)) ** 2)
    truth = r <= 1.0
    volume = 400 + 2500 * np.clip(1.2 - r, 0, 1) * truth + rng.normal(0, 60, truth.shape)
    return np.clip(volume, 0, 65535).astype(np.uint16), truth


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--planes", type=int, default=40, help="planes the object spans")
    p.add_argument("--size", type=int, default=256, help="plane side in pixels")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    p.add_argument("--model", default="default", help="anything load_model takes")
    p.add_argument("--threads", type=int, default=0,
                   help="fixed torch threads, also NAPARI_SAM_THREADS (0: torch's default "
                        "and napari-sam's automatic policy)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.planes < 1 or args.size < 16:
        p.error("--repeats and --planes must be >= 1 and --size >= 16")
    if args.threads:  # a fixed count: napari-sam's automatic policy would follow the load
        torch.set_num_threads(args.threads)
        os.environ["NAPARI_SAM_THREADS"] = str(args.threads)

    from napari_sam.engine.predictor import Predictor
    from napari_sam.engine.propagate import propagate_volume
    from napari_sam.engine.store import EmbeddingStore, embed_to_store
    from napari_sam.models.zoo import load_model

    volume, truth = ellipsoid_volume(args.planes, args.size)
    limits = (float(volume.min()), float(volume.max()))  # propagate_volume's own default
    start = volume.shape[0] // 2
    click = np.array([[args.size / 2, args.size / 2]])
    predictor = Predictor(load_model(args.model, device="cpu"))

    def run() -> tuple[float, np.ndarray]:
        predictor.cache.clear()  # every plane comes from the encoder or the store
        t0 = time.perf_counter()
        result = propagate_volume(predictor, volume, start, points=click, labels=[1],
                                  contrast_limits=limits)
        return time.perf_counter() - t0, result.masks

    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "volume.sam.zarr"
        t0 = time.perf_counter()
        embed_to_store(predictor, volume, store_path, contrast_limits=limits,
                       model_name=args.model, tile_size=None)
        write_s = time.perf_counter() - t0
        store = EmbeddingStore.open(store_path)

        times: dict[str, list[float]] = {"on demand": [], "from store": []}
        masks: dict[str, np.ndarray] = {}
        for i in range(args.repeats):
            order = ("on demand", "from store") if i % 2 == 0 else ("from store", "on demand")
            for variant in order:
                predictor.use_store(store if variant == "from store" else None)
                store.lookups = store.hits = 0
                seconds, masks[variant] = run()
                times[variant].append(seconds)
                hits = store.hits if variant == "from store" else None
        predictor.use_store(None)

    reached = {k: int(m.reshape(len(m), -1).any(1).sum()) for k, m in masks.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    setup = (f"model {args.model}, volume {volume.shape[0]} x {args.size} x {args.size} "
             f"(object spans {args.planes} planes), {torch.get_num_threads()} threads "
             f"(NAPARI_SAM_THREADS={os.environ.get('NAPARI_SAM_THREADS', 'auto')}), "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}; "
             f"{args.repeats} runs each, alternating")
    print(f"\n{setup}\n")
    print("| embeddings | median (s) | min (s) | per plane (ms) | planes reached | 3D IoU |")
    print("|---|---|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.2f} | {min(v):.2f} | {1e3 * med[k] / max(reached[k], 1):.0f} | "
              f"{reached[k]} | {_iou(masks[k], truth):.3f} |")
    print(f"\non demand / from store: {med['on demand'] / med['from store']:.2f}x; "
          f"store written once in {write_s:.2f} s ({volume.shape[0]} planes); "
          f"planes read from the store in its last run: {hits}")
    if hits == 0:
        print("warning: the store was never read (keys differ?); 'from store' is not what it "
              "says", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "setup": setup, "times_s": times, "median_s": med, "store_write_s": write_s,
            "planes_reached": reached, "store_hits": hits,
            "iou_3d": {k: _iou(m, truth) for k, m in masks.items()}}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
