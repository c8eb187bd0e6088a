"""Grid search of everything-mode thresholds on training images (never validation ones).

    python scripts/tune_everything.py /work/shared/data/dsb2018 [--model default] [--n-images 16]
        [--ids splits/dsb2018.json] [--iou 0.5 0.6 0.7] [--stability 0.8 0.85 0.9]

Takes ``--n-images`` ids of the split file's *training* list (a seeded random sample), runs
everything-mode with every (pred_iou_thresh, stability_score_thresh) pair, and prints AP at
IoU 0.5 (TP / (TP + FP + FN), the Data Science Bowl definition), precision and recall, best
AP50 first. The image embeddings are computed once and reused across the grid.
"""

from __future__ import annotations

import argparse
import itertools
import random

from napari_sam.engine.predictor import Predictor
from napari_sam.evaluation import evaluate
from napari_sam.models.zoo import load_model
from napari_sam.training.datasets import load_ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data")
    parser.add_argument("--model", default="default")
    parser.add_argument("--ids", default="splits/dsb2018.json")
    parser.add_argument("--n-images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iou", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument("--stability", type=float, nargs="+", default=[0.8, 0.85, 0.9])
    args = parser.parse_args(argv)

    train, _ = load_ids(args.ids)
    if not train:
        parser.error(f"{args.ids} has no 'train' list; the thresholds must not be tuned on "
                     "validation images.")
    ids = sorted(random.Random(args.seed).sample(sorted(train), args.n_images))
    predictor = Predictor(load_model(args.model, device="cpu"))
    rows = []
    for iou, stability in itertools.product(args.iou, args.stability):
        res = evaluate(
            predictor, args.data, ids=ids, n_clicks=0, box=False,
            everything_kwargs={"pred_iou_thresh": iou, "stability_score_thresh": stability},
        )
        ev = res["everything"]
        rows.append((ev["ap50"], ev["precision50"], ev["recall50"], iou, stability))
        print(f"pred_iou_thresh {iou:.2f} stability {stability:.2f}: AP50 {ev['ap50']:.3f}",
              flush=True)
    print(f"\n{args.n_images} training images (seed {args.seed}), model {args.model}\n")
    print("| pred_iou_thresh | stability_score_thresh | AP50 | precision | recall |")
    print("|---|---|---|---|---|")
    for ap, prec, rec, iou, stability in sorted(rows, reverse=True):
        print(f"| {iou:.2f} | {stability:.2f} | {ap:.3f} | {prec:.3f} | {rec:.3f} |")


if __name__ == "__main__":
    main()
