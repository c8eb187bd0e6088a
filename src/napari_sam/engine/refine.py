"""Native-resolution refinement of predicted masks (:mod:`napari_sam.models.mask_refiner`).

For each predicted mask, a square **window** of the original image is chosen around
the mask, the positive points and the box (their bounding box, enlarged by half and
by 4 pixels, at least :data:`MIN_WINDOW` pixels wide, centred on them; it may reach
past the image, where it reads zeros). The window's pixels, the decoder's mask
probability and the point maps are resampled to the refiner's grid (area averaging
when the window is larger than the grid, bilinear when smaller), the refiner redraws
the mask there, and its logits are resampled back (bilinear) into the window. Outside
the window the decoder's logits are kept (the decoder's mask lies inside it).

Training (:mod:`napari_sam.training.refiner`) builds its samples with the same
functions, so what the refiner learns is what it is given here.

Coordinates: points ``(row, col)`` in image pixels, boxes ``(row0, col0, row1, col1)``
with inclusive corners, windows ``(row0, col0, side)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.models.mask_refiner import REFINER_CROP
from napari_sam.models.sam import PIXEL_MEAN, PIXEL_STD

__all__ = ["MIN_WINDOW", "paste_window", "refine_logits", "refine_window", "window_features"]

#: the smallest window side (image pixels): a click on nothing still sees its context
MIN_WINDOW = 24
_MARGIN = 0.5
_CLICK_SIGMA = 2.0  # refiner-grid pixels

Window = tuple[int, int, int]


def refine_window(
    mask: np.ndarray | None, points: np.ndarray | None = None, box: np.ndarray | None = None,
) -> Window:
    """The square window ``(row0, col0, side)`` around a mask, points and a box.

    Arguments:
      mask: (H, W) bool, or None.
      points: (N, 2) ``(row, col)`` points (positive ones), or None.
      box: (4,) inclusive ``(row0, col0, row1, col1)``, or None.

    At least one of them must hold something; an empty mask with no point nor
    box gives a window of :data:`MIN_WINDOW` at the origin.
    """
    rows: list[float] = []
    cols: list[float] = []
    if mask is not None and mask.any():
        r = np.flatnonzero(mask.any(1))
        c = np.flatnonzero(mask.any(0))
        rows += [r[0], r[-1]]
        cols += [c[0], c[-1]]
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        rows += list(pts[:, 0])
        cols += list(pts[:, 1])
    if box is not None:
        rows += [box[0], box[2]]
        cols += [box[1], box[3]]
    if not rows:
        return 0, 0, MIN_WINDOW
    r0, r1, c0, c1 = min(rows), max(rows), min(cols), max(cols)
    side = max(r1 - r0 + 1, c1 - c0 + 1)
    side = int(np.ceil(max(side * (1 + _MARGIN) + 4, MIN_WINDOW)))
    return (int(round((r0 + r1) / 2 - side / 2)), int(round((c0 + c1) / 2 - side / 2)), side)


def _take(a: np.ndarray, window: Window) -> np.ndarray:
    """``a[row0:row0+side, col0:col0+side]`` with zeros outside ``a``."""
    r0, c0, side = window
    H, W = a.shape[:2]
    out = np.zeros((side, side) + a.shape[2:], a.dtype)
    rs, re, cs, ce = max(r0, 0), min(r0 + side, H), max(c0, 0), min(c0 + side, W)
    if rs < re and cs < ce:
        out[rs - r0:re - r0, cs - c0:ce - c0] = a[rs:re, cs:ce]
    return out


def _to_grid(a: np.ndarray) -> torch.Tensor:
    """(side, side[, C]) -> (C, S, S) float32: area average down, bilinear up."""
    t = torch.from_numpy(np.ascontiguousarray(a)).float()
    t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
    if t.shape[-1] > REFINER_CROP:
        t = F.interpolate(t, size=(REFINER_CROP, REFINER_CROP), mode="area")
    else:
        t = F.interpolate(t, size=(REFINER_CROP, REFINER_CROP), mode="bilinear",
                          align_corners=False)
    return t[0]


def _point_map(points: np.ndarray | None, window: Window) -> torch.Tensor:
    """(S, S) Gaussian bumps at ``points`` (image ``(row, col)``) on the window's grid."""
    S = REFINER_CROP
    out = torch.zeros(S, S)
    if points is None or len(points) == 0:
        return out
    r0, c0, side = window
    scale = S / side
    grid = torch.arange(S, dtype=torch.float32)
    for r, c in np.asarray(points, dtype=np.float64).reshape(-1, 2):
        y = (r - r0 + 0.5) * scale - 0.5
        x = (c - c0 + 0.5) * scale - 0.5
        bump = torch.exp(-((grid[:, None] - y) ** 2 + (grid[None, :] - x) ** 2)
                         / (2 * _CLICK_SIGMA ** 2))
        out = torch.maximum(out, bump)
    return out


