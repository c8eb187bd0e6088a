"""Sample data for napari's File > Open Sample menu."""

from __future__ import annotations

from importlib import resources
from typing import Any

import numpy as np

__all__ = ["nuclei", "nuclei_labels"]


def _read_png(name: str) -> np.ndarray:
    from skimage.io import imread

    with resources.as_file(resources.files("napari_sam") / "data" / name) as path:
        return np.asarray(imread(path))


def _attribution() -> str:
    return (resources.files("napari_sam") / "data" / "ATTRIBUTION.md").read_text(encoding="utf-8")


def nuclei() -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Fluorescence nuclei (520 x 696 uint8, DSB2018 stage-1, CC0) as napari layer data."""
    meta = {"source": "2018 Data Science Bowl (BBBC038v1), CC0 1.0", "attribution": _attribution()}
    return [(_read_png("nuclei.png"), {"name": "nuclei", "metadata": meta})]


def nuclei_labels() -> np.ndarray:
    """The ground-truth instance labels of :func:`nuclei` (uint16, 0 = background)."""
    return _read_png("nuclei_labels.png")
