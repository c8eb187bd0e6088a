"""Stand-in for ``torchvision.ops``."""

from .boxes import batched_nms, box_area, box_iou, nms

__all__ = ["batched_nms", "box_area", "box_iou", "nms"]
