"""The ``napari-sam`` command line.

::

    napari-sam models list|download|path ...
    napari-sam segment IMAGE --prompts PROMPTS.csv --out LABELS.tif
    napari-sam everything INPUT... --out DIR
    napari-sam train ...
    napari-sam evaluate ...

Conventions: results (written paths, tables) go to stdout; progress, notes,
warnings and errors go to stderr. Exit codes: 0 success, 1 runtime error (bad
input file, unknown model, some images failed, an output exists), 2 usage
error (bad options or option values), 130 interrupted (Ctrl-C), 143
terminated (SIGTERM); both interruptions keep finished outputs and leave no
temporary file. Errors print one line without a traceback unless ``--debug``.
Every command that runs a model takes ``-m/--model`` and ``--device``; every
command that writes files takes ``-o/--out`` and never replaces an existing
file without ``--overwrite``. See docs/cli.md (in the source repository) for
examples and file formats.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from napari_sam import __version__
from napari_sam.errors import ModelNotFoundError, NapariSamError

__all__ = ["GENERATOR_OPTIONS", "add_generator_options", "build_parser", "generator_kwargs", "main"]

PROG = "napari-sam"

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
        raise _UsageError(str(err)) from None
    return kwargs, recommended


class _Console:
    """stdout for results, stderr for everything else (silenced by --quiet)."""

    def __init__(self, quiet: bool = False, out: TextIO | None = None,
                 err: TextIO | None = None) -> None:
        self.quiet = quiet
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr

    def result(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def info(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.err, flush=True)

    def warn(self, text: str) -> None:
        print(f"{PROG}: warning: {text}", file=self.err, flush=True)

    def note(self, text: str) -> None:
        """A remark on how input was read or which file was kept (shown even with -q)."""
        print(f"{PROG}: note: {text}", file=self.err, flush=True)


class _UsageError(Exception):
    """Options that argparse accepted but that do not make sense together (exit 2)."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so that it unwinds like Ctrl-C.

    A KeyboardInterrupt subclass: every ``except Exception`` lets it through
    and every clean-up that runs for Ctrl-C (temporary files removed, Dask
    clusters closed) runs for it too.
    """


#: exit codes of an interrupted run (128 + signal number, as shells report them)
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def _on_sigterm(signum: int, frame: Any) -> None:
    # a second SIGTERM during the clean-up ends the process the default way
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


# ---------------------------------------------------------------------- parser


def _int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, else "expected <expected>, got ..."."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--quiet and --debug, accepted before and after the subcommand."""
    default = argparse.SUPPRESS if suppress else False
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress messages on stderr (errors are still shown)")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show full tracebacks for errors")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", metavar="NAME|PATH", default=None,
                        help="model name from 'napari-sam models list' or a checkpoint file "
                             "(.safetensors/.pth); default: the embedded default model")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="torch device, e.g. cpu, cuda, cuda:1, mps (default: best available)")


def _tile_size(text: str) -> int:
    value = _positive_int(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"expected at least 16 pixels, got {text!r}")
    return value




_RECOMMENDED: dict[str, float] | None = None


