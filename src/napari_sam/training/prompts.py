"""Interactive prompt simulation for training and evaluating SAM.

Following the SAM paper (section 3 / appendix A), an object is first prompted
with a point sampled uniformly inside its mask or with its bounding box plus
noise (standard deviation 10% of the box side, at most 20 pixels). Each
correction round then adds one point in the error region between the
previous prediction and the ground truth: a positive point (label 1) on a
false negative pixel, a negative point (label 0) on a false positive one; the
previous low-resolution logits are fed back as the mask prompt.

Everything here works in SAM's model frame: masks are ``(K, H, W)`` tensors
at model-input resolution, points are ``(x, y)`` = ``(col, row)`` pixel
coordinates (no half-pixel shift; the prompt encoder adds it), boxes are
``(x0, y0, x1, y1)`` with ``x1, y1`` the last (inclusive) column/row.
Label ``-1`` marks a padding point (no prompt), as in SAM's prompt encoder.
"""

from __future__ import annotations

import numpy as np
import torch

from napari_sam.errors import InvalidInputError

__all__ = [
    "boxes_from_masks",
    "correction_points",
    "innermost_points",
    "instance_masks",
    "jitter_boxes",
    "sample_instances",
    "sample_points_in_masks",
]


def sample_instances(
    labels: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    min_area: int = 1,
) -> torch.Tensor:
    """Up to ``k`` distinct instance ids of ``labels`` (H, W), chosen uniformly.

    Ids covering fewer than ``min_area`` pixels are not chosen. Returns an
    int64 tensor of shape (K,), K <= k (fewer when the image has fewer objects).
    """
    ids, counts = torch.unique(labels, return_counts=True)
    ids = ids[(ids > 0) & (counts >= min_area)]
    if ids.numel() <= k:
        return ids
    order = torch.randperm(ids.numel(), generator=generator)[:k]
    return ids[order.sort().values]


