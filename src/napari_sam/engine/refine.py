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

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.models.mask_refiner import REFINER_CROP
from napari_sam.models.sam import PIXEL_MEAN, PIXEL_STD

__all__ = [
    "MIN_WINDOW", "paste_window", "refine_logits", "refine_window", "window_features",
    "window_target",
]

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
    extent = None
    if mask is not None and mask.any():
        r = np.flatnonzero(mask.any(1))
        c = np.flatnonzero(mask.any(0))
        extent = (r[0], r[-1], c[0], c[-1])
    return _window(extent, points, box)


def _logit_window(
    logits: np.ndarray, threshold: float, points: np.ndarray | None, box: np.ndarray | None,
) -> Window:
    """:func:`refine_window` of the mask ``logits > threshold`` ((H, W) float), found by
    row and column maxima instead of a full-size boolean mask."""
    extent = None
    r = np.flatnonzero(logits.max(1) > threshold)
    if r.size:
        c = np.flatnonzero(logits[r[0]:r[-1] + 1].max(0) > threshold)
        extent = (r[0], r[-1], c[0], c[-1])
    return _window(extent, points, box)


def _window(
    extent: tuple[int, int, int, int] | None, points: np.ndarray | None, box: np.ndarray | None,
) -> Window:
    """The window around a mask's inclusive ``(row0, row1, col0, col1)`` extent (or
    None), points and a box (see :func:`refine_window`)."""
    rows: list[float] = []
    cols: list[float] = []
    if extent is not None:
        rows += [extent[0], extent[1]]
        cols += [extent[2], extent[3]]
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