class _HelpFormatter(argparse.HelpFormatter):
    """Adds the default model's own everything-mode settings to their options' help.

    ``everything --help`` shows SAM's defaults (0.88, 0.95); the embedded default
    model runs with other thresholds unless the option is given. Computed only
    when help is printed (it imports the model zoo).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        global _RECOMMENDED
        if not text or not action.option_strings or not text.endswith(")"):
            return text
        if _RECOMMENDED is None:
            from napari_sam.models.zoo import recommended_everything_settings

            _RECOMMENDED = recommended_everything_settings(None)
        if action.dest in _RECOMMENDED:
            text = f"{text[:-1]}; the default model recommends {_RECOMMENDED[action.dest]:g})"
        return text


class _SegmentHelpFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
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


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (``train``/``evaluate`` options are parsed by their own)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment Anything (SAM) from the command line: download models, segment "
                    "images from prompt files, run everything-mode over many images (locally "
                    "or on a Dask cluster), train and evaluate.",
        epilog="Run 'napari-sam COMMAND --help' for a command's options. Exit codes: 0 ok, "
               "1 runtime error, 2 usage error, 130 interrupted (Ctrl-C), 143 terminated "
               "(SIGTERM). Nothing is replaced without --overwrite.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # models ---------------------------------------------------------------
    p_models = sub.add_parser("models", help="list, download and locate model checkpoints",
                              description="List, download and locate model checkpoints.")
    _common_options(p_models, suppress=True)
    msub = p_models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = msub.add_parser("list", help="list the models (name, size, cached?, description)",
                        description="List the models of the zoo.")
    _common_options(p, suppress=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="checkpoint cache folder to look in (default: see 'models path')")
    p.set_defaults(func=_cmd_models_list)
    p = msub.add_parser("download", help="download a checkpoint; prints its path",
                        description="Download (and hash-check) a checkpoint into the cache; "
                                    "prints its path. Does nothing if it is already cached.")
    _common_options(p, suppress=True)
    p.add_argument("name", help="model name (see 'napari-sam models list')")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="download into this folder instead of the cache "
                        "(default: $NAPARI_SAM_CACHE or the user cache folder)")
    p.set_defaults(func=_cmd_models_download)
    p = msub.add_parser("path", help="print where a checkpoint is cached",
                        description="Print the path where a model's checkpoint is (or would be) "
                                    "cached. Exit code 1 if it has not been downloaded yet.")
    _common_options(p, suppress=True)
    p.add_argument("name", help="model name")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache folder to look in")
    p.set_defaults(func=_cmd_models_path)

    # segment --------------------------------------------------------------
    p = sub.add_parser(
        "segment", help="segment one image from point/box prompts in a file",
        formatter_class=_SegmentHelpFormatter, epilog=_PROMPT_FORMATS,
        description="Segment objects in one 2D image from prompts (points and/or a box per\n"
                    "object) read from a CSV or JSON file. Object k of the file (in file order)\n"
                    "gets label k in the output; where objects overlap, the earlier one keeps\n"
                    "the pixels. Existing files are not replaced without --overwrite.",
    )
    _common_options(p, suppress=True)
    p.add_argument("image", type=Path, help="image file (.png, .tif, .jpg, ...)")
    p.add_argument("--prompts", type=Path, required=True, metavar="FILE",
                   help="prompt file: .csv (object,row,col,label and/or object,row0,col0,row1,"
                        "col1) or .json (formats below)")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="LABELS",
                   help="output label image (.tif: uint32, .png: 16-bit)")
    _model_options(p)
    p.add_argument("--multimask-select", choices=("best", "single"), default="best",
                   help="best: predict 3 candidate masks per object and keep the one with the "
                        "highest predicted IoU; single: predict one mask (default: best)")
    p.add_argument("--overlay", action="store_true",
                   help="also write <out stem>_overlay.png (image with object outlines)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (and an overlay that napari-sam wrote; "
                        "never the input image)")
    p.set_defaults(func=_cmd_segment)

    # everything -----------------------------------------------------------
    p = sub.add_parser(
        "everything", help="segment everything in many images (one label image each)",
        formatter_class=_HelpFormatter,
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
    _common_options(p, suppress=True)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file, TIFF stack, folder (non-recursive) or quoted glob pattern")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="DIR|FILE",
                   help="output folder (created), or an output file for a single input")
    p.add_argument("--format", dest="fmt", choices=("tif", "png", "coco"), default=None,
                   help="tif: uint32 label image (stacks ok); png: 16-bit label image (2D); "
                        "coco: COCO JSON with RLE masks (default: tif, or from --out's suffix)")
    _model_options(p)
    g = add_generator_options(p)
    g.add_argument("--tile-size", type=_tile_size, default=None, metavar="PX",
                   help="split images larger than PX pixels into overlapping tiles "
                        "(default: no tiling)")
    g.add_argument("--tile-overlap", type=_non_negative_int, default=128, metavar="PX",
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
    o.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="run N local worker processes (Dask LocalCluster); default: 1, in this "
                        "process, using all cores for torch")
    o.add_argument("--torch-threads", type=_positive_int, default=None, metavar="N",
                   help="torch threads per worker process (default: torch's choice; with "
                        "--workers N: cores / N)")
    p.set_defaults(func=_cmd_everything)

    # train / evaluate: options parsed by the training/evaluation modules ---------
    for name, text in (("train", "fine-tune or train a model (options: napari-sam train --help)"),
                       ("evaluate", "evaluate a model (options: napari-sam evaluate --help)")):
        p = sub.add_parser(name, help=text, add_help=False,
                           description=f"{text}; all options are forwarded.")
        p.set_defaults(func=_cmd_train if name == "train" else _cmd_evaluate, forward=True)
    return parser


# ---------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it).

    SIGTERM is handled like Ctrl-C while a command runs (in the main thread):
    finished outputs are kept, temporary files removed, and the exit code is
    143 (130 for Ctrl-C).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "forward", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:  # --help, --version, usage errors
        return _exit_code(exit_)
    args.extra = extra
    console = _Console(quiet=bool(getattr(args, "quiet", False)))
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return int(args.func(args, console) or 0)
    except SystemExit as exit_:  # a forwarded parser (train/evaluate) exited
        return _exit_code(exit_)
    except _UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM); finished outputs are kept", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (finished outputs are kept)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        debug = bool(getattr(args, "debug", False))  # train/evaluate may set it late
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        if not isinstance(err, (NapariSamError, OSError)) and not debug:
            print(f"{PROG}: (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_code(exit_: SystemExit) -> int:
    code = exit_.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (NapariSamError, OSError)):
        return text
    return f"{type(err).__name__}: {text}"


# ---------------------------------------------------------------------- models


def _zoo():
    from napari_sam.models import zoo

    return zoo


def _model_local_path(zoo: Any, name: str, cache_dir: Path | None) -> Path:
    """Where ``name``'s checkpoint is (or would be) on disk.

    Zoo downloads live in the cache folder; the embedded default model inside
    the package.
    """
    info = zoo.model_info(name)
    if not getattr(info, "url", ""):
        return Path(zoo.embedded_weights_path())
    folder = Path(cache_dir).expanduser() if cache_dir is not None else Path(zoo.cache_dir())
    return folder / info.filename


def _with_valid_names(err: ModelNotFoundError) -> ModelNotFoundError:
    """Make sure a model-not-found message lists the valid names."""
    text = str(err)
    try:
        names = list(_zoo().list_models())
    except Exception:
        return err
    if names and not all(n in text for n in names):
        text = f"{text.rstrip('.')}. Valid names: {', '.join(names)}."
    return ModelNotFoundError(text)


def _cmd_models_list(args: argparse.Namespace, console: _Console) -> int:
    zoo = _zoo()
    rows = []
    for name in zoo.list_models():
        info = zoo.model_info(name)
        path = _model_local_path(zoo, name, args.cache_dir)
        size_mb = float(info.size_mb)
        if not info.url and path.is_file():  # embedded: its file size
            size_mb = path.stat().st_size / 2**20
        rows.append({
            "name": name,
            "size_mb": size_mb,
            "cached": path.is_file(),
            "path": str(path),
            "description": info.description,
        })
    if args.json:
        console.result(json.dumps(rows, indent=2))
        return 0
    width = max([4, *(len(r["name"]) for r in rows)])
    console.result(f"{'NAME':<{width}}  {'SIZE':>8}  {'CACHED':<6}  DESCRIPTION")
    for r in rows:
        size = f"{r['size_mb']:.0f} MB" if r["size_mb"] >= 1 else "< 1 MB"
        console.result(f"{r['name']:<{width}}  {size:>8}  {'yes' if r['cached'] else 'no':<6}  "
                       f"{r['description']}")
    return 0


def _cmd_models_download(args: argparse.Namespace, console: _Console) -> int:
    zoo = _zoo()
    try:
        path = zoo.download_checkpoint(args.name, cache_dir=args.cache_dir,
                                       progress=not console.quiet)
    except ModelNotFoundError as err:
        raise _with_valid_names(err) from err
    console.result(str(path))
    return 0


def _cmd_models_path(args: argparse.Namespace, console: _Console) -> int:
    zoo = _zoo()
    try:
        path = _model_local_path(zoo, args.name, args.cache_dir)
    except ModelNotFoundError as err:
        raise _with_valid_names(err) from err
    console.result(str(path))
    if not path.is_file():
        if path.parent == Path(zoo.embedded_weights_path()).parent:
            console.warn("the embedded model file is missing; reinstall napari-sam")
        else:
            console.warn(f"not downloaded yet; run: napari-sam models download {args.name}")
        return 1
    return 0


def _load_model(spec: str | None, device: str | None, console: _Console):
    from napari_sam.models.zoo import load_model

    console.info(f"loading model {spec or 'default'} ...")
    try:
        return load_model(spec, device=device)
    except ModelNotFoundError as err:
        raise _with_valid_names(err) from err


# ---------------------------------------------------------------------- segment


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _cmd_segment(args: argparse.Namespace, console: _Console) -> int:
    import numpy as np

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
        raise _UsageError(f"--out must end in .tif, .tiff or .png, got {out.name!r}")
    overlay = out.with_name(f"{out.stem}_overlay.png") if args.overlay else None
    for path, what in ((out, "--out"), (overlay, "the overlay")):
        if path is None:
            continue
        if _same_file(path, args.image):
            raise InvalidInputError(
                f"{what} ({path}) is the input image; choose another --out."
            )
        if path.exists() and not args.overwrite:
            raise InvalidInputError(f"{path} exists; pass --overwrite to replace it.")
    if overlay is not None and overlay.exists() and not written_by_napari_sam(overlay):
        # its name is derived from --out, not chosen: only a file we wrote is replaced
        raise InvalidInputError(
            f"{overlay} exists and was not written by napari-sam, so it is never replaced; "
            "choose another --out."
        )
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
    model = _load_model(args.model, args.device, console)

    from napari_sam.engine.predictor import Predictor

    rgb = to_rgb_uint8(image.data)
    predictor = Predictor(model)
    console.info(f"embedding {args.image.name} ({rgb.shape[1]} x {rgb.shape[0]}) ...")
    predictor.set_image(rgb)
    labels = np.zeros(image.plane_shape, dtype=np.uint32)
    multimask = args.multimask_select == "best"
    for number, obj in enumerate(objects, start=1):
        try:
            pred = predictor.predict(
                points=obj.points if len(obj.points) else None,
                labels=obj.labels if len(obj.points) else None,
                box=obj.box,
                multimask=multimask,
            )
        except InvalidInputError as err:
            raise InvalidInputError(f"{obj.describe(number)}: {err}") from err
        mask = pred.masks[int(np.argmax(pred.scores))]
        free = mask & (labels == 0)
        if not mask.any():
            console.warn(f"{obj.describe(number)} gave an empty mask.")
        elif not free.any():
            console.warn(f"{obj.describe(number)} lies entirely under earlier objects.")
        labels[free] = number
        console.info(f"[{number}/{len(objects)}] {obj.describe(number)}: {int(free.sum())} px, "
                     f"score {float(np.max(pred.scores)):.3f}")
    # replace=False guards against a file created meanwhile (e.g. by a parallel run)
    write_labels(out, labels, replace=args.overwrite)
    console.result(str(out))
    if overlay is not None:
        write_overlay(overlay, rgb, labels, replace=args.overwrite)
        console.info(f"overlay: {overlay}")
    return 0


# ---------------------------------------------------------------------- everything


def _cmd_everything(args: argparse.Namespace, console: _Console) -> int:
    from napari_sam.engine.batch import output_path, run_batch

    out: Path = args.out
    suffix = out.suffix.lower()
    by_suffix = {".tif": "tif", ".tiff": "tif", ".png": "png", ".json": "coco"}
    out_file = None
    fmt = args.fmt
    if suffix in by_suffix and not out.is_dir():
        out_file = out
        if fmt is not None and fmt != by_suffix[suffix]:
            raise _UsageError(f"--format {fmt} does not match --out {out.name}")
        fmt = by_suffix[suffix]
    fmt = fmt or "tif"
    if args.scheduler and args.workers:
        raise _UsageError("--workers starts a local cluster; it cannot be combined with "
                          "--scheduler (start workers with 'dask worker' instead)")
    if args.tile_size is not None and args.tile_overlap >= args.tile_size:
        raise _UsageError(f"--tile-overlap ({args.tile_overlap}) must be smaller than "
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
        raise _with_valid_names(err) from err
    for path, reason in report.ignored:
        console.info(f"ignored: {path}: {reason}")
    for path, reason in report.not_inputs:
        console.info(f"not an input: {path}: {reason}")
    for _path, message in report.failed:
        print(f"{PROG}: failed: {message}", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    return 0 if report.ok else 1


# ---------------------------------------------------------------------- train / evaluate


_FORWARDED = {
    "train": dict(
        modules=("napari_sam.training.loop", "napari_sam.training"),
        add="add_train_arguments", check="check_train_arguments", run="run_train",
        description="Fine-tune a model on a folder of images and label images (or train one "
                    "from scratch with --arch). Checkpoints, config.json and log.jsonl go to "
                    "--out; rerunning the same command resumes there. A run folder holding "
                    "another run is refused unless --overwrite (which starts over).",
    ),
    "evaluate": dict(
        modules=("napari_sam.evaluation", "napari_sam.evaluation.cli",
                 "napari_sam.evaluation.evaluate"),
        add="add_evaluate_arguments", check="", run="run_evaluate",
        description="Evaluate a model on a folder of images and label images: point and box "
                    "prompts (mIoU after each simulated click) and everything-mode (AP), as a "
                    "table on stdout and optionally a JSON file.",
    ),
}


def _forward(name: str, args: argparse.Namespace) -> int:
    """Parse ``args.extra`` with another module's ``add_*_arguments`` and run it.

    The module may define a ``check_*_arguments(args)`` that raises
    :class:`~napari_sam.errors.InvalidInputError` for option values that do not
    make sense; that is a usage error (exit code 2).
    """
    import importlib

    spec = _FORWARDED[name]
    module = None
    for module_name in spec["modules"]:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue
            raise
        if hasattr(module, spec["add"]) and hasattr(module, spec["run"]):
            break
        module = None
    if module is None:
        raise NapariSamError(f"'{name}' is not available in this installation.")
    parser = argparse.ArgumentParser(
        prog=f"{PROG} {name}", description=spec["description"], formatter_class=_HelpFormatter,
        epilog="Exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted, 143 "
               "terminated. More: docs/cli.md and docs/training.md in the napari-sam source "
               "repository.",
    )
    _common_options(parser, suppress=True)
    getattr(module, spec["add"])(parser)
    sub_args = parser.parse_args(args.extra)
    for key in ("quiet", "debug"):  # given before or after the command
        value = bool(getattr(sub_args, key, False) or getattr(args, key, False))
        setattr(sub_args, key, value)
        setattr(args, key, value)
    check = getattr(module, spec["check"], None) if spec["check"] else None
    if check is not None:
        from napari_sam.errors import InvalidInputError

        try:
            check(sub_args)
        except InvalidInputError as err:
            parser.error(str(err))
    run_fn: Callable[[argparse.Namespace], int] = getattr(module, spec["run"])
    return int(run_fn(sub_args) or 0)


def _cmd_train(args: argparse.Namespace, console: _Console) -> int:
    return _forward("train", args)


def _cmd_evaluate(args: argparse.Namespace, console: _Console) -> int:
    return _forward("evaluate", args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
