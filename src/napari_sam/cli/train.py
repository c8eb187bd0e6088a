"""``napari-sam train``: fine-tune (or train from scratch) on a folder of images and labels.

The options map onto :class:`~napari_sam.training.config.TrainConfig`; the numeric
ones, their help and their ranges come from its fields' metadata, checked by
:func:`~napari_sam.training.config.config_problems`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from napari_sam.errors import InvalidInputError

from ._common import Console, add_forwarded_parser, parse_forwarded

if TYPE_CHECKING:
    from napari_sam.training.config import TrainConfig

__all__ = ["add_train_arguments", "check_train_arguments", "config_from_args", "run_train"]

DESCRIPTION = ("Fine-tune a model on a folder of images and label images (or train one "
               "from scratch with --arch), or add an AIS head to it (--head-only, "
               "--aux-dense). Checkpoints, config.json and log.jsonl go to "
               "--out; rerunning the same command resumes there. A run folder holding "
               "another run is refused unless --overwrite (which starts over).")


def add_parser(sub: Any) -> None:
    """Add ``train`` to the subparsers ``sub`` (its options are parsed by :func:`run`)."""
    add_forwarded_parser(sub, "train",
                         "fine-tune or train a model (options: napari-sam train --help)", run)


def run(args: argparse.Namespace, console: Console) -> int:
    """Parse the forwarded options and train."""
    sub_args = parse_forwarded("train", DESCRIPTION, add_train_arguments, args,
                               check=check_train_arguments)
    return int(run_train(sub_args) or 0)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` subcommand's options to ``parser``.

    ``-m/--model`` (alias ``--init``) is the model to start from, as in every
    other command; ``--arch`` builds a randomly initialised model instead.
    Parse into a :class:`TrainConfig` with :func:`config_from_args`.
    """
    from napari_sam.training.config import (
        _CHOICES,
        _FLOAT_RANGE,
        _MIN_INT,
        TrainConfig,
        setting_fields,
    )

    d = TrainConfig()
    parser.add_argument("data", help="dataset folder (images/ + labels/, or x.png + x_labels.tif)")
    parser.add_argument("-o", "--out", "--output-dir", dest="output_dir", default=d.output_dir,
                        metavar="DIR",
                        help="run folder for checkpoints, config.json and log.jsonl; a folder "
                             "holding a run with the same settings is resumed "
                             "(default: %(default)s)")
    parser.add_argument("-m", "--model", "--init", dest="init", default=None, metavar="NAME|PATH",
                        help="model to start from: a name from 'napari-sam models list' or a "
                             "checkpoint file, e.g. an earlier run's last.safetensors "
                             "(default: the embedded default model, unless --arch)")
    parser.add_argument("--arch", dest="model", default=None, metavar="NAME|JSON",
                        help="train from scratch (random weights): a config name (vit_t, vit_b, "
                             "...) or a JSON SamConfig file such as configs/default_model.json; "
                             "not with --model (default: off)")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="torch device to train on: cpu, cuda, cuda:N or mps; a run "
                             "resumes on any device (default: cpu)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run folder that holds a run (deletes its "
                             "checkpoints, config.json and log.jsonl) (default: off)")
    parser.add_argument("--val-ids", default=None, metavar="FILE",
                        help="JSON list of validation ids, a JSON object {\"val\": [...], "
                             "\"train\": [...]}, or a text file with one id a line; these "
                             "images are left out of training (default: none)")
    help_of = {f.name: f.metadata["help"] for _, f in setting_fields()}  # the config's fields
    for name, typ in [*((k, int) for k in _MIN_INT), *((k, float) for k in _FLOAT_RANGE)]:
        help_text = help_of[name]
        parser.add_argument("--" + name.replace("_", "-"), type=typ, default=getattr(d, name),
                            metavar="N" if typ is int else "X",
                            help=f"{help_text} (default: %(default)s)")
    parser.add_argument("--num-threads", type=int, default=None, metavar="N",
                        help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--scale-range",
        type=float,
        nargs=2,
        default=d.scale_range,
        metavar=("MIN", "MAX"),
        help="zoom range of random crops, 1 = native resolution (default: %(default)s)",
    )
    parser.add_argument("--schedule", choices=_CHOICES["schedule"], default=d.schedule,
                        help="learning-rate decay after warm-up: cosine, step (x0.1 at 2/3 and "
                             "8/9 of the steps) or constant (default: %(default)s)")
    parser.add_argument("--point-mode", choices=_CHOICES["point_mode"], default=d.point_mode,
                        help="where correction clicks go in the error region "
                             "(default: %(default)s)")
    parser.add_argument("--freeze-encoder", action="store_true",
                        help="train the prompt encoder and mask decoder only (default: off)")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="no flips, rotations or intensity changes (default: augment)")
    parser.add_argument("--augment", dest="augment_preset", choices=_CHOICES["augment_preset"],
                        default=d.augment_preset,
                        help="augmentation preset: basic (flips, rotations, gamma, contrast, "
                             "inversion, blur, noise) or general (basic plus zoom 0.25-4x, "
                             "brightfield and H&E-like looks, anisotropic blur and noise, "
                             "16-bit and float ranges through the product's normalisation) "
                             "(default: %(default)s)")
    parser.add_argument(
        "--aux-dense",
        type=float,
        default=d.aux_dense,
        metavar="WEIGHT",
        help="train the model's AIS head (automatic instance segmentation; one is added to a "
        "model that has none) beside SAM's losses, with this weight on its dense loss "
        "(foreground, boundary, centre and boundary distances of every object). The head is "
        "saved inside the model's weights; 0 = off, a head the model has stays unchanged "
        "(default: 0, off)",
    )
    parser.add_argument("--head-only", action="store_true",
                        help="train the AIS head only (one is added to a model that has none): "
                             "the encoder runs without gradients, the prompt encoder and mask "
                             "decoder stay as they are, the only loss is the dense one and no "
                             "prompts are simulated; e.g. to add AIS to --model vit_b "
                             "(default: off)")
    parser.add_argument(
        "--cache-images",
        action="store_true",
        help="keep decoded images in memory (faster epochs; ~1 GB for DSB 2018) (default: off)",
    )


