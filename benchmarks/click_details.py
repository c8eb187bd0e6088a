"""Figures behind three design choices of the click path (docs/benchmarks.md).

    python benchmarks/click_details.py [--model vit_b] [--size 1200 1600] [--rounds 60]

1. Thresholding the full-size masks: numpy's ``np.greater`` vs ``torch.gt``, both
   writing bands of 32 rows into a (3, 1216, 1600) bool array, as the
   postprocessing does.
2. Factored decoding (the image tokens after the first block kept as a per-image
   part plus a low-rank per-click part: second block, final attention, first
   convolution of the mask head) vs the direct decoder on the image tokens: the
   largest logit difference relative to the logit range (ViT-B decoder,
   random weights, random embedding, one point).
3. bfloat16 for the second convolution (not used): logit difference, mask IoU
   and click time against float32.

The variants are decoder backends chosen at construction
(``Predictor(model, decoder=FactoredBackend(model, low_rank=False))``,
``FactoredBackend(model, conv2_dtype=torch.bfloat16)``), not patches.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from napari_sam.engine.predictor import Predictor
from napari_sam.models.build import MODEL_CONFIGS, build_sam
from napari_sam.models.fast_decoder import FactoredBackend


def _best_ms(fn, number: int = 20, repeat: int = 7) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t0) / number)
    return min(runs) * 1e3


def threshold_bands() -> None:
    x = torch.randn(3, 1216, 1600)
    out = torch.empty(3, 1216, 1600, dtype=torch.bool)
    xn, on = x.numpy(), out.numpy()

    def with_torch():
        for j in range(0, 1216, 32):
            torch.gt(x[:, j : j + 32], 0.0, out=out[:, j : j + 32])

    def with_numpy():
        for j in range(0, 1216, 32):
            np.greater(xn[:, j : j + 32], 0.0, out=on[:, j : j + 32])

    print(f"threshold, bands of 32 rows: torch.gt {_best_ms(with_torch):.2f} ms, "
          f"np.greater {_best_ms(with_numpy):.2f} ms")


def decoder_variants(model_name: str = "vit_b", shape: tuple[int, int] = (1200, 1600),
                     rounds: int = 60) -> None:
    torch.manual_seed(0)
    model = build_sam(MODEL_CONFIGS[model_name]).eval()
    variants = {
        "float32": "auto",
        "direct": FactoredBackend(model, low_rank=False),
        "bfloat16": FactoredBackend(model, conv2_dtype=torch.bfloat16),
    }
    features = None
    preds = {}
    for name, decoder in variants.items():
        pred = Predictor(model, decoder=decoder)
        if features is None:
            pe = model.prompt_encoder
            features = torch.randn(1, pe.embed_dim, *pe.image_embedding_size)
        pred.set_embedding(features, shape, pred.transform.input_size(shape))
        preds[name] = pred
    point = np.array([[shape[0] * 0.4, shape[1] * 0.55]])
    label = np.array([1])

    def click(name):
        return preds[name].predict(points=point, labels=label)

    ref = click("float32")
    span = float(ref.logits.max() - ref.logits.min())
    direct = click("direct")
    print(f"factored vs direct decoding: max |logit diff| / range "
          f"{np.abs(ref.logits - direct.logits).max() / span:.1e}")

    half = click("bfloat16")
    ious = [np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)
            for a, b in zip(ref.masks, half.masks, strict=True)]
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for i in range(rounds):
        order = ["float32", "bfloat16"] if i % 2 else ["bfloat16", "float32"]
        for name in order:
            t0 = time.perf_counter()
            click(name)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"second convolution in bfloat16: max |logit diff| / range "
          f"{np.abs(ref.logits - half.logits).max() / span:.1e}, mask IoU "
          f"{', '.join(f'{v:.4f}' for v in ious)}; click median {med['bfloat16']:.1f} ms vs "
          f"{med['float32']:.1f} ms in float32")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_b", choices=sorted(MODEL_CONFIGS),
                        help="architecture (random weights)")
    parser.add_argument("--size", type=int, nargs=2, default=(1200, 1600), metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=60, help="timed click pairs")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    threshold_bands()
    decoder_variants(args.model, tuple(args.size), args.rounds)


if __name__ == "__main__":
    main()
