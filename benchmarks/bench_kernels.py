"""Matrix-product rates: PyTorch's default float32 path (MKL) vs ``kernels.linear`` (oneDNN).

    python benchmarks/bench_kernels.py [--threads N] [--repeats 20]

For a square product and the shapes that dominate our image encoder and click
decoder, times ``F.linear(x, w, b)`` (plus ``F.gelu`` where the row says so)
against ``napari_sam.models.kernels.linear`` (GELU fused) in one process,
alternating, and prints the median time, the rate in G multiply-adds per
second and the largest difference between the two results relative to their
range. Also prints whether oneDNN is used at all (``NAPARI_SAM_ONEDNN=0``
switches it off) and, with ``MKL_VERBOSE=1`` set, MKL prints the code path it
takes for each call.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from napari_sam.models import kernels

# (label, rows M, inner K, outputs N, GELU)
SHAPES = [
    ("square 2048", 2048, 2048, 2048, False),
    ("ViT-B qkv (64x64 tokens)", 4096, 768, 2304, False),
    ("ViT-B MLP in + GELU", 4096, 768, 3072, True),
    ("ViT-B MLP out", 4096, 3072, 768, False),
    ("mask head conv1, factored (1024 cells)", 1024, 116, 256, False),
    ("mask head conv2 + GELU (4096 rows)", 4096, 64, 128, True),
    ("decoder token MLP in (7 tokens)", 7, 256, 2048, False),
]


def _time(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timings per side")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; oneDNN used: "
          f"{kernels.onednn_available()}")
    print("\n| product (M x K x N) | default ms | default G/s | kernels ms | kernels G/s | "
          "speed-up | max diff / range |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for label, m, k, n, gelu in SHAPES:
        x, w, b = (torch.randn(s, generator=gen) for s in ((m, k), (n, k), (n,)))
        repeats = max(1, args.repeats * 50_000_000 // (m * k * n + 1))

        def default(x=x, w=w, b=b, gelu=gelu):
            y = F.linear(x, w, b)
            return F.gelu(y) if gelu else y

        def ours(x=x, w=w, b=b, gelu=gelu):
            return kernels.linear(x, w, b, "gelu" if gelu else None)

        with torch.inference_mode():
            times: dict[str, list[float]] = {"default": [], "ours": []}
            for _ in range(args.rounds):
                times["default"].append(_time(default, repeats))
                times["ours"].append(_time(ours, repeats))
            ref, got = default(), ours()
        diff = float((ref - got).abs().max() / (ref.max() - ref.min()))
        t_ref, t_ours = (statistics.median(v) for v in times.values())
        macs = m * k * n / 1e9
        print(f"| {label} ({m} x {k} x {n}{', GELU' if gelu else ''}) | {t_ref * 1e3:.3f} | "
              f"{macs / t_ref:.0f} | {t_ours * 1e3:.3f} | {macs / t_ours:.0f} | "
              f"{t_ref / t_ours:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
