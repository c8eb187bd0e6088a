"""Where a click's time goes: wall time per stage of our ViT-B click (docs/benchmarks.md).

    python benchmarks/click_stages.py [--repeats 40] [--evict MB]

ViT-B decoder with random weights, a random (1, 256, 64, 64) embedding, a
1200 x 1600 image, one point, multimask, full-resolution masks. The stages are
timed by wrapping the functions and modules that implement them (nested stages
are included in their parents: ``decode`` contains the transformer and mask-head
stages, ``predict`` everything). Wrapping adds a little overhead to each call,
so the stage times add up to slightly more than an unwrapped click.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

import napari_sam.engine.predictor as P
from napari_sam.models.build import MODEL_CONFIGS, build_sam


def _timed(owner, name: str, label: str, acc: dict) -> None:
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        acc[label].append(time.perf_counter() - t0)
        return out

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--evict", type=int, default=0, metavar="MB",
                        help="write MB megabytes between clicks (other work evicting the "
                             "caches, as the reference's clicks do in bench_click.py)")
    args = parser.parse_args(argv)
    other_work = torch.empty(args.evict * 2**18)

    torch.manual_seed(0)
    model = build_sam(MODEL_CONFIGS["vit_b"]).eval()
    pred = P.Predictor(model)
    shape = (1200, 1600)
    pred.set_embedding(torch.randn(1, 256, 64, 64), shape, pred.transform.input_size(shape))
    acc: dict[str, list[float]] = defaultdict(list)
    dec = model.mask_decoder
    layers = dec.transformer.layers
    modules = {
        "prompt encoder": [model.prompt_encoder],
        "token self-attention": [layer.self_attn for layer in layers],
        "token MLPs": [layer.mlp for layer in layers],
        "IoU + hypernetwork heads": [dec.iou_prediction_head, *dec.output_hypernetworks_mlps],
    }
    for label, mods in modules.items():
        for mod in mods:
            _timed(mod, "forward", label, acc)
    for name, label in [
        ("_t2i_cached", "block 1 attentions (cached image side)"),
        ("_i2t_cached", "block 1 attentions (cached image side)"),
        ("_image_update", "image updates (add, LayerNorm; 2 blocks)"),
        ("upscale_masks", "mask head (2 transposed convolutions)"),
        ("_postprocess", "full-resolution masks"),
    ]:
        _timed(P, name, label, acc)
    for name in ("_t2i_factored", "_i2t_factored"):
        _timed(P._FastDecoder, name, "factored attentions (block 2, final)", acc)
    _timed(P._FastDecoder, "decode_factored", "decode (all of the decoder)", acc)
    _timed(P.Predictor, "predict", "predict (the whole click)", acc)

    point, label = np.array([[480.0, 880.0]]), np.array([1])
    t0 = time.perf_counter()
    pred.predict(points=point, labels=label)  # builds the per-image context
    first = time.perf_counter() - t0
    per_image = sum(
        t.numel() * t.element_size()
        for value in pred._context.values()
        for t in (value if isinstance(value, tuple) else (value,))
        if isinstance(t, torch.Tensor)
    )
    n_params = sum(p.numel() for p in dec.parameters())
    print(f"first click after set_embedding: {first * 1e3:.1f} ms; per-image context "
          f"{per_image / 2**20:.1f} MB; decoder {n_params / 1e6:.2f} M parameters "
          f"({n_params * 4 / 2**20:.1f} MB)")
    for _ in range(5):
        pred.predict(points=point, labels=label)
    acc.clear()
    for _ in range(args.repeats):
        other_work.fill_(1.0)
        pred.predict(points=point, labels=label)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"mean per click over {args.repeats} clicks"
          + (f", {args.evict} MB written between clicks" if args.evict else ""))
    print("| stage | ms per click | calls per click |")
    print("|---|---|---|")
    for name, times in acc.items():
        print(f"| {name} | {sum(times) / args.repeats * 1e3:.2f} | "
              f"{len(times) // args.repeats} |")


if __name__ == "__main__":
    main()
