"""``napari-sam evaluate``: point/box mIoU and everything-mode AP of a model on a dataset."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_sam.errors import InvalidInputError

from ._common import Console, add_forwarded_parser, parse_forwarded
from .everything import (
    add_generator_options,
    add_mode_options,
    ais_kwargs,
    check_mode_options,
    generator_kwargs,
    resolve_cli_mode,
)

__all__ = ["add_evaluate_arguments", "run_evaluate"]

DESCRIPTION = ("Evaluate a model on a folder of images and label images: point and box "
               "prompts (mIoU after each simulated click) and automatic segmentation (AP; "
               "--mode: AIS where the model has an AIS head, else AMG), as a table on stdout "
               "and optionally a JSON file.")


def add_parser(sub: Any) -> None:
    """Add ``evaluate`` to the subparsers ``sub`` (its options are parsed by :func:`run`)."""
    add_forwarded_parser(sub, "evaluate",
                         "evaluate a model (options: napari-sam evaluate --help)", run)


def run(args: argparse.Namespace, console: Console) -> int:
    """Parse the forwarded options and evaluate."""
    return int(run_evaluate(parse_forwarded("evaluate", DESCRIPTION, add_evaluate_arguments,
                                            args)) or 0)



def _count_arg(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` subcommand's options to ``parser``."""
    parser.add_argument("data", help="dataset folder (images/ + labels/, or x.png + x_labels.tif)")
    parser.add_argument(
        "-m", "--model", default="default", metavar="NAME|PATH",
        help="model name from 'napari-sam models list' or a checkpoint file "
             "(default: %(default)s, the embedded model)",
    )
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="torch device, e.g. cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--ids", default=None, metavar="FILE",
                        help='ids file: a JSON list of ids, {"val": [...]} (its val ids are '
                             "evaluated) or a text file with one id a line (default: every image)")
    parser.add_argument("--n-clicks", type=_count_arg(0), default=3, metavar="N",
                        help="correction clicks after the first point (default: %(default)s)")
    parser.add_argument("--no-everything", dest="everything", action="store_false",
                        help="skip everything-mode AP (slow: a grid of prompts per image) "
                             "(default: run it)")
    parser.add_argument("--no-box", dest="box", action="store_false",
                        help="skip the tight-box prompt (default: run it)")
    parser.add_argument("--max-images", type=_count_arg(1), default=None, metavar="N",
                        help="evaluate the first N images only (default: all)")
    parser.add_argument("--min-area", type=_count_arg(0), default=10, metavar="PX",
                        help="objects smaller than this many pixels are not prompted "
                             "(default: %(default)s)")
    parser.add_argument("--tiling", choices=("auto", "off"), default="auto",
                        help="prompts on images longer than 2x the model input: 'auto' embeds "
                             "them at native scale in overlapping tiles, as the widget does; "
                             "'off' resizes the whole image to the model input "
                             "(default: %(default)s)")
    parser.add_argument("-o", "--out", "--output", dest="output", default=None, metavar="FILE",
                        help="also write the results as JSON to FILE (default: table only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (default: refuse)")
    add_mode_options(parser)
    add_generator_options(parser)


def run_evaluate(args: argparse.Namespace) -> int:
    """Run :func:`~napari_sam.evaluation.evaluate` from parsed :func:`add_evaluate_arguments`
    options."""
    from napari_sam.evaluation.evaluate import evaluate, format_results, write_results

    output = Path(args.output) if args.output else None
    overwrite = bool(getattr(args, "overwrite", False))
    if output is not None and output.exists() and not overwrite:  # before hours of work
        raise InvalidInputError(f"{output} exists; pass --overwrite to replace it.")
    kwargs, _ = generator_kwargs(args)  # the model's recommended settings, as `everything` does
    ais = ais_kwargs(args)
    model: Any = args.model
    mode, reason = args.mode, ""
    if args.everything:
        mode, reason = resolve_cli_mode(args)
        check_mode_options(args, mode, reason)
        if args.mode != "amg":  # loaded by resolve_cli_mode: reuse it
            from napari_sam.engine.batch import _resolve_model_spec, cached_model

            model = cached_model(_resolve_model_spec(args.model), getattr(args, "device", None))

    def progress(done: int, total: int) -> None:
        # the mode line comes with the first progress, after the dataset has been checked
        head = f"{reason}\n" if reason and done == 1 else ""
        print(f"{head}\r{done}/{total} images", end="", file=sys.stderr, flush=True)

    results = evaluate(
        model,
        args.data,
        ids=args.ids,
        n_clicks=args.n_clicks,
        everything=args.everything,
        max_images=args.max_images,
        progress=progress,
        box=args.box,
        min_area=args.min_area,
        everything_kwargs=kwargs,
        device=getattr(args, "device", None),
        mode=mode,
        ais_kwargs=ais,
        tiling=args.tiling,
    )
    results["model"] = str(args.model)
    print(file=sys.stderr)
    print(format_results(results))
    if output is not None:
        write_results(results, output, replace=overwrite)
    return 0