def window_features(
    rgb: np.ndarray, logits: np.ndarray, window: Window,
    positive: np.ndarray | None = None, negative: np.ndarray | None = None,
) -> torch.Tensor:
    """The refiner's (6, S, S) float32 input for one mask (channels: see the model module).

    Arguments:
      rgb: (H, W, 3) uint8 image at its original size.
      logits: (H, W) float decoder logits at the original size.
      window: from :func:`refine_window`.
      positive, negative: (N, 2) ``(row, col)`` points, or None.
    """
    mean = np.asarray(PIXEL_MEAN, np.float32)
    std = np.asarray(PIXEL_STD, np.float32)
    image = _to_grid((_take(rgb.astype(np.float32), window) - mean) / std)
    logit = _to_grid(_take(np.asarray(logits, np.float32), window))[0]
    prob = torch.sigmoid(logit.clamp(-20, 20))
    return torch.cat([image, prob[None], _point_map(positive, window)[None],
                      _point_map(negative, window)[None]], 0)


def paste_window(logits: np.ndarray, refined: torch.Tensor, window: Window) -> np.ndarray:
    """``logits`` (H, W) with the window replaced by ``refined`` (S, S) resampled to it."""
    r0, c0, side = window
    up = F.interpolate(refined[None, None].float(), size=(side, side), mode="bilinear",
                       align_corners=False)[0, 0].numpy()
    H, W = logits.shape
    out = np.array(logits, dtype=np.float32, copy=True)
    rs, re, cs, ce = max(r0, 0), min(r0 + side, H), max(c0, 0), min(c0 + side, W)
    if rs < re and cs < ce:
        out[rs:re, cs:ce] = up[rs - r0:re - r0, cs - c0:ce - c0]
    return out


@torch.inference_mode()
def refine_logits(
    refiner: torch.nn.Module,
    rgb: np.ndarray,
    logits: np.ndarray,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    threshold: float = 0.0,
) -> np.ndarray:
    """Refine every predicted mask of a batch of prompts.

    Arguments:
      refiner: a :class:`~napari_sam.models.mask_refiner.MaskRefiner` (eval mode).
      rgb: (H, W, 3) uint8, the image the logits belong to.
      logits: (B, C, H, W) float32 decoder logits at the original size.
      points: (B, N, 2) ``(row, col)`` points of each prompt, or None.
      labels: (B, N) their labels (1 positive, 0 negative, -1 padding), or None.
      boxes: (B, 4) inclusive ``(row0, col0, row1, col1)`` boxes, or None.
      threshold: the mask threshold the window is taken from (the model's).

    Returns:
      (B, C, H, W) float32 logits: refined inside each mask's window.
    """
    B, C = logits.shape[:2]
    feats, windows = [], []
    for b in range(B):
        pos = neg = None
        if points is not None:
            lab = labels[b] if labels is not None else np.ones(len(points[b]))
            pos, neg = points[b][lab == 1], points[b][lab == 0]
        box = boxes[b] if boxes is not None else None
        for c in range(C):
            window = refine_window(logits[b, c] > threshold, pos, box)
            windows.append(window)
            feats.append(window_features(rgb, logits[b, c], window, pos, neg))
    device = next(refiner.parameters()).device
    refined = refiner(torch.stack(feats).to(device))[:, 0].float().cpu()
    out = np.empty(logits.shape, np.float32)
    for k, window in enumerate(windows):
        out[k // C, k % C] = paste_window(logits[k // C, k % C], refined[k], window)
    return out
