"""3D AP50 of automatic volume segmentation against per-plane results (issue 16).

    python scripts/volume_ais_eval.py [--volumes 1135_mini bbbc050_8 bbbc050_16 sample_ovule]
        [--min-planes N [N ...]] [--model MODEL] [--link-iou X] [--data DIR]
        [--json OUT.jsonl]

Each volume of ``--data`` (default /work/shared/data, see its README) is segmented by the
real CLI in a subprocess, as a user would: once with ``napari-sam everything VOLUME.tif
--no-link-planes`` (each plane's objects numbered apart), and once per ``--min-planes``
value N with ``--link-planes --min-planes N`` (the planes' objects linked into 3D objects
by overlap, :func:`napari_sam.engine.stack.link_planes`, at ``--link-iou``, the CLI's
default when not given; linked objects on fewer than N planes dropped; without
``--min-planes`` the CLI's default). Everything-mode runs in the mode and with the
settings the CLI picks for the model (``--model``, default: the embedded default model).

Scores (the DSB definition of :mod:`napari_sam.evaluation.metrics`: objects matched
one-to-one at IoU >= t, AP = TP / (TP + FP + FN)):

- **3D AP50 / AP75, linked**: the linked result's 3D objects against the true 3D objects,
  IoU over all their voxels (:func:`~napari_sam.evaluation.metrics.label_matching_metrics`);
- **3D AP50, unlinked**: the same for the per-plane result (every plane's object a 3D
  object of its own): what linking buys;
- how many linked objects lie in one plane only (short spurious objects cost 3D AP);
- **2D AP50 per plane** of the per-plane result against the truth's planes: pooled
  (TP, FP and FN summed over planes) and the mean over the planes that hold a true or a
  predicted object (an empty plane with no prediction would score 1 and is left out).

The linked run's masks are checked against the per-plane run's: each per-plane object is
either kept whole under one linked id or dropped whole (linking renames, ``--min-planes``
drops). One JSON line per volume and N on stdout (and appended to ``--json``), then a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VOLUMES = {
    "1135_mini": ("volumes/1135_mini_raw.tif", "volumes/1135_mini_labels.tif"),
    "bbbc050_8": ("volumes/bbbc050/images/8_cell_stage.tif",
                  "volumes/bbbc050/labels/8_cell_stage.tif"),
    "bbbc050_16": ("volumes/bbbc050/images/16_cell_stage.tif",
                   "volumes/bbbc050/labels/16_cell_stage.tif"),
    "sample_ovule": ("volumes/sample_ovule_raw.tif", "volumes/sample_ovule_labels.tif"),
}


def run_everything(image: Path, out: Path, link: bool, args: argparse.Namespace,
                   min_planes: int | None = None) -> float:
    """Run ``napari-sam everything IMAGE --out OUT`` (linking or not, ``--min-planes``
    when given); its wall seconds."""
    cmd = [sys.executable, "-m", "napari_sam.cli", "everything", str(image), "--out", str(out),
           "--link-planes" if link else "--no-link-planes"]
    if args.model:
        cmd += ["--model", args.model]
    if args.link_iou is not None and link:
        cmd += ["--link-iou", str(args.link_iou)]
    if min_planes is not None and link:
        cmd += ["--min-planes", str(min_planes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        x for x in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if x)}
    print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr}")
    return time.perf_counter() - t0


def renames_or_drops(plain: np.ndarray, linked: np.ndarray) -> bool:
    """Whether ``linked`` is ``plain`` (one plane's labels) with objects renamed one-to-one
    or dropped whole (set to 0): no pixel moved from one object to another."""
    pairs = np.unique(np.stack([plain.ravel(), linked.ravel()]), axis=1)
    kept = pairs[:, pairs[1] > 0]
    return (len(np.unique(pairs[0])) == pairs.shape[1]  # each plain id goes to one id
            and len(np.unique(kept[1])) == kept.shape[1]  # each linked id from one plain id
            and kept[0].min(initial=1) != 0)  # no background became an object


def single_plane_objects(labels: np.ndarray) -> int:
    """How many objects of (Z, Y, X) labels lie in one plane only."""
    planes_of = {}
    for z, plane in enumerate(labels):
        for i in np.unique(plane[plane > 0]):
            planes_of.setdefault(int(i), set()).add(z)
    return sum(len(zs) == 1 for zs in planes_of.values())


def per_plane_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """2D AP50 over the planes of (Z, Y, X) labels: pooled over planes, and the mean over
    the planes holding a true or a predicted object."""
    from napari_sam.evaluation.metrics import matching_metrics

    tp = fp = fn = 0.0
    aps = []
    for t, p in zip(truth, pred, strict=True):
        if not (t.any() or p.any()):
            continue
        m = matching_metrics(t, p.astype(np.int64), thresholds=(0.5,))
        tp, fp, fn = tp + m["tp50"], fp + m["fp50"], fn + m["fn50"]
        aps.append(m["ap50"])
    pooled = tp / (tp + fp + fn) if tp + fp + fn else 1.0
    return {"ap50_2d_pooled": pooled, "ap50_2d_mean": float(np.mean(aps)) if aps else 1.0,
            "planes_scored": len(aps), "tp50_2d": tp, "fp50_2d": fp, "fn50_2d": fn}


def evaluate(name: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """The rows of one volume: one per ``--min-planes`` value (one row at the CLI's
    default when none is given)."""
    import tifffile

    from napari_sam.evaluation.metrics import label_matching_metrics

    raw_rel, labels_rel = VOLUMES[name]
    image = Path(args.data) / raw_rel
    truth = tifffile.imread(Path(args.data) / labels_rel)
    plain_path = tmp / f"{name}_planes.tif"
    plain_s = run_everything(image, plain_path, False, args)
    plain = tifffile.imread(plain_path).astype(np.int64)
    if plain.shape != truth.shape:
        raise SystemExit(f"{name}: labels {plain.shape} do not match the truth's {truth.shape}")
    m3_plain = label_matching_metrics(truth, plain, thresholds=(0.5, 0.75))
    per_plane = per_plane_scores(truth, plain)
    rows = []
    for min_planes in args.min_planes or [None]:
        linked_path = tmp / f"{name}_linked_{min_planes}.tif"
        linked_s = run_everything(image, linked_path, True, args, min_planes)
        linked = tifffile.imread(linked_path).astype(np.int64)
        if linked.shape != truth.shape:
            raise SystemExit(f"{name}: labels {linked.shape} do not match the truth's "
                             f"{truth.shape}")
        same = all(renames_or_drops(p, q) for p, q in zip(plain, linked, strict=True))
        m3 = label_matching_metrics(truth, linked, thresholds=(0.5, 0.75))
        row = {
            "volume": name, "min_planes": min_planes if min_planes is not None else "default",
            "shape": list(truth.shape), "objects_true": int(m3["n_gt"]),
            "objects_linked": int(m3["n_pred"]), "objects_per_plane": int(m3_plain["n_pred"]),
            "linked_in_one_plane": single_plane_objects(linked),
            "ap50_3d_linked": m3["ap50"], "ap75_3d_linked": m3["ap75"], "tp50_3d": m3["tp50"],
            "fp50_3d": m3["fp50"], "fn50_3d": m3["fn50"],
            "ap50_3d_unlinked": m3_plain["ap50"], **per_plane,
            "seconds_planes": plain_s, "seconds_linked": linked_s,
            "linking_only_renames_or_drops": bool(same),
        }
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", nargs="+", choices=list(VOLUMES), default=list(VOLUMES))
    parser.add_argument("--data", default="/work/shared/data")
    parser.add_argument("--model", default=None, help="passed to the CLI's --model")
    parser.add_argument("--link-iou", type=float, default=None,
                        help="passed to the CLI's --link-iou (default: the CLI's)")
    parser.add_argument("--min-planes", type=int, nargs="+", default=None, metavar="N",
                        help="one linked run per value, passed to the CLI's --min-planes "
                             "(default: one run at the CLI's default)")
    parser.add_argument("--json", type=Path, default=None, help="also append the lines here")
    args = parser.parse_args(argv)
    if args.min_planes and min(args.min_planes) < 1:
        parser.error("--min-planes: values must be >= 1")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.volumes:
            for row in evaluate(name, args, Path(tmp)):
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if args.json is not None:
                    with args.json.open("a") as f:
                        f.write(line + "\n")

    print(f"\nmodel {args.model or 'default'}; AP = TP / (TP + FP + FN) at IoU 0.5 / 0.75\n")
    print("| volume | min planes | true objects | 3D objects linked (in one plane) "
          "| 3D AP50 linked | 3D AP75 linked | 3D AP50 unlinked "
          "| 2D AP50 per plane (pooled / mean) | everything s (planes / linked) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['volume']} | {r['min_planes']} | {r['objects_true']} | "
              f"{r['objects_linked']} ({r['linked_in_one_plane']}) | "
              f"{r['ap50_3d_linked']:.3f} | {r['ap75_3d_linked']:.3f} | "
              f"{r['ap50_3d_unlinked']:.3f} | "
              f"{r['ap50_2d_pooled']:.3f} / {r['ap50_2d_mean']:.3f} | "
              f"{r['seconds_planes']:.0f} / {r['seconds_linked']:.0f} |")
    bad = [r["volume"] for r in rows if not r["linking_only_renames_or_drops"]]
    if bad:
        print(f"warning: linking moved pixels between objects in {bad}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
