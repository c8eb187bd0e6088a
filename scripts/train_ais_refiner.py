"""Train an AIS map refiner for a model with an AIS head and save the model with it.

    python scripts/train_ais_refiner.py MODEL DATA -o RUN [--ids splits/dsb2018.json]
        [--steps 1000] [--crop 128] [--batch-size 16] [--lr 2e-3] [--threads 1]
        [--seed 0] [--overwrite]

MODEL: anything ``load_model`` takes that has an AIS head (the default model; a model
given one by ``napari-sam train --head-only``). DATA: a training folder as
``napari-sam train`` reads it; ``--ids`` keeps only the ids of its ``train`` list (the
validation images are never used). Steps (``napari_sam.training.ais_refiner``):

1. ``RUN/maps/ID.npz``: each training image, the frozen model's head maps (its own
   tiling) and the targets of its labels (images already there are reused);
2. the refiner's training, checkpointed to ``RUN/refiner_state.pt`` every 100 steps
   (a stopped run resumes from it with the same command);
3. ``RUN/model.safetensors``: MODEL with the refiner inside (``napari-sam everything
   -m RUN/model.safetensors`` refines the maps of every image).

A RUN folder made for another MODEL, DATA or settings is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--ids", help="ids file; its 'train' list is used")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.threads) < 1 or args.crop < 16:
        parser.error("--steps, --batch-size and --threads must be >= 1, --crop >= 16")

    import torch

    from napari_sam.engine.ais import NO_HEAD_MESSAGE, has_ais_head
    from napari_sam.engine.image import to_rgb_uint8
    from napari_sam.engine.io import read_image, read_labels
    from napari_sam.models import load_model
    from napari_sam.models.checkpoint import save_model
    from napari_sam.training.ais_refiner import (
        AisRefinerImage,
        ais_refiner_images,
        train_ais_refiner,
        with_ais_refiner,
    )
    from napari_sam.training.datasets import find_pairs, load_ids

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    if not has_ais_head(model):
        print(f"train_ais_refiner: {args.model}: {NO_HEAD_MESSAGE}", file=sys.stderr)
        return 1
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("out", "threads", "overwrite")}
    run = args.out
    record = run / "ais_refiner_run.json"
    if run.exists() and any(run.iterdir()):
        old = json.loads(record.read_text()) if record.is_file() else None
        if old != settings:
            if not args.overwrite:
                print(f"train_ais_refiner: {run} holds another run (or other files); pass "
                      "--overwrite to start over there, or choose a new folder.", file=sys.stderr)
                return 1
            shutil.rmtree(run)
    (run / "maps").mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=1))

    pairs = find_pairs(args.data)
    if args.ids:
        keep = set(load_ids(args.ids)[0] or [])
        pairs = [p for p in pairs if p[0] in keep]
    todo = [p for p in pairs if not (run / "maps" / f"{p[0]}.npz").is_file()]
    images = ((to_rgb_uint8(read_image(ip).data), read_labels(lp)) for _id, ip, lp in todo)
    for n, ((image_id, _ip, _lp), item) in enumerate(
            zip(todo, ais_refiner_images(model, images), strict=True), start=1):
        tmp = run / "maps" / f"{image_id}.tmp.npz"
        item.save(tmp)
        tmp.replace(run / "maps" / f"{image_id}.npz")
        if n % 20 == 0 or n == len(todo):
            logging.info("maps: %d/%d images", n, len(todo))
    data = [AisRefinerImage.load(run / "maps" / f"{p[0]}.npz") for p in pairs]
    logging.info("%d images", len(data))

    state_path = run / "refiner_state.pt"
    state = torch.load(state_path, weights_only=False) if state_path.is_file() else None

    def checkpoint(st: dict) -> None:
        torch.save(st, run / "refiner_state.tmp.pt")
        (run / "refiner_state.tmp.pt").replace(state_path)

    refiner = train_ais_refiner(data, steps=args.steps, crop=args.crop,
                                batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                state=state, checkpoint=checkpoint)
    out = save_model(with_ais_refiner(model, refiner), run / "model.safetensors")
    logging.info("saved %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
