"""``napari-sam everything``: automatic segmentation of many images (optionally on Dask)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from napari_sam.errors import ModelNotFoundError

from ._common import (
    PROG,
    Console,
    HelpFormatter,
    UsageError,
    common_options,
    model_options,
    non_negative_int,
    positive_int,
    with_valid_names,
)

#: everything-mode options: (option, AutomaticMaskGenerator keyword, type, default shown in help,
#: help); only options given on the command line are passed to the generator.
GENERATOR_OPTIONS: tuple[tuple[str, str, type, Any, str], ...] = (
    ("--points-per-side", "points_per_side", int, 32,
     "grid of N x N prompt points over the image (per crop layer 0)"),
    ("--points-per-batch", "points_per_batch", int, 64,
     "points run through the mask decoder at once (memory vs speed)"),
    ("--pred-iou-thresh", "pred_iou_thresh", float, 0.88,
     "drop masks whose predicted IoU is below this"),
    ("--stability-score-thresh", "stability_score_thresh", float, 0.95,
     "drop masks whose stability score is below this"),
    ("--stability-score-offset", "stability_score_offset", float, 1.0,
     "logit offset used to compute the stability score"),
    ("--box-nms-thresh", "box_nms_thresh", float, 0.7,
     "box IoU above which duplicate masks are removed"),
    ("--crop-n-layers", "crop_n_layers", int, 0,
     "extra layers of image crops (0: whole image only)"),
    ("--crop-nms-thresh", "crop_nms_thresh", float, 0.7,
     "box IoU for removing duplicates between crops"),
    ("--crop-overlap-ratio", "crop_overlap_ratio", float, 512 / 1500,
     "overlap of neighbouring crops, as a fraction of the crop size"),
    ("--crop-n-points-downscale-factor", "crop_n_points_downscale_factor", int, 1,
     "points per side in crop layer n are divided by this**n"),
    ("--min-mask-region-area", "min_mask_region_area", int, 0,
     "remove holes and islands smaller than this many pixels (0: off)"),
)


def add_generator_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add :data:`GENERATOR_OPTIONS` to ``parser`` as a group (default None: not given).

    The help of each option shows its valid range, from
    :class:`~napari_sam.engine.everything_settings.EverythingSettings`.
    """
    from dataclasses import fields

    from napari_sam.engine.everything_settings import SAM_THRESHOLDS, EverythingSettings

    ranges = {f.name: f.metadata for f in fields(EverythingSettings)}
    g = parser.add_argument_group("everything-mode parameters (as in AutomaticMaskGenerator)")
    for option, key, typ, default, text in GENERATOR_OPTIONS:
        meta = ranges.get(key, {})
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and hi is not None:
            bracket = ")" if meta.get("max_open") else "]"
            valid = f"{lo:g}..{hi:g}" if typ is int else f"[{lo:g}, {hi:g}{bracket}"
        elif lo is not None:
            valid = f">= {lo:g}"
        else:
            valid = None
        shown = (f"the value the model recommends, printed when the run starts, else "
                 f"{SAM_THRESHOLDS[key]:g}" if key in SAM_THRESHOLDS else f"{default:g}")
        extra = f"{valid}; default: {shown}" if valid else f"default: {shown}"
        g.add_argument(option, type=typ, default=None, metavar="N" if typ is int else "X",
                       help=f"{text} ({extra})")
    g.add_argument("--no-auto-tile", dest="auto_tile", action="store_const", const=False,
                   default=None,
                   help="do not tile images larger than 3x the model's input size on their "
                        "own (they are then seen at the model's resolution and small objects "
                        "are lost; a warning names the tile size to use)")
    return g


def generator_kwargs(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, float]]:
    """AutomaticMaskGenerator keywords from options parsed with :func:`add_generator_options`.

    The options given, then, for the others, the settings that ``args.model``
    recommends (:func:`~napari_sam.models.zoo.recommended_everything_settings`).
    The result is validated here, before any model is loaded
    (:class:`~napari_sam.engine.everything_settings.EverythingSettings`); an
    out-of-range option is a usage error (exit 2) naming the option.
    Returns the keywords and the recommended settings.
    """
    from napari_sam.engine.everything_settings import EverythingSettings
    from napari_sam.errors import InvalidInputError
    from napari_sam.models.zoo import recommended_everything_settings

    kwargs = {key: getattr(args, key) for _opt, key, *_ in GENERATOR_OPTIONS
              if getattr(args, key, None) is not None}
    if getattr(args, "auto_tile", None) is not None:
        kwargs["auto_tile"] = bool(args.auto_tile)
    recommended = recommended_everything_settings(args.model)
    for key, value in recommended.items():
        kwargs.setdefault(key, value)
    labels = {key: option for option, key, *_ in GENERATOR_OPTIONS}
    labels["auto_tile"] = "--no-auto-tile"
    try:
        EverythingSettings.from_kwargs(kwargs, labels=labels)
    except InvalidInputError as err:
        raise UsageError(str(err)) from None
    return kwargs, recommended


def _tile_size(text: str) -> int:
    value = positive_int(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"expected at least 16 pixels, got {text!r}")
    return value



