"""napari_sam.engine: numpy in, numpy out (no napari imports).

Coordinates are (row, col) image-data pixels; boxes (row0, col0, row1, col1).

    from napari_sam.engine import Predictor, to_rgb_uint8, EmbeddingCache

Names are imported lazily, so importing one engine module does not import
the others.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "to_rgb_uint8": "napari_sam.engine.image",
    "ImageTransform": "napari_sam.engine.transforms",
    "EmbeddingCache": "napari_sam.engine.cache",
    "CacheEntry": "napari_sam.engine.cache",
    "EmbeddedImage": "napari_sam.engine.cache",
    "image_key": "napari_sam.engine.cache",
    "Predictor": "napari_sam.engine.predictor",
    "Prediction": "napari_sam.engine.predictor",
    "InstanceSegmenter": "napari_sam.engine.ais",
    "AisSettings": "napari_sam.engine.ais",
    "EmbeddingStore": "napari_sam.engine.store",
    "iter_embed": "napari_sam.engine.store",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_sam.engine' has no attribute {name!r}")
