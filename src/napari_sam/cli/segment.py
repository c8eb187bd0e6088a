"""``napari-sam segment``: one image, objects from a prompt file, one label image."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_sam.engine.segment import SELECT_MODES, ObjectResult, segment_objects

from ._common import (
    Console,
    HelpFormatter,
    UsageError,
    common_options,
    load_model,
    model_options,
)


class _SegmentHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of the prompt-format examples in the epilog."""


_PROMPT_FORMATS = """\
prompt files (coordinates are image pixels: row = vertical, col = horizontal, 0 at the
top left; objects are numbered in file order):
  CSV   a header naming some of object,row,col,label,row0,col0,row1,col1; each row holds a
        point (row,col; label 1 = foreground, the default, 0 = background) and/or a box
        (row0,col0,row1,col1); rows with the same object form one object:
            object,row,col,label,row0,col0,row1,col1
            nucleus,120,85,1,,,,
            nucleus,150,60,0,,,,
            cell,,,,40,30,210,190
  JSON  a list of objects, each with any of points, labels, box, name:
            [{"points": [[120, 85], [150, 60]], "labels": [1, 0]},
             {"box": [40, 30, 210, 190]}]
More examples: docs/cli.md in the napari-sam source repository."""


def add_parser(sub: Any) -> None:
    """Add ``segment`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "segment", help="segment one image from point/box prompts in a file",
        formatter_class=_SegmentHelpFormatter, epilog=_PROMPT_FORMATS,
        description="Segment objects in one 2D image from prompts (points and/or a box per\n"
                    "object) read from a CSV or JSON file. Object k of the file (in file order)\n"
                    "gets label k in the output; where objects overlap, the earlier one keeps\n"
                    "the pixels. Existing files are not replaced without --overwrite.",
    )
    common_options(p, suppress=True)
    p.add_argument("image", type=Path, help="image file (.png, .tif, .jpg, ...)")
    p.add_argument("--prompts", type=Path, required=True, metavar="FILE",
                   help="prompt file: .csv (object,row,col,label and/or object,row0,col0,row1,"
                        "col1) or .json (formats below)")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="LABELS",
                   help="output label image (.tif: uint32, .png: 16-bit)")
    model_options(p)
    p.add_argument("--multimask-select", choices=SELECT_MODES, default="best",
                   help="best: predict 3 candidate masks per object and keep the one with the "
                        "highest predicted IoU; single: predict one mask (default: best)")
    p.add_argument("--overlay", action="store_true",
                   help="also write <out stem>_overlay.png (image with object outlines)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (and an overlay that napari-sam wrote; "
                        "never the input image)")
    p.set_defaults(func=_cmd_segment)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _cmd_segment(args: argparse.Namespace, console: Console) -> int:
    from napari_sam.engine.image import to_rgb_uint8
    from napari_sam.engine.io import (
        LABEL_EXTENSIONS,
        check_prompts,
        read_image,
        read_prompts,
        write_labels,
        write_overlay,
        written_by_napari_sam,
    )
    from napari_sam.errors import InvalidInputError

    out: Path = args.out
    if out.suffix.lower() not in LABEL_EXTENSIONS:
        raise UsageError(f"--out must end in .tif, .tiff or .png, got {out.name!r}")
    overlay = out.with_name(f"{out.stem}_overlay.png") if args.overlay else None
    for path, what in ((out, "--out"), (overlay, "the overlay")):
        if path is None:
            continue
        if _same_file(path, args.image):
            raise InvalidInputError(
                f"{what} ({path}) is the input image; choose another --out."
            )
        if path is overlay and path.exists() and not written_by_napari_sam(path):
            # its name is derived from --out, not chosen: only a file we wrote is replaced
            raise InvalidInputError(
                f"{path} exists and was not written by napari-sam, so it is never replaced "
                "(not even with --overwrite); choose another --out."
            )
        if path.exists() and not args.overwrite:
            raise InvalidInputError(f"{path} exists; pass --overwrite to replace it.")
    image = read_image(args.image)
    if image.is_stack:
        raise InvalidInputError(
            f"{args.image} is a stack of shape {image.data.shape}; 'segment' takes one 2D image "
            "(save the slice you want as its own file)."
        )
    if image.notice:
        console.note(
            f"{args.image.name}: its {image.data.shape[-1]} planes are stored as planar RGB "
            "(the TIFF's photometric tag), so they are segmented as one colour image; if they "
            "are a stack, save the plane you want as its own 2D file."
        )
    objects = read_prompts(args.prompts)
    check_prompts(objects, image.plane_shape)
    model = load_model(args.model, args.device, console)

    from napari_sam.engine.predictor import Predictor
    from napari_sam.engine.store import use_store_beside

    rgb = to_rgb_uint8(image.data)
    predictor = Predictor(model)
    remark = use_store_beside(predictor, args.image)  # IMAGE.sam.zarr (napari-sam embed)
    if remark is not None:
        console.note(remark)
    console.info(f"embedding {args.image.name} ({rgb.shape[1]} x {rgb.shape[0]}) ...")
    predictor.set_image(rgb)

    def report(obj: Any, result: ObjectResult) -> None:
        name = obj.describe(result.number)
        if result.empty:
            console.warn(f"{name} gave an empty mask.")
        elif result.covered:
            console.warn(f"{name} lies entirely under earlier objects.")
        console.info(f"[{result.number}/{len(objects)}] {name}: {result.area} px, "
                     f"score {result.score:.3f}")

    labels = segment_objects(predictor, objects, image.plane_shape,
                             select=args.multimask_select, on_object=report).labels
    # replace=False guards against a file created meanwhile (e.g. by a parallel run)
    write_labels(out, labels, replace=args.overwrite)
    console.result(str(out))
    if overlay is not None:
        write_overlay(overlay, rgb, labels, replace=args.overwrite)
        console.info(f"overlay: {overlay}")
    return 0
