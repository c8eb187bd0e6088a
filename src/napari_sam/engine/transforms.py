"""Geometry between image pixels and SAM's model-input frame.

SAM resizes an image so that its longest side is ``target_length`` (1024 for
the official models) and pads the rest. Prompts must follow the same resize.
This module is the single place where the engine's (row, col) image-pixel
coordinates become the model's (x, y) coordinates:

    x = col * (w / W),   y = row * (h / H)

with ``(H, W)`` the original and ``(h, w)`` the resized image size. There is
no half-pixel shift here: a prompt at (row, col) = (3, 5) means the same
pixel that SAM users address as (x, y) = (5, 3); the prompt encoder adds the
shift to the pixel centre itself.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from napari_sam.errors import InvalidInputError

__all__ = ["ImageTransform"]


class ImageTransform:
    """Resize-longest-side geometry for a model input of ``target_length`` pixels."""

    def __init__(self, target_length: int) -> None:
        if int(target_length) <= 0:
            raise InvalidInputError(f"target_length must be positive, got {target_length}.")
        self.target_length = int(target_length)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_length={self.target_length})"

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the original image -> (h, w) after resizing the longest side.

        Rounds half up (``int(x + 0.5)``) like the reference implementation.

        Raises:
          InvalidInputError: if a side would be resized to 0 pixels (aspect
            ratio beyond about ``2 * target_length : 1``).
        """
        old_h, old_w = int(original_size[0]), int(original_size[1])
        if old_h <= 0 or old_w <= 0:
            raise InvalidInputError(f"Image size must be positive, got {(old_h, old_w)}.")
        scale = self.target_length * 1.0 / max(old_h, old_w)
        new_h = int(old_h * scale + 0.5)
        new_w = int(old_w * scale + 0.5)
        if new_h == 0 or new_w == 0:
            raise InvalidInputError(
                f"An image of shape {(old_h, old_w)} is too elongated: resizing its longest side "
                f"to {self.target_length} px leaves the short side at 0 px. The aspect ratio "
                f"must be below about {2 * self.target_length}:1; crop the image into tiles "
                "closer to square first."
            )
        return new_h, new_w

    def resize_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear (PIL), longest side = target_length."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidInputError(
                f"resize_image expects an (H, W, 3) uint8 array, got {image.shape} {image.dtype}; "
                "normalise it with napari_sam.engine.image.to_rgb_uint8 first."
            )
        h, w = self.input_size(image.shape[:2])
        if (h, w) == image.shape[:2]:
            return np.ascontiguousarray(image)
        pil = Image.fromarray(np.ascontiguousarray(image))
        return np.array(pil.resize((w, h), Image.BILINEAR))

    def points_to_model(self, points_rc: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) (row, col) image pixels -> (..., 2) float64 (x, y) in the model frame."""
        points_rc = np.asarray(points_rc, dtype=np.float64)
        old_h, old_w = original_size
        new_h, new_w = self.input_size(original_size)
        xy = np.empty_like(points_rc)
        xy[..., 0] = points_rc[..., 1] * (new_w / old_w)
        xy[..., 1] = points_rc[..., 0] * (new_h / old_h)
        return xy

    def xy_to_model(self, points_xy: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) (x, y) = (col, row) image pixels -> (..., 2) float64 (x, y) in the model
        frame (SAM's own point order, as everything-mode's grids use it)."""
        points_xy = np.asarray(points_xy, dtype=np.float64)
        old_h, old_w = original_size
        new_h, new_w = self.input_size(original_size)
        return points_xy * np.array([new_w / old_w, new_h / old_h])

    def boxes_to_model(self, boxes_rc: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 4) (row0, col0, row1, col1) -> (..., 4) float64 (x0, y0, x1, y1), model frame."""
        boxes_rc = np.asarray(boxes_rc, dtype=np.float64)
        corners = self.points_to_model(boxes_rc.reshape(*boxes_rc.shape[:-1], 2, 2), original_size)
        return corners.reshape(boxes_rc.shape)
