"""Dense auxiliary supervision of the image embedding (``--aux-dense``).

SAM's losses reach the image encoder only through the mask decoder, for a few
prompted objects per image. A small model trained from scratch on a few
hundred images learns slowly that way. Here a light head on the image
embedding predicts four per-pixel maps of *every* object at the mask
decoder's low resolution (L = 4 x the embedding size):

0. foreground: inside any object;
1. boundary: object pixels with a 4-neighbour of another id (object or background);
2. centre proximity: ``1 - d / d_max`` with ``d`` the distance to the object's
   centre (its innermost pixel, the maximum of the distance to its boundary)
   and ``d_max`` the largest such distance in the object; 0 outside objects;
3. boundary distance: distance to the object's boundary over its largest
   value in the object (1 at the innermost pixel); 0 outside objects.

Targets are computed at model resolution S (row, col) and area-averaged down
to L, so they are soft values in [0, 1]. The loss is binary cross-entropy
plus soft Dice per channel, over the valid (unpadded) region only.

The head is the model's AIS head (:class:`~napari_sam.models.ais_head.AisHead`,
``model.ais_head``): it is trained inside the model and saved with its weights
(``ais_head.*`` keys), so a run's ``last.safetensors`` has automatic instance
segmentation at once. :func:`attach_ais_head` decides whether a run trains it
(``aux_dense > 0`` beside SAM's losses, or ``head_only``) and adds one to a
model that has none; a model whose head is not trained keeps it unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from napari_sam.errors import InvalidInputError
from napari_sam.models.ais_head import AisHead

__all__ = [
    "DENSE_CHANNELS",
    "DenseHead",
    "add_ais_head",
    "attach_ais_head",
    "aux_backward",
    "dense_loss",
    "dense_targets",
    "dense_targets_batch",
    "full_res_targets",
    "valid_mask",
]

DENSE_CHANNELS = ("foreground", "boundary", "center", "boundary_distance")


def _boundary(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: object pixels with a 4-neighbour of another id (edges padded by copy)."""
    p = np.pad(labels, 1, mode="edge")
    c = p[1:-1, 1:-1]
    diff = (
        (p[:-2, 1:-1] != c) | (p[2:, 1:-1] != c) | (p[1:-1, :-2] != c) | (p[1:-1, 2:] != c)
    )
    return diff & (c > 0)


def full_res_targets(labels: np.ndarray) -> np.ndarray:
    """(4, H, W) float32 targets of an (H, W) instance label image (channels in the module doc)."""
    labels = np.asarray(labels)
    fg = labels > 0
    out = np.zeros((4,) + labels.shape, dtype=np.float32)
    if not fg.any():
        return out
    boundary = _boundary(labels)
    out[0] = fg
    out[1] = boundary
    # distance to the nearest boundary or background pixel; boundary pixels get 1 so that
    # every object pixel is > 0. Inside an object the nearest such pixel is on its own
    # boundary (its boundary encloses it), so one transform serves all objects.
    dist = ndimage.distance_transform_edt(fg & ~boundary).astype(np.float32) + fg
    ids = np.unique(labels[fg])
    lut_max = np.zeros(int(ids.max()) + 1, dtype=np.float32)
    lut_max[ids] = ndimage.maximum(dist, labels, ids)
    out[3] = np.where(fg, dist / np.maximum(lut_max[labels], 1e-6), 0.0)
    # centre: the innermost pixel of each object
    centres = np.asarray(ndimage.maximum_position(dist, labels, ids), dtype=np.float32)
    lut_r = np.zeros_like(lut_max)
    lut_c = np.zeros_like(lut_max)
    lut_r[ids], lut_c[ids] = centres[:, 0], centres[:, 1]
    rr, cc = np.indices(labels.shape, dtype=np.float32)
    d = np.hypot(rr - lut_r[labels], cc - lut_c[labels])
    d = np.where(fg, d, 0.0)
    lut_dmax = np.zeros_like(lut_max)
    lut_dmax[ids] = ndimage.maximum(d, labels, ids)
    dmax = lut_dmax[labels]
    out[2] = np.where(fg, 1.0 - np.where(dmax > 0, d / np.maximum(dmax, 1e-6), 0.0), 0.0)
    return out


