"""Everything-mode speed: napari-sam's AutomaticMaskGenerator vs the official one.

Both generators get the same random SAM weights (``build_sam(model)`` seeded,
copied into ``segment_anything``'s Sam) and the same image: a 512 x 512 crop of
a DSB 2018 nuclei image (the set has no 512 x 512 image; the crop is rows
4..516, columns 92..604 of a 520 x 696 one). Two parameter sets run:

* ``default``: the official defaults (points_per_side=32, pred_iou_thresh=0.88,
  stability_score_thresh=0.95, ...). Random weights pass (almost) no mask here,
  so this measures the prompt decoding, which dominates the reference's time.
* ``lowered``: thresholds lowered so that a realistic number of masks survive
  and the whole post-processing runs (upsampling, stability, boxes, NMS,
  output). Random-weight logits are ~20x weaker than a trained model's, so the
  stability offset is scaled down; their masks cover the whole image, so box
  NMS is switched off (otherwise it keeps one mask).

For each side: embedding time (the reference's ``set_image``; our encoder run),
mask-generation time without the embedding (wall clock, and process CPU time,
which is less sensitive to other jobs on a shared machine), total, number of
masks; and the
fraction of reference masks matched by one of ours from the same prompt point
at mask IoU >= 0.95.

    python benchmarks/bench_everything.py [--model vit_b] [--points-per-side 32]
        [--sets default,lowered,recommended] [--encoder-depth N]   # a shallower encoder
        [--weights default|PATH]   # trained weights (the embedded model): real masks survive
        [--ours-only]   # skip the reference; also prints the process's peak RSS

Needs the reference package ``segment-anything`` (a test dependency); the
torchvision it imports is replaced by the stand-ins in ``tests/stubs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
IMAGE_ID = "8efed2e62c919e6d70a2ab548b1a33014877fe8a23f177ef25a9dee25ffe8842"
DATA = Path("/work/shared/data/dsb2018/images")

PARAMS = {
    "default": {},
    "lowered": dict(
        pred_iou_thresh=0.045,
        stability_score_thresh=0.83,
        stability_score_offset=0.02,
        box_nms_thresh=1.0,
    ),
}


def params_for(name: str) -> dict:
    """A parameter set by name; ``recommended``: the embedded default model's thresholds."""
    if name == "recommended":
        from napari_sam.models.zoo import recommended_everything_settings

        return recommended_everything_settings("default")
    return PARAMS[name]


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    return np.ascontiguousarray(img[4:516, 92:604])


def shallower_encoder(encoder, depth: int):
    """``encoder``'s config with at most ``depth`` blocks: a ViT keeps its first ``depth``
    blocks (the last one global), a TinyViT (vit_t) at most ``depth`` blocks per stage."""
    from napari_sam.models.build import TinyViTEncoderConfig

    if depth < 1:
        raise SystemExit(f"--encoder-depth must be at least 1, got {depth}.")
    if isinstance(encoder, TinyViTEncoderConfig):
        return dataclasses.replace(encoder, depths=tuple(min(d, depth) for d in encoder.depths))
    return dataclasses.replace(encoder, depth=depth, global_attn_indexes=(depth - 1,))


