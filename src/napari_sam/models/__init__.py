"""napari_sam.models: SAM / MobileSAM torch modules, configs, checkpoints and the model zoo.

Models speak SAM's conventions: (x, y) pixel coordinates in the resized model
input frame, images normalised and padded to ``img_size`` by ``Sam.preprocess``.
"""

from .build import (
    MODEL_CONFIGS,
    SamConfig,
    TinyViTEncoderConfig,
    ViTEncoderConfig,
    build_sam,
    config_from_state_dict,
)
from .sam import Sam

__all__ = [
    "MODEL_CONFIGS",
    "Sam",
    "SamConfig",
    "TinyViTEncoderConfig",
    "ViTEncoderConfig",
    "build_sam",
    "config_from_state_dict",
]
