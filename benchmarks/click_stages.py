"""Where a click's time goes: time per stage of our ViT-B click (docs/benchmarks.md).

    python benchmarks/click_stages.py [--repeats 40] [--evict MB] [--model vit_b]

ViT-B decoder with random weights, a random (1, 256, 64, 64) embedding, a
1200 x 1600 image, one point, multimask, full-resolution masks. The clicks run
under ``torch.profiler``; the stages are the ``napari_sam.*`` markers the
predictor, the decoder backend and the upsampler set
(``torch.profiler.record_function``) and the model's token-side modules (marked
through forward hooks). Nested stages are included in their parents:
``napari_sam.decode`` contains the transformer and mask-head stages. The
profiler adds overhead to every operator, so the stage times add up to more
than an unprofiled click (``bench_click.py`` times those).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from napari_sam.engine.predictor import Predictor
from napari_sam.models.build import MODEL_CONFIGS, build_sam


def _mark_module(module: torch.nn.Module, label: str) -> None:
    """Put each call of ``module`` inside a profiler range named ``label``."""
    open_ranges: list[torch.profiler.record_function] = []

    def enter(mod, args):
        rf = torch.profiler.record_function(label)
        rf.__enter__()
        open_ranges.append(rf)

    def leave(mod, args, out):
        open_ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def _context_bytes(pred: Predictor, point: np.ndarray, label: np.ndarray) -> int:
    """Bytes of the decoder's per-image context after one click (public seams only)."""
    backend = pred.decoder
    with torch.inference_mode():
        ctx = backend.prepare(pred.features)
        xy = torch.as_tensor(pred.transform.points_to_model(point, pred.original_size))[None]
        sparse, dense = pred.model.prompt_encoder(
            points=(xy.float(), torch.as_tensor(label)[None]), boxes=None, masks=None
        )
        backend.decode(ctx, sparse, dense, True)
    total = 0
    stack = [getattr(ctx, f.name) for f in dataclasses.fields(ctx)]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif dataclasses.is_dataclass(value):
            stack += [getattr(value, f.name) for f in dataclasses.fields(value)]
        elif isinstance(value, dict):
            stack += list(value.values())
        elif isinstance(value, (list, tuple)):
            stack += list(value)
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--evict", type=int, default=0, metavar="MB",
                        help="write MB megabytes between clicks (other work evicting the "
                             "caches, as the reference's clicks do in bench_click.py)")
    parser.add_argument("--model", default="vit_b", choices=sorted(MODEL_CONFIGS),
                        help="architecture (random weights)")
    args = parser.parse_args(argv)
    other_work = torch.empty(args.evict * 2**18)

    torch.manual_seed(0)
    model = build_sam(MODEL_CONFIGS[args.model]).eval()
    pred = Predictor(model)
    shape = (1200, 1600)
    pe = model.prompt_encoder
    features = torch.randn(1, pe.embed_dim, *pe.image_embedding_size)
    pred.set_embedding(features, shape, pred.transform.input_size(shape))
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
            _mark_module(mod, label)

    point, label = np.array([[480.0, 880.0]]), np.array([1])
    t0 = time.perf_counter()
    pred.predict(points=point, labels=label)  # builds the per-image context
    first = time.perf_counter() - t0
    per_image = _context_bytes(pred, point, label)
    n_params = sum(p.numel() for p in dec.parameters())
    print(f"decoder backend {pred.decoder.kind!r}; first click after set_embedding: "
          f"{first * 1e3:.1f} ms; per-image context {per_image / 2**20:.1f} MB; decoder "
          f"{n_params / 1e6:.2f} M parameters ({n_params * 4 / 2**20:.1f} MB)")
    for _ in range(5):
        pred.predict(points=point, labels=label)
    wall = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.repeats):
            other_work.fill_(1.0)
            t0 = time.perf_counter()
            pred.predict(points=point, labels=label)
            wall.append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"mean per click over {args.repeats} profiled clicks "
          f"({sum(wall) / args.repeats * 1e3:.2f} ms wall each)"
          + (f", {args.evict} MB written between clicks" if args.evict else ""))
    print("| stage | ms per click | calls per click |")
    print("|---|---|---|")
    stages = set(modules)
    for event in prof.key_averages():
        if event.key.startswith("napari_sam.") or event.key in stages:
            print(f"| {event.key} | {event.cpu_time_total / 1e3 / args.repeats:.2f} | "
                  f"{event.count // args.repeats} |")


if __name__ == "__main__":
    main()
