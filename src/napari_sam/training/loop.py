"""Compatibility module: the training code now lives in

- :mod:`.config` (:class:`TrainConfig`, :func:`config_problems`),
- :mod:`.trainer` (:func:`train`, :func:`validate`, :func:`build_model`),
- :mod:`.optim` (:func:`learning_rate`, :func:`build_optimizer`),
- :mod:`.simulation` (:class:`ObjectBatch`, :func:`collect_objects`, :func:`run_rounds`),
- :mod:`.run_folder` (run folder checks, resume, checkpoints),
- :mod:`.datasets` (:func:`load_ids`),

and the ``train`` subcommand's options in :mod:`napari_sam.cli.train`. Import
from those modules; these names stay importable from here for older code.
"""

from __future__ import annotations

from .config import RESUMABLE_CHANGES, TrainConfig, config_problems, validate_config
from .datasets import load_ids
from .optim import learning_rate
from .simulation import ObjectBatch, collect_objects, run_rounds
from .trainer import build_model, train, train_step, validate

__all__ = [
    "RESUMABLE_CHANGES",
    "ObjectBatch",
    "TrainConfig",
    "build_model",
    "collect_objects",
    "config_problems",
    "learning_rate",
    "load_ids",
    "run_rounds",
    "train",
    "train_step",
    "validate",
    "validate_config",
]
