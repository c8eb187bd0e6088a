"""``napari-sam everything``: automatic segmentation of many images (optionally on Dask)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from napari_sam.engine.ais import AIS_TILE_OVERLAP, MODES, AisSettings
from napari_sam.engine.everything_settings import (
    SAM_THRESHOLDS,
    EverythingSettings,
    everything_kwargs,
)
from napari_sam.engine.stack import LINK_IOU, MIN_PLANES
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

#: AMG's tile overlap when --tile-overlap is not given
AMG_TILE_OVERLAP = 128


def _option(field: Any) -> tuple[str, str, type, Any, str]:
    """(option, keyword, type, default shown in help, help) of an EverythingSettings field."""
    return ("--" + field.name.replace("_", "-"), field.name, field.metadata["kind"],
            SAM_THRESHOLDS.get(field.name, field.default), field.metadata["help"])


#: everything-mode options, generated from EverythingSettings' numeric fields (their help
#: and ranges live there); only options given on the command line reach the generator.
GENERATOR_OPTIONS = tuple(_option(f) for f in EverythingSettings.cli_fields())


def add_generator_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add :data:`GENERATOR_OPTIONS` to ``parser`` as a group (default None: not given).

    The help of each option shows its valid range, from
    :class:`~napari_sam.engine.everything_settings.EverythingSettings`.
    """
    g = parser.add_argument_group("everything-mode parameters (as in AutomaticMaskGenerator)")
    for field in EverythingSettings.cli_fields():
        option, key, typ, default, text = _option(field)
        meta = field.metadata
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
    recommends (:func:`~napari_sam.engine.everything_settings.everything_kwargs`,
    which validates them before any model is loaded); an out-of-range option
    is a usage error (exit 2) naming the option. Returns the keywords and the
    recommended settings.
    """
    from napari_sam.errors import InvalidInputError

    given = {key: getattr(args, key) for _opt, key, *_ in GENERATOR_OPTIONS
             if getattr(args, key, None) is not None}
    if getattr(args, "auto_tile", None) is not None:
        given["auto_tile"] = bool(args.auto_tile)
    labels = {key: option for option, key, *_ in GENERATOR_OPTIONS}
    labels["auto_tile"] = "--no-auto-tile"
    try:
        return everything_kwargs(given, args.model, labels=labels)
    except InvalidInputError as err:
        raise UsageError(str(err)) from None


#: AIS options, generated from AisSettings' fields: (option, keyword, type, default, help)
AIS_OPTIONS = tuple(
    ("--" + f.name.replace("_", "-"), f.name, type(f.default), f.default, f.metadata["help"])
    for f in dataclasses.fields(AisSettings)
)

_MODE_HELP = ("automatic segmentation mode: ais (the model's AIS head + watershed), amg (a grid "
              "of point prompts, SAM's everything-mode), or auto: ais where the model has an AIS "
              "head, else amg (default: auto; the start line says which runs and why)")


def add_mode_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add ``--mode`` and the AIS options (:data:`AIS_OPTIONS`, default None: not given)."""
    parser.add_argument("--mode", choices=MODES, default="auto", help=_MODE_HELP)
    g = parser.add_argument_group(
        "automatic instance segmentation (AIS) parameters (mode ais only)")
    for option, _key, typ, default, text in AIS_OPTIONS:
        g.add_argument(option, type=typ, default=None, metavar="N" if typ is int else "X",
                       help=f"{text} (default: {default:g})")
    return g


