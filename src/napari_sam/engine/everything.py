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
   tokens is ever materialised (the predictor's decoder backend,
   ``FactoredBackend.decode_selected`` in :mod:`napari_sam.models.fast_decoder`).
   Mask logits are
   only computed for the multimask outputs whose predicted IoU passes
   ``pred_iou_thresh``, right after their prompts' transformer pass, so the
   per-prompt image tokens are never stored. Large intermediates go into
   reused buffers or stay cache-sized: fresh multi-MB tensors cost page faults
   (about 1 us per 4 KiB page), once about half of the mask-generation time
   (docs/benchmarks.md).
3. Before upsampling, a cheap upper bound of each mask's stability score is
   taken at low resolution
   (:func:`~napari_sam.engine.upsample.stability_upper_bound`); masks whose bound
   is below ``stability_score_thresh`` cannot pass at full resolution and are
   dropped. Survivors are upsampled exactly like the reference and filtered on
   their exact stability score.
4. Masks touching a crop edge are dropped, duplicates removed by box NMS (per
   crop, then across crops), small holes and islands optionally cleaned.

Memory scales with the objects, not with the image: every kept candidate is
cut to its bounding box as soon as it is thresholded (empty masks are
dropped), full-resolution logits are upsampled a few masks at a time within a
fixed budget (:data:`UPSCALE_BUDGET_BYTES`), and the hole / island clean-up
works on the cropped masks. Full-size masks exist only in the final records,
and only with ``output_mode="binary_mask"`` (``"cropped_mask"`` and
:meth:`AutomaticMaskGenerator.generate_labels` never build them).

Large images: the model sees the image resized to its input size (256 px
for the default model, 1024 for SAM), so small objects in a large image
vanish. Unless ``auto_tile=False``, images whose longest side is more than
3 x the input size are segmented in overlapping tiles of 2 x the input size
(:func:`~napari_sam.engine.everything_settings.auto_tile_size`,
:func:`~napari_sam.engine.tiles.generate_tiled`); with ``auto_tile=False`` a
warning names the tile size to use.

Thresholds: ``pred_iou_thresh`` and ``stability_score_thresh`` left at None
take the values the model recommends
(:func:`~napari_sam.engine.everything_settings.recommended_settings`: 0.6 /
0.85 for the embedded default model and models fine-tuned from it) and
otherwise SAM's 0.88 / 0.95. Every parameter is checked when the generator is
built (:class:`~napari_sam.engine.everything_settings.EverythingSettings`).

