"""napari_sam.models: SAM / MobileSAM / EfficientSAM modules, configs, checkpoints, model zoo.

Models speak SAM's conventions: (x, y) pixel coordinates in the resized model
input frame, images normalised and padded to ``img_size`` by ``Sam.preprocess``
(EfficientSAM stretches the image to ``img_size`` instead; the engine's
``engine.transforms`` holds both conventions).

Names are imported lazily (as in :mod:`napari_sam.engine`): importing one
module (``models.kernels`` for the predictor, :data:`DEFAULT_MODEL` for the
widgets) does not import torch's model code, the checkpoint readers or the
zoo's downloader.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: name of the model used when none is given (embedded in the package; see models.zoo)
DEFAULT_MODEL = "default"

_LAZY = {
    **dict.fromkeys(
        ("MODEL_CONFIGS", "EfficientSamConfig", "SamConfig", "TinyViTEncoderConfig",
         "ViTEncoderConfig", "build_sam", "config_from_dict", "config_from_state_dict"),
        "napari_sam.models.build"),
    **dict.fromkeys(
        ("load_state_dict", "load_weights", "model_from_checkpoint", "save_model"),
        "napari_sam.models.checkpoint"),
    "Sam": "napari_sam.models.sam",
    "EfficientSam": "napari_sam.models.efficient_sam",
    **dict.fromkeys(
        ("ZOO", "ModelInfo", "cache_dir", "download_checkpoint", "list_models", "load_model",
         "model_info", "resolve_device"), "napari_sam.models.zoo"),
}

__all__ = ["DEFAULT_MODEL", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_sam.models' has no attribute {name!r}")
