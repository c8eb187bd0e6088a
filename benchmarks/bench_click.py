"""Click-to-mask latency: napari-sam's Predictor vs the official SamPredictor.

Both sides get the same random ViT weights (ours built with ``build_sam``, the
reference built with the same hyper-parameters and ``load_state_dict``) and
the same image. Each side embeds the image once (``set_image``, slow), then
one foreground point is predicted with ``multimask`` output and full-resolution
boolean masks: ``--warmup`` untimed calls each, then ``--repeats`` timed calls
each, the two sides alternating (and swapping order every round) so machine
load affects both alike. Reports median / min latency and the ratio, and
checks that the masks agree.

    python benchmarks/bench_click.py [--model vit_b] [--shape 1200 1600] [--repeats 30]
                                     [--threads N] [--fake-embedding] [--weights default|PATH]
                                     [--embed-repeats N] [--busy]

``--weights default`` benchmarks the embedded default model (trained weights, on
both sides) instead of ``--model``'s random weights; with ``--shape 512 512``
this is the check of the default model's targets (embedding <= 0.3 s, click
<= 10 ms). ``--embed-repeats N`` times ``set_image`` N times per side (our
embedding cache is bypassed, so every run computes the embedding) and reports
the median.

``--busy`` keeps one core busy during the timed calls with another process (a Python
loop at normal priority, as a browser or a second job would; ``bench_busy.py`` has the
same load), to show the click on a busy machine.

OpenMP's wait policy matters here. By default (``OMP_WAIT_POLICY`` unset, as
in a user's napari session) idle OpenMP threads spin briefly before sleeping,
which makes multi-threaded small operations cheap on a quiet machine; the
benchmark leaves it so. On a busy machine spinning threads compete with other
jobs, and ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_click.py`` gives
steadier figures (our predictor then decodes few prompts on one thread, see
``napari_sam.models.kernels.threads_for_small_batches``). The policy is printed
with the results.

``--fake-embedding`` skips the encoders and gives both sides the same random
(1, 256, 64, 64) features (the click latency does not depend on them).

Needs the reference package ``segment-anything`` (a test dependency); the
torchvision it imports is replaced by the stand-ins in ``tests/stubs`` when it is
not importable.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def _reference_modules():
    try:
        import torchvision  # noqa: F401
    except Exception:
        sys.path.insert(0, str(ROOT / "tests" / "stubs"))
    sys.path.insert(0, str(ROOT / "tests"))
    from segment_anything import SamPredictor

    from reference_utils import make_reference_sam

    return make_reference_sam, SamPredictor


def _image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth blobs plus noise, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w), np.float32)
    for cy, cx, r in zip(rng.uniform(0, h, 30), rng.uniform(0, w, 30), rng.uniform(10, 80, 30),
                         strict=True):
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img = img / img.max() * 200 + rng.uniform(0, 40, (h, w))
    return np.repeat(img.astype(np.uint8)[..., None], 3, axis=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--shape", type=int, nargs=2, default=(1200, 1600), metavar=("H", "W"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--fake-embedding", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--weights", default=None,
                        help="'default' (the embedded model) or a checkpoint with its config")
    parser.add_argument("--embed-repeats", type=int, default=1)
    parser.add_argument("--busy", action="store_true",
                        help="keep one core busy with another process while timing clicks")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from napari_sam.engine.predictor import Predictor
    from napari_sam.models.build import MODEL_CONFIGS, build_sam

    make_reference_sam, SamPredictor = _reference_modules()
    if args.weights is not None:
        from napari_sam.models.zoo import load_model

        ours_model = load_model(args.weights, device="cpu")  # "default" or a checkpoint path
        cfg = ours_model.config
        what = f"weights {args.weights}"
    else:
        cfg = MODEL_CONFIGS[args.model]
        torch.manual_seed(0)
        ours_model = build_sam(cfg).eval()
        what = f"model {args.model} (random weights)"
    ref_model = make_reference_sam(cfg)
    # the AIS head and the mask refiner are ours: the reference holds SAM's tensors
    ref_model.load_state_dict({k: v for k, v in ours_model.state_dict().items()
                               if not k.startswith(("ais_head.", "mask_refiner."))})
    # SAM's work side by side ("ours"); a model with a mask refiner is also timed with it
    ours, ref = Predictor(ours_model, refine=False), SamPredictor(ref_model)
    refined = Predictor(ours_model, cache=ours.cache)
    has_refiner = getattr(ours_model, "mask_refiner", None) is not None

    shape = tuple(args.shape)
    image = _image(shape)
    if args.fake_embedding:
        feats = torch.randn(1, cfg.prompt_embed_dim, *(2 * [cfg.image_embedding_size]))
        input_size = ours.transform.input_size(shape)
        ours.set_embedding(feats, shape, input_size)
        ref.features, ref.original_size, ref.input_size = feats, shape, input_size
        ref.is_image_set = True
        embed_s = {"ours": float("nan"), "reference": float("nan")}
    else:
        runs: dict[str, list[float]] = {"reference": [], "ours": []}
        for _ in range(max(1, args.embed_repeats)):
            for name, pred in (("reference", ref), ("ours", ours)):
                if name == "ours":
                    ours.cache.clear()  # time the embedding, not a cache hit
                t0 = time.perf_counter()
                with torch.inference_mode():
                    pred.set_image(image)
                runs[name].append(time.perf_counter() - t0)
        embed_s = {k: statistics.median(v) for k, v in runs.items()}
        for name, v in embed_s.items():
            print(f"set_image {name}: median {v:.3f} s of {len(runs[name])}", flush=True)

    point_rc = np.array([[shape[0] * 0.4, shape[1] * 0.55]])
    label = np.array([1])

    def click_ours():
        return ours.predict(points=point_rc, labels=label, multimask=True)

    def click_ref():
        return ref.predict(point_coords=point_rc[:, ::-1].copy(), point_labels=label,
                           multimask_output=True)

    def click_refined():
        return refined.predict(points=point_rc, labels=label, multimask=True)

    if has_refiner:
        refined.set_image(image)  # from the shared cache
    for _ in range(args.warmup):
        click_ref()
        click_ours()
        if has_refiner:
            click_refined()
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    order = [("reference", click_ref), ("ours", click_ours)]
    if has_refiner:
        times["ours + refiner"] = []
        order.append(("ours + refiner", click_refined))
    load = None
    if args.busy:
        load = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)  # let the load settle (and the predictor's load sampler see it)
    try:
        for i in range(args.repeats):
            for name, fn in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        if load is not None:
            load.kill()
            load.wait()

    a, b = click_ours(), click_ref()
    inter = np.logical_and(a.masks, b[0]).sum(axis=(1, 2))
    union = np.logical_or(a.masks, b[0]).sum(axis=(1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    best = {k: min(v) * 1e3 for k, v in times.items()}
    print()
    print(f"{what}, image {shape[0]} x {shape[1]}, one point, "
          f"multimask, full-resolution masks; {args.repeats} timed calls each")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.1f}"
          + (", one core kept busy by another process" if args.busy else ""))
    print()
    print("| side | set_image (s) | click median (ms) | click min (ms) |")
    print("|---|---|---|---|")
    for k in times:
        emb = embed_s.get(k, embed_s["ours"])
        print(f"| {k} | {emb:.3f} | {med[k]:.1f} | {best[k]:.1f} |")
    print()
    print(f"speed-up (median): {med['reference'] / med['ours']:.2f}x; "
          f"(min): {best['reference'] / best['ours']:.2f}x")
    if has_refiner:
        print(f"with the refiner, time / reference's (median): "
              f"{med['ours + refiner'] / med['reference']:.2f}x; "
              f"refiner's share: {med['ours + refiner'] - med['ours']:.1f} ms")
    print(f"mask IoU ours vs reference: {', '.join(f'{v:.5f}' for v in iou)}; "
          f"max |score diff| {np.abs(a.scores - b[1]).max():.2e}")


if __name__ == "__main__":
    main()
