"""Image-encoder speed: napari-sam's ViT vs the official segment_anything ViT.

Both sides get the same random ViT-B weights and the same 1024 x 1024 input. Each
side runs in its own subprocess (so peak memory, ``ru_maxrss``, is per side),
does ``--warmup`` untimed runs then ``--repeats`` timed runs (sides alternate
for ``--rounds`` rounds) under
``torch.inference_mode()``, and saves its embedding so the parent can check the
outputs agree.

    python benchmarks/bench_encoder.py [--model vit_b] [--size 1024] [--repeats 2] [--rounds 2]

Needs the reference package ``segment-anything`` (a test dependency); the
torchvision it imports is replaced by the stand-ins in ``tests/stubs`` when it is
not importable.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB


def _build(side: str, model: str, size: int):
    import torch

    from napari_sam.models.build import MODEL_CONFIGS

    cfg = MODEL_CONFIGS[model].encoder
    if side == "ours":
        from napari_sam.models.image_encoder import ImageEncoderViT

        return ImageEncoderViT(
            img_size=size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            out_chans=256,
            window_size=cfg.window_size,
            global_attn_indexes=cfg.global_attn_indexes,
        )
    try:
        import torchvision  # noqa: F401
    except Exception:
        sys.path.insert(0, str(ROOT / "tests" / "stubs"))
    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(
        img_size=size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=cfg.window_size,
        global_attn_indexes=tuple(cfg.global_attn_indexes),
    )


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = _build(args.worker, args.model, args.size).eval()
    encoder.load_state_dict(torch.load(args.weights, weights_only=True), strict=True)
    x = torch.load(args.input, weights_only=True)
    rss_loaded = _peak_rss_mb()
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            out = encoder(x)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    torch.save(out.clone(), args.output)
    result = {
        "times": times,
        "median": statistics.median(times),
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": _peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


def main(args: argparse.Namespace) -> None:
    import torch

    from napari_sam.models.build import MODEL_CONFIGS

    if args.model not in MODEL_CONFIGS or MODEL_CONFIGS[args.model].encoder_type != "vit":
        raise SystemExit(f"--model must be one of vit_b, vit_l, vit_h (got {args.model})")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        encoder = _build("ours", args.model, args.size)
        with torch.no_grad():  # the zero-initialised position tables get real values
            for name, p in encoder.named_parameters():
                if "rel_pos" in name or "pos_embed" in name:
                    p.normal_(0, 0.1)
        torch.save(encoder.state_dict(), tmp / "weights.pth")
        torch.save(torch.randn(1, 3, args.size, args.size), tmp / "input.pth")
        del encoder

        # alternate the sides round by round so that drifting machine load hits both alike
        results: dict[str, list[dict]] = {"ref": [], "ours": []}
        for rnd in range(args.rounds):
            for side in ("ref", "ours"):
                cmd = [
                    sys.executable, __file__, "--worker", side, "--model", args.model,
                    "--size", str(args.size), "--repeats", str(args.repeats),
                    "--warmup", str(args.warmup), "--threads", str(args.threads),
                    "--weights", str(tmp / "weights.pth"), "--input", str(tmp / "input.pth"),
                    "--output", str(tmp / f"{side}.pth"),
                ]  # fmt: skip
                print(f"round {rnd + 1}/{args.rounds}: {side} ...", file=sys.stderr, flush=True)
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise SystemExit(f"{side} worker failed:\n{proc.stderr}")
                results[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))

        ref_out = torch.load(tmp / "ref.pth", weights_only=True)
        our_out = torch.load(tmp / "ours.pth", weights_only=True)
        max_diff = float((ref_out - our_out).abs().max())
        out_range = float(ref_out.max() - ref_out.min())

    summary = {}
    for side, runs in results.items():
        times = [t for res in runs for t in res["times"]]
        summary[side] = {
            "times": times,
            "median": statistics.median(times),
            "rss_loaded_mb": max(res["rss_loaded_mb"] for res in runs),
            "peak_rss_mb": max(res["peak_rss_mb"] for res in runs),
            "threads": runs[0]["threads"],
        }
    r, o = summary["ref"], summary["ours"]
    cpu = platform.processor() or platform.machine()
    print(
        f"\nImage encoder {args.model} at {args.size}x{args.size}, batch 1, float32, "
        f"{o['threads']} threads, torch {torch.__version__}, {cpu}; {args.rounds} rounds x "
        f"({args.warmup} warm-up + {args.repeats} timed runs) per side, median\n"
    )
    print("| implementation | median s | timed runs s | RSS after load MB | peak RSS MB |")
    print("| --- | --- | --- | --- | --- |")
    for label, res in (("segment_anything (reference)", r), ("napari-sam", o)):
        runs = ", ".join(f"{t:.2f}" for t in res["times"])
        print(
            f"| {label} | {res['median']:.2f} | {runs} | {res['rss_loaded_mb']:.0f} | "
            f"{res['peak_rss_mb']:.0f} |"
        )
    print(f"\nspeed-up (reference / ours): {r['median'] / o['median']:.2f}x")
    print(f"peak RSS ours / reference: {o['peak_rss_mb'] / r['peak_rss_mb']:.2f}")
    print(f"max |ours - reference| = {max_diff:.2e} (output range {out_range:.2f})")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating ref/ours rounds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--worker", choices=["ours", "ref"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    ns = _parse()
    worker(ns) if ns.worker else main(ns)
