"""Shared pieces of the ``napari-sam`` subcommands: console, usage errors,
SIGTERM handling, integer option parsers, the options every command shares and
the help formatter."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Any, TextIO

from napari_sam.errors import ModelNotFoundError, NapariSamError

PROG = "napari-sam"


class Console:
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


class UsageError(Exception):
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


def on_sigterm(signum: int, frame: Any) -> None:
    # a second SIGTERM during the clean-up ends the process the default way
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


# ---------------------------------------------------------------------- parser


def int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
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


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")


def common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--quiet and --debug, accepted before and after the subcommand."""
    default = argparse.SUPPRESS if suppress else False
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress messages on stderr (errors are still shown)")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show full tracebacks for errors")


def model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", metavar="NAME|PATH", default=None,
                        help="model name from 'napari-sam models list' or a checkpoint file "
                             "(.safetensors/.pth); default: the embedded default model")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="torch device, e.g. cpu, cuda, cuda:1, mps (default: best available)")



_RECOMMENDED: dict[str, float] | None = None


class HelpFormatter(argparse.HelpFormatter):
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



def exit_code(exit_: SystemExit) -> int:
    code = exit_.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (NapariSamError, OSError)):
        return text
    return f"{type(err).__name__}: {text}"


def zoo_module():
    from napari_sam.models import zoo

    return zoo


def with_valid_names(err: ModelNotFoundError) -> ModelNotFoundError:
    """Make sure a model-not-found message lists the valid names."""
    text = str(err)
    try:
        names = list(zoo_module().list_models())
    except Exception:
        return err
    if names and not all(n in text for n in names):
        text = f"{text.rstrip('.')}. Valid names: {', '.join(names)}."
    return ModelNotFoundError(text)


def load_model(spec: str | None, device: str | None, console: Console):
    from napari_sam.models.zoo import load_model

    console.info(f"loading model {spec or 'default'} ...")
    try:
        return load_model(spec, device=device)
    except ModelNotFoundError as err:
        raise with_valid_names(err) from err


def add_forwarded_parser(sub: Any, name: str, text: str, run: Callable[..., int]) -> None:
    """Register ``name`` in ``sub`` with its options left unparsed (``args.extra``).

    Its own parser (:func:`parse_forwarded`) gives ``napari-sam NAME --help``
    the command's full option list.
    """
    p = sub.add_parser(name, help=text, add_help=False,
                       description=f"{text}; all options are forwarded.")
    p.set_defaults(func=run, forward=True)


def parse_forwarded(name: str, description: str, add_arguments: Callable[[Any], None],
                    args: argparse.Namespace,
                    check: Callable[[argparse.Namespace], None] | None = None,
                    ) -> argparse.Namespace:
    """Parse ``args.extra`` with the options ``add_arguments`` adds.

    ``check(args)`` may raise :class:`~napari_sam.errors.InvalidInputError`
    for option values that do not make sense; that is a usage error (exit 2).
    ``--quiet``/``--debug`` count whether given before or after the command.
    """
    from napari_sam.errors import InvalidInputError

    parser = argparse.ArgumentParser(
        prog=f"{PROG} {name}", description=description, formatter_class=HelpFormatter,
        epilog="Exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted, 143 "
               "terminated. More: docs/cli.md and docs/training.md in the napari-sam source "
               "repository.",
    )
    common_options(parser, suppress=True)
    add_arguments(parser)
    sub_args = parser.parse_args(args.extra)
    for key in ("quiet", "debug"):  # given before or after the command
        value = bool(getattr(sub_args, key, False) or getattr(args, key, False))
        setattr(sub_args, key, value)
        setattr(args, key, value)
    if check is not None:
        try:
            check(sub_args)
        except InvalidInputError as err:
            parser.error(str(err))
    return sub_args