Records (one dict per mask, ordered like the reference's):

* ``segmentation``: (H, W) bool mask; an uncompressed COCO RLE dict when
  ``output_mode="uncompressed_rle"``; the mask cut to ``bbox_rc``
  ((row1 - row0, col1 - col0) bool) when ``output_mode="cropped_mask"``.
* ``area``: number of mask pixels (never 0).
* ``bbox``: ``[x, y, w, h]`` exactly as SAM reports it: ``x, y`` the first
  column and row of the mask, ``w, h`` = last column - first column and
  last row - first row (one less than the pixel extent).
* ``bbox_rc``: ``[row0, col0, row1, col1]`` slice bounds of the mask
  (``row1, col1`` exclusive), the engine's convention.
* ``predicted_iou``, ``stability_score``: the model's quality estimates.
* ``point_coords``: ``[[x, y]]`` image pixel coordinates of the prompt.
* ``crop_box``: ``[x, y, w, h]`` of the crop the mask came from.
* tiled images only: ``tile_box`` ``[row0, col0, row1, col1]`` of the tile
  and ``n_pieces``, the tiles merged into the mask
  (:mod:`napari_sam.engine.tiles`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_sam.engine import masks as M
from napari_sam.engine.everything_settings import EverythingSettings, auto_tile_size
from napari_sam.engine.image import to_rgb_uint8
from napari_sam.engine.mask_batch import MaskBatch
from napari_sam.engine.predictor import Predictor
from napari_sam.engine.progress import check_cancel, run_steps
from napari_sam.engine.threads import compute_threads
from napari_sam.engine.upsample import stability_upper_bound, upscale_logits
from napari_sam.errors import InvalidInputError

__all__ = ["AutomaticMaskGenerator", "EverythingProgress", "EverythingSettings",
           "records_to_labels"]

_ORDERS = ("area_desc", "area_asc", "input")
# what CancelledError says when ``cancel`` stops a run
_CANCELLED = "Everything-mode"
#: full-resolution float logits upsampled at once stay within this many bytes
UPSCALE_BUDGET_BYTES = 64 << 20
_MAX_UPSCALE_CHUNK = 16


@dataclass(frozen=True)
class EverythingProgress:
    """Progress of everything-mode: ``done`` of ``total`` batches of prompts decoded
    (over all crops, and over all tiles when the image is tiled)."""

    done: int
    total: int


#: what the internal generation steps yield, and finally return
_Steps = Generator[EverythingProgress, None, Any]


class AutomaticMaskGenerator:
    """Segment everything in an image with a grid of point prompts.

    Arguments (the official generator's, plus ``auto_tile``):
      model_or_predictor: a SAM model (``napari_sam.models.Sam`` or anything with
        its interface) or a :class:`~napari_sam.engine.predictor.Predictor`.
      points_per_side: points along each side of the image (1..256); None to use
        ``point_grids`` instead.
      points_per_batch: prompts decoded together (1..4096; memory grows linearly).
      pred_iou_thresh: keep masks whose predicted IoU is > this ([0, 1]; None:
        the model's recommended value, else SAM's 0.88).
      stability_score_thresh: keep masks whose stability score is >= this
        ([0, 1]; None: the model's recommended value, else SAM's 0.95).
      stability_score_offset: logit offset used by the stability score (>= 0).
      box_nms_thresh: box IoU above which duplicates within a crop are dropped ([0, 1]).
      crop_n_layers: extra crop layers (0..4); layer i has ``2**i x 2**i`` crops.
      crop_nms_thresh: box IoU above which duplicates between crops are dropped ([0, 1]).
      crop_overlap_ratio: overlap of first-layer crops, as a fraction of the
        image's short side ([0, 1)).
      crop_n_points_downscale_factor: points per side shrink by this factor per
        layer (a whole number >= 1).
      point_grids: explicit grids, one per crop layer, of normalised ``(x, y)``
        points in [0, 1] (SAM's convention, x = column).
      min_mask_region_area: when > 0, fill holes and drop islands smaller than
        this many pixels, then run NMS again.
      output_mode: ``"binary_mask"``, ``"uncompressed_rle"`` or ``"cropped_mask"``.
      auto_tile: tile images too large for the model's input (module docstring).

    Raises:
      InvalidInputError: a parameter is out of range (see
        :class:`~napari_sam.engine.everything_settings.EverythingSettings`).
    """

    def __init__(
        self,
        model_or_predictor: Any,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float | None = None,
        stability_score_thresh: float | None = None,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        auto_tile: bool = True,
    ) -> None:
        settings = EverythingSettings(
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers,
            crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            point_grids=point_grids,
            min_mask_region_area=min_mask_region_area,
            output_mode=output_mode,
            auto_tile=auto_tile,
        )
        if isinstance(model_or_predictor, Predictor):
            self.predictor = model_or_predictor
        else:
            self.predictor = Predictor(model_or_predictor)
        #: the validated settings, thresholds resolved for this model
        self.settings = settings.resolved(self.predictor.model)
        st = self.settings
        if st.point_grids is not None:
            self.point_grids = list(st.point_grids)
        else:
            self.point_grids = M.build_all_layer_point_grids(
                st.points_per_side, st.crop_n_layers, st.crop_n_points_downscale_factor
            )
        self.points_per_batch = st.points_per_batch
        self.pred_iou_thresh = float(st.pred_iou_thresh)
        self.stability_score_thresh = float(st.stability_score_thresh)
        self.stability_score_offset = st.stability_score_offset
        self.box_nms_thresh = st.box_nms_thresh
        self.crop_n_layers = st.crop_n_layers
        self.crop_nms_thresh = st.crop_nms_thresh
        self.crop_overlap_ratio = st.crop_overlap_ratio
        self.crop_n_points_downscale_factor = st.crop_n_points_downscale_factor
        self.min_mask_region_area = st.min_mask_region_area
        self.output_mode = st.output_mode
        self.auto_tile = st.auto_tile
        # the predictor's kind of decoder backend, with scratch tensors of its own
        # (the predictor may keep predicting on another thread)
        self._backend = self.predictor.decoder.fresh()

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
          progress: called as ``progress(done, total)`` after each batch of
            prompts (over all tiles when the image is tiled).
          cancel: called before each embedding and each batch; when it returns
            True, :class:`~napari_sam.errors.CancelledError` is raised.
          use_cache: take embeddings from (and put them into) the predictor's
            embedding cache; False keeps no embedding alive after the call.
            (Tiles never use the cache.)

        Returns:
          a list of records (see the module docstring), in ``output_mode``.
        """
        result: list[dict[str, Any]] = []
        for item in self.iter_generate(image, contrast_limits, channel_axis, cancel, use_cache):
            if isinstance(item, EverythingProgress):
                if progress is not None:
                    progress(item.done, item.total)
            else:
                result = item
        return result

    def iter_generate(
        self,
        image: np.ndarray,
        contrast_limits: tuple[float, float] | None = None,
        channel_axis: int | None = None,
        cancel: Callable[[], bool] | None = None,
        use_cache: bool = True,
    ) -> Iterator[EverythingProgress | list[dict[str, Any]]]:
        """:meth:`generate` as a generator: yields an :class:`EverythingProgress` after
        each batch of prompts, and last the list of records.

        For a worker thread (napari's ``thread_worker`` takes it as is). Stopping
        the iteration (``close()``) stops the work between two batches; ``cancel``
        works as in :meth:`generate`. Torch's inference mode and thread settings
        are not held across the yields.
        """
        rgb = to_rgb_uint8(image, contrast_limits=contrast_limits, channel_axis=channel_axis)
        records = yield from self._iter_cropped_records(rgb, cancel, use_cache)
        yield _finish_records(records, rgb.shape[:2], self.output_mode)

    def iter_tile(
        self, rgb: np.ndarray, cancel: Callable[[], bool] | None = None
    ) -> Generator[EverythingProgress, None, list[dict[str, Any]]]:
        """Records with cropped masks (``bbox_rc``) of one (h, w, 3) uint8 tile, in one
        piece and without the embedding cache; yields progress per batch and returns the
        records (what :func:`~napari_sam.engine.tiles.generate_tiled` runs per tile)."""
        return (yield from self._iter_plain_records(rgb, cancel, use_cache=False))

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

        See :func:`records_to_labels` for the painting order and ids. No
        full-size mask is built, whatever ``output_mode`` says.
        """
        if order not in _ORDERS:  # before the work, not after
            raise InvalidInputError(
                f"order must be 'area_desc', 'area_asc' or 'input', got {order!r}."
            )
        rgb = to_rgb_uint8(image, contrast_limits=contrast_limits, channel_axis=channel_axis)
        records = run_steps(self._iter_cropped_records(rgb, cancel, use_cache=True), progress)
        return records_to_labels(records, rgb.shape[:2], order=order)

    def tile_size_for(self, shape: tuple[int, int]) -> int | None:
        """The tile size this generator uses on its own for an (H, W) image (None: no tiles).

        See :func:`~napari_sam.engine.everything_settings.auto_tile_size`;
        always None with ``auto_tile=False``.
        """
        if not self.auto_tile:
            return None
        return auto_tile_size(shape, self.predictor.transform.target_length)

    # ------------------------------------------------------------------ generation

    def _iter_cropped_records(self, rgb, cancel, use_cache) -> _Steps:
        """Records with cropped masks (``bbox_rc``) of an (H, W, 3) uint8 image, tiled if needed."""
        shape = rgb.shape[:2]
        img_size = self.predictor.transform.target_length
        tile = self.tile_size_for(shape)
        if tile is None:
            if auto_tile_size(shape, img_size) is not None:
                suggested = auto_tile_size(shape, img_size)
                warnings.warn(
                    f"The model sees this {shape[0]} x {shape[1]} image at {img_size} px, so "
                    f"small objects are lost; keep auto_tile=True or tile it "
                    f"(generate_tiled(..., tile_size={suggested}), CLI --tile-size {suggested}).",
                    UserWarning, stacklevel=4,
                )
            return (yield from self._iter_plain_records(rgb, cancel, use_cache))
        from napari_sam.engine.tiles import iter_tiled

        steps = iter_tiled(self, rgb, tile_size=tile, overlap=tile // 8, cancel=cancel)
        try:
            while True:
                k, n, step = next(steps)
                if step is not None:  # progress over all tiles (each has the same batches)
                    yield EverythingProgress(k * step.total + step.done, n * step.total)
        except StopIteration as stop:
            return stop.value

    def _iter_plain_records(self, rgb, cancel, use_cache) -> _Steps:
        """Records with cropped masks of an (H, W, 3) uint8 image, in one piece."""
        data = yield from self._iter_masks(rgb, cancel, use_cache)
        if self.min_mask_region_area > 0:
            data = self._postprocess_small_regions(
                data, rgb.shape[:2], self.min_mask_region_area,
                max(self.box_nms_thresh, self.crop_nms_thresh),
            )
        return self._records(data)

    def _iter_masks(self, rgb, cancel, use_cache) -> _Steps:
        H, W = rgb.shape[:2]
        crop_boxes, layers = M.generate_crop_boxes((H, W), self.crop_n_layers,
                                                   self.crop_overlap_ratio)
        ppb = self.points_per_batch
        total = sum(math.ceil(len(self.point_grids[k]) / ppb) for k in layers)
        state = {"done": 0, "total": total, "cancel": cancel}
        parts = []
        for crop_box, layer in zip(crop_boxes, layers, strict=True):
            parts.append((yield from self._iter_crop(rgb, crop_box, layer, state, use_cache)))
        data = MaskBatch.cat(parts)
        if len(crop_boxes) > 1 and len(data):
            # between crops, prefer masks from smaller crops
            cb = data.crop_boxes.float()
            scores = 1.0 / M.box_area(cb)
            keep = M.nms(data.boxes.float(), scores, self.crop_nms_thresh)
            data = data.filter(keep)
        return data

    def _iter_crop(self, rgb, crop_box, layer, state, use_cache) -> _Steps:
        x0, y0, x1, y1 = crop_box
        crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        check_cancel(state["cancel"], _CANCELLED)
        p = self.predictor
        emb = p.embed(crop, use_cache=use_cache)  # the predictor's own image is untouched
        h_c, w_c = emb.original_size
        pts = self.point_grids[layer] * np.array([[w_c, h_c]], dtype=np.float64)  # crop xy
        model_xy = p.transform.xy_to_model(pts, emb.original_size)

        dev = p.device
        thr = float(getattr(self.model, "mask_threshold", 0.0))
        try:
            with torch.inference_mode():
                ctx = self._backend.prepare(emb.features.to(dev))
            chunks = []
            for s in range(0, len(pts), self.points_per_batch):
                check_cancel(state["cancel"], _CANCELLED)
                sl = slice(s, s + self.points_per_batch)
                # threads chosen per batch (they follow the machine's load); inference mode
                # and thread settings are not held across the yield
                with torch.inference_mode(), compute_threads():
                    chunks.append(self._process_batch(ctx, emb, pts[sl], model_xy[sl], crop_box,
                                                      rgb.shape[:2], thr, dev))
                state["done"] += 1
                yield EverythingProgress(state["done"], state["total"])
        finally:
            ctx = None
            self._backend.release()
        data = MaskBatch.cat(chunks)
        if len(data):
            keep = M.nms(data.boxes.float(), data.iou, self.box_nms_thresh)
            data = data.filter(keep)
        data.boxes = M.uncrop_boxes_xyxy(data.boxes, crop_box)
        data.points = M.uncrop_points(data.points, crop_box)
        n = len(data)
        data.crop_boxes = torch.tensor([list(crop_box)] * n, dtype=torch.int64).reshape(n, 4)
        data.masks = [(m, (r + y0, c + x0)) for m, (r, c) in data.masks]  # image frame
        return data

    def _decode(self, ctx, model_xy: np.ndarray, dev) -> tuple[torch.Tensor, ...]:
        """Decode a batch of point prompts.

        Returns the IoU predictions (B, 3) of the multimask outputs, the flat
        indices (prompt * 3 + output) of the outputs that pass
        ``pred_iou_thresh``, and their low-res logits (S, 4E, 4E).
        """
        coords = torch.as_tensor(model_xy, device=dev)[:, None, :]  # float64, like the reference
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=dev)

        def select(iou: torch.Tensor) -> torch.Tensor:
            if self.pred_iou_thresh > 0.0:
                return iou > self.pred_iou_thresh
            return torch.ones_like(iou, dtype=torch.bool)

        sparse, dense = self.model.prompt_encoder(points=(coords, labels), boxes=None,
                                                  masks=None)
        iou, chosen, low = self._backend.decode_selected(ctx, sparse, dense, select)
        return iou, torch.nonzero(chosen.flatten()).flatten(), low

    def _process_batch(self, ctx, emb, pts, model_xy, crop_box, orig_size, thr, dev):
        """Decode one batch of prompts on the crop embedded as ``emb`` (backend context
        ``ctx``) -> filtered masks (crop frame) and their data."""
        iou, cand, low = self._decode(ctx, model_xy, dev)
        n_out = iou.shape[1]
        flat_iou = iou.reshape(-1)
        empty = MaskBatch.empty()
        if cand.numel() == 0:
            return empty
        b_idx = cand // n_out

        transform = self.predictor.transform
        target = transform.target_length
        # the low-res bound follows SAM's bilinear upscaling (not EfficientSAM's bicubic one)
        if self.stability_score_thresh > 0.0 and transform.bilinear_upscale:
            ub = stability_upper_bound(
                low, target, emb.input_size, emb.original_size, thr,
                self.stability_score_offset,
            )
            ok = ub >= self.stability_score_thresh
            cand, b_idx, low = cand[ok], b_idx[ok], low[ok]
            if cand.numel() == 0:
                return empty

        # full-resolution logits a few masks at a time; each kept mask is cut to its box
        h_c, w_c = emb.original_size
        chunk = max(1, min(_MAX_UPSCALE_CHUNK, UPSCALE_BUDGET_BYTES // (4 * h_c * w_c)))
        kept_masks: list[tuple[torch.Tensor, tuple[int, int]]] = []
        kept_stab, kept_sel, kept_boxes = [], [], []
        for s in range(0, cand.numel(), chunk):
            if transform.bilinear_upscale:  # SAM: the banded resize chain
                logits = upscale_logits(low[s : s + chunk, None], target, emb.input_size,
                                        emb.original_size)[:, 0]  # (s, h_c, w_c)
            else:  # EfficientSAM's bicubic resize
                logits = transform.upscale(low[s : s + chunk, None], emb.input_size,
                                           emb.original_size)[:, 0]
            stab = M.stability_score(logits, thr, self.stability_score_offset)
            masks = logits > thr
            del logits
            # empty masks never pass (their stability is 0 / 0, even with threshold 0)
            ok = masks.flatten(1).any(dim=1)
            if self.stability_score_thresh > 0:
                ok &= stab >= self.stability_score_thresh
            if not ok.any():
                continue
            idx = torch.nonzero(ok).flatten()
            boxes = M.mask_to_box_xyxy(masks[idx])  # inclusive, crop frame
            for i, (bx0, by0, bx1, by1) in zip(idx.tolist(), boxes.tolist(), strict=True):
                kept_masks.append((masks[i, by0 : by1 + 1, bx0 : bx1 + 1].clone(), (by0, bx0)))
            kept_stab.append(stab[idx])
            kept_sel.append(idx + s)
            kept_boxes.append(boxes)
            del masks
        if not kept_sel:
            return empty
        sel = torch.cat(kept_sel)
        stab = torch.cat(kept_stab)
        boxes = torch.cat(kept_boxes)
        cand, b_idx = cand[sel], b_idx[sel]
        H, W = orig_size
        near = M.is_box_near_crop_edge(boxes, crop_box, [0, 0, W, H])
        if near.any():
            ok = torch.nonzero(~near).flatten()
            kept_masks = [kept_masks[i] for i in ok.tolist()]
            stab, cand, b_idx, boxes = stab[ok], cand[ok], b_idx[ok], boxes[ok]
        points = torch.as_tensor(pts, dtype=torch.float64)[b_idx.cpu()]
        return MaskBatch(kept_masks, flat_iou[cand].float(), stab.float(), points, boxes)

    # ------------------------------------------------------------------ post-processing

    @staticmethod
    def _postprocess_small_regions(data, shape, min_area: int, nms_thresh: float):
        """Fill small holes, drop small islands, then NMS preferring unchanged masks.

        Works on the cropped masks (:func:`~napari_sam.engine.masks.remove_small_regions_cropped`
        gives the full-frame result without building the full frame).
        """
        if len(data) == 0:
            return data
        changed: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
        scores, boxes = [], []
        for i, (mask, origin) in enumerate(data.masks):
            m = mask.cpu().numpy()
            m, origin_h, changed_h = M.remove_small_regions_cropped(m, origin, shape, min_area,
                                                                    "holes")
            m, origin_i, changed_i = M.remove_small_regions_cropped(m, origin_h, shape, min_area,
                                                                    "islands")
            if changed_h or changed_i:
                r, c = origin_i
                h, w = m.shape
                changed[i] = (torch.from_numpy(m), origin_i)
                # SAM's box of the new mask ([0, 0, 0, 0] if it became empty)
                boxes.append(torch.tensor([c, r, c + w - 1, r + h - 1] if m.size else [0, 0, 0, 0],
                                          dtype=data.boxes.dtype))
            else:
                boxes.append(data.boxes[i])
            scores.append(0.0 if (changed_h or changed_i) else 1.0)
        boxes_t = torch.stack(boxes)
        keep = M.nms(boxes_t.float(), torch.tensor(scores), nms_thresh)
        for i in keep.tolist():
            if i in changed:
                data.masks[i] = changed[i]
                data.boxes[i] = boxes_t[i]
        keep = torch.tensor([i for i in keep.tolist() if data.masks[i][0].numel() > 0],
                            dtype=torch.int64)
        return data.filter(keep)

    def _records(self, data) -> list[dict[str, Any]]:
        """Records with cropped masks: ``segmentation`` (h, w) bool inside ``bbox_rc``."""
        out = []
        for i in range(len(data)):
            mask, (r0, c0) = data.masks[i]
            m = np.ascontiguousarray(mask.cpu().numpy())
            h, w = m.shape
            out.append(
                {
                    "segmentation": m,
                    "area": int(m.sum()),
                    "bbox": [c0, r0, w - 1, h - 1],
                    "bbox_rc": [r0, c0, r0 + h, c0 + w],
                    "predicted_iou": float(data.iou[i]),
                    "point_coords": [data.points[i].tolist()],
                    "stability_score": float(data.stability[i]),
                    "crop_box": M.box_xyxy_to_xywh(data.crop_boxes[i].tolist()),
                }
            )
        return out


def _finish_records(
    records: list[dict[str, Any]], shape: tuple[int, int], output_mode: str
) -> list[dict[str, Any]]:
    """Records with cropped masks -> the ``segmentation`` format of ``output_mode``."""
    if output_mode == "cropped_mask":
        return records
    H, W = shape
    for rec in records:
        r0, c0, r1, c1 = rec["bbox_rc"]
        if output_mode == "uncompressed_rle":
            rec["segmentation"] = M.cropped_mask_to_rle(rec["segmentation"], (r0, c0), (H, W))
        else:
            full = np.zeros((H, W), dtype=bool)
            full[r0:r1, c0:c1] = rec["segmentation"]
            rec["segmentation"] = full
    return records


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
    if order not in _ORDERS:
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
