"""Everything-mode's intermediate masks: :class:`MaskBatch`, filtered and concatenated
as a unit (like SAM's ``MaskData``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["CroppedMask", "MaskBatch"]

#: a bool mask cut to its bounding box, and the (row, col) of its top-left pixel
CroppedMask = tuple[torch.Tensor, tuple[int, int]]


@dataclass
class MaskBatch:
    """N candidate masks of everything-mode, one entry per mask in every field.

    Attributes:
      masks: N cropped masks: (h, w) bool tensors and their (row0, col0) origin
        (in the crop's frame, then the image's).
      iou: (N,) float32 predicted IoU.
      stability: (N,) float32 stability score.
      points: (N, 2) float64 (x, y) prompt points.
      boxes: (N, 4) int64 (x0, y0, x1, y1) boxes, corners inclusive (SAM's).
      crop_boxes: (N, 4) int64 (x0, y0, x1, y1) crop of each mask (x1, y1
        exclusive), None until the masks of a crop are placed in the image.
    """

    masks: list[CroppedMask]
    iou: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor
    boxes: torch.Tensor
    crop_boxes: torch.Tensor | None = None

    @classmethod
    def empty(cls) -> MaskBatch:
        """No masks."""
        return cls(
            masks=[],
            iou=torch.zeros(0),
            stability=torch.zeros(0),
            points=torch.zeros(0, 2, dtype=torch.float64),
            boxes=torch.zeros(0, 4, dtype=torch.int64),
        )

    def __len__(self) -> int:
        return len(self.iou)

    @classmethod
    def cat(cls, parts: Sequence[MaskBatch]) -> MaskBatch:
        """The masks of ``parts`` in order, tensors on the CPU (empty for no parts)."""
        if not parts:
            return cls.empty()
        crop_boxes = None
        if parts[0].crop_boxes is not None:
            crop_boxes = torch.cat([p.crop_boxes.cpu() for p in parts])
        return cls(
            masks=[m for p in parts for m in p.masks],
            iou=torch.cat([p.iou.cpu() for p in parts]),
            stability=torch.cat([p.stability.cpu() for p in parts]),
            points=torch.cat([p.points.cpu() for p in parts]),
            boxes=torch.cat([p.boxes.cpu() for p in parts]),
            crop_boxes=crop_boxes,
        )

    def filter(self, keep: torch.Tensor) -> MaskBatch:
        """The masks ``keep`` selects: a bool (N,) mask or int indices, in their order."""
        keep = keep.cpu()
        if keep.dtype == torch.bool:
            keep = torch.nonzero(keep).flatten()
        return MaskBatch(
            masks=[self.masks[i] for i in keep.tolist()],
            iou=self.iou[keep],
            stability=self.stability[keep],
            points=self.points[keep],
            boxes=self.boxes[keep],
            crop_boxes=None if self.crop_boxes is None else self.crop_boxes[keep],
        )
