"""EfficientSAM, MobileSAM and SAM ViT-B: embedding time, click time and peak memory,
napari-sam against each model's reference implementation in one run.

For every model of ``--models`` the parent builds our model from
``napari_sam.models.build.MODEL_CONFIGS`` with seeded random weights (no
download) and saves its state dict. Each side, ours and the reference, then
runs in a fresh subprocess (so ``ru_maxrss`` is that side's peak memory): it
loads the weights, embeds the same synthetic image ``--repeats`` times (after one
untimed warm-up; our embedding cache is cleared before each run) and times
``--click-repeats`` one-point clicks (multimask, full-size boolean masks, after 3
untimed ones). The reference runs first, then ours; the parent checks that the
masks agree (IoU of the three masks).

References: EfficientSAM's modeling code in ``../shared/references/efficient_sam``
(Apache-2.0, as the tests import it), ``mobile_sam`` for ``vit_t`` and
``segment_anything`` for ``vit_b``; the torchvision / timm they import are
replaced by ``tests/stubs`` when not importable.

    python benchmarks/bench_efficient_sam.py [--models efficientsam_ti efficientsam_s vit_t vit_b]
        [--repeats 3] [--click-repeats 20] [--threads 2] [--image-size 1024] [--json OUT.json]

``--image-size S`` sets the model's input side (and the square test image) to S,
as ``bench_encoder.py --size`` does; the models' native size is 1024. Smaller
sizes are for smoke tests only (the random position tables are resized).
``vit_t`` always runs at 1024: mobile_sam's TinyViT hard-codes its 64 x 64 grid.
``--threads N`` gives both sides N torch threads (and ``NAPARI_SAM_THREADS=N`` to ours, so
napari-sam's automatic thread policy does not lower it on a busy machine); 0 leaves
torch's default and napari-sam's policy, as a user has them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("efficientsam_ti", "efficientsam_s", "vit_t", "vit_b")
REFERENCE_NAMES = {"efficientsam": "EfficientSAM (yformer)", "vit_t": "mobile_sam",
                   "vit": "segment_anything"}


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB


def _input_size(model: str, size: int) -> int:
    """The input side ``model`` runs at: ``size``, but 1024 for vit_t (mobile_sam's
    TinyViT reshapes to a fixed 64 x 64 grid)."""
    return 1024 if model == "vit_t" else size


def _config(model: str, size: int):
    """``MODEL_CONFIGS[model]`` with its input side set to ``_input_size(model, size)``."""
    from napari_sam.models.build import MODEL_CONFIGS, EfficientSamConfig

    size = _input_size(model, size)
    cfg = MODEL_CONFIGS[model]
    if isinstance(cfg, EfficientSamConfig):
        return dataclasses.replace(cfg, img_size=size)
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, img_size=size))


def _reference_paths() -> None:
    """Put tests/ (reference_utils, test_efficient_sam), and tests/stubs when torchvision or
    timm are missing, on ``sys.path``."""
    missing = False
    for name in ("torchvision", "timm"):
        try:
            __import__(name)
        except Exception:
            missing = True
    if missing:
        sys.path.insert(0, str(ROOT / "tests" / "stubs"))
    sys.path.insert(1, str(ROOT / "tests"))
    sys.path.insert(2, str(ROOT / "tests" / "models"))


def _image(size: int, seed: int = 0):
    """Smooth blobs plus noise, (size, size, 3) uint8."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((size, size), np.float32)
    for cy, cx, r in zip(rng.uniform(0, size, 30), rng.uniform(0, size, 30),
                         rng.uniform(size / 100, size / 12, 30), strict=True):
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img = img / img.max() * 200 + rng.uniform(0, 40, (size, size))
    return np.repeat(img.astype(np.uint8)[..., None], 3, axis=2)


def _reference_side(model: str, cfg, state_dict):
    """(embed(), click() -> (3, H, W) bool) for the reference implementation of ``model``."""
    import numpy as np
    import torch

    from napari_sam.models.build import EfficientSamConfig

    _reference_paths()
    if isinstance(cfg, EfficientSamConfig):
        from test_efficient_sam import make_reference  # the tests' reference builder

        ref = make_reference(cfg)
        ref.load_state_dict(state_dict, strict=True, assign=True)
        state: dict = {}

        def embed(image):
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
            state["hw"] = image.shape[:2]
            state["emb"] = ref.get_image_embeddings(x)

        def click(point_rc):
            h, w = state["hw"]
            pts = torch.tensor([[point_rc[1], point_rc[0]]], dtype=torch.float32)[None, None]
            lbl = torch.ones(1, 1, 1)
            logits, _ = ref.predict_masks(state["emb"], pts, lbl, True, h, w, h, w)
            return (logits[0, 0] > 0).numpy()

        return embed, click

    from reference_utils import make_reference_sam

    ref = make_reference_sam(cfg)
    ref.load_state_dict(state_dict, strict=True, assign=True)
    if model == "vit_t":
        from mobile_sam import SamPredictor
    else:
        from segment_anything import SamPredictor
    predictor = SamPredictor(ref)

    def click_sam(point_rc):
        masks, _, _ = predictor.predict(point_coords=np.array([[point_rc[1], point_rc[0]]]),
                                        point_labels=np.array([1]), multimask_output=True)
        return masks

    return predictor.set_image, click_sam


