"""Train a mask refiner for any model and save the model with it (docs/training.md).

    python scripts/train_refiner.py MODEL DATA -o RUN [--ids splits/dsb2018.json]
        [--steps 1500] [--max-objects 20] [--threads 1] [--seed 0] [--overwrite]
        [--corrections] [--warm-start]

MODEL: anything ``load_model`` takes (default, vit_b, a checkpoint path). DATA: a training
folder as ``napari-sam train`` reads it; ``--ids`` keeps only the ids of its ``train`` list
(the validation images are never used). Steps (``napari_sam.training.refiner``):

1. ``RUN/samples.npz``: three prompts per object (innermost click, random click, box) on the
   frozen model, the refiner's input windows and targets (reused when present); with
   ``--corrections`` also ``RUN/corrections.npz``: a correction click after each click
   (negative or positive, as a user places it on the mask MODEL shows);
2. the refiner's training, checkpointed to ``RUN/refiner_state.pt`` every 100 steps
   (a stopped run resumes from it with the same command);
   ``--warm-start`` starts from MODEL's own refiner (a longer schedule for a shipped one);
3. ``RUN/model.safetensors``: MODEL with the refiner inside (``load_model(RUN/model.safetensors)``
   refines every click and box at once).

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
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--max-objects", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrections", action="store_true",
                        help="also learn from correction clicks (negative points)")
    parser.add_argument("--warm-start", action="store_true",
                        help="start from MODEL's own refiner")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.max_objects < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--steps, --max-objects, --batch-size and --threads must be >= 1")

    import torch

    from napari_sam.engine.image import to_rgb_uint8
    from napari_sam.engine.io import read_image, read_labels
    from napari_sam.models import load_model
    from napari_sam.models.checkpoint import save_model
    from napari_sam.training.datasets import find_pairs, load_ids
    from napari_sam.training.refiner import (
        RefinerSamples,
        refiner_samples,
        train_refiner,
        with_refiner,
    )

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("out", "threads", "overwrite")}
    run = args.out
    record = run / "refiner_run.json"
    if run.exists() and any(run.iterdir()):
        old = json.loads(record.read_text()) if record.is_file() else None
        if old != settings:
            if not args.overwrite:
                print(f"train_refiner: {run} holds another run (or other files); pass "
                      "--overwrite to start over there, or choose a new folder.", file=sys.stderr)
                return 1
            shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=1))

    model = load_model(args.model).eval()
    init, widths = None, {}
    if args.warm_start:
        own = getattr(model, "mask_refiner", None)
        if own is None:
            print(f"train_refiner: --warm-start: {args.model} has no mask refiner to start "
                  "from; leave the option out.", file=sys.stderr)
            return 1
        init, widths = own.state_dict(), {"widths": tuple(own.widths)}
    pairs = find_pairs(args.data)
    if args.ids:
        train_ids, _val = load_ids(args.ids)
        keep = set(train_ids or [])
        pairs = [p for p in pairs if p[0] in keep]

    def make_samples(path: Path, prompts: str) -> RefinerSamples:
        if path.is_file():
            return RefinerSamples.load(path)

        def images():
            for _id, image_path, label_path in pairs:
                yield to_rgb_uint8(read_image(image_path).data), read_labels(label_path)

        def progress(n: int) -> None:
            if n % 20 == 0 or n == len(pairs):
                logging.info("%s: %d/%d images", path.name, n, len(pairs))

        made = refiner_samples(model, images(), max_objects=args.max_objects, seed=args.seed,
                               progress=progress, prompts=prompts)
        tmp = path.with_suffix(".tmp.npz")
        made.save(tmp)
        tmp.replace(path)
        return made

    samples = make_samples(run / "samples.npz", "all")
    if args.corrections:
        samples = samples + make_samples(run / "corrections.npz", "corrections")
    logging.info("%d samples", len(samples.x))

    state_path = run / "refiner_state.pt"
    state = torch.load(state_path, weights_only=False) if state_path.is_file() else None

    def checkpoint(st: dict) -> None:
        torch.save(st, run / "refiner_state.tmp.pt")
        (run / "refiner_state.tmp.pt").replace(state_path)

    refiner = train_refiner(samples, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed, state=state, checkpoint=checkpoint, init=init,
                            **widths)
    out = save_model(with_refiner(model, refiner), run / "model.safetensors")
    logging.info("saved %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