def build_models(model: str, encoder_depth: int | None, weights: str | None = None,
                 reference: bool = True):
    """Our model and the reference with the same weights (None with ``reference=False``)."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "stubs")]
    from napari_sam.models.build import MODEL_CONFIGS, build_sam
    from reference_utils import make_reference_sam

    if weights is not None:  # trained weights (e.g. the embedded default model) on both sides
        from napari_sam.models.zoo import load_model

        ours = load_model(weights, device="cpu")  # "default" or a checkpoint path
        if not reference:
            return ours, None
        ref = make_reference_sam(ours.config)
        ref.load_state_dict(ours.state_dict())
        return ours, ref.eval()
    cfg = MODEL_CONFIGS[model]
    if encoder_depth is not None:
        cfg = dataclasses.replace(cfg, encoder=shallower_encoder(cfg.encoder, encoder_depth))
    torch.manual_seed(0)
    ours = build_sam(cfg).eval()
    if not reference:
        return ours, None
    ref = make_reference_sam(cfg)
    ref.load_state_dict(ours.state_dict())
    return ours, ref.eval()


def run_ours(model, image, params):
    from napari_sam.engine.everything import AutomaticMaskGenerator

    gen = AutomaticMaskGenerator(model, **params)
    t0 = time.perf_counter()
    gen.predictor.embed(image)  # fills the embedding cache
    t1, c1 = time.perf_counter(), time.process_time()
    records = gen.generate(image)  # takes the embedding from the cache
    t2, c2 = time.perf_counter(), time.process_time()
    return records, t1 - t0, t2 - t1, c2 - c1


def run_reference(model, image, params):
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    embed = {"t": 0.0, "c": 0.0}
    orig = SamPredictor.set_image

    def timed(self, *args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        orig(self, *args, **kwargs)
        embed["t"] += time.perf_counter() - t
        embed["c"] += time.process_time() - c

    SamPredictor.set_image = timed
    try:
        gen = SamAutomaticMaskGenerator(model, **params)
        t0, c0 = time.perf_counter(), time.process_time()
        records = gen.generate(image)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        SamPredictor.set_image = orig
    return records, embed["t"], total - embed["t"], cpu - embed["c"]


def match_fraction(ref_records, our_records, thresh: float = 0.95) -> float:
    """Fraction of reference masks matched by a mask of ours from the same prompt point
    and crop at mask IoU >= thresh (random-weight masks look alike, so matching any
    mask would say little)."""
    if not ref_records:
        return float("nan") if our_records else 1.0
    by_prompt: dict = {}
    for r in our_records:
        key = (tuple(np.round(r["point_coords"][0], 6)), tuple(r["crop_box"]))
        by_prompt.setdefault(key, []).append(r["segmentation"])
    matched = 0
    for r in ref_records:
        key = (tuple(np.round(r["point_coords"][0], 6)), tuple(r["crop_box"]))
        rm = r["segmentation"]
        for om in by_prompt.get(key, []):
            union = np.logical_or(rm, om).sum()
            if union and np.logical_and(rm, om).sum() / union >= thresh:
                matched += 1
                break
    return matched / len(ref_records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--sets", default="default,lowered")
    ap.add_argument("--encoder-depth", type=int, default=None,
                    help="a shallower encoder: N blocks (vit_b/l/h), at most N per stage (vit_t)")
    ap.add_argument(
        "--weights",
        default=None,
        help="trained weights for both sides: 'default' (the embedded model) or a checkpoint "
        "with its config (our safetensors); replaces --model's random weights",
    )
    ap.add_argument("--image", default=str(DATA / f"{IMAGE_ID}.png"))
    ap.add_argument("--ours-only", action="store_true",
                    help="run only napari-sam's generator and report the process's peak RSS")
    args = ap.parse_args()

    image = load_image(Path(args.image))
    ours_model, ref_model = build_models(args.model, args.encoder_depth, args.weights,
                                         reference=not args.ours_only)
    rows = []
    for name in args.sets.split(","):
        params = dict(params_for(name), points_per_side=args.points_per_side)
        with torch.inference_mode():
            ours, o_emb, o_gen, o_cpu = run_ours(ours_model, image, params)
        print(f"[{name}] ours: embed {o_emb:.1f}s, masks {o_gen:.1f}s (cpu {o_cpu:.1f}s), "
              f"n={len(ours)}", flush=True)
        if args.ours_only:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"[{name}] ours: peak RSS of the process so far {peak_mb:.0f} MB", flush=True)
            continue
        ref, r_emb, r_gen, r_cpu = run_reference(ref_model, image, params)
        print(f"[{name}] reference: embed {r_emb:.1f}s, masks {r_gen:.1f}s (cpu {r_cpu:.1f}s), "
              f"n={len(ref)}", flush=True)
        rows.append((name, o_emb, o_gen, o_cpu, len(ours), r_emb, r_gen, r_cpu, len(ref),
                     match_fraction(ref, ours)))
        del ours, ref

    if args.ours_only:
        return
    depth = "" if args.encoder_depth is None else f", encoder depth {args.encoder_depth}"
    print()
    what = f"{args.model}{depth} (random weights)" if args.weights is None else (
        f"trained weights {args.weights}")
    print(f"Everything-mode, {what}, 512 x 512 image, "
          f"points_per_side={args.points_per_side}; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print()
    print("| params | side | embedding (s) | masks (s) | masks, CPU (s) | total (s) | masks "
          "| speed-up masks / masks CPU / total | ref. masks matched (same prompt, IoU >= 0.95) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, o_emb, o_gen, o_cpu, n_o, r_emb, r_gen, r_cpu, n_r, match in rows:
        print(f"| {name} | reference | {r_emb:.1f} | {r_gen:.1f} | {r_cpu:.1f} "
              f"| {r_emb + r_gen:.1f} | {n_r} | | |")
        print(f"| {name} | napari-sam | {o_emb:.1f} | {o_gen:.1f} | {o_cpu:.1f} "
              f"| {o_emb + o_gen:.1f} | {n_o} "
              f"| {r_gen / o_gen:.1f}x / {r_cpu / o_cpu:.1f}x / "
              f"{(r_emb + r_gen) / (o_emb + o_gen):.1f}x | {match:.1%} |")


if __name__ == "__main__":
    main()
