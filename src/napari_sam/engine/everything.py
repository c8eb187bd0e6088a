"""Everything-mode: automatic mask generation from a grid of point prompts.

:class:`AutomaticMaskGenerator` takes the parameters of SAM's official
``SamAutomaticMaskGenerator`` (same names, same defaults, same meaning) and
returns the same masks, computed in a different order so that most of the work
is skipped:

1. The image (or each crop of it) is embedded once.
2. Point prompts run through the mask decoder in batches. The parts of the
   decoder that only depend on the image (the first layer's image-side
   projections) are computed once per image, and the cross-attentions are
   evaluated in factored form, so no per-prompt projection of the 64 x 64 image
   tokens is ever materialised (see :class:`_FastDecoder`). Mask logits are
   only computed for prompts with at least one multimask output whose predicted
   IoU passes ``pred_iou_thresh``.
3. Before upsampling, a cheap upper bound of each mask's stability score is
   taken at low resolution (:func:`_stability_upper_bound`); masks whose bound
   is below ``stability_score_thresh`` cannot pass at full resolution and are
   dropped. Survivors are upsampled exactly like the reference and filtered on
   their exact stability score.
4. Masks touching a crop edge are dropped, duplicates removed by box NMS (per
   crop, then across crops), small holes and islands optionally cleaned.

Records (one dict per mask, ordered like the reference's):

* ``segmentation``: (H, W) bool mask, or an uncompressed COCO RLE dict when
  ``output_mode="uncompressed_rle"``.
* ``area``: number of mask pixels.
* ``bbox``: ``[x, y, w, h]`` exactly as SAM reports it: ``x, y`` the first
  column and row of the mask, ``w, h`` = last column - first column and
  last row - first row (one less than the pixel extent).
* ``bbox_rc``: ``[row0, col0, row1, col1]`` slice bounds of the mask
  (``row1, col1`` exclusive), the engine's convention.
* ``predicted_iou``, ``stability_score``: the model's quality estimates.
* ``point_coords``: ``[[x, y]]`` image pixel coordinates of the prompt.
* ``crop_box``: ``[x, y, w, h]`` of the crop the mask came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.engine import masks as M
from napari_sam.engine.image import to_rgb_uint8
from napari_sam.engine.predictor import Predictor
from napari_sam.errors import CancelledError, InvalidInputError

__all__ = ["AutomaticMaskGenerator", "records_to_labels"]

_OUTPUT_MODES = ("binary_mask", "uncompressed_rle")
# Margin (in logit units) by which the low-resolution stability bound is widened,
# far above float32 rounding of the bilinear upsampling.
_BOUND_EPS = 1e-3


class AutomaticMaskGenerator:
    """Segment everything in an image with a grid of point prompts.

    Arguments (same as the official generator):
      model_or_predictor: a SAM model (``napari_sam.models.Sam`` or anything with
        its interface) or a :class:`~napari_sam.engine.predictor.Predictor`.
      points_per_side: points along each side of the image; None to use
        ``point_grids`` instead.
      points_per_batch: prompts decoded together (memory grows linearly).
      pred_iou_thresh: keep masks whose predicted IoU is > this.
      stability_score_thresh: keep masks whose stability score is >= this.
      stability_score_offset: logit offset used by the stability score.
      box_nms_thresh: box IoU above which duplicates within a crop are dropped.
      crop_n_layers: extra crop layers; layer i has ``2**i x 2**i`` crops.
      crop_nms_thresh: box IoU above which duplicates between crops are dropped.
      crop_overlap_ratio: overlap of first-layer crops, as a fraction of the
        image's short side.
      crop_n_points_downscale_factor: points per side shrink by this factor per layer.
      point_grids: explicit grids, one per crop layer, of normalised ``(x, y)``
        points in [0, 1] (SAM's convention, x = column).
      min_mask_region_area: when > 0, fill holes and drop islands smaller than
        this many pixels, then run NMS again.
      output_mode: ``"binary_mask"`` or ``"uncompressed_rle"``.
    """

    def __init__(
        self,
        model_or_predictor: Any,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise InvalidInputError(
                "Give exactly one of points_per_side (e.g. 32) and point_grids; got "
                f"points_per_side={points_per_side!r} and "
                f"point_grids={'None' if point_grids is None else 'a list'}."
            )
        if output_mode not in _OUTPUT_MODES:
            raise InvalidInputError(
                f"output_mode must be one of {_OUTPUT_MODES}, got {output_mode!r} (for COCO's "
                "compressed RLE, encode the uncompressed RLEs with pycocotools)."
            )
        if int(points_per_batch) < 1:
            raise InvalidInputError(f"points_per_batch must be >= 1, got {points_per_batch!r}.")
        if int(crop_n_layers) < 0:
            raise InvalidInputError(f"crop_n_layers must be >= 0, got {crop_n_layers!r}.")
        if points_per_side is not None:
            grids = M.build_all_layer_point_grids(
                int(points_per_side), int(crop_n_layers), crop_n_points_downscale_factor
            )
        else:
            grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
            if len(grids) < int(crop_n_layers) + 1:
                raise InvalidInputError(
                    f"point_grids has {len(grids)} grids but crop_n_layers={crop_n_layers} "
                    f"needs {int(crop_n_layers) + 1} (one per layer, the full image first)."
                )
            for g in grids:
                if g.ndim != 2 or g.shape[1] != 2 or g.shape[0] == 0:
                    raise InvalidInputError(
                        "Each point grid must be an (N, 2) array of (x, y) in [0, 1]; got "
                        f"{g.shape}."
                    )
        self.point_grids = grids

        if isinstance(model_or_predictor, Predictor):
            self.predictor = model_or_predictor
        else:
            self.predictor = Predictor(model_or_predictor)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = int(crop_n_points_downscale_factor)
        self.min_mask_region_area = int(min_mask_region_area)
        self.output_mode = output_mode
        self._decoder = _FastDecoder.build(self.predictor.model)

    @property
    def model(self) -> torch.nn.Module:
        return self.predictor.model

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        image: np.ndarray,
        contrast_limits: tuple[float, float] | None = None,
        channel_axis: int | None = None,
        progress: Callable[[int, int], Any] | None = None,
        cancel: Callable[[], bool] | None = None,
        use_cache: bool = True,
    ) -> list[dict[str, Any]]:
        """Masks of everything in ``image``.

        Arguments:
          image: any 2D image layer data (see
            :func:`~napari_sam.engine.image.to_rgb_uint8`).
          contrast_limits, channel_axis: passed to ``to_rgb_uint8``.
          progress: called as ``progress(done, total)`` after each batch of prompts.
          cancel: called before each embedding and each batch; when it returns
            True, :class:`~napari_sam.errors.CancelledError` is raised.
          use_cache: take embeddings from (and put them into) the predictor's
            embedding cache; False keeps no embedding alive after the call.

        Returns:
          a list of records (see the module docstring).
        """
        rgb = to_rgb_uint8(image, contrast_limits=contrast_limits, channel_axis=channel_axis)
        data = self._generate_masks(rgb, progress, cancel, use_cache)
        if self.min_mask_region_area > 0:
            data = self._postprocess_small_regions(
                data, rgb.shape[:2], self.min_mask_region_area,
                max(self.box_nms_thresh, self.crop_nms_thresh),
            )
        return self._records(data, rgb.shape[:2])

    def generate_labels(
        self,
        image: np.ndarray,
        contrast_limits: tuple[float, float] | None = None,
        channel_axis: int | None = None,
        progress: Callable[[int, int], Any] | None = None,
        cancel: Callable[[], bool] | None = None,
        order: str = "area_desc",
    ) -> np.ndarray:
        """(H, W) uint32 instance labels of everything in ``image``.

        See :func:`records_to_labels` for the painting order and ids.
        """
        rgb = to_rgb_uint8(image, contrast_limits=contrast_limits, channel_axis=channel_axis)
        records = self.generate(rgb, progress=progress, cancel=cancel)
        return records_to_labels(records, rgb.shape[:2], order=order)

    # ------------------------------------------------------------------ generation

    def _generate_masks(self, rgb, progress, cancel, use_cache) -> dict[str, Any]:
        H, W = rgb.shape[:2]
        crop_boxes, layers = M.generate_crop_boxes((H, W), self.crop_n_layers,
                                                   self.crop_overlap_ratio)
        ppb = self.points_per_batch
        total = sum(math.ceil(len(self.point_grids[k]) / ppb) for k in layers)
        state = {"done": 0, "total": total, "progress": progress, "cancel": cancel}
        parts = []
        p = self.predictor
        saved = (p.features, p.original_size, p.input_size) if p.is_image_set else None
        try:
            for crop_box, layer in zip(crop_boxes, layers, strict=True):
                parts.append(self._process_crop(rgb, crop_box, layer, state, use_cache))
        finally:
            # give a shared predictor its image back (an interactive session may use it)
            if saved is None:
                p.reset_image()
            else:
                p.set_embedding(*saved)
        data = _cat(parts)
        if len(crop_boxes) > 1 and len(data["iou"]):
            # between crops, prefer masks from smaller crops
            cb = data["crop_boxes"].float()
            scores = 1.0 / M.box_area(cb)
            keep = M.nms(data["boxes"].float(), scores, self.crop_nms_thresh)
            data = _filter(data, keep)
        return data

    def _embed(self, crop: np.ndarray, use_cache: bool) -> None:
        p = self.predictor
        if use_cache:
            entry = p.embed(crop)
            p.set_embedding(entry.features, entry.original_size, entry.input_size)
        else:
            size = (int(crop.shape[0]), int(crop.shape[1]))
            p.set_embedding(p.compute_embedding(crop), size, p.transform.input_size(size))

    def _process_crop(self, rgb, crop_box, layer, state, use_cache) -> dict[str, Any]:
        x0, y0, x1, y1 = crop_box
        crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        _check_cancel(state["cancel"])
        self._embed(crop, use_cache)
        p = self.predictor
        h_c, w_c = p.original_size
        in_h, in_w = p.input_size
        pts = self.point_grids[layer] * np.array([[w_c, h_c]], dtype=np.float64)  # crop xy
        model_xy = pts * np.array([[in_w / w_c, in_h / h_c]])

        dev = p.device
        thr = float(getattr(self.model, "mask_threshold", 0.0))
        with torch.inference_mode():
            if self._decoder is not None:
                self._decoder.prepare(p.features, p._get_dense_pe())
            chunks = []
            for s in range(0, len(pts), self.points_per_batch):
                _check_cancel(state["cancel"])
                sl = slice(s, s + self.points_per_batch)
                chunks.append(self._process_batch(pts[sl], model_xy[sl], crop_box,
                                                  rgb.shape[:2], thr, dev))
                state["done"] += 1
                if state["progress"] is not None:
                    state["progress"](state["done"], state["total"])
            if self._decoder is not None:
                self._decoder.release()
        data = _cat(chunks)
        if len(data["iou"]):
            keep = M.nms(data["boxes"].float(), data["iou"], self.box_nms_thresh)
            data = _filter(data, keep)
        data["boxes"] = M.uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = M.uncrop_points(data["points"], crop_box)
        n = len(data["iou"])
        data["crop_boxes"] = torch.tensor([list(crop_box)] * n, dtype=torch.int64).reshape(n, 4)
        data["masks"] = [(m, (y0, x0)) for m in data["masks"]]
        return data

    def _decode(self, model_xy: np.ndarray, dev) -> tuple[torch.Tensor, Callable]:
        """IoU predictions (B, 3) and a function (prompt idx, output idx) -> low-res logits."""
        coords = torch.as_tensor(model_xy, device=dev)[:, None, :]  # float64, like the reference
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=dev)
        if self._decoder is not None:
            sparse, _ = self.model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            iou, state = self._decoder.run(sparse)
            return iou[:, 1:], lambda b, k: self._decoder.masks(state, b, k + 1)
        _, iou, low = self.predictor.predict_torch(coords, labels, multimask=True, upscale=False)
        return iou, lambda b, k: low[b, k]

    def _process_batch(self, pts, model_xy, crop_box, orig_size, thr, dev):
        """Decode one batch of prompts -> filtered masks (crop frame) and their data."""
        iou, get_low = self._decode(model_xy, dev)
        n_out = iou.shape[1]
        flat_iou = iou.reshape(-1)
        cand = torch.arange(flat_iou.numel(), device=flat_iou.device)
        if self.pred_iou_thresh > 0.0:
            cand = cand[flat_iou > self.pred_iou_thresh]
        empty = _empty_data()
        if cand.numel() == 0:
            return empty
        b_idx, k_idx = cand // n_out, cand % n_out
        low = get_low(b_idx, k_idx)  # (S, L, L)

        p = self.predictor
        if self.stability_score_thresh > 0.0:
            ub = _stability_upper_bound(
                low, p.transform.target_length, p.input_size, p.original_size, thr,
                self.stability_score_offset,
            )
            ok = ub >= self.stability_score_thresh
            cand, b_idx, low = cand[ok], b_idx[ok], low[ok]
            if cand.numel() == 0:
                return empty

        keep_masks, keep_stab, keep_sel = [], [], []
        for s in range(0, cand.numel(), 16):
            logits = p.upscale_logits(low[s : s + 16, None])[:, 0]  # (s, h_c, w_c)
            stab = M.stability_score(logits, thr, self.stability_score_offset)
            ok = (stab >= self.stability_score_thresh) if self.stability_score_thresh > 0 else (
                torch.ones_like(stab, dtype=torch.bool))
            if ok.any():
                keep_masks.append(logits[ok] > thr)
                keep_stab.append(stab[ok])
                keep_sel.append(torch.arange(s, s + logits.shape[0], device=ok.device)[ok])
            del logits
        if not keep_sel:
            return empty
        sel = torch.cat(keep_sel)
        masks = torch.cat(keep_masks)
        stab = torch.cat(keep_stab)
        cand, b_idx = cand[sel], b_idx[sel]
        boxes = M.mask_to_box_xyxy(masks)
        H, W = orig_size
        near = M.is_box_near_crop_edge(boxes, crop_box, [0, 0, W, H])
        if near.any():
            ok = ~near
            masks, stab, cand, b_idx, boxes = masks[ok], stab[ok], cand[ok], b_idx[ok], boxes[ok]
        points = torch.as_tensor(pts, dtype=torch.float64)[b_idx.cpu()]
        return {
            "masks": list(masks),
            "iou": flat_iou[cand].float(),
            "stability": stab.float(),
            "points": points,
            "boxes": boxes,
        }

    # ------------------------------------------------------------------ post-processing

    @staticmethod
    def _postprocess_small_regions(data, shape, min_area: int, nms_thresh: float):
        """Fill small holes, drop small islands, then NMS preferring unchanged masks."""
        if len(data["iou"]) == 0:
            return data
        H, W = shape
        changed: dict[int, np.ndarray] = {}
        scores, boxes = [], []
        for i, (mask, (r0, c0)) in enumerate(data["masks"]):
            # in the full frame: a background region is only a hole if it is small there
            full = np.zeros((H, W), dtype=bool)
            h, w = mask.shape
            full[r0 : r0 + h, c0 : c0 + w] = mask.cpu().numpy()
            full, changed_h = M.remove_small_regions(full, min_area, "holes")
            full, changed_i = M.remove_small_regions(full, min_area, "islands")
            if changed_h or changed_i:
                changed[i] = full
                boxes.append(M.mask_to_box_xyxy(torch.from_numpy(full)))
            else:
                boxes.append(data["boxes"][i])
            scores.append(0.0 if (changed_h or changed_i) else 1.0)
        boxes_t = torch.stack(boxes)
        keep = M.nms(boxes_t.float(), torch.tensor(scores), nms_thresh)
        for i in keep.tolist():
            if i in changed:
                data["masks"][i] = (torch.from_numpy(changed[i]), (0, 0))
                data["boxes"][i] = boxes_t[i]
        return _filter(data, keep)

    def _records(self, data, shape) -> list[dict[str, Any]]:
        H, W = shape
        out = []
        for i in range(len(data["iou"])):
            mask, (r0, c0) = data["masks"][i]
            m = mask.cpu().numpy()
            full = np.zeros((H, W), dtype=bool)
            full[r0 : r0 + m.shape[0], c0 : c0 + m.shape[1]] = m
            box = data["boxes"][i].tolist()
            area = int(m.sum())
            seg = M.mask_to_rle(full) if self.output_mode == "uncompressed_rle" else full
            nonempty = 1 if area else 0
            out.append(
                {
                    "segmentation": seg,
                    "area": area,
                    "bbox": M.box_xyxy_to_xywh(box),
                    "bbox_rc": [box[1], box[0], box[3] + nonempty, box[2] + nonempty],
                    "predicted_iou": float(data["iou"][i]),
                    "point_coords": [data["points"][i].tolist()],
                    "stability_score": float(data["stability"][i]),
                    "crop_box": M.box_xyxy_to_xywh(data["crop_boxes"][i].tolist()),
                }
            )
        return out


def records_to_labels(
    records: Sequence[dict[str, Any]], shape: tuple[int, int], order: str = "area_desc"
) -> np.ndarray:
    """Paint mask records into an (H, W) uint32 instance label image.

    ``order="area_desc"`` (default) sorts records by decreasing area (ties keep
    their order) and paints them in that order, so a smaller mask lying on a
    larger one stays visible on top; ids are 1..n in the painting order (the
    largest mask gets 1). ``"area_asc"`` paints the smallest first (larger masks
    cover smaller ones), ``"input"`` keeps the records' order. Pixels outside
    every mask are 0. A mask entirely covered by later ones leaves no pixel with
    its id.

    Records may hold a full (H, W) bool mask, an uncompressed RLE, or a cropped
    bool mask placed by its ``bbox_rc`` (as :mod:`napari_sam.engine.tiles` returns).
    """
    H, W = (int(s) for s in shape)
    if order not in ("area_desc", "area_asc", "input"):
        raise InvalidInputError(
            f"order must be 'area_desc', 'area_asc' or 'input', got {order!r}."
        )
    idx = list(range(len(records)))
    if order != "input":
        areas = [int(records[i]["area"]) for i in idx]
        sign = -1 if order == "area_desc" else 1
        idx.sort(key=lambda i: sign * areas[i])
    labels = np.zeros((H, W), dtype=np.uint32)
    for new_id, i in enumerate(idx, start=1):
        (r0, c0, r1, c1), local = record_mask(records[i], (H, W))
        labels[r0:r1, c0:c1][local] = new_id
    return labels


def record_mask(
    record: dict[str, Any], shape: tuple[int, int]
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """A record's mask as ``((row0, col0, row1, col1), local bool mask)`` in an (H, W) image."""
    seg = record["segmentation"]
    if isinstance(seg, dict):
        seg = M.rle_to_mask(seg)
    seg = np.asarray(seg, dtype=bool)
    H, W = shape
    if seg.shape == (H, W):
        return (0, 0, H, W), seg
    box = record.get("bbox_rc")
    if box is None:
        raise InvalidInputError(
            f"A record's mask has shape {seg.shape}, not the image shape {(H, W)}, and no "
            "'bbox_rc' to place it."
        )
    r0, c0, r1, c1 = (int(v) for v in box)
    if seg.shape != (r1 - r0, c1 - c0) or r0 < 0 or c0 < 0 or r1 > H or c1 > W:
        raise InvalidInputError(
            f"A cropped mask of shape {seg.shape} does not fit its bbox_rc {list(box)} inside "
            f"an image of shape {(H, W)}."
        )
    return (r0, c0, r1, c1), seg


# ----------------------------------------------------------------------------- helpers


def _check_cancel(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise CancelledError("Everything-mode was cancelled.")


def _empty_data() -> dict[str, Any]:
    return {
        "masks": [],
        "iou": torch.zeros(0),
        "stability": torch.zeros(0),
        "points": torch.zeros(0, 2, dtype=torch.float64),
        "boxes": torch.zeros(0, 4, dtype=torch.int64),
    }


def _cat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if not parts:
        return _empty_data()
    out: dict[str, Any] = {}
    for key in parts[0]:
        vals = [p[key] for p in parts]
        if isinstance(vals[0], list):
            out[key] = [v for sub in vals for v in sub]
        else:
            out[key] = torch.cat([v.cpu() for v in vals])
    return out


def _filter(data: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    keep = keep.cpu()
    if keep.dtype == torch.bool:
        keep = torch.nonzero(keep).flatten()
    out = {}
    for key, v in data.items():
        out[key] = [v[i] for i in keep.tolist()] if isinstance(v, list) else v[keep]
    return out


# ----------------------------------------------------------------------------- low-res bound


def _axis_support(n_low: int, target: int, n_in: int, n_out: int) -> np.ndarray:
    """First low-res index feeding each of ``n_out`` output pixels along one axis.

    Mirrors the postprocessing (bilinear, align_corners=False): ``n_low`` ->
    ``target`` (keep the first ``n_in``) -> ``n_out``. Returns ``lo`` (n_out,)
    and the largest support width; every output pixel is a convex combination
    of low-res pixels in ``[lo, lo + width - 1]``.
    """

    def src_index(dst: np.ndarray, n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray]:
        src = np.maximum((dst + 0.5) * (n_src / n_dst) - 0.5, 0.0)
        i0 = np.floor(src).astype(np.int64)
        return i0, np.minimum(i0 + 1, n_src - 1)

    j = np.arange(n_in, dtype=np.float64)
    lo1, hi1 = src_index(j, n_low, target)
    if n_in == n_out:
        lo, hi = lo1, hi1
    else:
        j0, j1 = src_index(np.arange(n_out, dtype=np.float64), n_in, n_out)
        lo, hi = lo1[j0], hi1[j1]
    return lo, int((hi - lo).max()) + 1


def _stability_upper_bound(
    low: torch.Tensor,
    target_length: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    mask_threshold: float,
    offset: float,
) -> torch.Tensor:
    """Upper bound of the full-resolution stability score of (S, L, L) low-res logits.

    An upsampled pixel is a convex combination of the low-res pixels in its
    support (a k x k block starting at ``(lo_y, lo_x)``), so it can only be
    above a threshold if one of them is (bounding the intersection from
    above), and it surely is if all of them are (bounding the union from
    below). Counting full-resolution pixels per block start turns both bounds
    into weighted sums over the low-res grid. A margin of ``_BOUND_EPS`` covers
    float rounding. Returns (S,) float32, ``inf`` when the union bound is 0.
    """
    s, lh, lw = low.shape
    lo_y, ky = _axis_support(lh, target_length, input_size[0], original_size[0])
    lo_x, kx = _axis_support(lw, target_length, input_size[1], original_size[1])
    cy = torch.from_numpy(np.bincount(lo_y, minlength=lh)).to(low.device, torch.float32)
    cx = torch.from_numpy(np.bincount(lo_x, minlength=lw)).to(low.device, torch.float32)

    def block(x: torch.Tensor, any_: bool) -> torch.Tensor:
        """any / all of x over the block [i, i + ky) x [j, j + kx) (clipped to the grid)."""
        out = x.clone()
        for dim, k in ((1, ky), (2, kx)):
            src = out.clone() if k > 1 else out
            n = x.shape[dim]
            for j in range(1, min(k, n)):
                dst, shifted = out.narrow(dim, 0, n - j), src.narrow(dim, j, n - j)
                if any_:
                    dst |= shifted
                else:
                    dst &= shifted
        return out

    hi = low > mask_threshold + offset - _BOUND_EPS
    lo = low > mask_threshold - offset + _BOUND_EPS
    inter_ub = torch.einsum("i,sij,j->s", cy, block(hi, True).float(), cx)
    union_lb = torch.einsum("i,sij,j->s", cy, block(lo, False).float(), cx)
    return torch.where(union_lb > 0, inter_ub / union_lb.clamp(min=1), torch.inf)


# ----------------------------------------------------------------------------- fast decoder


def _softmax_short_(x: torch.Tensor) -> torch.Tensor:
    """In-place softmax over a short last axis (a few prompt tokens).

    ``Tensor.softmax`` is slow when rows are only a handful of elements long;
    three vectorised passes are faster.
    """
    x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=-1, keepdim=True))


def _has(obj: Any, *names: str) -> bool:
    return all(hasattr(obj, n) for n in names)


class _FastDecoder:
    """SAM's mask decoder evaluated for many prompt sets on one image embedding.

    Gives the same IoU predictions and low-res logits as
    ``model.mask_decoder`` without a mask prompt (up to float rounding), with
    far less work for the (B, N, C) image tokens (B prompts, N = E*E tokens):

    * The first block's image tokens are the same for every prompt, so its
      image-side q/k/v projections are computed once per image (:meth:`prepare`).
    * Cross-attention is factored. Token-to-image attention computes
      ``softmax((Q W_k) (K + pe)^T) K`` and applies ``W_v`` afterwards (the key
      bias is constant along the softmax axis and drops out, attention rows sum
      to one); image-to-token attention folds ``W_q`` into the token keys and
      ``W_o`` into the token values. Every product with the N image tokens
      then has width ``heads * tokens`` instead of the attention width.
    * Mask logits are only computed on request (:meth:`masks`), for the prompts
      whose IoU predictions pass the filter, with the transposed convolutions
      written as matrix products on the channels-last tokens.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.dec = model.mask_decoder
        self.tr = self.dec.transformer
        self.no_mask = model.prompt_encoder.no_mask_embed.weight
        self._img: dict[str, torch.Tensor] | None = None

    @classmethod
    def build(cls, model: Any) -> _FastDecoder | None:
        """A fast decoder for ``model``, or None when its decoder has another structure."""
        try:
            dec = model.mask_decoder
            tr = dec.transformer
            ok = (
                type(dec).__name__ == "MaskDecoder"
                and type(tr).__name__ == "TwoWayTransformer"
                and _has(dec, "iou_token", "mask_tokens", "output_hypernetworks_mlps",
                         "iou_prediction_head", "num_mask_tokens", "output_upscaling")
                and _has(tr, "layers", "final_attn_token_to_image", "norm_final_attn")
                and len(tr.layers) > 0
                and hasattr(model.prompt_encoder, "no_mask_embed")
                and len(dec.output_upscaling) == 5
            )
            up = dec.output_upscaling
            ok = ok and all(
                isinstance(up[i], torch.nn.ConvTranspose2d)
                and tuple(up[i].kernel_size) == (2, 2)
                and tuple(up[i].stride) == (2, 2)
                and tuple(up[i].padding) == (0, 0)
                for i in (0, 3)
            ) and _has(up[1], "weight", "bias", "eps")
            attns = [tr.final_attn_token_to_image]
            for layer in tr.layers:
                ok = ok and _has(layer, "self_attn", "cross_attn_token_to_image", "mlp",
                                 "cross_attn_image_to_token", "norm1", "norm2", "norm3", "norm4",
                                 "skip_first_layer_pe")
                attns += [layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
            ok = ok and all(
                _has(a, "q_proj", "k_proj", "v_proj", "out_proj", "num_heads")
                and all(getattr(a, n).bias is not None for n in ("q_proj", "k_proj", "v_proj",
                                                                  "out_proj"))
                for a in attns
            )
        except (AttributeError, TypeError):
            return None
        return cls(model) if ok else None

    # ------------------------------------------------------------------ image side

    def prepare(self, features: torch.Tensor, dense_pe: torch.Tensor) -> None:
        """Precompute the prompt-independent terms for ``features`` (1, C, E, E)."""
        _, c, eh, ew = features.shape
        src = features + self.no_mask.reshape(1, -1, 1, 1)
        keys0 = src[0].reshape(c, -1).t().contiguous()  # (N, C)
        pe = dense_pe[0].reshape(c, -1).t().contiguous()
        kp0 = keys0 + pe
        first = self.tr.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        self._img = {
            "keys0": keys0,
            "pe": pe,
            "K0": self._heads_shared(t2i.k_proj(kp0), t2i.num_heads),
            "V0": self._heads_shared(t2i.v_proj(keys0), t2i.num_heads),
            "Q0": self._heads_shared(i2t.q_proj(kp0), i2t.num_heads),
            "size": (eh, ew),
        }

    def release(self) -> None:
        """Drop the per-image tensors."""
        self._img = None

    @staticmethod
    def _heads_shared(x: torch.Tensor, h: int) -> torch.Tensor:
        n, ci = x.shape
        return x.view(n, h, ci // h).transpose(0, 1).contiguous()  # (h, N, d)

    # ------------------------------------------------------------------ attention pieces

    @staticmethod
    def _fold_out(attn, v_tok: torch.Tensor) -> torch.Tensor:
        """Token values (B, T, h, d) times out_proj -> (B, h*T, C) (bias / h added)."""
        b, t, h, d = v_tok.shape
        w_o = attn.out_proj.weight.t().reshape(h, d, -1)
        vo = torch.einsum("bthd,hdc->bhtc", v_tok, w_o).reshape(b, h * t, -1)
        return vo + attn.out_proj.bias / h

    @staticmethod
    def _t2i_shared(attn, q_in, k_heads, v_heads) -> torch.Tensor:
        """Token-to-image attention on image tokens shared by all prompts."""
        b, t, _ = q_in.shape
        h, _, d = k_heads.shape
        q = attn.q_proj(q_in) * (d**-0.5)
        q = q.view(b, t, h, d).permute(2, 0, 1, 3).reshape(h, b * t, d)
        a = torch.bmm(q, k_heads.transpose(1, 2)).softmax(dim=-1)  # (h, B*T, N)
        o = torch.bmm(a, v_heads).view(h, b, t, d).permute(1, 2, 0, 3).reshape(b, t, h * d)
        return attn.out_proj(o)

    def _i2t_shared(self, attn, q_heads, k_in, v_in, resid) -> torch.Tensor:
        """``resid + image-to-token attention`` for shared image queries (before the norm)."""
        b, t, _ = k_in.shape
        h, n, d = q_heads.shape
        k = (attn.k_proj(k_in) * (d**-0.5)).view(b, t, h, d).permute(2, 3, 0, 1)
        s = _softmax_short_(torch.bmm(q_heads, k.reshape(h, d, b * t)).view(h, n, b, t))
        a = s.permute(2, 1, 0, 3).reshape(b, n, h * t)
        vo = self._fold_out(attn, attn.v_proj(v_in).view(b, t, h, d))
        return torch.baddbmm(resid.expand(b, n, -1), a, vo)

    @staticmethod
    def _t2i(attn, q_in, kp, keys) -> torch.Tensor:
        """Token-to-image attention, keys ``kp`` = image tokens + pe, values ``keys``."""
        b, t, c = q_in.shape
        h = attn.num_heads
        ci = attn.q_proj.out_features
        d = ci // h
        q = (attn.q_proj(q_in) * (d**-0.5)).view(b, t, h, d)
        qk = torch.einsum("bthd,hdc->bhtc", q, attn.k_proj.weight.view(h, d, c))
        a = torch.bmm(qk.reshape(b, h * t, c), kp.transpose(1, 2)).softmax(dim=-1)
        r = torch.bmm(a, keys).view(b, h, t, c)  # attention-weighted image tokens
        o = torch.einsum("bhtc,hdc->bthd", r, attn.v_proj.weight.view(h, d, c))
        o = o + attn.v_proj.bias.view(h, d)
        return attn.out_proj(o.reshape(b, t, ci))

    @staticmethod
    def _t2i_pe(attn, q_in, keys, pe) -> torch.Tensor:
        """Like :meth:`_t2i` with keys ``keys + pe``, without forming that sum: the pe part
        of the logits, ``(q W_k) pe^T``, is one product for all prompts (cheap for few
        tokens)."""
        b, t, c = q_in.shape
        h = attn.num_heads
        ci = attn.q_proj.out_features
        d = ci // h
        q = (attn.q_proj(q_in) * (d**-0.5)).view(b, t, h, d)
        qk = torch.einsum("bthd,hdc->bhtc", q, attn.k_proj.weight.view(h, d, c))
        qk = qk.reshape(b, h * t, c)
        a = torch.baddbmm(qk @ pe.t(), qk, keys.transpose(1, 2)).softmax(dim=-1)
        r = torch.bmm(a, keys).view(b, h, t, c)
        o = torch.einsum("bhtc,hdc->bthd", r, attn.v_proj.weight.view(h, d, c))
        o = o + attn.v_proj.bias.view(h, d)
        return attn.out_proj(o.reshape(b, t, ci))

    def _i2t(self, attn, kp, k_in, v_in, keys) -> torch.Tensor:
        """``keys + image-to-token attention`` with queries ``kp`` (before the norm), in place."""
        b, t, c = k_in.shape
        h = attn.num_heads
        d = attn.q_proj.out_features // h
        k = (attn.k_proj(k_in) * (d**-0.5)).view(b, t, h, d)
        m = torch.einsum("bthd,hdc->bcht", k, attn.q_proj.weight.view(h, d, c))
        bias = torch.einsum("bthd,hd->bht", k, attn.q_proj.bias.view(h, d))
        s = torch.baddbmm(bias.reshape(b, 1, h * t), kp, m.reshape(b, c, h * t))
        n = kp.shape[1]
        a = _softmax_short_(s.view(b, n, h, t)).view(b, n, h * t)
        vo = self._fold_out(attn, attn.v_proj(v_in).view(b, t, h, d))
        return keys.baddbmm_(a, vo)  # the caller's keys are not needed any more

    # ------------------------------------------------------------------ decoding

    def run(
        self, sparse: torch.Tensor, sub_batch: int = 16
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor], int]]:
        """(B, Np, C) sparse prompt tokens -> IoU predictions (B, num_mask_tokens) and a state.

        Only the IoU token goes through the final token-to-image attention here;
        the mask tokens follow in :meth:`masks`, for the prompts that need them
        (each token attends on its own, so this is exact). Prompts go through
        the transformer ``sub_batch`` at a time to bound memory.
        """
        if self._img is None:
            raise InvalidInputError("_FastDecoder.prepare(features, pe) must be called first.")
        queries, keys, iou_tokens = [], [], []
        for s in range(0, sparse.shape[0], sub_batch):
            q, k, qpe = self._transformer(sparse[s : s + sub_batch])
            iou_tokens.append(self._final(q[:, :1], qpe[:, :1], k))
            queries.append(q)
            keys.append(k)
        iou = self.dec.iou_prediction_head(torch.cat(iou_tokens)[:, 0])
        return iou, (torch.cat(queries), keys, sub_batch)

    def _final(self, queries: torch.Tensor, qpe: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Final token-to-image attention + norm for (b, t, C) tokens against (b, N, C) keys."""
        tr = self.tr
        out = self._t2i_pe(tr.final_attn_token_to_image, queries + qpe, keys, self._img["pe"])
        return tr.norm_final_attn(queries + out)

    def _transformer(self, sparse: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The two-way attention blocks: tokens (b, T, C), image tokens (b, N, C), token pe."""
        img = self._img
        dec, tr = self.dec, self.tr
        b = sparse.shape[0]
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens[None].expand(b, -1, -1), sparse], dim=1)
        queries, qpe, pe = tokens, tokens, img["pe"]
        keys = None
        for i, layer in enumerate(tr.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + qpe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            if i == 0:
                out = self._t2i_shared(layer.cross_attn_token_to_image, queries + qpe,
                                       img["K0"], img["V0"])
                queries = layer.norm2(queries + out)
                queries = layer.norm3(queries + layer.mlp(queries))
                keys = layer.norm4(self._i2t_shared(layer.cross_attn_image_to_token, img["Q0"],
                                                    queries + qpe, queries, img["keys0"]))
            else:
                kp = keys + pe
                out = self._t2i(layer.cross_attn_token_to_image, queries + qpe, kp, keys)
                queries = layer.norm2(queries + out)
                queries = layer.norm3(queries + layer.mlp(queries))
                keys = layer.norm4(self._i2t(layer.cross_attn_image_to_token, kp,
                                             queries + qpe, queries, keys))
                del kp
        return queries, keys, qpe

    def masks(
        self,
        state: tuple[torch.Tensor, torch.Tensor],
        prompt_idx: torch.Tensor,
        token_idx: torch.Tensor,
        chunk: int = 8,
    ) -> torch.Tensor:
        """Low-res logits (S, 4E, 4E): mask token ``token_idx[s]`` of prompt ``prompt_idx[s]``."""
        queries, key_parts, sub = state
        dec = self.dec
        eh, ew = self._img["size"]
        up = dec.output_upscaling
        c1, ln, act1, c2, act2 = up[0], up[1], up[2], up[3], up[4]
        c = queries.shape[-1]
        c4, c8 = c1.out_channels, c2.out_channels
        # ConvTranspose2d(k=2, s=2) = a per-token linear map to 4 sub-pixels (ky, kx, out)
        w1 = c1.weight.permute(2, 3, 1, 0).reshape(4 * c4, c)
        b1 = c1.bias.repeat(4)
        w2 = c2.weight.permute(2, 3, 1, 0).reshape(4 * c8, c4)
        b2 = c2.bias.repeat(4)
        uniq, inv = torch.unique(prompt_idx, return_inverse=True)
        toks = torch.unique(token_idx).tolist()
        tok_pos = torch.full((dec.num_mask_tokens,), -1, dtype=torch.long)
        tok_pos[toks] = torch.arange(len(toks))
        col = tok_pos[token_idx.cpu()].to(token_idx.device)
        tok_rows = torch.tensor([1 + k for k in toks], device=queries.device)
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        out = queries.new_empty(prompt_idx.numel(), 4 * eh, 4 * ew)
        for s in range(0, uniq.numel(), chunk):
            e = min(s + chunk, uniq.numel())
            keys = torch.stack([key_parts[p // sub][p % sub] for p in uniq[s:e].tolist()])
            q = queries[uniq[s:e]][:, tok_rows]
            q = self._final(q, out_tokens[tok_rows][None].expand(e - s, -1, -1), keys)
            hyper = torch.stack(
                [dec.output_hypernetworks_mlps[k](q[:, j]) for j, k in enumerate(toks)], dim=2
            )  # (P, C/8, K)
            x = F.linear(keys, w1, b1).view(e - s, -1, 4, c4)
            x = act1(F.layer_norm(x, (c4,), ln.weight, ln.bias, ln.eps))
            y = act2(F.linear(x, w2, b2)).view(e - s, -1, c8)  # (P, N*16, C/8)
            m = torch.bmm(y, hyper)  # (P, N*16, K), order (y, x, ky1, kx1, ky2, kx2)
            rows = torch.nonzero((inv >= s) & (inv < e)).flatten()
            m = m[inv[rows] - s, :, col[rows]]  # (R, N*16)
            m = m.view(-1, eh, ew, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
            out[rows] = m.reshape(-1, 4 * eh, 4 * ew)
        return out