#: command-line spelling of TrainConfig fields whose option is not --<field>
_OPTION_OF = {"init": "--model", "model": "--arch", "output_dir": "--out",
              "augment_preset": "--augment"}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed :func:`add_train_arguments` options.

    Without ``--arch`` the run starts from ``--model`` (default: the embedded
    default model).
    """
    from napari_sam.training.config import TrainConfig, setting_fields

    names = {f.name for _, f in setting_fields()}
    kwargs = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if kwargs.get("model") is None and kwargs.get("init") is None:
        kwargs["init"] = "default"
    return TrainConfig(**kwargs)


def check_train_arguments(args: argparse.Namespace) -> None:
    """Reject option values that cannot train (the CLI turns this into exit code 2).

    Raises:
      InvalidInputError: naming the option, e.g. ``--steps must be an integer >= 1, got -5``.
    """
    from napari_sam.training.config import config_problems
    from napari_sam.training.trainer import training_device

    if getattr(args, "init", None) and getattr(args, "model", None):
        raise InvalidInputError("give --model (weights to start from) or --arch (train from "
                                "scratch), not both")
    device = getattr(args, "device", None)
    if device is not None:
        try:
            training_device(device)
        except InvalidInputError as err:
            raise InvalidInputError(f"--device: {err}") from None
    init = getattr(args, "init", None)
    if isinstance(init, str) and init.lower().endswith(".json"):
        raise InvalidInputError(f"--model {init} looks like an architecture config; pass it as "
                                "--arch to train from scratch (--model takes weights)")
    problems = config_problems(config_from_args(args))
    if problems:
        name, text = problems[0]
        raise InvalidInputError(f"{_OPTION_OF.get(name, '--' + name.replace('_', '-'))} {text}")

def run_train(args: argparse.Namespace) -> int:
    """Run training from parsed :func:`add_train_arguments` options; returns an exit code."""
    from napari_sam.training.trainer import log_to_stderr, train

    check_train_arguments(args)
    with log_to_stderr():  # the progress lines of the napari_sam.training logger
        path = train(config_from_args(args), overwrite=bool(getattr(args, "overwrite", False)),
                     device=getattr(args, "device", None))
    print(path)
    return 0