def instance_masks(labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(H, W) labels, (K,) ids -> (K, H, W) bool masks ``labels == id``."""
    return labels.unsqueeze(0) == ids.view(-1, 1, 1)


def _flat_to_xy(flat: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack([flat % width, torch.div(flat, width, rounding_mode="floor")], -1).float()


def sample_points_in_masks(
    masks: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One point uniformly inside each mask.

    Arguments:
      masks: (K, H, W) bool.

    Returns:
      coords (K, 2) float32 (x, y) and valid (K,) bool (False for empty masks,
      whose coordinates are 0).
    """
    K, H, W = masks.shape
    if K == 0:
        return torch.zeros(0, 2), torch.zeros(0, dtype=torch.bool)
    weights = masks.reshape(K, H * W).float()
    valid = weights.sum(1) > 0
    weights[~valid] = 1.0
    flat = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    coords = _flat_to_xy(flat, W)
    coords[~valid] = 0.0
    return coords, valid


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes (K, 4) float32 ``(x0, y0, x1, y1)`` (inclusive) of (K, H, W) bool masks.

    Empty masks get the box (0, 0, 0, 0).
    """
    K, H, W = masks.shape
    rows = masks.any(2)
    cols = masks.any(1)
    ar_h = torch.arange(H).expand(K, H)
    ar_w = torch.arange(W).expand(K, W)
    big = H + W
    y0 = torch.where(rows, ar_h, big).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values
    x0 = torch.where(cols, ar_w, big).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    boxes[~rows.any(1)] = 0.0
    return boxes


def prompt_boxes(masks: torch.Tensor | np.ndarray) -> np.ndarray:
    """Tight box prompts of (K, H, W) bool masks, as a user draws them.

    Returns (K, 4) float64 ``(row0, col0, row1, col1)`` with inclusive corners (the
    predictor's convention); an object one pixel thin gets one pixel more extent, since
    a box without area is no prompt.
    """
    xyxy = boxes_from_masks(torch.as_tensor(np.asarray(masks, dtype=bool))).numpy()
    boxes = xyxy[:, [1, 0, 3, 2]].astype(np.float64)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes


def jitter_boxes(
    boxes: torch.Tensor,
    size: tuple[int, int],
    generator: torch.Generator | None = None,
    noise_fraction: float = 0.1,
    max_noise: float = 20.0,
) -> torch.Tensor:
    """Add Gaussian noise to each box coordinate, as in SAM's training.

    The noise standard deviation is ``noise_fraction`` times the box width
    (x coordinates) or height (y coordinates), at most ``max_noise`` pixels.
    Boxes are clipped to the (H, W) = ``size`` frame and kept ordered.
    """
    w = (boxes[:, 2] - boxes[:, 0] + 1).clamp(min=1)
    h = (boxes[:, 3] - boxes[:, 1] + 1).clamp(min=1)
    std = torch.stack([w, h, w, h], 1) * noise_fraction
    std = std.clamp(max=max_noise)
    noisy = boxes + torch.randn(boxes.shape, generator=generator) * std
    x = noisy[:, 0::2].clamp(0, size[1] - 1).sort(1).values
    y = noisy[:, 1::2].clamp(0, size[0] - 1).sort(1).values
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)


def _interior_point(
    region: np.ndarray, mode: str, rng: np.random.Generator | None
) -> tuple[int, int]:
    """(row, col) of a point deep inside ``region`` (2D bool, non-empty).

    ``center``: the maximum of the Euclidean distance transform (first in
    raster order on ties; the image border counts as background).
    ``interior``: uniform among pixels at least half that deep.
    """
    from scipy.ndimage import distance_transform_edt

    rows = np.flatnonzero(region.any(1))
    cols = np.flatnonzero(region.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(region[r0:r1, c0:c1], 1)
    dist = distance_transform_edt(crop)[1:-1, 1:-1]
    if mode == "center" or rng is None:
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    else:
        cand = np.flatnonzero(dist >= 0.5 * dist.max())
        r, c = np.unravel_index(int(cand[rng.integers(0, cand.size)]), dist.shape)
    return int(r + r0), int(c + c0)


def innermost_points(masks: torch.Tensor | np.ndarray) -> np.ndarray:
    """The innermost pixel of each mask: argmax of its distance transform.

    Arguments:
      masks: (K, H, W) bool.

    Returns:
      (K, 2) int64 ``(row, col)``; ``(-1, -1)`` for empty masks.
    """
    masks = np.asarray(masks, dtype=bool)
    out = np.full((masks.shape[0], 2), -1, dtype=np.int64)
    for i, m in enumerate(masks):
        if m.any():
            out[i] = _interior_point(m, "center", None)
    return out


def correction_points(
    pred: torch.Tensor,
    gt: torch.Tensor,
    mode: str = "interior",
    generator: torch.Generator | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One correction click per object from the error between prediction and truth.

    Arguments:
      pred: (K, H, W) bool predicted masks (model resolution).
      gt: (K, H, W) bool ground-truth masks.
      mode: ``"uniform"`` -- uniform over all error pixels (false negatives
        and false positives together, as in the SAM paper); ``"center"`` --
        the innermost pixel (distance-transform maximum) of the larger of the
        false-negative and false-positive regions (deterministic, used for
        evaluation); ``"interior"`` -- uniform among the pixels of the larger
        error region that are at least half as deep as its innermost pixel.
      generator: torch random source for ``uniform``.
      rng: numpy random source for ``interior``.

    Returns:
      coords (K, 2) float32 (x, y) and labels (K,) int64: 1 on a false
      negative (add), 0 on a false positive (remove), -1 where the prediction
      is already perfect (a padding point at (0, 0)).
    """
    if mode not in ("uniform", "center", "interior"):
        raise InvalidInputError(f"mode must be 'uniform', 'center' or 'interior', got {mode!r}")
    K, H, W = gt.shape
    fn = gt & ~pred
    fp = pred & ~gt
    coords = torch.zeros(K, 2)
    labels = torch.full((K,), -1, dtype=torch.int64)
    if mode == "uniform":
        err = (fn | fp).reshape(K, H * W)
        has = err.any(1)
        weights = err.float()
        weights[~has] = 1.0
        flat = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        coords = _flat_to_xy(flat, W)
        labels = gt.reshape(K, H * W).gather(1, flat[:, None]).squeeze(1).long()
        coords[~has] = 0.0
        labels[~has] = -1
        return coords, labels
    n_fn = fn.reshape(K, -1).sum(1)
    n_fp = fp.reshape(K, -1).sum(1)
    fn_np, fp_np = fn.numpy(), fp.numpy()
    for i in range(K):
        if n_fn[i] == 0 and n_fp[i] == 0:
            continue
        positive = bool(n_fn[i] >= n_fp[i])
        r, c = _interior_point(fn_np[i] if positive else fp_np[i], mode, rng)
        coords[i, 0], coords[i, 1] = c, r
        labels[i] = int(positive)
    return coords, labels
