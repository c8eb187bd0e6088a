"""Score 3D propagation and tracking (issue 16) against ground truth, next to an oracle.

    python scripts/propagation_eval.py volumes [--sets 1135_mini bbbc050 sample_ovule]
        [--objects N] [--model MODEL] [--json OUT.jsonl]
    python scripts/propagation_eval.py tracking [--tracks N] [--frames N] [--model MODEL]

Data: ``--data`` (default /work/shared/data, see its README). The model is anything
``load_model`` takes (default: the embedded default model).

**volumes**: for each ground-truth 3D object (the first ``--objects`` by id, or all), the
object's largest plane is clicked at its innermost pixel and the object is propagated up
and down with :func:`napari_sam.engine.propagate.propagate_volume` (default settings, or
those given). Reported per object: the 3D IoU with the truth, the planes reached against
the truth's extent, the stop reasons; and next to it the **oracle**: the same model
clicked at the innermost pixel of every plane the object occupies (multimask, best
score), stacked. Both read the same embeddings (the predictor's cache). Last line: the
mean 3D IoU of both and their ratio per set.

**tracking** (``timelapse/bacteria``, Cell Tracking Challenge format): each track (the
``--tracks`` longest, or all) is clicked at its innermost pixel in its first frame and
followed forward with :func:`~napari_sam.engine.propagate.track_object`. Reported per
track: frames of its life followed correctly (IoU >= 0.5 with the truth), the mean IoU
over its life (a frame after the track was lost counts 0), the stop reason, and what the
track did after the cell's last frame (at a division: the daughter it went on with, if
any); next to it the oracle's mean IoU (every frame of the track's life clicked at the
cell's innermost pixel). Frames are cropped to the colony's bounding box over the frames used, plus
``--margin`` pixels (the colony is small in a large field).

One JSON line per object / track on stdout (and in ``--json``), a summary last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

VOLUME_SETS = {
    "1135_mini": [("volumes/1135_mini_raw.tif", "volumes/1135_mini_labels.tif")],
    "sample_ovule": [("volumes/sample_ovule_raw.tif", "volumes/sample_ovule_labels.tif")],
    "bbbc050": [(f"volumes/bbbc050/images/{n}_cell_stage.tif",
                 f"volumes/bbbc050/labels/{n}_cell_stage.tif") for n in (8, 16)],
}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def oracle(predictor, provider, truth: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: every plane where ``truth`` has pixels clicked at its innermost
    pixel (multimask, the best-scored mask)."""
    from napari_sam.engine.propagate import innermost_pixel

    out = np.zeros_like(truth)
    for k in np.flatnonzero(truth.reshape(len(truth), -1).any(1)):
        embedded = provider(int(k))
        predictor.set_embedding(embedded.features, embedded.original_size, embedded.input_size)
        pred = predictor.predict(points=[innermost_pixel(truth[k])])
        out[k] = pred.masks[int(np.argmax(pred.scores))]
    return out


def settings_from(args: argparse.Namespace):
    from napari_sam.engine.propagate import PropagationSettings

    given = {k: getattr(args, k) for k in ("min_score", "min_overlap", "max_area_ratio",
                                           "min_contrast", "use_mask")
             if getattr(args, k) is not None}
    return PropagationSettings(**given)


def eval_volumes(args: argparse.Namespace, predictor, emit) -> None:
    import tifffile

    from napari_sam.engine.propagate import innermost_pixel, propagate_volume, volume_embeddings

    settings = settings_from(args)
    for name in args.sets:
        prop_scores, oracle_scores = [], []
        for raw_path, label_path in VOLUME_SETS[name]:
            raw = tifffile.imread(Path(args.data) / raw_path)
            gt = tifffile.imread(Path(args.data) / label_path)
            provider, _ = volume_embeddings(predictor, raw)
            ids = [int(i) for i in np.unique(gt) if i]
            if args.objects:
                ids = ids[: args.objects]
            for obj in ids:
                truth = gt == obj
                areas = truth.reshape(len(truth), -1).sum(1)
                z0 = int(np.argmax(areas))
                click = innermost_pixel(truth[z0])
                result = propagate_volume(predictor, raw, z0, points=[click], settings=settings)
                p_iou = iou(result.masks, truth)
                o_iou = iou(oracle(predictor, provider, truth), truth)
                prop_scores.append(p_iou)
                oracle_scores.append(o_iou)
                present = np.flatnonzero(areas)
                emit({"set": name, "volume": Path(raw_path).name, "object": obj,
                      "start_plane": z0, "iou_3d": round(p_iou, 4),
                      "oracle_iou_3d": round(o_iou, 4),
                      "planes_truth": [int(present[0]), int(present[-1])],
                      "planes_reached": list(result.extent or ()),
                      "stopped": result.stopped})
        if prop_scores:
            mp, mo = float(np.mean(prop_scores)), float(np.mean(oracle_scores))
            emit({"set": name, "summary": True, "objects": len(prop_scores),
                  "mean_iou_3d": round(mp, 4), "mean_oracle_iou_3d": round(mo, 4),
                  "ratio": round(mp / mo, 3) if mo else None})


