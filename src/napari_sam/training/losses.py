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

__all__ = [
    "SamLoss",
    "dice_loss",
    "focal_loss",
    "logits_mask_iou",
    "object_windows",
    "sam_loss",
    "soft_targets",
]


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    window: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid focal loss, averaged over the last two (pixel) dimensions.

    Arguments:
      logits: (..., H, W) mask logits.
      targets: (..., H, W) targets in [0, 1] (soft targets allowed).
      alpha: weight of positives (``1 - alpha`` for negatives); < 0 disables.
      window: optional (..., H, W) 0/1 map (broadcastable): average over it only.

    Returns:
      (...) per-mask loss.
    """
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if window is None:
        return loss.mean(dim=(-2, -1))
    window = window.expand_as(loss)
    return (loss * window).sum(dim=(-2, -1)) / window.sum(dim=(-2, -1)).clamp(min=1)


def dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    eps: float = 1.0,
    window: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)`` per mask.

    Arguments:
      logits: (..., H, W) mask logits (``p = sigmoid(logits)``).
      targets: (..., H, W) targets in [0, 1].
      window: optional (..., H, W) 0/1 map (broadcastable): sums over it only.

    Returns:
      (...) per-mask loss.
    """
    prob = torch.sigmoid(logits)
    if window is not None:
        prob = prob * window
        targets = targets * window
    prob = prob.flatten(-2)
    targets = targets.flatten(-2)
    inter = (prob * targets).sum(-1)
    return 1 - (2 * inter + eps) / (prob.sum(-1) + targets.sum(-1) + eps)


def logits_mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
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


def object_windows(targets: torch.Tensor, factor: float, min_side: int = 8) -> torch.Tensor:
    """(K, h, w) targets -> (K, h, w) float 0/1 windows around each object.

    Each window is the object's bounding box scaled by ``factor`` about its
    centre (each side at least ``min_side`` pixels), clipped to the map. An
    empty target gives the whole map.
    """
    h, w = targets.shape[1:]
    fg = targets > 0
    rows, cols = fg.any(2), fg.any(1)
    ar_h = torch.arange(h, device=targets.device, dtype=torch.float32)
    ar_w = torch.arange(w, device=targets.device, dtype=torch.float32)

    def span(any_: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
        """(K, n) rows/cols holding the object -> (K, n) inside its scaled extent."""
        lo = torch.where(any_, ar, torch.full_like(ar, ar.numel())).amin(1)
        hi = torch.where(any_, ar, torch.full_like(ar, -1)).amax(1)
        centre, half = (lo + hi) / 2, ((hi - lo + 1) * factor).clamp(min=min_side) / 2
        empty = hi < lo
        return ((ar[None] - centre[:, None]).abs() <= half[:, None]) | empty[:, None]

    in_r, in_c = span(rows, ar_h), span(cols, ar_w)
    return (in_r[:, :, None] & in_c[:, None, :]).float()


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
    window: torch.Tensor | None = None,
) -> SamLoss:
    """SAM's loss for C mask outputs per object.

    Arguments:
      mask_logits: (K, C, h, w) low-resolution mask logits.
      iou_pred: (K, C) predicted IoUs.
      targets: (K, h, w) targets in [0, 1] (see :func:`soft_targets`).
      focal_alpha, focal_gamma: see :func:`focal_loss`.
      window: optional (K, h, w) 0/1 maps (:func:`object_windows`): the mask
        losses count only these pixels (a curriculum for small objects; the
        reported IoU is always over the whole map).

    Returns:
      :class:`SamLoss`; only the lowest-loss mask of each object contributes
      to the mask loss, every output to the IoU loss.
    """
    t = targets.unsqueeze(1).expand_as(mask_logits)
    win = None if window is None else window.unsqueeze(1)
    focal = focal_loss(mask_logits, t, focal_alpha, focal_gamma, win)
    dice = dice_loss(mask_logits, t, window=win)
    per_mask = focal_weight * focal + dice_weight * dice  # (K, C)
    best = per_mask.detach().argmin(1)
    rows = torch.arange(mask_logits.shape[0], device=mask_logits.device)
    with torch.no_grad():
        actual = logits_mask_iou(mask_logits, t)
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
