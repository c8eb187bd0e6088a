"""Mask utilities for everything-mode: point grids, crops, scores, boxes, NMS, RLE, COCO.

Pure numpy / torch (no torchvision, no OpenCV). Conventions:

* Point grids and crop boxes follow SAM's automatic mask generator, so its
  parameters mean the same here: grid points are normalised ``(x, y)`` in
  [0, 1], crop boxes are ``[x0, y0, x1, y1]`` integer pixels with exclusive
  ``x1, y1``.
* ``mask_to_box_xyxy`` returns SAM's mask boxes: ``[x0, y0, x1, y1]`` where
  ``x1, y1`` are the *last* column/row of the mask (inclusive), ``[0, 0, 0, 0]``
  for an empty mask. ``mask_to_box_rc`` returns the engine's
  ``(row0, col0, row1, col1)`` with exclusive ``row1, col1`` (numpy slice
  bounds: ``mask[row0:row1, col0:col1]`` holds the whole object).
* Uncompressed RLE is COCO's: ``{"size": [H, W], "counts": [...]}``; counts are
  alternating run lengths over the mask flattened in column-major (Fortran)
  order, starting with a run of zeros (possibly 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import product
from typing import Any

import numpy as np
import torch

from napari_sam.errors import InvalidInputError

__all__ = [
    "area_from_rle",
    "batched_nms",
    "box_area",
    "box_iou",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "coco_annotations",
    "coco_json",
    "cropped_mask_to_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_box_rc",
    "mask_to_box_xyxy",
    "mask_to_rle",
    "masks_to_rle",
    "nms",
    "remove_small_regions",
    "remove_small_regions_cropped",
    "rle_to_mask",
    "stability_score",
    "uncrop_boxes_xyxy",
    "uncrop_masks",
    "uncrop_points",
]


# --------------------------------------------------------------------------- grids and crops


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) float64 grid of normalised ``(x, y)`` points at ``(i + 0.5) / n``.

    Points are ordered row by row: x varies fastest.
    """
    n = int(n_per_side)
    if n <= 0:
        raise InvalidInputError(f"points_per_side must be a positive integer, got {n_per_side!r}.")
    side = (np.arange(n, dtype=np.float64) + 0.5) / n
    ys, xs = np.meshgrid(side, side, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """One grid per crop layer: layer i has ``int(n_per_side / scale_per_layer**i)`` per side."""
    grids = []
    for i in range(int(n_layers) + 1):
        n = int(n_per_side / (scale_per_layer**i))
        if n <= 0:
            raise InvalidInputError(
                f"Crop layer {i} would get {n} points per side (points_per_side={n_per_side}, "
                f"crop_n_points_downscale_factor={scale_per_layer}); use more points per side, "
                "fewer crop layers or a smaller downscale factor."
            )
        grids.append(build_point_grid(n))
    return grids


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes ``[x0, y0, x1, y1]`` (exclusive ends) and their layer index.

    Layer 0 is the whole image; layer i >= 1 tiles it with ``2**i`` x ``2**i``
    overlapping crops. Neighbouring crops of layer i overlap by
    ``int(overlap_ratio * min(H, W) * 2 / 2**i)`` pixels; crops are ordered with
    y varying fastest (x0-major), as in SAM's generator. Crops that would be
    empty (images a few pixels wide) are left out.
    """
    im_h, im_w = int(im_size[0]), int(im_size[1])
    short_side = min(im_h, im_w)
    boxes: list[list[int]] = [[0, 0, im_w, im_h]]
    layers = [0]
    for i in range(int(n_layers)):
        n = 2 ** (i + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
        xs = [int((crop_w - overlap) * k) for k in range(n)]
        ys = [int((crop_h - overlap) * k) for k in range(n)]
        for x0, y0 in product(xs, ys):
            x1, y1 = min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)
            if x1 > x0 and y1 > y0:  # tiny images: rounding can push a crop off the image
                boxes.append([x0, y0, x1, y1])
                layers.append(i + 1)
    return boxes, layers


# --------------------------------------------------------------------------- scores and boxes


def stability_score(
    logits: torch.Tensor, mask_threshold: float, offset: float, chunk: int = 16
) -> torch.Tensor:
    """Stability score of (..., H, W) mask logits -> (...) float32.

    IoU of the masks ``logits > mask_threshold + offset`` and
    ``logits > mask_threshold - offset``. The first is contained in the second,
    so the IoU is a ratio of pixel counts. Counts are taken ``chunk`` masks at a
    time so that only a small boolean temporary is alive. An empty low-threshold
    mask gives NaN (0 / 0), which fails every ``>=`` threshold.
    """
    lead = logits.shape[:-2]
    flat = logits.reshape(-1, *logits.shape[-2:])
    hi_t, lo_t = mask_threshold + offset, mask_threshold - offset
    inter = torch.empty(flat.shape[0], dtype=torch.int32, device=logits.device)
    union = torch.empty_like(inter)
    for s in range(0, flat.shape[0], chunk):
        part = flat[s : s + chunk]
        inter[s : s + chunk] = (part > hi_t).sum(dim=(-1, -2), dtype=torch.int32)
        union[s : s + chunk] = (part > lo_t).sum(dim=(-1, -2), dtype=torch.int32)
    return (inter / union).reshape(lead)


def mask_to_box_xyxy(masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """SAM-style boxes of (..., H, W) bool masks -> (..., 4) int64 ``[x0, y0, x1, y1]``.

    ``x1, y1`` are inclusive (the last column / row of the mask); empty masks
    give ``[0, 0, 0, 0]``.
    """
    m = torch.as_tensor(masks)
    lead = m.shape[:-2]
    h, w = m.shape[-2:]
    if m.numel() == 0:
        return torch.zeros(*lead, 4, dtype=torch.int64, device=m.device)
    m = m.reshape(-1, h, w).bool()
    rows = m.any(dim=-1)  # (N, H)
    cols = m.any(dim=-2)  # (N, W)
    empty = ~rows.any(dim=-1)
    ar_h = torch.arange(h, device=m.device)
    ar_w = torch.arange(w, device=m.device)
    y0 = torch.where(rows, ar_h, h).amin(dim=-1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=-1)
    x0 = torch.where(cols, ar_w, w).amin(dim=-1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=-1)
    out = torch.stack([x0, y0, x1, y1], dim=-1).to(torch.int64)
    out[empty] = 0
    return out.reshape(*lead, 4)


def mask_to_box_rc(masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(..., H, W) bool masks -> (..., 4) int64 ``(row0, col0, row1, col1)``, exclusive ends.

    Empty masks give ``(0, 0, 0, 0)``.
    """
    xyxy = mask_to_box_xyxy(masks)
    nonempty = (torch.as_tensor(masks).flatten(-2).any(dim=-1)).to(torch.int64)
    return torch.stack(
        [xyxy[..., 1], xyxy[..., 0], xyxy[..., 3] + nonempty, xyxy[..., 2] + nonempty], dim=-1
    )


def box_xyxy_to_xywh(box: Sequence[float] | torch.Tensor | np.ndarray) -> list:
    """``[x0, y0, x1, y1]`` -> ``[x0, y0, x1 - x0, y1 - y0]`` as a Python list."""
    if isinstance(box, torch.Tensor):
        box = box.tolist()
    x0, y0, x1, y1 = np.asarray(box).tolist()
    return [x0, y0, x1 - x0, y1 - y0]


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area ``(x1 - x0) * (y1 - y0)`` of (N, 4) xyxy boxes -> (N,)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M) (NaN for two empty boxes)."""
    a1 = box_area(boxes1)
    a2 = box_area(boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (a1[:, None] + a2[None, :] - inter)


def nms(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, chunk: int = 512
) -> torch.Tensor:
    """Greedy non-maximum suppression of (N, 4) xyxy boxes.

    Same semantics as ``torchvision.ops.nms``: boxes are visited by decreasing
    score (ties keep their input order) and a box is dropped when its IoU with
    an already kept box is strictly greater than ``iou_threshold``. Returns the
    kept indices (int64) sorted by decreasing score. IoUs are computed ``chunk``
    rows at a time, so memory stays O(chunk * N).
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    if not b.is_floating_point():
        b = b.float()
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        over = box_iou(b[s:e], b[s:]) > iou_threshold  # (c, n - s), NaN -> False
        sup = suppressed[s:].clone()
        for i in range(e - s):
            if sup[i]:
                continue
            keep[s + i] = True
            sup |= over[i]
            sup[i] = True
        suppressed[s:] = sup
    return order[keep]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS applied independently per category ``idxs`` (N,).

    Boxes of different categories never suppress each other. Returns the kept
    indices sorted by decreasing score (ties by input order), like
    ``torchvision.ops.batched_nms``.
    """
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    for c in torch.unique(idxs):
        sel = torch.nonzero(idxs == c).flatten()
        keep[sel[nms(boxes[sel], scores[sel], iou_threshold)]] = True
    kept = torch.nonzero(keep).flatten()
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


# --------------------------------------------------------------------------- crops


def is_box_near_crop_edge(
    boxes: torch.Tensor,
    crop_box: Sequence[int],
    orig_box: Sequence[int],
    atol: float = 20.0,
) -> torch.Tensor:
    """Which (N, 4) xyxy boxes (in crop coordinates) lie within ``atol`` px of a crop edge
    that is not also an edge of the image ``orig_box`` -> (N,) bool."""
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float32, device=boxes.device)
    b = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = (b - crop[None]).abs() <= atol
    near_image = (b - orig[None]).abs() <= atol
    return (near_crop & ~near_image).any(dim=1)


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Shift (..., 4) xyxy boxes from crop to image coordinates."""
    x0, y0 = int(crop_box[0]), int(crop_box[1])
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device, dtype=boxes.dtype)


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Shift (..., 2) xy points from crop to image coordinates."""
    x0, y0 = int(crop_box[0]), int(crop_box[1])
    return points + torch.tensor([x0, y0], device=points.device, dtype=points.dtype)


def uncrop_masks(
    masks: torch.Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int
) -> torch.Tensor:
    """Zero-pad (..., h, w) crop masks into the (..., orig_h, orig_w) image frame."""
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    out = masks.new_zeros(*masks.shape[:-2], orig_h, orig_w)
    out[..., y0:y1, x0:x1] = masks
    return out


# --------------------------------------------------------------------------- cleanup


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Fill small holes (``mode="holes"``) or drop small islands (``mode="islands"``).

    Regions are 8-connected. A hole is a connected component of the background
    with fewer than ``area_thresh`` pixels (a component touching the image
    border counts too); an island is such a component of the foreground. When
    every island is small, the largest one is kept. Returns the new mask and
    whether anything changed.
    """
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise InvalidInputError(f"mode must be 'holes' or 'islands', got {mode!r}.")
    mask = np.asarray(mask, dtype=bool)
    holes = mode == "holes"
    work = ~mask if holes else mask
    labels, n = ndimage.label(work, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask, False
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if holes:
        fill = np.concatenate([[False], small])  # label -> becomes foreground
        return mask | fill[labels], True
    keep = np.concatenate([[False], ~small])
    if not keep.any():
        keep[int(np.argmax(sizes)) + 1] = True
    return keep[labels], True


def remove_small_regions_cropped(
    mask: np.ndarray,
    origin: tuple[int, int],
    image_shape: tuple[int, int],
    area_thresh: float,
    mode: str,
) -> tuple[np.ndarray, tuple[int, int], bool]:
    """:func:`remove_small_regions` for a mask cropped out of an (H, W) image.

    ``mask`` (h, w) bool lies at rows ``origin[0]:origin[0] + h`` and columns
    ``origin[1]:origin[1] + w`` of the image; every pixel outside it is
    background. The result equals ``remove_small_regions`` on the full-size
    mask, but memory and time scale with the crop: a background region
    touching a crop side that is not the image border continues outside the
    crop, where it is as large as the outside part it reaches. (When some
    part of the outside is itself smaller than ``area_thresh``, which needs a
    crop almost as large as the image, the full frame is used.)

    Returns the new mask cropped to its bounding box (``(0, 0)`` shape when it
    became empty), its origin, and whether anything changed.
    """
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise InvalidInputError(f"mode must be 'holes' or 'islands', got {mode!r}.")
    mask = np.asarray(mask, dtype=bool)
    r0, c0 = int(origin[0]), int(origin[1])
    h, w = mask.shape
    H, W = int(image_shape[0]), int(image_shape[1])
    if mode == "islands":  # islands lie inside the crop: nothing outside matters
        new, changed = remove_small_regions(mask, area_thresh, mode)
        return (*_crop_to_box(new, r0, c0), changed) if changed else (mask, (r0, c0), False)

    r1, c1 = r0 + h, c0 + w
    if _smallest_outside_part(r0, c0, r1, c1, H, W) < area_thresh:
        full = np.zeros((H, W), dtype=bool)
        full[r0:r1, c0:c1] = mask
        new, changed = remove_small_regions(full, area_thresh, mode)
        return (*_crop_to_box(new, 0, 0), changed) if changed else (mask, (r0, c0), False)
    labels, n = ndimage.label(~mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask, (r0, c0), False
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    outside = np.zeros(n + 1, dtype=bool)  # touches a side that continues outside the crop
    for touches, side in ((r0 > 0, labels[0]), (r1 < H, labels[-1]),
                          (c0 > 0, labels[:, 0]), (c1 < W, labels[:, -1])):
        if touches:
            outside[side] = True
    small = (sizes < area_thresh) & ~outside
    small[0] = False
    if not small.any():
        return mask, (r0, c0), False
    return mask | small[labels], (r0, c0), True


def _smallest_outside_part(r0: int, c0: int, r1: int, c1: int, H: int, W: int) -> float:
    """Pixels of the smallest connected part of an (H, W) image outside rows
    r0:r1, cols c0:c1 (inf when nothing lies outside)."""
    full_w, full_h = c0 == 0 and c1 == W, r0 == 0 and r1 == H
    if full_w and full_h:
        return math.inf
    if full_w:
        parts = [r0 * W, (H - r1) * W]
    elif full_h:
        parts = [c0 * H, (W - c1) * H]
    else:  # the frame around a rectangle that spans neither axis is connected
        parts = [H * W - (r1 - r0) * (c1 - c0)]
    parts = [p for p in parts if p > 0]
    return min(parts) if parts else math.inf


def _crop_to_box(mask: np.ndarray, r0: int, c0: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``mask`` (placed at r0, c0) cut to its bounding box, and the box's origin."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros((0, 0), dtype=bool), (r0, c0)
    cols = np.flatnonzero(mask.any(axis=0))
    out = np.ascontiguousarray(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    return out, (r0 + int(rows[0]), c0 + int(cols[0]))


# --------------------------------------------------------------------------- RLE


def mask_to_rle(mask: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """(H, W) bool mask -> uncompressed COCO RLE ``{"size": [H, W], "counts": [...]}``."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise InvalidInputError(f"mask_to_rle expects a 2D mask, got shape {m.shape}.")
    h, w = m.shape
    flat = m.astype(bool, copy=False).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    elif not flat.size:
        counts = [0]
    return {"size": [int(h), int(w)], "counts": [int(c) for c in counts]}


def cropped_mask_to_rle(
    mask: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]
) -> dict[str, Any]:
    """Uncompressed COCO RLE of an (H, W) image holding only ``mask`` (h, w) bool at ``origin``.

    Equals ``mask_to_rle`` of the full-size mask, in time and memory of the crop.
    """
    m = np.asarray(mask, dtype=bool)
    r0, c0 = int(origin[0]), int(origin[1])
    H, W = int(shape[0]), int(shape[1])
    h, w = m.shape
    if r0 < 0 or c0 < 0 or r0 + h > H or c0 + w > W:
        raise InvalidInputError(
            f"A mask of shape {m.shape} at {(r0, c0)} does not fit an image of shape {(H, W)}."
        )
    # run boundaries column by column: starts and ends of foreground runs, flat (col-major)
    padded = np.zeros((h + 2, w), dtype=np.int8)
    padded[1:-1] = m
    edges = np.diff(padded, axis=0)  # +1 at a run start, -1 after its end (row index)
    cols_s, rows_s = np.nonzero(edges.T == 1)
    cols_e, rows_e = np.nonzero(edges.T == -1)
    starts = (cols_s + c0) * H + rows_s + r0
    ends = (cols_e + c0) * H + rows_e + r0
    # a run ending at the bottom of a column continues at the top of the next one
    joined = ends[:-1] == starts[1:]
    if joined.any():
        starts = np.concatenate([starts[:1], starts[1:][~joined]])
        ends = np.concatenate([ends[:-1][~joined], ends[-1:]])
    bounds = np.empty(2 * starts.size + 2, dtype=np.int64)
    bounds[0], bounds[-1] = 0, H * W
    bounds[1:-1:2], bounds[2:-1:2] = starts, ends
    if ends.size and ends[-1] == H * W:  # the mask reaches the last pixel: no final 0 run
        bounds = bounds[:-1]
    return {"size": [H, W], "counts": np.diff(bounds).tolist()}


def masks_to_rle(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """(N, H, W) bool masks -> list of uncompressed RLEs."""
    return [mask_to_rle(m) for m in masks]


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed COCO RLE -> (H, W) bool mask (C-contiguous)."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = np.asarray(rle["counts"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidInputError(
            "An uncompressed RLE must be a dict {'size': [H, W], 'counts': [int, ...]}; "
            f"got {type(rle).__name__}."
        ) from err
    if counts.sum() != h * w or (counts < 0).any():
        raise InvalidInputError(
            f"RLE counts sum to {int(counts.sum())} but size {h}x{w} needs {h * w} pixels."
        )
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return np.ascontiguousarray(flat.reshape(w, h).T)


def area_from_rle(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


# --------------------------------------------------------------------------- COCO


def _record_rle(record: dict[str, Any], image_shape: tuple[int, int] | None) -> dict[str, Any]:
    seg = record["segmentation"]
    if isinstance(seg, dict):
        return seg
    seg = np.asarray(seg, dtype=bool)
    box = record.get("bbox_rc")
    if image_shape is not None and seg.shape != tuple(image_shape):
        if box is None:
            raise InvalidInputError(
                f"A record's mask has shape {seg.shape} but the image is {tuple(image_shape)} "
                "and the record has no 'bbox_rc' to place it."
            )
        r0, c0, r1, c1 = (int(v) for v in box)
        if seg.shape != (r1 - r0, c1 - c0):
            raise InvalidInputError(
                f"A cropped mask of shape {seg.shape} does not fit its bbox_rc {list(box)}."
            )
        return cropped_mask_to_rle(seg, (r0, c0), image_shape)
    return mask_to_rle(seg)


def coco_annotations(
    records: Iterable[dict[str, Any]],
    image_id: int = 1,
    category_id: int = 1,
    image_shape: tuple[int, int] | None = None,
    start_id: int = 1,
) -> list[dict[str, Any]]:
    """COCO annotation dicts for everything-mode records (uncompressed RLE segmentations).

    ``bbox`` is COCO's ``[x, y, width, height]`` of the mask's pixels (width =
    last column - first column + 1), ``score`` the record's predicted IoU.
    ``image_shape`` (H, W) is needed for records holding cropped masks.
    """
    anns = []
    for k, rec in enumerate(records):
        rle = _record_rle(rec, image_shape)
        mask_rows = None
        if "bbox_rc" in rec:
            r0, c0, r1, c1 = (int(v) for v in rec["bbox_rc"])
        else:
            mask_rows = rle_to_mask(rle)
            r0, c0, r1, c1 = (int(v) for v in mask_to_box_rc(mask_rows))
        anns.append(
            {
                "id": start_id + k,
                "image_id": int(image_id),
                "category_id": int(category_id),
                "segmentation": rle,
                "area": area_from_rle(rle),
                "bbox": [c0, r0, c1 - c0, r1 - r0],
                "iscrowd": 0,
                "score": float(rec.get("predicted_iou", 1.0)),
            }
        )
    return anns


def coco_json(
    records: Iterable[dict[str, Any]],
    image_shape: tuple[int, int],
    file_name: str = "image.png",
    image_id: int = 1,
    category_name: str = "object",
) -> dict[str, Any]:
    """A minimal COCO dataset dict (``images``, ``annotations``, ``categories``) for one image.

    Serialise with ``json.dump``.
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    return {
        "images": [{"id": int(image_id), "file_name": str(file_name), "height": h, "width": w}],
        "annotations": coco_annotations(records, image_id=image_id, image_shape=(h, w)),
        "categories": [{"id": 1, "name": str(category_name)}],
    }
