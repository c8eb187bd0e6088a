"""PIL-based stand-ins for ``torchvision.transforms.functional.resize/to_pil_image``.

Only the code paths the reference SAM packages use are covered: a numpy
uint8 HWC (or HW) array to a PIL image, and resizing a PIL image to an
explicit ``(h, w)`` with bilinear interpolation (what torchvision does for PIL
input: ``img.resize((w, h), BILINEAR)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def to_pil_image(pic, mode: str | None = None) -> Image.Image:
    """numpy (H, W[, C]) array -> PIL image."""
    if isinstance(pic, Image.Image):
        return pic
    arr = np.asarray(pic)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"pic should be 2/3 dimensional, got {arr.ndim} dimensions")
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def resize(img, size, interpolation=None, max_size=None, antialias=True):
    """Resize a PIL image to ``size`` = (h, w) (or shorter side = int) bilinearly."""
    if not isinstance(img, Image.Image):
        raise TypeError("this test stand-in only resizes PIL images")
    if isinstance(size, int) or (isinstance(size, Sequence) and len(size) == 1):
        s = size if isinstance(size, int) else size[0]
        w, h = img.size
        size = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
    h, w = int(size[0]), int(size[1])
    resample = Image.BILINEAR if interpolation is None else interpolation
    if (w, h) == img.size:
        return img
    return img.resize((w, h), resample)
