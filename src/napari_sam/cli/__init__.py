"""The ``napari-sam`` command line.

::

    napari-sam models list|download|path ...
    napari-sam segment IMAGE --prompts PROMPTS.csv --out LABELS.tif
    napari-sam everything INPUT... --out DIR
    napari-sam embed IMAGE [--out STORE.zarr]
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

The package holds one module per subcommand (``models``, ``segment``,
``everything``, ``embed``, ``train``, ``evaluate``), each with ``add_parser(sub)`` and
the command's ``run``; ``_common`` holds the console, usage errors, SIGTERM
handling and the options every command shares.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from collections.abc import Sequence

from napari_sam import __version__
from napari_sam.errors import NapariSamError

from . import embed, evaluate, everything, models, segment, train
from ._common import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    PROG,
    Console,
    Terminated,
    UsageError,
    common_options,
    exit_code,
    on_sigterm,
    one_line,
)

__all__ = ["build_parser", "main"]


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
    common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    models.add_parser(sub)
    segment.add_parser(sub)
    everything.add_parser(sub)
    embed.add_parser(sub)
    train.add_parser(sub)
    evaluate.add_parser(sub)
    return parser


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
        return exit_code(exit_)
    args.extra = extra
    console = Console(quiet=bool(getattr(args, "quiet", False)))
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return int(args.func(args, console) or 0)
    except SystemExit as exit_:  # a forwarded parser (train/evaluate) exited
        return exit_code(exit_)
    except UsageError as err:
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
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        if not isinstance(err, (NapariSamError, OSError)) and not debug:
            print(f"{PROG}: (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
