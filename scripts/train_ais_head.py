"""Train an AIS head on a frozen model: a thin wrapper of ``napari-sam train --head-only``.

    python scripts/train_ais_head.py MODEL DATA -o RUN --ids splits/dsb2018.json \
        [--steps 600] [--batch-size 8] [--lr 1e-3] [--hidden 64]

Kept so that the commands of docs/training.md's ablation section still run; new work should call
the CLI directly (docs/training.md, "Adding AIS to your model"). It runs::

    napari-sam train DATA -o RUN --model MODEL --head-only --val-ids IDS --steps N \
        --batch-size B --lr LR --ais-head-hidden H --warmup-steps 0 --min-lr-ratio 0 \
        --grad-clip 0 --scale-range MIN MAX --full-view-prob P --checkpoint-every C --seed S

(lr: cosine from LR to 0 without warm-up, as this script had) and then copies
``RUN/last.safetensors`` (the model with its head inside) to ``RUN/model.safetensors``, the
name this script used to write. Differences from the old script: the head's AdamW has no weight
decay (it had 0.01), images are drawn in seeded epochs rather than with replacement, and
``--init-head`` is gone: pass a MODEL that already has a head and that head is trained further.
A RUN folder of the old script (``head_state.pt``) does not resume; use a new folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def cli_arguments(args: argparse.Namespace) -> list[str]:
    """The ``napari-sam train`` command line of this script's parsed ``args``."""
    out = ["train", args.data, "-o", str(args.out), "--model", args.model, "--head-only",
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr",
           str(args.lr), "--ais-head-hidden", str(args.hidden), "--warmup-steps", "0",
           "--min-lr-ratio", "0", "--grad-clip", "0", "--scale-range", str(args.scale_min),
           str(args.scale_max), "--full-view-prob", str(args.full_view_prob),
           "--checkpoint-every", str(args.checkpoint_every), "--seed", str(args.seed)]
    if args.ids:
        out += ["--val-ids", args.ids]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--ids", default=None, help="ids file: trains on its train ids")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--scale-min", type=float, default=0.5)
    parser.add_argument("--scale-max", type=float, default=2.0)
    parser.add_argument("--full-view-prob", type=float, default=0.3)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from napari_sam.cli import main as napari_sam

    code = napari_sam(cli_arguments(args))
    if code == 0:
        shutil.copyfile(args.out / "last.safetensors", args.out / "model.safetensors")
    return code


if __name__ == "__main__":
    sys.exit(main())
