"""Point and box mIoU by image-size class, with a model's mask refiner (or tiling) on and off.

    python scripts/size_classes.py [MODEL] [--data /work/shared/data/dsb2018]
        [--ids splits/dsb2018.json] [--limit N] [--compare refiner|tiling] [--min-side PX]

Per validation object (at least 10 pixels): a click at its innermost pixel (multimask, the
mask with the best predicted IoU) and its tight box, IoU at full resolution, with two
predictors:

* ``--compare refiner`` (default): ``Predictor(model)`` (refiner on, when the model has
  one) and ``Predictor(model, refine=False)`` (docs/training.md, "The mask refiner");
* ``--compare tiling``: ``Predictor(model, tiling="auto")`` (large images in native-scale
  tiles, as the widget) and ``Predictor(model)`` (the whole image at model scale), both
  with the model's refiner (docs/training.md, "Large images in tiles").

Classes by the image's longer side: up to 300, 300-400, 400-800 and 800-2000 px, plus the
objects under 100 pixels. ``--min-side`` skips images whose longer side is shorter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASSES = [(0, 300), (300, 400), (400, 800), (800, 2000)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="default")
    parser.add_argument("--data", default="/work/shared/data/dsb2018")
    parser.add_argument("--ids", default="splits/dsb2018.json")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--compare", choices=("refiner", "tiling"), default="refiner")
    parser.add_argument("--min-side", type=int, default=0,
                        help="skip images whose longer side is shorter than this")
    args = parser.parse_args()

    from napari_sam.engine.image import to_rgb_uint8
    from napari_sam.engine.io import read_image, read_labels
    from napari_sam.engine.predictor import Predictor
    from napari_sam.models import load_model
    from napari_sam.training.datasets import load_ids
    from napari_sam.training.prompts import innermost_points, prompt_boxes

    model = load_model(args.model)
    _train, val = load_ids(args.ids)
    if args.compare == "refiner":
        on, off = Predictor(model), Predictor(model, refine=False)
    else:
        on, off = Predictor(model, tiling="auto"), Predictor(model)
    off.cache = on.cache  # one encoder run per image (per tile)
    rows = []
    for sid in val[: args.limit]:
        rgb = to_rgb_uint8(read_image(Path(args.data) / "images" / f"{sid}.png").data)
        if max(rgb.shape[:2]) < args.min_side:
            continue
        labels = read_labels(Path(args.data) / "labels" / f"{sid}.png")
        for p in (on, off):
            p.set_image(rgb)
        ids, area = np.unique(labels, return_counts=True)
        for obj in ids[(ids != 0) & (area >= 10)]:
            truth = labels == obj
            point = innermost_points(truth[None]).astype(np.float64)
            box = prompt_boxes(truth[None])[0]
            row = [max(labels.shape), truth.sum()]
            for p in (on, off):
                pred = p.predict(points=point, multimask=True)
                mask = pred.masks[int(np.argmax(pred.scores))]
                row.append((mask & truth).sum() / (mask | truth).sum())
            for p in (on, off):
                mask = p.predict(box=box, multimask=False).masks[0]
                row.append((mask & truth).sum() / (mask | truth).sum())
            rows.append(row)
    r = np.asarray(rows, dtype=np.float64)
    print(f"{len(r)} objects; {args.compare} on / off: point on / off, box on / off")
    print(f"all: {r[:, 2].mean():.3f} / {r[:, 3].mean():.3f}, {r[:, 4].mean():.3f} / "
          f"{r[:, 5].mean():.3f}")
    for lo, hi in CLASSES:
        s = (r[:, 0] >= lo) & (r[:, 0] < hi)
        if s.any():
            print(f"{lo}-{hi} px (n={s.sum()}): {r[s, 2].mean():.3f} / {r[s, 3].mean():.3f}, "
                  f"{r[s, 4].mean():.3f} / {r[s, 5].mean():.3f}")
    s = r[:, 1] < 100
    print(f"under 100 px (n={s.sum()}): point {r[s, 2].mean():.3f} / {r[s, 3].mean():.3f}")


if __name__ == "__main__":
    main()
