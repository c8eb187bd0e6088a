"""Training SAM on instance-segmentation data (prompt simulation, losses, loop).

Main entry point: :func:`train` with a :class:`TrainConfig` (see
:mod:`napari_sam.training.loop`).
"""

from .datasets import InstanceDataset, find_pairs, split_ids
from .loop import TrainConfig, train

__all__ = [
    "InstanceDataset",
    "TrainConfig",
    "find_pairs",
    "split_ids",
    "train",
]
