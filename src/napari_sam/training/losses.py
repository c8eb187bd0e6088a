"""SAM's training losses.

The mask loss is ``20 * focal + 1 * dice`` (focal with alpha 0.25, gamma 2), the
IoU-prediction loss the mean squared error between the predicted IoU and the
IoU of the predicted mask (``logits > 0``) with the target.

Resolution: losses are computed on the mask decoder's low-resolution logits
(``4 *`` the embedding size, e.g. 64x64 for a 256 px patch-16 model) against
a *soft* target, the fraction of each low-resolution pixel covered by the
object at model resolution (area average). This is cheap and does not lose
small objects the way nearest downsampling would. The "actual IoU" uses the
target binarised at 0.5.

For ambiguous prompts the decoder returns C = 3 masks: only the one with the
lowest mask loss is back-propagated, the IoU head is trained on all C.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from napari_sam.errors import InvalidInputError

__all__ = ["SamLoss", "dice_loss", "focal_loss", "mask_iou", "sam_loss", "soft_targets"]


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss, averaged over the last two (pixel) dimensions.

    Arguments:
      logits: (..., H, W) mask logits.
      targets: (..., H, W) targets in [0, 1] (soft targets allowed).
      alpha: weight of positives (``1 - alpha`` for negatives); < 0 disables.

    Returns:
      (...) per-mask loss.
    """
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean(dim=(-2, -1))


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)`` per mask.

    Arguments:
      logits: (..., H, W) mask logits (``p = sigmoid(logits)``).
      targets: (..., H, W) targets in [0, 1].

    Returns:
      (...) per-mask loss.
    """
    prob = torch.sigmoid(logits).flatten(-2)
    targets = targets.flatten(-2)
    inter = (prob * targets).sum(-1)
    return 1 - (2 * inter + eps) / (prob.sum(-1) + targets.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with ``targets > 0.5`` per mask, (..., H, W) -> (...).

    Both empty gives IoU 1.
    """
    pred = (logits > 0).flatten(-2)
    gt = (targets > 0.5).flatten(-2)
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def soft_targets(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(K, S, S) bool masks -> (K, size, size) float coverage (area average).

    ``S`` must be a multiple of ``size``.
    """
    side = masks.shape[-1]
    x = masks.float()
    if side == size:
        return x
    if side % size:
        raise InvalidInputError(f"mask size {side} is not a multiple of the target size {size}")
    return F.avg_pool2d(x.unsqueeze(1), side // size).squeeze(1)


@dataclasses.dataclass
class SamLoss:
    """Result of :func:`sam_loss`.

    Attributes:
      total: scalar ``mean(mask_weighted) + iou_weight * mean(iou_mse)``.
      focal, dice: (K,) of the selected mask of each object.
      iou_mse: (K,) MSE of the IoU head, averaged over the C outputs.
      best: (K,) int64 index of the selected (lowest-loss) mask.
      iou: (K,) actual IoU of the selected mask (detached).
    """

    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou_mse: torch.Tensor
    best: torch.Tensor
    iou: torch.Tensor


def sam_loss(
    mask_logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> SamLoss:
    """SAM's loss for C mask outputs per object.

    Arguments:
      mask_logits: (K, C, h, w) low-resolution mask logits.
      iou_pred: (K, C) predicted IoUs.
      targets: (K, h, w) targets in [0, 1] (see :func:`soft_targets`).
      focal_alpha, focal_gamma: see :func:`focal_loss`.

    Returns:
      :class:`SamLoss`; only the lowest-loss mask of each object contributes
      to the mask loss, every output to the IoU loss.
    """
    t = targets.unsqueeze(1).expand_as(mask_logits)
    focal = focal_loss(mask_logits, t, focal_alpha, focal_gamma)
    dice = dice_loss(mask_logits, t)
    per_mask = focal_weight * focal + dice_weight * dice  # (K, C)
    best = per_mask.detach().argmin(1)
    rows = torch.arange(mask_logits.shape[0])
    with torch.no_grad():
        actual = mask_iou(mask_logits, t)
    iou_mse = ((iou_pred - actual) ** 2).mean(1)
    total = per_mask[rows, best].mean() + iou_weight * iou_mse.mean()
    return SamLoss(
        total=total,
        focal=focal[rows, best].detach(),
        dice=dice[rows, best].detach(),
        iou_mse=iou_mse.detach(),
        best=best,
        iou=actual[rows, best],
    )
