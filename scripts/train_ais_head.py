"""Train an AIS head on a frozen model (experiment driver for issue 15; resumable).

    python scripts/train_ais_head.py MODEL DATA -o RUN --ids splits/dsb2018.json \
        [--steps 600] [--batch-size 8] [--lr 1e-3] [--hidden 64] [--init-head aux_head.pt]

Only the head learns: the image encoder runs under ``no_grad``, so a step costs one encoder
forward pass of the batch. The loss is that of ``--aux-dense`` (BCE + Dice on the four maps
of :mod:`napari_sam.training.dense_targets`). ``RUN/head_state.pt`` is written every
``--checkpoint-every`` steps (head, optimiser, step) and a run resumes from it;
``RUN/model.safetensors`` is the model with the head inside (``load_model`` reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--ids", default=None, help="ids file: trains on its train ids")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--init-head", default=None)
    parser.add_argument("--scale-min", type=float, default=0.5)
    parser.add_argument("--scale-max", type=float, default=2.0)
    parser.add_argument("--full-view-prob", type=float, default=0.3)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch

    from napari_sam.models.ais_head import AisHead
    from napari_sam.models.checkpoint import save_model
    from napari_sam.models.zoo import load_model
    from napari_sam.training.datasets import InstanceDataset
    from napari_sam.training.dense_targets import dense_loss, dense_targets_batch
    from napari_sam.training.loop import load_ids

    torch.manual_seed(args.seed)
    model = load_model(args.model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dim = int(model.prompt_encoder.embed_dim)
    head = AisHead(dim, args.hidden)
    if args.init_head:
        head.load_state_dict(torch.load(args.init_head, weights_only=True))
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.01)
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / "head_state.pt"
    step = 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
    train_ids = load_ids(args.ids)[0] if args.ids else None
    low = int(model.prompt_encoder.mask_input_size[0])
    data = InstanceDataset(
        args.data, ids=train_ids, img_size=model.img_size, low_res_size=low,
        pixel_mean=model.pixel_mean.flatten().tolist(),
        pixel_std=model.pixel_std.flatten().tolist(),
        full_view_prob=args.full_view_prob, scale_range=(args.scale_min, args.scale_max),
        cache=True,
    )
    log = (args.out / "log.jsonl").open("a")
    while step < args.steps:
        tic = time.perf_counter()
        rng = np.random.default_rng([args.seed, step])
        picks = rng.integers(0, len(data), args.batch_size)
        samples = [data.sample(int(i), rng=rng) for i in picks]
        images = torch.stack([s.image for s in samples])
        targets, valid = dense_targets_batch([s.labels for s in samples],
                                             [s.input_size for s in samples], low)
        with torch.no_grad():
            emb = model.image_encoder(images)
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = dense_loss(head(emb), targets, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        log.write(json.dumps({"step": step, "loss": float(loss.detach()), "lr": lr,
                              "sec": time.perf_counter() - tic}) + "\n")
        log.flush()
        if step % args.checkpoint_every == 0 or step == args.steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
            tmp.replace(state_path)
    head.eval()
    model.ais_head = head
    model.config = dataclasses.replace(model.config, ais_head_hidden=args.hidden)
    save_model(model, args.out / "model.safetensors")
    torch.save(head.state_dict(), args.out / "aux_head.pt")


if __name__ == "__main__":
    main()
