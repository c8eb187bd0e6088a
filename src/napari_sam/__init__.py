"""napari-sam: Segment Anything for napari and Python.

Public API (imported lazily, so ``import napari_sam`` stays cheap and never
imports napari)::

    from napari_sam import load_model, list_models, Predictor, AutomaticMaskGenerator
    from napari_sam import InstanceSegmenter, AisSettings  # automatic instance segmentation
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "napari_sam.models.zoo",
    "list_models": "napari_sam.models.zoo",
    "Predictor": "napari_sam.engine.predictor",
    "AutomaticMaskGenerator": "napari_sam.engine.everything",
    "InstanceSegmenter": "napari_sam.engine.ais",
    "AisSettings": "napari_sam.engine.ais",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_sam' has no attribute {name!r}")
