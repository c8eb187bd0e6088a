"""Training SAM on instance-segmentation data (prompt simulation, losses, loop).

Main entry point: :func:`train` with a :class:`TrainConfig` (see
:mod:`napari_sam.training.trainer` and :mod:`napari_sam.training.config`).
"""

from .config import TrainConfig
from .datasets import InstanceDataset, find_pairs, split_ids
from .trainer import train

__all__ = [
    "InstanceDataset",
    "TrainConfig",
    "find_pairs",
    "split_ids",
    "train",
]