def dense_targets(labels: np.ndarray | torch.Tensor, low_res_size: int) -> torch.Tensor:
    """Dense targets of one label image at the decoder's low resolution.

    Arguments:
      labels: (S, S) integer instance ids at model resolution (0 = background
        and padding), e.g. :attr:`~napari_sam.training.datasets.Sample.labels`.
      low_res_size: L, the side of the output grid (S / L pixels per cell).

    Returns:
      (4, L, L) float32 soft targets in [0, 1], channels :data:`DENSE_CHANNELS`.
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.numpy()
    full = torch.from_numpy(full_res_targets(np.asarray(labels)))
    return F.adaptive_avg_pool2d(full, int(low_res_size))


def valid_mask(input_size: tuple[int, int], img_size: int, low_res_size: int) -> torch.Tensor:
    """(L, L) float 0/1 map of the low-res cells inside the unpadded ``(h, w)`` region.

    A cell counts when its centre lies inside the region (row, col; padding is
    at the bottom/right as in :class:`~napari_sam.training.datasets.Sample`).
    """
    h, w = input_size
    centres = (torch.arange(low_res_size, dtype=torch.float32) + 0.5) * (img_size / low_res_size)
    return ((centres[:, None] < h) & (centres[None, :] < w)).float()


def dense_targets_batch(
    labels: Sequence[torch.Tensor],
    input_sizes: Sequence[tuple[int, int]],
    low_res_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and valid maps of a batch: ``(B, 4, L, L)`` and ``(B, 1, L, L)``."""
    img_size = int(labels[0].shape[-1])
    targets = torch.stack([dense_targets(x, low_res_size) for x in labels])
    valid = torch.stack([valid_mask(hw, img_size, low_res_size) for hw in input_sizes])
    return targets, valid[:, None]


#: the old name of :class:`~napari_sam.models.ais_head.AisHead` (one definition, kept importable)
DenseHead = AisHead


def dense_loss(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """BCE + soft Dice per channel, averaged over channels and images.

    Arguments:
      logits: (B, K, L, L) head output.
      targets: (B, K, L, L) soft targets in [0, 1].
      valid: optional (B, 1, L, L) 0/1 map; pixels outside do not count.

    Returns:
      scalar loss.
    """
    if valid is None:
        valid = torch.ones_like(targets[:, :1])
    valid = valid.expand_as(targets)
    n = valid.sum(dim=(-2, -1)).clamp(min=1)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    bce = (bce * valid).sum(dim=(-2, -1)) / n
    prob = torch.sigmoid(logits) * valid
    t = targets * valid
    dice = 1 - (2 * (prob * t).sum(dim=(-2, -1)) + 1) / (
        prob.sum(dim=(-2, -1)) + t.sum(dim=(-2, -1)) + 1
    )
    return (bce + dice).mean()


def add_ais_head(model: nn.Module, hidden: int) -> AisHead:
    """Give ``model`` (which has no head) a new AIS head of width ``hidden`` on its device;
    ``model.config`` records the width, so that its saved weights load with the head."""
    head = AisHead(int(model.prompt_encoder.embed_dim), hidden)
    head.to(next(model.parameters()).device)
    model.ais_head = head
    if getattr(model, "config", None) is not None:
        model.config = dataclasses.replace(model.config, ais_head_hidden=hidden)
    return head


def attach_ais_head(
    model: nn.Module, config: Any, optimizer: torch.optim.Optimizer,
) -> nn.Module | None:
    """The AIS head that a run trains (``model.ais_head``), or None when it trains none.

    A run trains the head when ``config.aux_dense > 0`` (the dense loss beside
    SAM's, weighted) or ``config.head_only``. A model without a head then gets a
    new :class:`~napari_sam.models.ais_head.AisHead` of width
    ``config.ais_head_hidden`` on the model's device (``model.config`` records
    it, so the saved weights load with the head). The trained head's parameters
    join ``optimizer`` as one group without weight decay; an existing head that
    is not trained is frozen, so it is saved unchanged.

    Raises:
      InvalidInputError: ``config.aux_dense`` is negative or not finite.
    """
    weight = float(config.aux_dense)
    if not math.isfinite(weight) or weight < 0:
        raise InvalidInputError(f"aux_dense must be a finite weight >= 0 (0 = off), got {weight}.")
    head = getattr(model, "ais_head", None)
    if weight == 0 and not config.head_only:
        if head is not None:
            head.requires_grad_(False)
        return None
    if head is None:
        head = add_ais_head(model, int(config.ais_head_hidden))
    head.requires_grad_(True)
    optimizer.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0})
    return head


def aux_backward(
    head: nn.Module,
    leaf: torch.Tensor,
    labels: Sequence[torch.Tensor],
    input_sizes: Sequence[tuple[int, int]],
    low_res_size: int,
    weight: float,
) -> float:
    """Back-propagate ``weight *`` the dense loss of ``head(leaf)`` (into ``leaf.grad`` when
    ``leaf`` requires grad, and into the head); returns the unweighted loss.

    Arguments:
      leaf: (B, C, E, E) image embeddings; ``labels`` (B of (S, S)) and
        ``input_sizes`` (B of (h, w)) are the images' label maps and valid sizes.
    """
    targets, valid = dense_targets_batch(labels, input_sizes, low_res_size)
    loss = dense_loss(head(leaf), targets.to(leaf.device), valid.to(leaf.device))
    (loss * weight).backward()
    return float(loss.detach())