def ais_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The AIS options given on the command line, checked by :class:`AisSettings`
    (an out-of-range value is a usage error naming the option)."""
    from napari_sam.errors import InvalidInputError

    given = {key: getattr(args, key) for _opt, key, *_ in AIS_OPTIONS
             if getattr(args, key, None) is not None}
    try:
        AisSettings(**given)
    except InvalidInputError as err:
        option = next(opt for opt, key, *_ in AIS_OPTIONS if f".{key} " in str(err))
        raise UsageError(f"{option}: {err}") from None
    return given


def given_options(args: argparse.Namespace, mode: str) -> list[str]:
    """The options of ``mode`` ("amg" or "ais") given on the command line."""
    if mode == "ais":
        return [opt for opt, key, *_ in AIS_OPTIONS if getattr(args, key, None) is not None]
    shown = [opt for opt, key, *_ in GENERATOR_OPTIONS if getattr(args, key, None) is not None]
    if getattr(args, "auto_tile", None) is not None:
        shown.append("--no-auto-tile")
    return shown


def check_mode_options(args: argparse.Namespace, mode: str, reason: str) -> None:
    """A usage error when options of the mode that does not run were given.

    ``mode`` is the mode that runs ("amg" or "ais"); ``reason`` the start line's
    ``"mode ais (the model has an AIS head)"``. An option that would be ignored
    is refused rather than silently dropped.
    """
    other = "amg" if mode == "ais" else "ais"
    wrong = given_options(args, other)
    if wrong:
        raise UsageError(
            f"{', '.join(wrong)} {'applies' if len(wrong) == 1 else 'apply'} to mode {other} "
            f"only, but this run uses {reason}: pass --mode {other}, or leave "
            f"{'it' if len(wrong) == 1 else 'them'} out."
        )


def resolve_cli_mode(args: argparse.Namespace, load: bool = True) -> tuple[str, str]:
    """``(mode, reason)`` of a run: the mode that runs and the start line that says why.

    ``--mode auto`` loads the model (cached for the run, see
    :func:`~napari_sam.engine.batch.cached_model`) to see whether it has an AIS
    head; so does ``--mode ais`` when ``load`` (a head-less model is then a usage
    error before any image). With ``load`` False an explicit mode is taken as given.
    """
    from napari_sam.engine.ais import mode_reason, resolve_mode
    from napari_sam.engine.batch import _resolve_model_spec, cached_model
    from napari_sam.errors import InvalidInputError

    mode = getattr(args, "mode", "auto")
    if mode == "amg" or (mode == "ais" and not load):
        return mode, f"mode {mode} (--mode {mode})"
    try:
        model = cached_model(_resolve_model_spec(args.model), getattr(args, "device", None))
    except ModelNotFoundError as err:
        raise with_valid_names(err) from err
    try:
        return resolve_mode(model, mode), mode_reason(model, mode)
    except InvalidInputError as err:
        raise UsageError(f"--mode {mode}: {err}") from None


def _unit_float(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _stack_axis(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer axis, got {text!r}") from None


def add_link_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--link-planes/--no-link-planes``, ``--link-axis``, ``--link-iou`` and
    ``--min-planes`` (default None: not given, :data:`MIN_PLANES` when linking)."""
    g = parser.add_argument_group(
        "stacks: 3D objects and tracks (linking the planes' objects by overlap)")
    g.add_argument("--link-planes", action=argparse.BooleanOptionalAction, default=True,
                   help="give the objects of neighbouring planes of a stack that overlap one id, "
                        "so a z stack gets 3D objects and a time-lapse gets tracks (at a "
                        "division the daughter that overlaps the mother most keeps the id); "
                        "--no-link-planes numbers every plane's objects apart (default: link; "
                        "2D images are not affected)")
    g.add_argument("--link-axis", type=_stack_axis, default=-1, metavar="N",
                   help="the stack axis to link along, 0 = the first; negative counts from the "
                        "last stack axis, the one next to the planes (z of a TZYX stack); the "
                        "other stack axes are linked apart (default: -1)")
    g.add_argument("--link-iou", type=_unit_float, default=LINK_IOU, metavar="X",
                   help="objects of neighbouring planes are one object when their IoU is at "
                        "least this, matched one-to-one ([0, 1]; default: %(default)s)")
    g.add_argument("--min-planes", type=positive_int, default=None, metavar="N",
                   help="drop linked objects that span fewer than N planes along the linked "
                        "axis: out-of-focus blur and noise segmented in a single plane (on a "
                        "time-lapse: tracks shorter than N frames, also cells that enter in "
                        f"the last N-1 frames); 1 keeps all (default: {MIN_PLANES}, measured in "
                        "docs/volumes.md of the source repository)")
    return g


def min_planes_option(args: argparse.Namespace) -> int:
    """The ``--min-planes`` of a run: the value given, else :data:`MIN_PLANES`; a usage
    error when given with ``--no-link-planes`` (it would be ignored)."""
    if args.min_planes is not None and not args.link_planes:
        raise UsageError("--min-planes applies to linked objects only: leave it out, or "
                         "drop --no-link-planes.")
    return MIN_PLANES if args.min_planes is None else args.min_planes


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
                    "(shown in the options' help) unless you give them. Mode auto runs AIS "
                    "(the model's instance head) where the model has one, else AMG (grid "
                    "prompts); options of the mode that does not run are refused. The "
                    "objects of a stack's planes are linked into 3D objects (or tracks) by "
                    "overlap unless --no-link-planes.",
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
    add_mode_options(p)
    add_generator_options(p)
    add_link_options(p)
    t = p.add_argument_group("tiles (both modes)")
    t.add_argument("--tile-size", type=_tile_size, default=None, metavar="PX",
                   help="split images larger than PX pixels into overlapping tiles (default: "
                        "amg: no tiling; ais: the model's input size, at native scale)")
    t.add_argument("--tile-overlap", type=non_negative_int, default=None, metavar="PX",
                   help="overlap between tiles in pixels, less than the tile size (default: "
                        f"amg: {AMG_TILE_OVERLAP}; ais: {AIS_TILE_OVERLAP})")
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
    # out-of-range values are usage errors found before any model is loaded
    kwargs, recommended = generator_kwargs(args)
    ais = ais_kwargs(args)
    min_planes = min_planes_option(args)
    mode, reason = resolve_cli_mode(args, load=args.scheduler is None)
    check_mode_options(args, mode, reason)
    overlap = args.tile_overlap
    if overlap is None:
        overlap = AIS_TILE_OVERLAP if mode == "ais" else AMG_TILE_OVERLAP
    if args.tile_size is not None and overlap >= args.tile_size:
        raise UsageError(f"--tile-overlap ({overlap}) must be smaller than "
                          f"--tile-size ({args.tile_size})")
    console.info(reason)
    if mode == "ais":
        if args.tile_size is not None:
            ais["tile_size"] = args.tile_size
        ais["overlap"] = overlap
    elif recommended:
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
            device=args.device, overlay=args.overlay,
            tile_size=args.tile_size if mode == "amg" else None,
            tile_overlap=overlap if mode == "amg" else AMG_TILE_OVERLAP,
            torch_threads=args.torch_threads, out_file=out_file, mode=mode, ais_kwargs=ais,
            channels_as_planes=args.channels_as_planes,
            notify=lambda _path, text: console.note(text),
            link_axis=args.link_axis if args.link_planes else None, link_iou=args.link_iou,
            min_planes=min_planes if args.link_planes else 1,
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