def _to_grid(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(side, side[, C]) array or (C, side, side) tensor -> (C, S, S) float32: area
    average down, bilinear up."""
    if isinstance(a, torch.Tensor):
        t = a.float()[None]
    else:
        t = torch.from_numpy(np.ascontiguousarray(a)).float()
        t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
    if t.shape[-1] > REFINER_CROP:
        t = F.interpolate(t, size=(REFINER_CROP, REFINER_CROP), mode="area")
    else:
        t = F.interpolate(t, size=(REFINER_CROP, REFINER_CROP), mode="bilinear",
                          align_corners=False)
    return t[0]


def _point_maps(points: list[np.ndarray | None], windows: list[Window]) -> torch.Tensor:
    """(K, S, S) Gaussian bumps (sigma :data:`_CLICK_SIGMA` grid pixels, the maximum where
    they overlap) at ``points[k]`` (image ``(row, col)``, (N, 2) or None) on the grid of
    ``windows[k]``; all zeros for a window without points."""
    S, K = REFINER_CROP, len(windows)
    counts = [0 if p is None else len(p) for p in points]
    if max(counts, default=0) == 0:
        return torch.zeros(K, S, S)
    # (K, N) grid coordinates of every point; padding points lie far off the grid
    yx = np.full((K, max(counts), 2), 1e6)
    for k, ((r0, c0, side), pts) in enumerate(zip(windows, points, strict=True)):
        if counts[k]:
            rc = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
            yx[k, :counts[k]] = (rc - (r0, c0) + 0.5) * (S / side) - 0.5
    yx_t = torch.from_numpy(yx).float()
    grid = torch.arange(S, dtype=torch.float32)
    dy2 = (grid[None, None, :] - yx_t[..., 0:1]) ** 2  # (K, N, S) over rows
    dx2 = (grid[None, None, :] - yx_t[..., 1:2]) ** 2  # (K, N, S) over columns
    bumps = torch.exp(-(dy2[..., :, None] + dx2[..., None, :]) / (2 * _CLICK_SIGMA ** 2))
    return bumps.amax(1)


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

    :func:`refine_logits` builds the same input for many windows at once
    (:func:`_batch_features`).
    """
    return _batch_features(rgb, np.asarray(logits)[None], [window], [positive], [negative])[0]


def _batch_features(
    rgb: np.ndarray, logits: Sequence[np.ndarray], windows: list[Window],
    positive: list[np.ndarray | None], negative: list[np.ndarray | None],
) -> torch.Tensor:
    """(K, 6, S, S) float32 refiner inputs of K windows: window ``k`` of ``logits[k]``
    ((H, W) float each) with the points ``positive[k]``, ``negative[k]`` ((N, 2) or None).

    Only the window is read and converted (zeros outside the image, as :func:`_take`
    gives), its image and logit channels are resampled in one call per window, and the
    point maps of all windows are computed together (:func:`_point_maps`).
    """
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(PIXEL_STD, dtype=torch.float32)[:, None, None]
    grids = []
    for k, window in enumerate(windows):
        # contiguous (C, side, side): the area resampling is slow on a channels-last view
        image = torch.from_numpy(_take(rgb, window)).permute(2, 0, 1).contiguous().float()
        logit = torch.from_numpy(_take(np.asarray(logits[k], np.float32), window))[None]
        grids.append(_to_grid(torch.cat([(image - mean) / std, logit], 0)))
    grid = torch.stack(grids)  # (K, 4, S, S)
    prob = torch.sigmoid(grid[:, 3:].clamp(-20, 20))
    return torch.cat([grid[:, :3], prob, _point_maps(positive, windows)[:, None],
                      _point_maps(negative, windows)[:, None]], 1)


def window_target(mask: np.ndarray, window: Window) -> torch.Tensor:
    """(S, S) float32 share of each refiner-grid pixel inside ``mask`` (H, W) bool: the
    training target for that window (area-averaged, as the image channels are)."""
    return _to_grid(_take(np.asarray(mask, np.float32), window))[0]


def paste_window(logits: np.ndarray, refined: torch.Tensor, window: Window) -> np.ndarray:
    """``logits`` (H, W) with the window replaced by ``refined`` (S, S) resampled to it."""
    out = np.array(logits, dtype=np.float32, copy=True)
    _paste_into(out, refined, window)
    return out


def _paste_into(out: np.ndarray, refined: torch.Tensor, window: Window) -> None:
    """Write ``refined`` (S, S), resampled (bilinear) to the window, into ``out`` (H, W)
    float32 in place, where the window lies inside it."""
    r0, c0, side = window
    H, W = out.shape
    rs, re, cs, ce = max(r0, 0), min(r0 + side, H), max(c0, 0), min(c0 + side, W)
    if rs < re and cs < ce:
        up = F.interpolate(refined[None, None].float(), size=(side, side), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        out[rs:re, cs:ce] = up[rs - r0:re - r0, cs - c0:ce - c0]


@torch.inference_mode()
def refine_logits(
    refiner: torch.nn.Module,
    rgb: np.ndarray,
    logits: np.ndarray,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    threshold: float = 0.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Refine every predicted mask of a batch of prompts.

    Arguments:
      refiner: a :class:`~napari_sam.models.mask_refiner.MaskRefiner` (run with its
        ``infer``: eval-mode batch norm whatever its mode).
      rgb: (H, W, 3) uint8, the image the logits belong to.
      logits: (B, C, H, W) float32 decoder logits at the original size.
      points: (B, N, 2) ``(row, col)`` points of each prompt, or None.
      labels: (B, N) their labels (1 positive, 0 negative, -1 padding), or None.
      boxes: (B, 4) inclusive ``(row0, col0, row1, col1)`` boxes, or None.
      threshold: the mask threshold the window is taken from (the model's).
      out: (B, C, H, W) float32 array to write the result into (``logits`` itself is
        allowed: every window is read before any is written); None: a new array.

    Returns:
      (B, C, H, W) float32 logits: refined inside each mask's window (``out`` if given).
    """
    B, C = logits.shape[:2]
    masks, windows, positive, negative = [], [], [], []
    for b in range(B):
        pos = neg = None
        if points is not None:
            lab = labels[b] if labels is not None else np.ones(len(points[b]))
            pos, neg = points[b][lab == 1], points[b][lab == 0]
        box = boxes[b] if boxes is not None else None
        for c in range(C):
            masks.append(np.asarray(logits[b, c], np.float32))
            windows.append(_logit_window(masks[-1], threshold, pos, box))
            positive.append(pos)
            negative.append(neg)
    feats = _batch_features(rgb, masks, windows, positive, negative)
    device = next(refiner.parameters()).device
    infer = getattr(refiner, "infer", refiner)
    refined = infer(feats.to(device))[:, 0].float().cpu()
    if out is None:
        out = np.array(logits, dtype=np.float32, copy=True)
    elif out is not logits:
        out[...] = logits
    for k, window in enumerate(windows):
        _paste_into(out[k // C, k % C], refined[k], window)
    return out
