"""Score automatic instance segmentation (AIS) on a dataset, over a grid of thresholds.

    python scripts/ais_eval.py MODEL /work/shared/data/dsb2018 --ids splits/dsb2018_val20.json \
        [--head RUN/aux_head.pt] [--foreground 0.4 0.5 0.6] [--center 0.4 0.5 0.6 0.7]

MODEL is anything ``load_model`` takes. ``--head`` grafts a head trained with ``--aux-dense``
(saved beside the checkpoints as ``aux_head.pt``) onto a model without one. The maps of each
image are computed once and decoded with every threshold pair; the output is one JSON line
per pair with AP50, AP75 and the DSB AP (mean over images, as ``napari-sam evaluate``
scores everything-mode), best AP50 last.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--ids", default=None)
    parser.add_argument("--head", default=None, help="aux_head.pt of a --aux-dense run")
    parser.add_argument("--foreground", type=float, nargs="+", default=[0.5])
    parser.add_argument("--center", type=float, nargs="+", default=[0.5])
    parser.add_argument("--min-size", type=int, default=10)
    parser.add_argument("--tile-size", type=int, default=None)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--click-iou", action="store_true",
                        help="also score 'click = the AIS instance under the innermost pixel' "
                             "(objects of at least 10 px, as napari-sam evaluate prompts them)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from napari_sam.engine.ais import AisSettings, InstanceSegmenter, instances_from_maps
    from napari_sam.evaluation.metrics import matching_metrics, mean_metrics
    from napari_sam.models.ais_head import AisHead
    from napari_sam.models.zoo import load_model
    from napari_sam.training.datasets import InstanceDataset
    from napari_sam.training.loop import load_ids

    model = load_model(args.model)
    if args.head:
        state = torch.load(args.head, weights_only=True)
        hidden = state["net.0.weight"].shape[1]
        model.ais_head = AisHead(int(model.prompt_encoder.embed_dim), hidden)
        model.ais_head.load_state_dict(state)
        model.ais_head.eval()
    segmenter = InstanceSegmenter(model)
    ids = load_ids(args.ids)[1] if args.ids else None
    data = InstanceDataset(args.data, ids=ids)
    grid = list(itertools.product(args.foreground, args.center))
    scores: dict[tuple[float, float], list] = {pair: [] for pair in grid}
    clicks: dict[tuple[float, float], list] = {pair: [] for pair in grid}
    seconds = []
    for i in range(len(data)):
        image, labels = data.load(i)
        from napari_sam.engine.image import to_rgb_uint8

        tic = time.perf_counter()
        maps = segmenter.maps(to_rgb_uint8(image), use_cache=False, tile_size=args.tile_size,
                              overlap=args.overlap, scale=args.scale)
        for fg, ct in grid:
            settings = AisSettings(foreground_threshold=fg, center_threshold=ct,
                                   min_size=args.min_size)
            pred = instances_from_maps(maps, settings)
            n = int(pred.max())
            masks = [pred == k for k in range(1, n + 1)]
            scores[(fg, ct)].append(matching_metrics(labels, masks))
            if args.click_iou:
                clicks[(fg, ct)].extend(_click_ious(pred, labels))
        seconds.append(time.perf_counter() - tic)
    rows = []
    for (fg, ct), per_image in scores.items():
        m = mean_metrics(per_image)
        rows.append({"foreground": fg, "center": ct, "ap50": m["ap50"], "ap75": m["ap75"],
                     "ap_dsb": m["ap_dsb"], "n_pred": m["n_pred"], "n_gt": m["n_gt"],
                     **({"click_miou": float(np.mean(clicks[(fg, ct)]))} if args.click_iou
                        else {})})
    rows.sort(key=lambda r: r["ap50"])
    for r in rows:
        print(json.dumps(r))
    print(json.dumps({"images": len(data), "seconds_per_image": sum(seconds) / len(seconds),
                      "settings": dataclasses.asdict(AisSettings())}))


def _click_ious(pred, labels, min_area: int = 10) -> list[float]:
    """IoU of the predicted instance under each object's innermost pixel (0 on background)."""
    import numpy as np

    from napari_sam.training.prompts import innermost_points

    ids = [i for i in np.unique(labels) if i and (labels == i).sum() >= min_area]
    if not ids:
        return []
    gt = np.stack([labels == i for i in ids])
    out = []
    for mask, (r, c) in zip(gt, innermost_points(gt), strict=True):
        k = pred[r, c]
        if k == 0:
            out.append(0.0)
            continue
        p = pred == k
        out.append(float((p & mask).sum() / (p | mask).sum()))
    return out


if __name__ == "__main__":
    main()
