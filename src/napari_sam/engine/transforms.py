"""Image conventions: geometry between image pixels and a model family's input frame.

Each model family has one convention object, chosen by :func:`transform_for`:

* SAM / MobileSAM (:class:`ImageTransform`): the image is resized so that its
  longest side is ``target_length`` (1024 for the official models; PIL bilinear
  on uint8) and zero-padded at the bottom/right to a square; low-res logits are
  resized bilinearly to the padded input, cropped and resized bilinearly to the
  original size (:func:`~napari_sam.engine.upsample.upscale_logits`).
* EfficientSAM (:class:`StretchTransform`): the image is stretched to
  ``target_length`` x ``target_length`` without keeping the aspect ratio
  (torch bilinear, ``align_corners=False``, on float values) and nothing is
  padded; low-res logits are resized bicubically straight to the original size.

Both normalise with the ImageNet mean/std (the model's ``preprocess``). This
module is the single place where the engine's (row, col) image-pixel
coordinates become the model's (x, y) coordinates:

    x = col * (w / W),   y = row * (h / H)

with ``(H, W)`` the original and ``(h, w)`` the resized image size (``(h, w) =
(S, S)`` for a stretch). There is no half-pixel shift here: a prompt at
(row, col) = (3, 5) means the same pixel that SAM users address as
(x, y) = (5, 3); the prompt encoder adds the shift to the pixel centre itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from napari_sam.engine.upsample import upscale_logits
from napari_sam.errors import InvalidInputError

__all__ = ["ImageTransform", "StretchTransform", "transform_for"]


def transform_for(model: Any) -> ImageTransform:
    """The image convention of ``model``: :class:`StretchTransform` for a model whose
    ``image_convention`` is ``"stretch"`` (EfficientSAM), else SAM's :class:`ImageTransform`."""
    size = model.image_encoder.img_size
    if getattr(model, "image_convention", "resize_longest") == "stretch":
        return StretchTransform(size)
    return ImageTransform(size)


class ImageTransform:
    """SAM's convention: resize-longest-side geometry for a model input of
    ``target_length`` pixels, padded at the bottom/right."""

    #: :func:`~napari_sam.engine.upsample.stability_upper_bound` follows this upscaling
    bilinear_upscale = True

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

    def model_input(self, rgb: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, h, w) float32 0..255 on ``device``, resized (the model's
        ``preprocess`` normalises and pads)."""
        resized = self.resize_image(rgb)  # (h, w, 3) uint8
        x = torch.from_numpy(resized).to(device)
        return x.permute(2, 0, 1).contiguous()[None].float()

    def upscale(
        self,
        low_res: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        threshold: float | None = None,
        work: dict | None = None,
    ) -> torch.Tensor:
        """(B, C, 4E, 4E) low-res logits -> (B, C, H, W) logits at ``original_size``, or the
        bool masks ``logits > threshold``: :func:`~napari_sam.engine.upsample.upscale_logits`."""
        return upscale_logits(low_res, self.target_length, input_size, original_size,
                              threshold=threshold, work=work)

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


class StretchTransform(ImageTransform):
    """EfficientSAM's convention: the image is stretched to ``target_length`` squared.

    ``input_size`` is always (S, S); points scale as ``x = col * S / W``,
    ``y = row * S / H`` (the same formulas as SAM's with (h, w) = (S, S)).
    """

    bilinear_upscale = False

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the original image -> (S, S)."""
        old_h, old_w = int(original_size[0]), int(original_size[1])
        if old_h <= 0 or old_w <= 0:
            raise InvalidInputError(f"Image size must be positive, got {(old_h, old_w)}.")
        return self.target_length, self.target_length

    def resize_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (S, S, 3) uint8, stretched (bilinear, rounded to uint8)."""
        x = self.model_input(image)[0].permute(1, 2, 0)
        return x.round().clamp(0, 255).to(torch.uint8).numpy()

    def model_input(self, rgb: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, S, S) float32 0..255 on ``device``: bilinear stretch
        (``align_corners=False``, no antialiasing) of the float values, as EfficientSAM does."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise InvalidInputError(
                f"model_input expects an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}; "
                "normalise it with napari_sam.engine.image.to_rgb_uint8 first."
            )
        s = self.target_length
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(device)
        x = x.permute(2, 0, 1)[None].float()
        if tuple(x.shape[-2:]) == (s, s):
            return x.contiguous()
        return F.interpolate(x, (s, s), mode="bilinear", align_corners=False)

    def upscale(
        self,
        low_res: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        threshold: float | None = None,
        work: dict | None = None,
    ) -> torch.Tensor:
        """(B, C, 4E, 4E) low-res logits -> (B, C, H, W): bicubic (``align_corners=False``)
        straight to ``original_size`` (the low-res frame is the whole stretched image);
        bool masks ``logits > threshold`` when a threshold is given (``work`` is unused)."""
        size = (int(original_size[0]), int(original_size[1]))
        logits = F.interpolate(low_res, size, mode="bicubic", align_corners=False)
        return logits if threshold is None else logits > threshold