def read_tracks(path: Path) -> dict[int, tuple[int, int, int]]:
    """``{track id: (first frame, last frame, parent)}`` of a CTC ``man_track.txt``."""
    tracks = {}
    for line in path.read_text().split("\n"):
        if line.strip():
            label, first, last, parent = (int(v) for v in line.split())
            tracks[label] = (first, last, parent)
    return tracks


def eval_tracking(args: argparse.Namespace, predictor, emit) -> None:
    from PIL import Image

    from napari_sam.engine.propagate import innermost_pixel, track_object, volume_embeddings

    root = Path(args.data) / "timelapse" / "bacteria"
    n_frames = len(list((root / "images").glob("t*.png")))
    if args.frames:
        n_frames = min(n_frames, args.frames)
    frames = np.stack([np.asarray(Image.open(root / "images" / f"t{t:03d}.png"))
                       for t in range(n_frames)])
    gt = np.stack([np.asarray(Image.open(root / "labels" / f"t{t:03d}.png"))
                   for t in range(n_frames)])
    rows = np.flatnonzero(gt.any((0, 2)))
    cols = np.flatnonzero(gt.any((0, 1)))
    m = args.margin
    r0, r1 = max(rows[0] - m, 0), min(rows[-1] + m + 1, gt.shape[1])
    c0, c1 = max(cols[0] - m, 0), min(cols[-1] + m + 1, gt.shape[2])
    frames, gt = frames[:, r0:r1, c0:c1], gt[:, r0:r1, c0:c1]
    tracks = {k: v for k, v in read_tracks(root / "man_track.txt").items() if v[0] < n_frames}
    children = {}
    for k, (_first, _last, parent) in tracks.items():
        children.setdefault(parent, []).append(k)
    order = sorted(tracks, key=lambda k: -(min(tracks[k][1], n_frames - 1) - tracks[k][0]))
    if args.tracks:
        order = order[: args.tracks]
    settings = settings_from(args)
    provider, _ = volume_embeddings(predictor, frames)
    correct_all, mean_all, oracle_all = [], [], []
    for track in order:
        first, last, _parent = tracks[track]
        last = min(last, n_frames - 1)
        click = innermost_pixel(gt[first] == track)
        result = track_object(predictor, frames, first, points=[click], backward=False,
                              settings=settings)
        ious = [iou(result.masks[t], gt[t] == track) for t in range(first, last + 1)]
        life = np.zeros_like(gt, dtype=bool)
        life[first:last + 1] = gt[first:last + 1] == track
        clicked = oracle(predictor, provider, life)
        oracle_ious = [iou(clicked[t], life[t]) for t in range(first, last + 1)]
        oracle_all.append(float(np.mean(oracle_ious)))
        after = None
        if last + 1 < n_frames and result.masks[last + 1].any():
            ids, counts = np.unique(gt[last + 1][result.masks[last + 1]], return_counts=True)
            best = int(ids[np.argmax(counts)])
            after = {"id": best, "daughter": best in children.get(track, [])}
        correct = int(sum(v >= 0.5 for v in ious))
        correct_all.append(correct / len(ious))
        mean_all.append(float(np.mean(ious)))
        emit({"track": track, "frames": [first, last], "frames_correct": correct,
              "frames_total": len(ious), "mean_iou": round(float(np.mean(ious)), 4),
              "oracle_mean_iou": round(oracle_all[-1], 4),
              "stopped": result.stopped, "after_last_frame": after,
              "daughters": children.get(track, [])})
    if mean_all:
        emit({"summary": True, "tracks": len(mean_all),
              "fraction_frames_correct": round(float(np.mean(correct_all)), 4),
              "mean_iou": round(float(np.mean(mean_all)), 4),
              "oracle_mean_iou": round(float(np.mean(oracle_all)), 4)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("volumes", "tracking"))
    parser.add_argument("--data", default="/work/shared/data")
    parser.add_argument("--model", default=None)
    parser.add_argument("--sets", nargs="+", choices=sorted(VOLUME_SETS),
                        default=["1135_mini", "bbbc050", "sample_ovule"])
    parser.add_argument("--objects", type=int, default=None, help="first N objects per volume")
    parser.add_argument("--tracks", type=int, default=None, help="the N longest tracks")
    parser.add_argument("--frames", type=int, default=None, help="first N frames only")
    parser.add_argument("--margin", type=int, default=32)
    parser.add_argument("--min-score", type=float, default=None)
    parser.add_argument("--min-overlap", type=float, default=None)
    parser.add_argument("--max-area-ratio", type=float, default=None)
    parser.add_argument("--min-contrast", type=float, default=None)
    parser.add_argument("--use-mask", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also append the lines here")
    args = parser.parse_args(argv)

    from napari_sam.engine.cache import EmbeddingCache
    from napari_sam.engine.predictor import Predictor
    from napari_sam.models import load_model

    predictor = Predictor(load_model(args.model), cache=EmbeddingCache(2 << 30))
    out = args.json.open("a") if args.json else None

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if out is not None:
            out.write(line + "\n")

    try:
        (eval_volumes if args.what == "volumes" else eval_tracking)(args, predictor, emit)
    finally:
        if out is not None:
            out.close()


if __name__ == "__main__":
    sys.exit(main())
