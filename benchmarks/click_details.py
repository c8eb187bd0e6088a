"""Figures behind three design choices of the click path (docs/benchmarks.md).

    python benchmarks/click_details.py

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
"""

from __future__ import annotations

import statistics
import time
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

import napari_sam.engine.predictor as P
from napari_sam.models.build import MODEL_CONFIGS, build_sam


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


def _upscale_bf16(upscaling, keys, hyper, grid, work=None, conv1_factors=None):
    """upscale_masks with the second convolution in bfloat16 (float32 elsewhere)."""
    conv1, norm, conv2 = upscaling[0], upscaling[1], upscaling[3]
    w1, bias1 = P._up_conv_matrix(conv1)
    w2, bias2 = (t.bfloat16() for t in P._up_conv_matrix(conv2))
    c4, c8 = conv1.weight.shape[1], conv2.weight.shape[1]
    ys = []
    for s in range(0, keys.shape[1], P._UPSCALE_CHUNK):
        e = s + P._UPSCALE_CHUNK
        if conv1_factors is None:
            y = torch.addmm(bias1, keys[0, s:e], w1)
        else:
            xm, a, fb, scale = conv1_factors
            y = torch.addmm(xm[s:e], a[0, :, s:e].t(), fb[0]).mul_(scale[0, s:e, None])
        y = F.gelu(F.layer_norm(y.view(-1, c4), (c4,), norm.weight, norm.bias, norm.eps))
        y = F.gelu(torch.addmm(bias2, y.bfloat16(), w2).float()).view(-1, c8)
        ys.append(hyper[0] @ y.t())
    eh, ew = grid
    m = hyper.shape[1]
    masks = torch.cat(ys, 1).view(1, m, eh, ew, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
    return masks.reshape(1, m, 4 * eh, 4 * ew).contiguous()


def decoder_variants() -> None:
    torch.manual_seed(0)
    model = build_sam(MODEL_CONFIGS["vit_b"]).eval()
    pred = P.Predictor(model)
    shape = (1200, 1600)
    pred.set_embedding(torch.randn(1, 256, 64, 64), shape, pred.transform.input_size(shape))
    point, label = np.array([[480.0, 880.0]]), np.array([1])

    def click():
        return pred.predict(points=point, labels=label)

    ref = click()
    span = float(ref.logits.max() - ref.logits.min())
    with mock.patch.object(P._FastDecoder, "factor_pays", lambda self, updates: False):
        direct = click()
    print(f"factored vs direct decoding: max |logit diff| / range "
          f"{np.abs(ref.logits - direct.logits).max() / span:.1e}")

    with mock.patch.object(P, "upscale_masks", _upscale_bf16):
        half = click()
    ious = [np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)
            for a, b in zip(ref.masks, half.masks, strict=True)]
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for i in range(60):
        order = ["float32", "bfloat16"] if i % 2 else ["bfloat16", "float32"]
        for name in order:
            with mock.patch.object(P, "upscale_masks",
                                   _upscale_bf16 if name == "bfloat16" else P.upscale_masks):
                t0 = time.perf_counter()
                click()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"second convolution in bfloat16: max |logit diff| / range "
          f"{np.abs(ref.logits - half.logits).max() / span:.1e}, mask IoU "
          f"{', '.join(f'{v:.4f}' for v in ious)}; click median {med['bfloat16']:.1f} ms vs "
          f"{med['float32']:.1f} ms in float32")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    threshold_bands()
    decoder_variants()
