"""Automatic instance segmentation (AIS) speed with the embedded default model.

    python benchmarks/bench_ais.py [--size 1024] [--repeats 3] [--tile-size auto|none|N]

The image is a mosaic of the bundled 520 x 696 nuclei sample cut to ``size x size`` (real
nuclei at their native scale). Times ``InstanceSegmenter.generate_labels`` end to end (tiles
embedded one after another, maps blended, the watershed), best and median of ``repeats``
after one warm-up call, and the decoding alone (``instances_from_maps`` on precomputed maps),
with the thread policy of the package (``NAPARI_SAM_THREADS`` unset: the free cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile-size", default="auto")
    args = ap.parse_args()

    from napari_sam.engine.ais import InstanceSegmenter, instances_from_maps
    from napari_sam.engine.image import to_rgb_uint8
    from napari_sam.models.zoo import load_model
    from napari_sam.sample_data import nuclei

    sample = np.asarray(nuclei()[0][0])
    reps = (args.size // sample.shape[0] + 1, args.size // sample.shape[1] + 1)
    image = np.tile(sample, reps)[: args.size, : args.size]
    tile = {"auto": "auto", "none": None}.get(args.tile_size)
    tile = int(args.tile_size) if tile is None and args.tile_size != "none" else tile
    seg = InstanceSegmenter(load_model(), tile_size=tile)
    rgb = to_rgb_uint8(image)
    seg.generate_labels(image)  # warm-up
    times, n = [], 0
    for _ in range(args.repeats):
        tic = time.perf_counter()
        n = int(seg.generate_labels(image).max())
        times.append(time.perf_counter() - tic)
    tile_px = seg.tile_size_for(rgb.shape[:2])
    maps = seg.maps(rgb, use_cache=False, tile_size=tile_px) if tile_px else seg.maps(rgb)
    tic = time.perf_counter()
    instances_from_maps(maps, seg.settings)
    decode = time.perf_counter() - tic
    print(f"AIS {args.size} x {args.size}: {seg.n_tiles(rgb.shape[:2])} tile(s) of {tile_px} px, "
          f"{n} objects; best {min(times):.3f} s, median {statistics.median(times):.3f} s "
          f"(watershed decoding alone {decode:.3f} s)")


if __name__ == "__main__":
    main()