def _our_side(cfg, state_dict):
    import numpy as np

    from napari_sam.engine.predictor import Predictor
    from napari_sam.models.build import build_sam

    model = build_sam(cfg).eval()
    model.load_state_dict(state_dict, strict=True, assign=True)
    predictor = Predictor(model)

    def embed(image):
        predictor.cache.clear()  # time the embedding, not a cache hit
        predictor.set_image(image)

    def click(point_rc):
        return predictor.predict(points=np.array([point_rc], dtype=float), labels=np.array([1]),
                                 multimask=True).masks

    return embed, click


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rss_start = _peak_rss_mb()
    cfg = _config(args.models[0], args.image_size)
    # mapped and assigned, not copied: the process holds one copy of the weights, as after
    # loading a checkpoint, so the peak RSS is not inflated by a second one
    state_dict = torch.load(args.weights, weights_only=True, mmap=True)
    if args.worker == "ours":
        embed, click = _our_side(cfg, state_dict)
    else:
        embed, click = _reference_side(args.models[0], cfg, state_dict)
    del state_dict
    size = _input_size(args.models[0], args.image_size)
    image = _image(size)
    point_rc = (size * 0.4, size * 0.55)
    rss_loaded = _peak_rss_mb()
    embed_times, click_times = [], []
    with torch.inference_mode():
        for i in range(1 + args.repeats):
            t0 = time.perf_counter()
            embed(image)
            if i:
                embed_times.append(time.perf_counter() - t0)
        for i in range(3 + args.click_repeats):
            t0 = time.perf_counter()
            masks = click(point_rc)
            if i >= 3:
                click_times.append(time.perf_counter() - t0)
    np.save(args.output, np.asarray(masks, dtype=bool))
    print(json.dumps({
        "embed_s": embed_times, "click_s": click_times,
        "embed_median_s": statistics.median(embed_times),
        "click_median_ms": statistics.median(click_times) * 1e3,
        "rss_start_mb": rss_start, "rss_loaded_mb": rss_loaded, "peak_rss_mb": _peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }))


def _run_side(side: str, model: str, args: argparse.Namespace, tmp: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--models", model,
           "--image-size", str(args.image_size), "--repeats", str(args.repeats),
           "--click-repeats", str(args.click_repeats), "--threads", str(args.threads),
           "--weights", str(tmp / f"{model}.pth"), "--output", str(tmp / f"{model}_{side}.npy")]
    print(f"{model}: {side} ...", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)}
    if args.threads:  # the same fixed count on both sides (no automatic policy on ours)
        env["NAPARI_SAM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{model} {side} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    _reference_paths()
    from reference_utils import build_random_sam

    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in args.models:
            cfg = _config(model, args.image_size)
            ours = build_random_sam(cfg, seed=0)  # build_sam + seeded randomize_, any family
            n_params = sum(p.numel() for p in ours.parameters())
            torch.save(ours.state_dict(), tmp / f"{model}.pth")
            del ours
            ref = _run_side("ref", model, args, tmp)
            our = _run_side("ours", model, args, tmp)
            a = np.load(tmp / f"{model}_ours.npy")
            b = np.load(tmp / f"{model}_ref.npy")
            inter = np.logical_and(a, b).sum(axis=(1, 2))
            union = np.logical_or(a, b).sum(axis=(1, 2))
            iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
            family = getattr(cfg, "family", None) or (
                "vit_t" if model == "vit_t" else "vit")
            rows.append({"model": model, "reference": REFERENCE_NAMES[family],
                         "input": _input_size(model, args.image_size),
                         "parameters_m": n_params / 1e6, "ours": our, "ref": ref,
                         "mask_iou": [float(v) for v in iou]})

    threads = rows[0]["ours"]["threads"] if rows else 0
    header = (f"random weights, square image of the model's input side, "
              f"{threads} threads (NAPARI_SAM_THREADS={args.threads or 'auto'}), "
              f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"load average {os.getloadavg()[0]:.1f}; embedding median of {args.repeats}, "
              f"click median of {args.click_repeats}")
    print(f"\n{header}\n")
    print("| model | input | params (M) | embedding ours / ref (s) | ref / ours | "
          "click ours / ref (ms) | ref / ours | peak RSS ours / ref (MB) | mask IoU (min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, f = r["ours"], r["ref"]
        print(f"| {r['model']} | {r['input']} | {r['parameters_m']:.1f} | "
              f"{o['embed_median_s']:.3f} / {f['embed_median_s']:.3f} | "
              f"{f['embed_median_s'] / o['embed_median_s']:.2f}x | "
              f"{o['click_median_ms']:.1f} / {f['click_median_ms']:.1f} | "
              f"{f['click_median_ms'] / o['click_median_ms']:.2f}x | "
              f"{o['peak_rss_mb']:.0f} / {f['peak_rss_mb']:.0f} | {min(r['mask_iou']):.4f} |")
    print("\nreferences: " + ", ".join(f"{r['model']}: {r['reference']}" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"setup": header, "image_size": args.image_size, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--repeats", type=int, default=3, help="timed embeddings per side")
    p.add_argument("--click-repeats", type=int, default=20, help="timed clicks per side")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--image-size", type=int, default=1024, help="model input side (native 1024)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", choices=["ours", "ref"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.click_repeats < 1:
        p.error("--repeats and --click-repeats must be >= 1")
    return args


if __name__ == "__main__":
    ns = _parse()
    worker(ns) if ns.worker else main(ns)
