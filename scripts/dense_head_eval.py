"""Score a run's ``--aux-dense`` head on validation images (what the encoder has learnt).

    python scripts/dense_head_eval.py RUN_DIR /work/shared/data/dsb2018 \
        --ids splits/dsb2018_val20.json

Loads ``RUN_DIR/last.safetensors`` and ``RUN_DIR/aux_head.pt``, runs each whole image (as at
inference: longest side to the model's input, no augmentation) and prints, pooled over the
images at the decoder's low resolution: the foreground IoU of the head (probability > 0.5
against the area-averaged target > 0.5), the boundary F1 and the mean absolute error of the
two distance maps inside objects.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="training output folder with aux_head.pt")
    parser.add_argument("data", help="dataset folder")
    parser.add_argument("--ids", default=None, help="ids file (its validation ids)")
    args = parser.parse_args()

    from napari_sam.models.checkpoint import model_from_checkpoint
    from napari_sam.training.datasets import InstanceDataset, load_ids
    from napari_sam.training.dense_targets import DenseHead, dense_targets_batch

    model = model_from_checkpoint(args.run / "last.safetensors").eval()
    head = DenseHead(int(model.prompt_encoder.embed_dim))
    head.load_state_dict(torch.load(args.run / "aux_head.pt", weights_only=True))
    head.eval()
    ids = load_ids(args.ids)[1] if args.ids else None
    low = int(model.prompt_encoder.mask_input_size[0])
    data = InstanceDataset(
        args.data,
        ids=ids,
        img_size=int(model.image_encoder.img_size),
        low_res_size=low,
        pixel_mean=model.pixel_mean.flatten().tolist(),
        pixel_std=model.pixel_std.flatten().tolist(),
    )
    inter = union = tp = fp = fn = 0.0
    err = torch.zeros(2)
    n_in = 0.0
    with torch.no_grad():
        for i in range(len(data)):
            s = data[i]
            prob = torch.sigmoid(head(model.image_encoder(s.image[None])))[0]
            target, valid = dense_targets_batch([s.labels], [s.input_size], low)
            target, valid = target[0], valid[0, 0] > 0
            p, t = (prob[0] > 0.5) & valid, (target[0] > 0.5) & valid
            inter += float((p & t).sum())
            union += float((p | t).sum())
            pb, tb = (prob[1] > 0.5) & valid, (target[1] > 0.5) & valid
            tp += float((pb & tb).sum())
            fp += float((pb & ~tb).sum())
            fn += float((~pb & tb).sum())
            inside = t
            err += (prob[2:] - target[2:]).abs()[:, inside].sum(dim=1)
            n_in += float(inside.sum())
    result = {
        "images": len(data),
        "foreground_iou": inter / max(union, 1.0),
        "boundary_f1": 2 * tp / max(2 * tp + fp + fn, 1.0),
        "center_mae_in_objects": float(err[0]) / max(n_in, 1.0),
        "boundary_distance_mae_in_objects": float(err[1]) / max(n_in, 1.0),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
