"""Point (and box) mIoU of a model on DSB's validation split and on other real microscopy data.

    OMP_NUM_THREADS=1 python scripts/other_data_eval.py [MODEL] [--root /work/shared/data]
        [--dsb-images N] [--he-images N] [--plane-step K] [--bbbc050-step K]
        [--bacteria-frames 5 10 15 20 25 29] [--no-box] [-o results.json]

The protocol is :func:`napari_sam.evaluation.interactive.evaluate_image_interactive`'s, the
one ``napari-sam evaluate`` uses: per object of at least ``--min-area`` pixels one click at
its innermost pixel (multimask, the candidate with the best predicted IoU) and its tight box,
with ``Predictor(model)`` (the model's mask refiner on when it has one, as in the product),
IoU at the image's own resolution. Images are normalised by
:func:`napari_sam.engine.image.to_rgb_uint8` (min/max of each image or plane for 16-bit data).

Sets (under ``--root``, see its README):

* ``dsb2018``: the validation ids of ``splits/dsb2018.json`` (the first ``--dsb-images``);
* ``he_nuclei``: the validation ids of ``splits/he_nuclei.json`` (H&E, 1000 x 1000);
* ``1135_mini``: every ``--plane-step``-th z plane of ``volumes/1135_mini`` (nuclei, 100 x 100);
* ``bbbc050``: every ``--bbbc050-step``-th z plane of both ``volumes/bbbc050`` embryos
  (uint16, 120 x 122);
* ``bacteria``: ``--bacteria-frames`` of ``timelapse/bacteria`` (phase contrast, 1305 x 1009).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _dataset_images(root: Path, ids: list[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(id, image, labels)`` of an images/ + labels/ folder, read as every command reads them."""
    from napari_sam.training.datasets import InstanceDataset

    data = InstanceDataset(root, ids=ids)
    for i, image_id in enumerate(data.ids):
        image, labels = data.load(i)
        yield image_id, image, labels


def _volume_planes(raw: Path, labels: Path, step: int) -> Iterator[tuple[str, np.ndarray,
                                                                          np.ndarray]]:
    """Every ``step``-th z plane of a (Z, Y, X) volume and its instance labels."""
    import tifffile

    from napari_sam.engine.image import to_rgb_uint8

    volume, truth = tifffile.imread(raw), tifffile.imread(labels)
    for z in range(0, volume.shape[0], step):
        if truth[z].any():
            yield f"{raw.stem}[z={z}]", to_rgb_uint8(volume[z]), truth[z].astype(np.int64)


def _sets(args: argparse.Namespace) -> dict[str, Iterator[tuple[str, np.ndarray, np.ndarray]]]:
    from napari_sam.training.datasets import load_ids

    root = Path(args.root)
    _, dsb_val = load_ids(REPO / "splits" / "dsb2018.json")
    _, he_val = load_ids(REPO / "splits" / "he_nuclei.json")
    vol = root / "volumes"
    bbbc = vol / "bbbc050"

    def bbbc050() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for name in ("8_cell_stage", "16_cell_stage"):
            yield from _volume_planes(bbbc / "images" / f"{name}.tif",
                                      bbbc / "labels" / f"{name}.tif", args.bbbc050_step)

    bacteria = root / "timelapse" / "bacteria"
    frames = [f"t{t:03d}" for t in args.bacteria_frames]
    return {
        "dsb2018": _dataset_images(root / "dsb2018", dsb_val[: args.dsb_images]),
        "he_nuclei": _dataset_images(root / "he_nuclei", he_val[: args.he_images]),
        "1135_mini": _volume_planes(vol / "1135_mini_raw.tif", vol / "1135_mini_labels.tif",
                                    args.plane_step),
        "bbbc050": bbbc050(),
        "bacteria": _dataset_images(bacteria, frames),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="default")
    parser.add_argument("--root", default="/work/shared/data")
    parser.add_argument("--dsb-images", type=int, default=78)
    parser.add_argument("--he-images", type=int, default=4)
    parser.add_argument("--plane-step", type=int, default=10)
    parser.add_argument("--bbbc050-step", type=int, default=5)
    parser.add_argument("--bacteria-frames", type=int, nargs="+", default=[5, 10, 15, 20, 25, 29])
    parser.add_argument("--min-area", type=int, default=10)
    parser.add_argument("--no-box", dest="box", action="store_false")
    parser.add_argument("--sets", nargs="+", default=None, help="evaluate only these sets")
    parser.add_argument("-o", "--out", default=None)
    args = parser.parse_args()

    from napari_sam.engine.predictor import Predictor
    from napari_sam.evaluation.interactive import evaluate_image_interactive
    from napari_sam.models import load_model

    predictor = Predictor(load_model(args.model))  # refiner as the product has it
    results = {"model": args.model, "settings": vars(args), "sets": {}}
    print(f"{'set':<10} {'images':>6} {'objects':>7} {'median area':>11} {'size':>11} "
          f"{'point':>6} {'box':>6}")
    for name, images in _sets(args).items():
        if args.sets and name not in args.sets:
            continue
        point, box, area, shapes = [], [], [], set()
        n_images = 0
        for _image_id, image, labels in images:
            res = evaluate_image_interactive(predictor, image, labels, n_clicks=0, box=args.box,
                                             min_area=args.min_area)
            point.append(res["point_iou"][:, 0])
            box.append(res["box_iou"])
            area.append(res["area"])
            shapes.add(labels.shape)
            n_images += 1
        p, b, a = np.concatenate(point), np.concatenate(box), np.concatenate(area)
        size = " / ".join(f"{h}x{w}" for h, w in sorted(shapes))
        row = {"images": n_images, "objects": int(len(p)), "median_area": float(np.median(a)),
               "shapes": sorted(shapes), "point_miou": float(p.mean()),
               "box_miou": float(b.mean()) if args.box else None}
        results["sets"][name] = row
        print(f"{name:<10} {n_images:>6} {len(p):>7} {np.median(a):>11.0f} "
              f"{size if len(size) <= 11 else 'various':>11} {p.mean():>6.3f} "
              f"{(b.mean() if args.box else float('nan')):>6.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