def add_parser(sub: Any) -> None:
    """Add ``everything`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "everything", help="segment everything in many images (one label image each)",
        formatter_class=HelpFormatter,
        description="Automatic ('everything') segmentation of images, stacks, folders or glob "
                    "patterns. Writes <stem>_labels.tif (or .png / _coco.json) per input; inputs "
                    "whose output exists are skipped (resume), unless --overwrite. A file that "
                    "napari-sam did not write is never replaced. Files named like another "
                    "input's outputs (x_labels.tif, x_overlay.png beside x.png) are not taken as "
                    "inputs. Files that cannot be read are reported and skipped; the exit code "
                    "is 1 if any failed. The default model runs with its own thresholds "
                    "(shown in the options' help) unless you give them.",
        epilog="Resume, overwrite rules, formats and Dask: docs/cli.md in the napari-sam source "
               "repository.",
    )
    common_options(p, suppress=True)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file, TIFF stack, folder (non-recursive) or quoted glob pattern")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="DIR|FILE",
                   help="output folder (created), or an output file for a single input")
    p.add_argument("--format", dest="fmt", choices=("tif", "png", "coco"), default=None,
                   help="tif: uint32 label image (stacks ok); png: 16-bit label image (2D); "
                        "coco: COCO JSON with RLE masks (default: tif, or from --out's suffix)")
    model_options(p)
    g = add_generator_options(p)
    g.add_argument("--tile-size", type=_tile_size, default=None, metavar="PX",
                   help="split images larger than PX pixels into overlapping tiles "
                        "(default: no tiling)")
    g.add_argument("--tile-overlap", type=non_negative_int, default=128, metavar="PX",
                   help="overlap between tiles in pixels, less than --tile-size (default: 128)")
    o = p.add_argument_group("outputs and execution")
    o.add_argument("--overlay", action="store_true",
                   help="also write <stem>_overlay.png (image with coloured object outlines; "
                        ".tif for stacks)")
    o.add_argument("--overwrite", action="store_true",
                   help="redo inputs whose outputs exist, replacing the outputs napari-sam "
                        "wrote (other files of the same name are never replaced)")
    o.add_argument("--channels-as-planes", action="store_true",
                   help="read colour samples as stack planes: for a (3, H, W) stack that was "
                        "saved as planar RGB (napari-sam says so when it reads one as colour)")
    o.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="run on a Dask cluster, e.g. tcp://10.0.0.5:8786 (needs dask.distributed;"
                        " inputs, outputs and model files must be visible to the workers)")
    o.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="run N local worker processes (Dask LocalCluster); default: 1, in this "
                        "process, using all cores for torch")
    o.add_argument("--torch-threads", type=positive_int, default=None, metavar="N",
                   help="torch threads per worker process (default: torch's choice; with "
                        "--workers N: cores / N)")
    p.set_defaults(func=_cmd_everything)


def _cmd_everything(args: argparse.Namespace, console: Console) -> int:
    from napari_sam.engine.batch import output_path, run_batch

    out: Path = args.out
    suffix = out.suffix.lower()
    by_suffix = {".tif": "tif", ".tiff": "tif", ".png": "png", ".json": "coco"}
    out_file = None
    fmt = args.fmt
    if suffix in by_suffix and not out.is_dir():
        out_file = out
        if fmt is not None and fmt != by_suffix[suffix]:
            raise UsageError(f"--format {fmt} does not match --out {out.name}")
        fmt = by_suffix[suffix]
    fmt = fmt or "tif"
    if args.scheduler and args.workers:
        raise UsageError("--workers starts a local cluster; it cannot be combined with "
                          "--scheduler (start workers with 'dask worker' instead)")
    if args.tile_size is not None and args.tile_overlap >= args.tile_size:
        raise UsageError(f"--tile-overlap ({args.tile_overlap}) must be smaller than "
                          f"--tile-size ({args.tile_size})")
    kwargs, recommended = generator_kwargs(args)
    if recommended:
        shown = ", ".join(f"{k}={v:g}" for k, v in recommended.items())
        console.info(f"model {args.model or 'default'}: recommended settings {shown} "
                     "(options given on the command line win)")

    def progress(n: int, total: int, path: Path, status: str) -> None:
        text = "overlay drawn from the existing output" if status == "overlay" else status
        console.info(f"[{n}/{total}] {text}: {path}")
        if status == "done":  # results as they come, so a long run can be followed
            console.result(str(out_file if out_file is not None else output_path(path, out, fmt)))

    try:
        report = run_batch(
            args.inputs, out.parent if out_file is not None else out,
            model_spec=args.model, generator_kwargs=kwargs, fmt=fmt, overwrite=args.overwrite,
            scheduler=args.scheduler, n_workers=args.workers, progress=progress,
            device=args.device, overlay=args.overlay, tile_size=args.tile_size,
            tile_overlap=args.tile_overlap, torch_threads=args.torch_threads, out_file=out_file,
            channels_as_planes=args.channels_as_planes,
            notify=lambda _path, text: console.note(text),
        )
    except ModelNotFoundError as err:
        raise with_valid_names(err) from err
    for path, reason in report.ignored:
        console.info(f"ignored: {path}: {reason}")
    for path, reason in report.not_inputs:
        console.info(f"not an input: {path}: {reason}")
    for _path, message in report.failed:
        print(f"{PROG}: failed: {message}", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    return 0 if report.ok else 1
