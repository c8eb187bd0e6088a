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
from .checkpoint import load_state_dict, load_weights, model_from_checkpoint, save_model
from .sam import Sam
from .zoo import (
    ZOO,
    ModelInfo,
    cache_dir,
    download_checkpoint,
    list_models,
    load_model,
    model_info,
    resolve_device,
)

__all__ = [
    "MODEL_CONFIGS",
    "ZOO",
    "ModelInfo",
    "Sam",
    "SamConfig",
    "TinyViTEncoderConfig",
    "ViTEncoderConfig",
    "build_sam",
    "cache_dir",
    "config_from_state_dict",
    "download_checkpoint",
    "list_models",
    "load_model",
    "load_state_dict",
    "load_weights",
    "model_from_checkpoint",
    "model_info",
    "resolve_device",
    "save_model",
]
