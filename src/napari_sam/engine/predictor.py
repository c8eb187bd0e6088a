"""Interactive SAM prediction with numpy in, numpy out.

:class:`Predictor` holds one image embedding and turns point / box / mask
prompts into masks. It speaks the engine's coordinate convention:

* points are ``(row, col)`` in image-data pixels, ``0 <= row < H`` and
  ``0 <= col < W`` (a point outside raises; round or clip napari click
  coordinates first), with labels 1 (foreground) or 0 (background);
* boxes are ``(row0, col0, row1, col1)`` in image-data pixels; corners given in
  the wrong order are sorted, a box of zero height or width raises, and a box
  reaching beyond the image is clipped to it (rows ``0..H``, columns ``0..W``:
  SAM draws no mask where the model sees no image, so a box far larger than the
  image would otherwise give empty masks); a box that does not overlap the
  image raises;
* ``mask_input`` is a previous prediction's low-resolution logits.

Everything in SAM's model frame ((x, y) in the resized input, batched torch
tensors) goes through :meth:`Predictor.predict_torch`, which everything-mode
uses directly.

Masks are computed like the reference ``Sam.postprocess_masks`` (bilinear to
the padded model input, crop, bilinear to the original size, threshold), with
the resize chain applied as one banded matrix product per axis.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.engine.cache import CacheEntry, EmbeddingCache
from napari_sam.engine.image import to_rgb_uint8
from napari_sam.engine.threads import compute_threads
from napari_sam.engine.transforms import ImageTransform
from napari_sam.errors import InvalidInputError
from napari_sam.models import kernels

__all__ = ["Prediction", "Predictor"]


class Prediction(NamedTuple):
    """Output of :meth:`Predictor.predict`.

    Single prompt (C = 3 with ``multimask=True``, else 1):
      masks: (C, H, W) bool at the original image size (float32 logits with
        ``return_logits=True``).
      scores: (C,) float32 predicted IoU of each mask.
      logits: (C, 4E, 4E) float32 low-resolution logits (E = embedding size,
        256 x 256 for the official models); feed one back as ``mask_input``.

    Batched prompts add a leading batch axis B to every field.
    """

    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray


class Predictor:
    """Predict masks for one image at a time from point, box and mask prompts.

    Arguments:
      model: a ``napari_sam.models.Sam`` (or any module with the same
        interface: ``image_encoder`` with ``img_size``, ``prompt_encoder``,
        ``mask_decoder``, ``preprocess``, ``mask_threshold``).
      cache: embedding cache to use (may be shared between predictors);
        a private one of ``cache_bytes`` is made when None.
      cache_bytes: capacity of the private cache.

    Typical use::

        predictor = Predictor(load_model("vit_b"))
        predictor.set_image(image)                     # slow: runs the encoder
        pred = predictor.predict(points=[[120, 85]])   # fast: one click
        best = pred.masks[pred.scores.argmax()]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: EmbeddingCache | None = None,
        cache_bytes: int = 512 * 2**20,
    ) -> None:
        self.model = model
        self.cache = cache if cache is not None else EmbeddingCache(cache_bytes)
        self.transform = ImageTransform(model.image_encoder.img_size)
        self._dense_pe: torch.Tensor | None = None
        self._fast = _FastDecoder(model.mask_decoder) if _FastDecoder.supports(model) else None
        self._context: dict | None = None
        self._post_work: dict = {}  # scratch tensors of _postprocess
        self._lock = threading.Lock()
        self.reset_image()

    @property
    def use_fast_decoder(self) -> bool:
        """Whether predictions use the restructured decoder (see :class:`_FastDecoder`).

        True by default when the model's decoder has the standard SAM layout; set
        False to run ``model.mask_decoder`` itself.
        """
        return self._fast is not None

    @use_fast_decoder.setter
    def use_fast_decoder(self, value: bool) -> None:
        if value and not _FastDecoder.supports(self.model):
            raise InvalidInputError("This model's mask decoder has no fast path.")
        self._fast = _FastDecoder(self.model.mask_decoder) if value else None
        self._context = None

    # ------------------------------------------------------------------ image state

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def reset_image(self) -> None:
        """Forget the current image, its embedding and everything derived from the
        weights for it (call after editing the weights; clear ``cache`` too)."""
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.is_image_set = False
        self._context = None
        if getattr(self, "_fast", None) is not None:
            self._fast.clear_buffers()

    def set_image(
        self,
        image: np.ndarray,
        contrast_limits: tuple[float, float] | None = None,
        channel_axis: int | None = None,
    ) -> None:
        """Normalise ``image`` (see :func:`~napari_sam.engine.image.to_rgb_uint8`) and embed it.

        The embedding comes from the cache when this model has seen the same
        normalised image before; otherwise the image encoder runs (slow).
        """
        rgb = to_rgb_uint8(image, contrast_limits=contrast_limits, channel_axis=channel_axis)
        entry = self.embed(rgb)
        self.set_embedding(entry.features, entry.original_size, entry.input_size)

    def embed(self, rgb: np.ndarray) -> CacheEntry:
        """Embedding of a normalised (H, W, 3) uint8 image, from the cache or computed.

        Does not change the predictor's current image, so a worker thread can
        call it while the main thread keeps predicting; apply the result with
        :meth:`set_embedding`.
        """
        key = self.cache.key(self.model, rgb)
        entry = self.cache.get(key)
        if entry is None:
            original_size = (int(rgb.shape[0]), int(rgb.shape[1]))
            input_size = self.transform.input_size(original_size)
            entry = CacheEntry(self.compute_embedding(rgb), input_size, original_size)
            self.cache.put(key, entry)
        return entry

    def compute_embedding(self, rgb: np.ndarray) -> torch.Tensor:
        """Run the image encoder on a normalised (H, W, 3) uint8 image.

        Pure: no cache, no state change. Returns (1, C, E, E) features on the
        model's device (C = 256, E = 64 for the official models).
        """
        resized = self.transform.resize_image(rgb)  # (h, w, 3) uint8
        with torch.inference_mode(), compute_threads():
            x = torch.from_numpy(resized).to(self.device)
            x = x.permute(2, 0, 1).contiguous()[None].float()  # (1, 3, h, w), 0..255
            return self.model.image_encoder(self.model.preprocess(x))

    def set_embedding(
        self,
        features: torch.Tensor,
        original_size: tuple[int, int],
        input_size: tuple[int, int],
    ) -> None:
        """Use precomputed ``features`` (1, C, E, E) of an image of ``original_size`` (H, W)
        resized to ``input_size`` (h, w)."""
        if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[0] != 1:
            shape = getattr(features, "shape", type(features).__name__)
            raise InvalidInputError(f"features must be a (1, C, E, E) tensor, got {shape}.")
        self.features = features.to(self.device)
        self._context = None
        self._dense_pe = None
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.is_image_set = True

    # ------------------------------------------------------------------ prediction

    def predict(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = True,
        return_logits: bool = False,
    ) -> Prediction:
        """Masks for prompts in image-data pixel coordinates.

        Arguments:
          points: (N, 2) (row, col) points, or (B, N, 2) for a batch of prompts.
          labels: (N,) or (B, N) labels, 1 = foreground, 0 = background;
            all 1 when None.
          box: (4,) (row0, col0, row1, col1), or (B, 4).
          mask_input: (1, 4E, 4E) low-res logits of an earlier prediction
            (``pred.logits[i][None]``), or (B, 1, 4E, 4E).
          multimask: return 3 candidate masks (best for a single ambiguous
            click) instead of 1.
          return_logits: return full-size float32 logits instead of bool masks.

        Unbatched prompts are broadcast against batched ones.

        Returns:
          :class:`Prediction` (see there for shapes).

        Raises:
          InvalidInputError: no image set, no prompt, malformed or
            out-of-image prompts.
        """
        if not self.is_image_set:
            raise InvalidInputError("No image is set; call predictor.set_image(image) first.")
        H, W = self.original_size
        pts = self._check_points(points, labels)
        boxes = self._check_boxes(box)
        masks = self._check_mask_input(mask_input)
        if pts is None and boxes is None and masks is None:
            raise InvalidInputError(
                "No prompt given; add at least one point (points=[[row, col]]) or a box "
                "(box=[row0, col0, row1, col1])."
            )

        # agree on a batch size; unbatched prompts are broadcast to it
        given = {"points": pts, "box": boxes, "mask_input": masks}
        sizes = {name: len(v[0]) for name, v in given.items() if v is not None and v[-1]}
        if len(set(sizes.values())) > 1:
            desc = ", ".join(f"{name}: {n}" for name, n in sizes.items())
            raise InvalidInputError(f"Batched prompts disagree on the batch size ({desc}).")
        batched = bool(sizes)
        n_batch = next(iter(sizes.values())) if batched else 1

        dev = self.device
        coords_t = labels_t = boxes_t = mask_t = None
        if pts is not None:
            rc, lab, pts_batched = pts
            xy = torch.as_tensor(self.transform.points_to_model(rc, (H, W)), dtype=torch.float32)
            coords_t = _batch(xy.to(dev), pts_batched, n_batch)
            labels_t = _batch(torch.as_tensor(lab, device=dev), pts_batched, n_batch)
        if boxes is not None:
            xyxy = torch.as_tensor(self.transform.boxes_to_model(boxes[0], (H, W)),
                                   dtype=torch.float32)
            boxes_t = _batch(xyxy.to(dev), boxes[1], n_batch)
        if masks is not None:
            mask_t = _batch(torch.as_tensor(masks[0], device=dev), masks[1], n_batch)

        out_masks, iou, low_res = self.predict_torch(
            coords_t, labels_t, boxes_t, mask_t, multimask=multimask, return_logits=return_logits
        )
        out = Prediction(
            out_masks.cpu().numpy(),
            iou.float().cpu().numpy(),
            low_res.float().cpu().numpy(),
        )
        if not batched:
            out = Prediction(*(a[0] for a in out))
        return out

    def predict_torch(
        self,
        coords_xy: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes_xy: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = True,
        return_logits: bool = False,
        upscale: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Masks for batched prompts already in SAM's model frame.

        Arguments:
          coords_xy: (B, N, 2) float (x, y) in the resized model input frame.
          labels: (B, N) int labels (1 foreground, 0 background, -1 padding).
          boxes_xy: (B, 4) float (x0, y0, x1, y1) in the model input frame.
          mask_input: (B, 1, 4E, 4E) low-res logits.
          multimask: 3 masks per prompt instead of 1.
          return_logits: full-size float logits instead of bool masks.
          upscale: compute full-size masks; when False the first output is None
            (use :meth:`upscale_logits` later, e.g. after filtering).

        Returns:
          masks (B, C, H, W) bool (or float logits) at the original size, or None;
          iou (B, C) predicted IoU; low_res (B, C, 4E, 4E) logits.
        """
        if not self.is_image_set:
            raise InvalidInputError("No image is set; call predictor.set_image(image) first.")
        if (coords_xy is None) != (labels is None):
            raise InvalidInputError("coords_xy and labels must be given together.")
        model = self.model
        batch = next(
            (int(t.shape[0]) for t in (coords_xy, boxes_xy, mask_input) if t is not None), 1
        )
        # one prediction at a time: the decoder and postprocessing reuse scratch tensors
        with self._lock, torch.inference_mode(), compute_threads(), _threads_for_clicks(batch):
            points = (coords_xy, labels) if coords_xy is not None else None
            sparse, dense = model.prompt_encoder(points=points, boxes=boxes_xy, masks=mask_input)
            if self._fast is not None:
                if self._context is None:
                    self._context = self._fast.context(
                        self.features, model.prompt_encoder.no_mask_embed.weight,
                        self._get_dense_pe(),
                    )
                image_tokens = None
                if mask_input is not None:  # the dense prompt differs from the cached one
                    image_tokens = (self.features + dense).flatten(2).transpose(1, 2)
                low_res, iou = self._fast(self._context, sparse, multimask, image_tokens)
            else:
                low_res, iou = model.mask_decoder(
                    image_embeddings=self.features,
                    image_pe=self._get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                )
            masks = None
            if upscale:
                threshold = None if return_logits else float(model.mask_threshold)
                masks = _postprocess(
                    low_res, self.transform.target_length, self.input_size, self.original_size,
                    threshold=threshold, work=self._post_work,
                )
        return masks, iou, low_res

    def upscale_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """(B, C, 4E, 4E) low-res logits -> (B, C, H, W) logits at the original image size.

        Same result (to float32 rounding) as the reference ``Sam.postprocess_masks``:
        bilinear (align_corners=False) to the padded model input, crop to the
        resized image, bilinear to the original size; computed as one banded
        linear map per axis (see :func:`_postprocess`).
        """
        if not self.is_image_set:
            raise InvalidInputError("No image is set; call predictor.set_image(image) first.")
        with torch.inference_mode():
            return _postprocess(
                low_res, self.transform.target_length, self.input_size, self.original_size
            )

    # ------------------------------------------------------------------ helpers

    def _get_dense_pe(self) -> torch.Tensor:
        """(1, C, E, E) positional encoding of the embedding grid (computed once)."""
        pe = self._dense_pe
        if pe is None or pe.device != self.features.device:
            with torch.inference_mode():
                pe = self.model.prompt_encoder.get_dense_pe().to(self.features.device)
            self._dense_pe = pe
        return pe

    def _low_res_size(self) -> tuple[int, int]:
        size = getattr(self.model.prompt_encoder, "mask_input_size", None)
        if size is None:
            size = (4 * self.features.shape[-2], 4 * self.features.shape[-1])
        return int(size[0]), int(size[1])

    def _check_points(self, points, labels):
        """-> ((N, 2) | (B, N, 2) rc points, (N,) | (B, N) labels, batched) or None.

        No points (None, ``[]``, shape (0, 2), or (B, 0, 2) next to a batched box)
        means no point prompt; a batch of zero prompts, shape (0, N, 2), raises.
        """
        pts = None if points is None else _as_float_array(points, "points")
        if pts is not None and pts.ndim == 3 and pts.shape[0] == 0:
            raise InvalidInputError(
                f"points holds a batch of 0 prompts (shape {pts.shape}); pass at least one "
                "prompt of shape (N, 2), or points=None."
            )
        if pts is None or pts.size == 0:
            if labels is not None and _as_float_array(labels, "labels").size > 0:
                raise InvalidInputError("labels were given without points.")
            return None
        if not ((pts.ndim == 2 and pts.shape[1] == 2) or (pts.ndim == 3 and pts.shape[2] == 2)):
            raise InvalidInputError(
                f"points must have shape (N, 2) as (row, col), or (B, N, 2) for a batch; "
                f"got {pts.shape}."
            )
        if labels is None:
            lab = np.ones(pts.shape[:-1], dtype=np.int64)
        else:
            lab_f = _as_float_array(labels, "labels")
            if lab_f.shape != pts.shape[:-1]:
                raise InvalidInputError(
                    f"Got points of shape {pts.shape} but labels of shape {lab_f.shape}; give "
                    "one label (1 foreground, 0 background) per point."
                )
            bad = ~np.isin(lab_f, (0.0, 1.0))
            if bad.any():
                raise InvalidInputError(
                    f"labels must be 1 (foreground) or 0 (background); got {lab_f[bad][0]!r}."
                )
            lab = lab_f.astype(np.int64)
        if np.isnan(pts).any() or np.isinf(pts).any():
            raise InvalidInputError("points contain NaN or inf values.")
        H, W = self.original_size
        inside = (pts[..., 0] >= 0) & (pts[..., 0] < H) & (pts[..., 1] >= 0) & (pts[..., 1] < W)
        if not inside.all():
            idx = tuple(int(i) for i in np.argwhere(~inside)[0])
            raise InvalidInputError(
                f"Point {idx} at (row, col) = {tuple(float(v) for v in pts[idx])} is outside "
                f"the image of shape ({H}, {W}); rows must be in [0, {H}) and columns in "
                f"[0, {W})."
            )
        return pts, lab, pts.ndim == 3

    def _check_boxes(self, box):
        """-> ((4,) | (B, 4) float64 box, corners sorted and clipped to the image, batched) or None.

        An empty box array (``[]``, shape (0, 4)) means no box.
        """
        if box is None:
            return None
        b = _as_float_array(box, "box")
        if b.size == 0:
            return None
        if b.shape[-1:] != (4,) or b.ndim not in (1, 2):
            raise InvalidInputError(
                f"box must have shape (4,) as (row0, col0, row1, col1), or (B, 4); got {b.shape}."
            )
        if not np.isfinite(b).all():
            raise InvalidInputError("box contains NaN or inf values.")
        r0, c0, r1, c1 = (b[..., i] for i in range(4))
        rc = np.stack(
            [np.minimum(r0, r1), np.minimum(c0, c1), np.maximum(r0, r1), np.maximum(c0, c1)], -1
        )
        H, W = self.original_size
        pairs = zip(b.reshape(-1, 4), rc.reshape(-1, 4), strict=True)
        for i, (given, (br0, bc0, br1, bc1)) in enumerate(pairs):
            if br1 == br0 or bc1 == bc0:
                raise InvalidInputError(
                    f"Box {i} {tuple(given.tolist())} has zero height or width; draw a box with "
                    "row1 != row0 and col1 != col0."
                )
            if br1 <= 0 or bc1 <= 0 or br0 >= H or bc0 >= W:
                raise InvalidInputError(
                    f"Box {i} {tuple(given.tolist())} (row0, col0, row1, col1) does not overlap "
                    f"the image of shape ({H}, {W})."
                )
        # the image spans rows 0..H and columns 0..W (pixel i covers [i, i + 1))
        np.clip(rc, 0.0, np.array([H, W, H, W], dtype=np.float64), out=rc)
        return rc, rc.ndim == 2

    def _check_mask_input(self, mask_input):
        """-> ((1, 4E, 4E) | (B, 1, 4E, 4E) float32, batched) or None."""
        if mask_input is None:
            return None
        m = _as_float_array(mask_input, "mask_input").astype(np.float32)
        size = self._low_res_size()
        if m.shape == size:
            m = m[None]
        if m.shape[-3:] != (1, *size) or m.ndim not in (3, 4):
            raise InvalidInputError(
                f"mask_input must be low-res logits of shape (1, {size[0]}, {size[1]}) (e.g. "
                f"pred.logits[i][None]) or (B, 1, {size[0]}, {size[1]}); got {m.shape}."
            )
        if not np.isfinite(m).all():
            raise InvalidInputError("mask_input contains NaN or inf values.")
        return m, m.ndim == 4


_SHAPE_HINTS = {
    "points": "each point is (row, col), and every prompt of a batch has the same number of "
    "points",
    "labels": "give one label per point, the same number for every prompt of a batch",
    "box": "each box is (row0, col0, row1, col1)",
    "mask_input": "pass low-res logits of one shape, e.g. pred.logits[i][None]",
}


def _as_float_array(value, name: str) -> np.ndarray:
    """``value`` as a float64 array; InvalidInputError for ragged, complex or non-numeric data."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as err:
        if "inhomogeneous" in str(err):  # nested sequences of different lengths
            raise InvalidInputError(
                f"{name} is ragged (nested sequences of different lengths): "
                f"{_SHAPE_HINTS.get(name, 'pass a regular array')}; got {_brief(value)}."
            ) from err
        raise InvalidInputError(f"{name} must be a numeric array, got {_brief(value)}.") from err
    if arr.dtype.kind == "c":
        raise InvalidInputError(
            f"{name} must be real numbers, got complex values {_brief(value)}; pass "
            f"np.real({name}) if the imaginary parts are 0."
        )
    try:
        return arr.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"{name} must be a numeric array, got {_brief(value)}.") from err


def _brief(value, limit: int = 80) -> str:
    """A one-line repr of ``value`` of at most ``limit`` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _batch(t: torch.Tensor, batched: bool, n_batch: int) -> torch.Tensor:
    """Give an unbatched prompt tensor a batch axis of size ``n_batch`` (batched: unchanged)."""
    if batched:
        return t
    return t[None].expand(n_batch, *t.shape).contiguous()


def _postprocess(
    low_res: torch.Tensor,
    target_length: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    threshold: float | None = None,
    work: dict | None = None,
) -> torch.Tensor:
    """(B, C, L, L) logits -> (B, C, H, W) logits, like the reference postprocessing.

    With ``threshold``, returns the bool masks ``logits > threshold`` instead,
    computed band by band so the full-size float logits never exist at once.

    The reference upsamples bilinearly to the padded model input
    (``target_length``), crops ``input_size`` and resizes bilinearly to
    ``original_size``. Along each axis that chain is one linear map, an
    (H, L) matrix with at most four non-zeros per row in a narrow band, so it
    is applied here as two batched matrix products over bands of 32 output
    rows (columns). That is several times faster than PyTorch's CPU bilinear
    kernel at these sizes and agrees with it to float32 rounding (the weights
    mirror the kernel's float32 arithmetic).
    """
    b, c, low_h, low_w = low_res.shape
    plan_rows = _resize_plan(low_h, target_length, int(input_size[0]), int(original_size[0]))
    plan_cols = _resize_plan(low_w, target_length, int(input_size[1]), int(original_size[1]))
    x = low_res.reshape(b * c, low_h, low_w)
    out = _apply_resize(x, plan_rows, plan_cols, threshold, work)
    return out.view(b, c, *out.shape[-2:])


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, ...]:
    """Source indices and weights of a bilinear resize (align_corners=False) along one axis.

    Returns i0, i1 (n_out,) int64 and w0, w1 (n_out,) float64 with output k =
    w0[k] * x[i0[k]] + w1[k] * x[i1[k]]. Mirrors the float32 arithmetic of
    PyTorch's CPU kernel (source index ``scale * (k + 0.5) - 0.5`` rounded once).
    """
    f32 = np.float32
    scale = np.float64(f32(n_in) / f32(n_out))
    src = (scale * (np.arange(n_out) + 0.5) - 0.5).astype(f32)
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, (f32(1.0) - w1).astype(np.float64), w1.astype(np.float64)


def _resize_matrix(n_low: int, n_model: int, n_crop: int, n_out: int) -> np.ndarray:
    """(n_out, n_low) matrix of: resize n_low -> n_model, keep [:n_crop], resize -> n_out."""
    i0, i1, w0, w1 = _bilinear_taps(n_low, n_model)
    first = np.zeros((n_crop, n_low))
    rows = np.arange(n_crop)
    np.add.at(first, (rows, i0[:n_crop]), w0[:n_crop])
    np.add.at(first, (rows, i1[:n_crop]), w1[:n_crop])
    if n_crop == n_out:  # a same-size bilinear resize is the identity
        return first
    j0, j1, v0, v1 = _bilinear_taps(n_crop, n_out)
    return v0[:, None] * first[j0] + v1[:, None] * first[j1]


@lru_cache(maxsize=32)
def _resize_plan(
    n_low: int, n_model: int, n_crop: int, n_out: int, block: int = 32
) -> tuple[tuple[int, ...], torch.Tensor, int]:
    """Banded form of :func:`_resize_matrix`: output rows in blocks of ``block``; block j
    reads the k consecutive input rows from ``starts[j]``. Returns starts, weights
    (nb, block, k) float32 and n_out."""
    if not (0 < n_crop <= n_model and n_out > 0 and n_low > 0):
        raise InvalidInputError(
            f"Invalid resize geometry: low-res {n_low}, model {n_model}, crop {n_crop}, "
            f"output {n_out}."
        )
    m = _resize_matrix(n_low, n_model, n_crop, n_out)
    nz = m != 0
    first = nz.argmax(1)  # every row has a non-zero weight (the weights sum to 1)
    last = n_low - 1 - nz[:, ::-1].argmax(1)
    nb = -(-n_out // block)
    pad = nb * block - n_out
    first_b = np.pad(first, (0, pad), mode="edge").reshape(nb, block).min(1)
    last_b = np.pad(last, (0, pad), mode="edge").reshape(nb, block).max(1)
    k = int((last_b - first_b).max()) + 1
    start = np.minimum(first_b, n_low - k)
    idx = start[:, None] + np.arange(k)  # (nb, k)
    m = np.pad(m, ((0, pad), (0, 0))).reshape(nb, block, n_low)
    w = np.take_along_axis(m, np.broadcast_to(idx[:, None, :], (nb, block, k)), axis=2)
    return tuple(int(v) for v in start), torch.from_numpy(w.astype(np.float32)), n_out


def _apply_resize(
    x: torch.Tensor,
    plan_rows: tuple[tuple[int, ...], torch.Tensor, int],
    plan_cols: tuple[tuple[int, ...], torch.Tensor, int],
    threshold: float | None = None,
    work: dict | None = None,
) -> torch.Tensor:
    """x (N, Lh, Lw) -> (N, H, W) with banded plans for rows and columns; bool
    ``> threshold`` when a threshold is given (then the full-size float logits
    never exist at once). ``work`` (a dict) keeps scratch tensors between calls."""
    n = x.shape[0]
    starts_c, w_c, out_w = plan_cols
    starts_r, w_r, out_h = plan_rows
    w_c, w_r = w_c.to(x.device, x.dtype), w_r.to(x.device, x.dtype)
    nbc, bsc, kc = w_c.shape
    nbr, bsr, kr = w_r.shape
    # only the low-res rows the row pass reads (the rest is padding cropped away)
    low_h = max(starts_r) + kr
    x = x[:, :low_h]
    # columns, all blocks at once: (nbc, N*Lh, kc) @ (nbc, kc, bsc)
    idx_c = (torch.tensor(starts_c)[:, None] + torch.arange(kc)).reshape(-1).to(x.device)
    g = x.index_select(2, idx_c).view(n * low_h, nbc, kc).transpose(0, 1)
    t_blocks = _scratch(work, "cols", (nbc, n * low_h, bsc), x)
    torch.bmm(g, w_c.transpose(1, 2), out=t_blocks)
    t = _scratch(work, "rows_in", (n, low_h, nbc * bsc), x)
    t.view(n * low_h, nbc, bsc).copy_(t_blocks.transpose(0, 1))
    t = t[..., :out_w]
    # rows, block by block from slices of t: (bsr, kr) @ (N, kr, W)
    out = x.new_empty((n, nbr * bsr, out_w), dtype=x.dtype if threshold is None else torch.bool)
    band = _scratch(work, "band", (n, bsr, out_w), x)
    # numpy's comparison into strided bool slices is faster than torch.gt here
    # (3 x 1216 x 1600: 0.73 vs 1.21 ms, benchmarks/click_details.py)
    use_numpy = threshold is not None and x.device.type == "cpu"
    if use_numpy:
        band_np, out_np = band.numpy(), out.numpy()
    for j, s in enumerate(starts_r):
        rows = out[:, j * bsr : (j + 1) * bsr]
        w = w_r[j].expand(n, bsr, kr)
        if threshold is None:
            torch.bmm(w, t[:, s : s + kr], out=rows)
        elif use_numpy:
            torch.bmm(w, t[:, s : s + kr], out=band)
            np.greater(band_np, threshold, out=out_np[:, j * bsr : (j + 1) * bsr])
        else:
            torch.gt(torch.bmm(w, t[:, s : s + kr], out=band), threshold, out=rows)
    return out[:, :out_h]


def _scratch(work: dict | None, name: str, shape: tuple[int, ...], like: torch.Tensor):
    """A scratch tensor from ``work`` (reused when the shape matches), or a new one."""
    if work is None:
        return like.new_empty(shape)
    key = (name, like.device, like.dtype)
    buf = work.get(key)
    if buf is None or buf.shape != shape:
        buf = work[key] = like.new_empty(shape)
    return buf


# ---------------------------------------------------------------------------- fast decoding

_UPSCALE_CHUNK = 1024  # embedding-grid cells per chunk in upscale_masks
_UPDATE_CHUNK = 1 << 17  # elements per chunk in _image_update


class _FastDecoder:
    """SAM's mask decoder, restructured for few prompt tokens; same weights, same maths.

    The reference decoder projects all E*E image tokens to queries/keys/values in
    every cross-attention (E*E x C x C/2 multiply-adds each). With only a handful
    of prompt tokens T it is cheaper to move the projection to the token side:

    * token -> image: ``(q Wk_h) (X + P)^T`` gives the logits (the key bias only
      adds a per-row constant, which softmax ignores) and
      ``(A X) Wv_h^T + bv_h`` the values (rows of A sum to 1);
    * image -> token: ``(X + P) (Wq_h^T k_h^T) + bq_h k_h^T`` gives the logits
      and ``A (v_h Wo_h^T)`` summed over heads the projected output.

    Each costs E*E x C x heads*T multiply-adds. In the first block, for prompts
    without a mask, the image side is the same for every click, so its
    projections are computed once per image (:meth:`context`). The output
    upscaling (two 2x2 stride-2 transposed convolutions) runs as matrix
    products on pixel-major features, in cache-sized chunks, so no layout
    copies of the large tensors are needed; for prompts of few tokens its first
    convolution is evaluated in factored form through the blocks' image updates
    (:meth:`conv1_factors`). For such prompts every block after the first works
    on the image tokens in that factored form too (:meth:`decode_factored`).
    Token-side modules (self-attention, MLPs, norms, heads) are the model's own.
    """

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.dec = decoder
        # Scratch tensors reused between calls: fresh multi-MB allocations cost
        # page faults (about 1 us per 4 KiB page), a noticeable part of a click.
        self._work: dict[tuple, torch.Tensor] = {}
        # the image updates' norms are plain affine LayerNorms: factored forms apply
        self._plain_layer_norms = all(
            type(layer.norm4) is torch.nn.LayerNorm and len(layer.norm4.normalized_shape) == 1
            and layer.norm4.weight is not None
            and layer.norm4.bias is not None
            for layer in decoder.transformer.layers
        )

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reusable scratch tensor (contents undefined)."""
        return _scratch(self._work, name, shape, like)

    def clear_buffers(self) -> None:
        """Drop the scratch tensors (they are re-created on the next call)."""
        self._work.clear()

    def upscale(
        self,
        keys: torch.Tensor,
        hyper: torch.Tensor,
        grid: tuple[int, int],
        factors: Conv1Factors | None = None,
    ) -> torch.Tensor:
        """:func:`upscale_masks` with this decoder's mask head and scratch tensors."""
        return upscale_masks(self.dec.output_upscaling, keys, hyper, grid, self._work, factors)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """True if ``model.mask_decoder`` has the standard SAM layout this class relies on."""
        nn = torch.nn
        try:
            dec = model.mask_decoder
            tr = dec.transformer
            up = dec.output_upscaling
            attns = [tr.final_attn_token_to_image]
            for layer in tr.layers:
                attns += [layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
                for name in ("self_attn", "norm1", "norm2", "norm3", "norm4", "mlp"):
                    getattr(layer, name)
                bool(layer.skip_first_layer_pe)
            ok = len(tr.layers) > 0 and all(
                isinstance(getattr(a, n), nn.Linear) and getattr(a, n).bias is not None
                and isinstance(a.num_heads, int)
                for a in attns for n in ("q_proj", "k_proj", "v_proj", "out_proj")
            )
            convs = (up[0], up[3])
            ok = ok and len(up) == 5 and all(
                type(c) is nn.ConvTranspose2d and c.kernel_size == (2, 2) and c.stride == (2, 2)
                and c.padding == (0, 0) and c.output_padding == (0, 0) and c.groups == 1
                and c.dilation == (1, 1) and c.bias is not None
                for c in convs
            )
            ok = ok and all(
                type(g) is nn.GELU and g.approximate == "none" for g in (up[2], up[4])
            )
            ok = ok and all(hasattr(up[1], n) for n in ("weight", "bias", "eps"))
            ok = ok and type(up[1]).__name__ == "LayerNorm2d"
            for name in ("iou_token", "mask_tokens", "output_hypernetworks_mlps",
                         "iou_prediction_head", "num_mask_tokens"):
                getattr(dec, name)
            model.prompt_encoder.no_mask_embed.weight  # noqa: B018
        except (AttributeError, IndexError, TypeError):
            return False
        return bool(ok)

    def context(
        self, features: torch.Tensor, no_mask_embed: torch.Tensor, dense_pe: torch.Tensor
    ) -> dict:
        """Per-image tensors: image tokens X (1, L, C) with the no-mask embedding
        added, positional encoding P (1, L, C), and the first block's image-side
        projections (per head)."""
        layer = self.dec.transformer.layers[0]
        x = (features + no_mask_embed.reshape(1, -1, 1, 1)).flatten(2).transpose(1, 2)
        x = x.contiguous()
        p = dense_pe.flatten(2).transpose(1, 2).contiguous()
        xp = x + p
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        n = x.shape[1]
        k = t2i.k_proj(xp)[0].view(n, t2i.num_heads, -1).transpose(0, 1).contiguous()
        v = t2i.v_proj(x)[0].view(n, t2i.num_heads, -1).transpose(0, 1).contiguous()
        q = i2t.q_proj(xp)[0].view(n, i2t.num_heads, -1).permute(1, 2, 0)
        q = (q * q.shape[1] ** -0.5).contiguous()
        grid = (int(features.shape[-2]), int(features.shape[-1]))
        return {"x": x, "p": p, "k1": k, "v1": v, "q1": q, "grid": grid}

    def _factored_map(
        self, ctx: dict, name: str, linear: torch.nn.Linear, depth: int, heads: int,
        values: bool,
    ) -> FactoredMap:
        """The per-image part of ``keys_depth @ linear.weight.T`` in factored form
        (see :meth:`conv1_factors`), cached in ``ctx`` under ``name``."""
        key = ("factored_map", name)
        if key not in ctx:
            w = linear.weight.t()
            maps, rows = _map_chain(self.dec.transformer.layers[:depth], w)
            n = ctx["x"].shape[1]
            d = w.shape[1] // heads
            xm = (ctx["x"][0] @ maps[0]).view(n, heads, d)
            xm = xm.transpose(0, 1) if values else xm.permute(1, 2, 0)
            pe = None  # values carry no positional encoding
            if not values:
                pe = (ctx["p"][0] @ w).view(n, heads, d).permute(1, 2, 0).contiguous()
            ctx[key] = FactoredMap(xm.contiguous(), pe, maps, rows)
        return ctx[key]

    def transformer(
        self,
        ctx: dict,
        sparse: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The two-way transformer on (B, N, C) sparse prompt tokens, image tokens formed.

        ``image_tokens`` (B, L, C) replaces the cached image side when the dense
        prompt is not the no-mask embedding (mask prompts).

        Returns the tokens (B, T, C) (output tokens, then the prompt tokens), their
        positional encoding (B, T, C), the image tokens ``keys`` (B, L, C)
        and ``keys + pe`` (B, L, C), both scratch buffers that the next call
        overwrites. Not thread-safe; the Predictor serialises calls. For prompts of
        few tokens :meth:`transformer_factored` is cheaper.
        """
        tr = self.dec.transformer
        queries = qpe = self._initial_tokens(sparse)
        p = ctx["p"]
        keys = ctx["x"] if image_tokens is None else image_tokens
        keys_pe = None if image_tokens is None else keys + p  # the cached first block needs none
        for i, layer in enumerate(tr.layers):
            queries = _token_self_attention(layer, queries, qpe)
            cached = i == 0 and image_tokens is None
            t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            if cached:
                attn = _t2i_cached(t2i, queries + qpe, ctx["k1"], ctx["v1"])
            else:
                attn = _t2i(t2i, queries + qpe, keys_pe, keys)
            queries = layer.norm2(queries + attn)
            queries = layer.norm3(queries + layer.mlp(queries))
            if cached:
                a, vo = _i2t_cached(i2t, ctx["q1"], queries + qpe, queries)
            else:
                a, vo = _i2t(i2t, keys_pe, queries + qpe, queries)
            vo = vo + i2t.out_proj.bias / i2t.num_heads  # see _image_update
            shape = (a.shape[0], a.shape[2], vo.shape[2])
            out = (self._buffer(f"keys{i % 2}", shape, vo), self._buffer(f"kpe{i % 2}", shape, vo))
            keys, keys_pe = _image_update(a, vo, keys, layer.norm4, p, out)
        return queries, qpe, keys, keys_pe

    def _initial_tokens(self, sparse: torch.Tensor) -> torch.Tensor:
        """(B, N, C) sparse prompt tokens -> (B, T, C): IoU and mask tokens, then the prompts."""
        dec = self.dec
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        return torch.cat([out_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], 1)

    def __call__(
        self,
        ctx: dict,
        sparse: torch.Tensor,
        multimask: bool,
        image_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode (B, N, C) sparse prompt tokens (``image_tokens``: see :meth:`transformer`).

        Returns (B, C', 4E, 4E) low-res logits and (B, C') IoU, C' = 3 or 1.
        Not thread-safe (scratch tensors are reused); the Predictor serialises calls.
        """
        if image_tokens is None and self.factor_pays(sparse.shape[1]):
            return self.decode_factored(ctx, sparse, multimask)
        queries, qpe, keys, keys_pe = self.transformer(ctx, sparse, image_tokens)
        sel, used = self._selected_tokens(multimask)
        hs = self.final_attention(queries[:, used], qpe[:, used], keys, keys_pe)
        return self._heads(hs, sel, keys, ctx["grid"], None)

    def decode_factored(
        self, ctx: dict, sparse: torch.Tensor, multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`__call__` for prompts of few tokens, with the image tokens in factored form
        (:meth:`transformer_factored`); the final attention and the mask head's first
        convolution use that form too."""
        state = self.transformer_factored(ctx, sparse)
        sel, used = self._selected_tokens(multimask)
        hs = self.final_attention_factored(ctx, state, used)
        return self._heads(hs, sel, ctx["x"], ctx["grid"], self.conv1_factors(ctx, state))

    def transformer_factored(self, ctx: dict, sparse: torch.Tensor) -> FactoredState:
        """The two-way transformer on (B, N, C) sparse prompt tokens, with the image
        tokens after the first block in factored form.

        After the first block the image tokens are ``keys_i = R_i (x M + A'_i B'_i)``
        for any linear map (:meth:`conv1_factors`), so every later product of
        per-click token matrices with the L image tokens goes through the per-image
        ``x M`` (one head's width) and the L x K_i matrix A'_i instead of the C-wide
        tokens: the later blocks' attentions, and after the transformer the final
        attention and the first convolution of the mask head. Only the intermediate
        blocks' image tokens are formed (each block's LayerNorm needs its input's
        statistics); the last block's only for its statistics. Needs plain
        LayerNorms and no mask prompt; worth it while K_D = D (H T + 2) is well
        below C (:meth:`factor_pays`). Not thread-safe (scratch buffers).
        """
        layers = self.dec.transformer.layers
        queries = qpe = self._initial_tokens(sparse)
        keys = ctx["x"]
        updates = ImageUpdates([], [], [], [])
        a_aug = scale = q = None
        k_i = 0  # rows of A' filled so far: H T + 2 per block
        for i, layer in enumerate(layers):
            queries = _token_self_attention(layer, queries, qpe)
            t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            if i == 0:
                attn = _t2i_cached(t2i, queries + qpe, ctx["k1"], ctx["v1"])
            else:
                attn = self._t2i_factored(ctx, f"block{i}", t2i, queries + qpe, i, updates,
                                          a_aug[..., :k_i], scale)
            queries = layer.norm2(queries + attn)
            queries = layer.norm3(queries + layer.mlp(queries))
            if i == 0:
                a, vo = _i2t_cached(i2t, ctx["q1"], queries + qpe, queries)
            else:
                a, vo = self._i2t_factored(ctx, f"block{i}", i2t, queries + qpe, queries, i,
                                           updates, a_aug[..., :k_i], scale)
            vo = vo + i2t.out_proj.bias / i2t.num_heads  # see _image_update
            b, ht, n = a.shape
            if i == 0:
                a_aug = self._buffer("factors_a", (b, n, len(layers) * (ht + 2)), a)
                q = torch.ones((b, n), dtype=a.dtype, device=a.device)
            stats = (self._buffer(f"mean{i}", (b, n), vo), self._buffer(f"rstd{i}", (b, n), vo))
            for field, value in zip(updates, (a, vo, *stats), strict=True):
                field.append(value)
            last = i == len(layers) - 1
            # the last block's tokens are only needed for their statistics
            out = (None if last else self._buffer(f"keys{i % 2}", (b, n, vo.shape[2]), vo), None)
            keys = _image_update(a, vo, keys, layer.norm4, None, out, stats)[0]
            q = _fill_factor_rows(a_aug, q, i, a, *stats)
            scale = 1 / q
            k_i += ht + 2
        return FactoredState(queries, qpe, updates, a_aug, scale)

    def final_attention_factored(
        self, ctx: dict, state: FactoredState, tokens: list[int], index: int | None = None
    ) -> torch.Tensor:
        """Final token -> image attention and norm of the output tokens ``tokens``
        (positions in the token sequence) against the factored image tokens; ``index``
        picks one prompt of the batch. Returns (B or 1, len(tokens), C)."""
        state = state.select(index)
        tr = self.dec.transformer
        queries = state.queries[:, tokens]
        attn = self._t2i_factored(ctx, "final", tr.final_attn_token_to_image,
                                  queries + state.qpe[:, tokens], len(tr.layers),
                                  state.updates, state.a_aug, state.scale)
        return tr.norm_final_attn(queries + attn)

    def conv1_factors(
        self, ctx: dict, state: FactoredState, index: int | None = None
    ) -> Conv1Factors:
        """The mask head's first convolution on the final image tokens, in factored form.

        The final image tokens are ``keys_D`` with ``keys_i = LN_i(keys_{i-1} +
        A_i^T V_i)`` (``keys_0`` = x, the cached image tokens): per token, a
        LayerNorm is ``r (z - mu) g + b`` with scalars ``mu``, ``r``. Unrolled,

            keys_D W + bias = R (x M_1 + A' B'),

        with ``M_i = diag(g_i) ... diag(g_D) W``, ``R`` the product of the ``r_i``,
        and A' (L, K) / B' (K, 4 C/4) stacking per block the attention ``A_i^T``,
        the mean and bias terms (K = D (H T + 2)). ``x M_1`` is per image
        (cached in ``ctx`` on first use), so a click costs L K 4 C/4 multiply-adds instead of
        L C 4 C/4: K = 116 instead of 256 for ViT SAM with one point.
        ``state`` is a :meth:`transformer_factored` result (A' and R are
        at hand); ``index`` picks one prompt of the batch. Returns the factors
        for :func:`upscale_masks`.
        """
        state = state.select(index)
        if "conv1" not in ctx:  # per image: the maps M_i and the image-only term x M_1
            w1, bias1 = _up_conv_matrix(self.dec.output_upscaling[0])
            maps, rows = _map_chain(self.dec.transformer.layers, w1, bias1)
            ctx["conv1"] = (ctx["x"][0] @ maps[0], maps, rows)
        xm, maps, rows = ctx["conv1"]
        b_aug = _factor_rows(state.updates.values, maps, rows)
        return Conv1Factors(xm, state.a_aug, b_aug, state.scale)

    def _t2i_factored(
        self, ctx: dict, name: str, attn, q_in: torch.Tensor, depth: int,
        updates: ImageUpdates, a_aug: torch.Tensor, scale: torch.Tensor,
    ) -> torch.Tensor:
        """Token -> image attention against the image tokens after ``depth`` blocks in
        factored form (a_aug (B, L, K), scale (B, L)). q_in (B, T, C) -> (B, T, C)."""
        b, t, _ = q_in.shape
        h = attn.num_heads
        d = attn.q_proj.out_features // h
        fk = self._factored_map(ctx, f"{name}.t2i.k", attn.k_proj, depth, h, values=False)
        fv = self._factored_map(ctx, f"{name}.t2i.v", attn.v_proj, depth, h, values=True)
        qh = attn.q_proj(q_in).view(b, t, h, d).transpose(1, 2) * d**-0.5  # (B, H, T, d)
        logits = _factored_logits(qh, fk, _factor_rows(updates.values, fk.maps, fk.rows),
                                  a_aug, scale)  # the key bias is a per-row constant
        a = torch.softmax(logits, dim=-1)
        out = _factored_values(a, fv, _factor_rows(updates.values, fv.maps, fv.rows),
                               a_aug, scale)
        out = out + attn.v_proj.bias.view(h, 1, d)
        return attn.out_proj(out.transpose(1, 2).reshape(b, t, h * d))

    def _i2t_factored(
        self, ctx: dict, name: str, attn, k_in: torch.Tensor, v_in: torch.Tensor, depth: int,
        updates: ImageUpdates, a_aug: torch.Tensor, scale: torch.Tensor,
    ) -> tuple:
        """:func:`_i2t` against the image tokens after ``depth`` blocks in factored form
        (a_aug (B, L, K), scale (B, L)): the image queries' projection goes through
        :func:`_factored_logits`. k_in, v_in (B, T, C) tokens."""
        b, t, _ = k_in.shape
        h = attn.num_heads
        d = attn.q_proj.out_features // h
        n = a_aug.shape[1]
        fq = self._factored_map(ctx, f"{name}.i2t.q", attn.q_proj, depth, h, values=False)
        k = attn.k_proj(k_in).view(b, t, h, d).transpose(1, 2) * d**-0.5  # (B, H, T, d)
        logits = _factored_logits(k, fq, _factor_rows(updates.values, fq.maps, fq.rows),
                                  a_aug, scale)
        logits += torch.matmul(k, attn.q_proj.bias.view(h, d, 1)).reshape(b, h * t, 1)
        a = torch.softmax(logits.view(b, h, t, n), dim=2).view(b, h * t, n)
        v = attn.v_proj(v_in).view(b, t, h, d).transpose(1, 2)
        return a, _projected_values(attn, v)

    def _selected_tokens(self, multimask: bool) -> tuple[list[int], list[int]]:
        """Mask tokens read for the output, and the output tokens that attend in the
        final attention (the IoU token and those mask tokens; the prompt tokens'
        outputs are unused)."""
        sel = list(range(1, self.dec.num_mask_tokens)) if multimask else [0]
        return sel, [0] + [1 + i for i in sel]

    def _heads(
        self, hs: torch.Tensor, sel: list[int], keys: torch.Tensor, grid: tuple[int, int],
        factors: Conv1Factors | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """IoU head and mask head on the final output tokens hs (B, 1 + len(sel), C)."""
        dec = self.dec
        iou = dec.iou_prediction_head(hs[:, 0])[:, sel]
        hyper = torch.stack(
            [dec.output_hypernetworks_mlps[i](hs[:, 1 + k]) for k, i in enumerate(sel)], 1
        )
        return self.upscale(keys, hyper, grid, factors), iou

    def factor_pays(self, n_prompt_tokens: int) -> bool:
        """True if image tokens in factored form (:meth:`conv1_factors`,
        :meth:`decode_factored`) are cheaper than the tokens themselves: the inner
        size K = D (H T + 2) well below C (few prompt tokens). Needs plain LayerNorms."""
        if not self._plain_layer_norms:
            return False
        tr = self.dec.transformer
        t = 1 + self.dec.num_mask_tokens + n_prompt_tokens
        k = len(tr.layers) * (tr.layers[0].cross_attn_image_to_token.num_heads * t + 2)
        return k <= 0.6 * tr.layers[0].norm4.normalized_shape[0]

    def final_attention(
        self, queries: torch.Tensor, qpe: torch.Tensor, keys: torch.Tensor, keys_pe: torch.Tensor
    ) -> torch.Tensor:
        """Final token -> image attention and norm: (B, T, C) tokens against (B|1, L, C)."""
        tr = self.dec.transformer
        attn = _t2i(tr.final_attn_token_to_image, queries + qpe, keys_pe, keys)
        return tr.norm_final_attn(queries + attn)


class FactoredState(NamedTuple):
    """Output of :meth:`_FastDecoder.transformer_factored`: the tokens (B, T, C) and their
    positional encoding, the blocks' image updates, and the final image tokens in
    factored form, A' (B, L, K) and the scale R (B, L). A' is a scratch buffer that the
    next call overwrites."""

    queries: torch.Tensor
    qpe: torch.Tensor
    updates: ImageUpdates
    a_aug: torch.Tensor
    scale: torch.Tensor

    def select(self, index: int | None) -> FactoredState:
        """The state of prompt ``index`` alone (batch of 1); all of it for None."""
        if index is None:
            return self
        one = slice(index, index + 1)
        return FactoredState(
            self.queries[one], self.qpe[one],
            ImageUpdates(*([t[one] for t in field] for field in self.updates)),
            self.a_aug[one], self.scale[one],
        )


class FactoredMap(NamedTuple):
    """Per-image part of ``keys_i @ W`` in factored form (:meth:`_FastDecoder.conv1_factors`)
    for an attention projection W of H heads of width d: xm = x M_1 per head, (H, d, L)
    for keys and queries or (H, L, d) for values; pe = P W per head (H, d, L), None
    for values; the maps M_1 ... M_i, W and per block the rows of B' for the mean and
    bias terms."""

    xm: torch.Tensor
    pe: torch.Tensor | None
    maps: list[torch.Tensor]
    rows: list[tuple[torch.Tensor, torch.Tensor]]


class ImageUpdates(NamedTuple):
    """Per transformer block, the terms of its image-token update
    ``keys' = LN(keys + attn^T values)``: attn (B, H*T, L), values (B, H*T, C)
    (out_proj applied, its bias folded in), and the LayerNorm's per-token mean
    and reciprocal std (B, L)."""

    attn: list[torch.Tensor]
    values: list[torch.Tensor]
    mean: list[torch.Tensor]
    rstd: list[torch.Tensor]


class Conv1Factors(NamedTuple):
    """The mask head's first transposed convolution as ``scale * (xm + a^T b)``
    (:meth:`_FastDecoder.conv1_factors`): xm (L, 4 C4) per image, a (B, L, K),
    b (B, K, 4 C4), scale (B, L); columns ordered as in :func:`_up_conv_matrix`."""

    xm: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor


def _up_conv_matrix(conv: torch.nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2 stride-2 transposed convolution as a matrix (C, 4 C') and bias (4 C') on
    pixel-major tokens: out[o, 2i+a, 2j+b] = bias[o] + sum_c x[c, i, j] W[c, o, a, b],
    columns ordered (a, b, o)."""
    c, c_out = conv.weight.shape[:2]
    return conv.weight.permute(0, 2, 3, 1).reshape(c, 4 * c_out), conv.bias.repeat(4)


def _up_conv_weight(
    conv: torch.nn.ConvTranspose2d, work: dict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_up_conv_matrix` as a (4 C', C) linear weight and its bias, kept in ``work``
    while the convolution's parameters are unchanged (same storage, no in-place edit)."""
    params = (conv.weight, conv.bias)
    key = ("up_conv", id(conv))
    stamp = tuple((p.data_ptr(), p._version) for p in params)
    hit = None if work is None else work.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    w, bias = _up_conv_matrix(conv)
    value = (w.t().contiguous(), bias)
    if work is not None:
        work[key] = (stamp, value)
    return value


def upscale_masks(
    upscaling: torch.nn.Sequential,
    keys: torch.Tensor,
    hyper: torch.Tensor,
    grid: tuple[int, int],
    work: dict | None = None,
    conv1_factors: Conv1Factors | None = None,
) -> torch.Tensor:
    """SAM's mask head: image tokens and hypernetwork outputs -> low-res mask logits.

    Arguments:
      upscaling: the decoder's ``output_upscaling`` (ConvTranspose2d 2x2/2,
        LayerNorm2d, GELU, ConvTranspose2d 2x2/2, GELU).
      keys: (B|1, L, C) image tokens after the two-way transformer, L = Eh * Ew
        in row-major grid order.
      hyper: (B, M, C/8) hypernetwork outputs of the M mask tokens.
      grid: (Eh, Ew).
      work: optional dict of scratch tensors reused between calls.
      conv1_factors: the first convolution in factored form
        (:meth:`_FastDecoder.conv1_factors`, the same prompts as ``keys``);
        then ``keys`` is not read.

    Returns (B, M, 4 Eh, 4 Ew) logits, the same as the reference's
    ``hyper @ upscaling(keys)``. The transposed convolutions run as matrix
    products on pixel-major tokens (:func:`napari_sam.models.kernels.linear`, the
    second with its GELU fused), in chunks of grid cells so that the
    intermediates stay in cache; no large temporary is allocated (fresh
    multi-MB allocations cost page faults, about 1 us per 4 KiB page).
    """
    conv1, norm, conv2 = upscaling[0], upscaling[1], upscaling[3]
    b, m = hyper.shape[:2]
    n = keys.shape[1]
    eh, ew = grid
    c4, c8 = conv1.weight.shape[1], conv2.weight.shape[1]
    (w1t, bias1), (w2t, bias2) = (_up_conv_weight(conv, work) for conv in (conv1, conv2))
    # masks (B, L*16, M), rows ordered (i, j, a, b, a2, b2) for the output pixel
    # (4i + 2a + a2, 4j + 2b + b2)
    masks = _scratch(work, "upscale", (b, n * 16, m), keys)
    for i in range(b):
        k = keys[i if keys.shape[0] > 1 else 0]
        for s in range(0, n, _UPSCALE_CHUNK):
            e = s + _UPSCALE_CHUNK
            if conv1_factors is None:
                y = kernels.linear(k[s:e], w1t, bias1).view(-1, c4)
            else:
                xm, a, fb, scale = conv1_factors
                y = kernels.linear(a[i, s:e], fb[i].t()).add_(xm[s:e])
                y = y.mul_(scale[i, s:e, None]).view(-1, c4)
            y = F.gelu(F.layer_norm(y, (c4,), norm.weight, norm.bias, norm.eps))
            y = kernels.linear(y, w2t, bias2, "gelu").view(-1, c8)
            masks[i, 16 * s : 16 * e] = kernels.linear(y, hyper[i])
    result = keys.new_empty((b, m, 4 * eh, 4 * ew))  # fresh: returned to the caller
    result.view(b, m, eh, 2, 2, ew, 2, 2).copy_(
        masks.view(b, eh, ew, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
    )
    return result


#: prompt batches up to this size decode on one thread under a passive OpenMP
#: wait policy (see :func:`_threads_for_clicks`)
SINGLE_THREAD_MAX_BATCH = 4


def _openmp_threads_sleep() -> bool:
    """True when ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep at once."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


@contextlib.contextmanager
def _threads_for_clicks(batch: int) -> Iterator[None]:
    """Under a passive OpenMP wait policy, run a few-prompt decode on one intra-op
    thread, then restore the thread count.

    The decoder's operations on one or a few prompts are small (tens of
    microseconds each). With the default policy idle OpenMP threads spin for a
    moment before sleeping, so splitting even small operations over threads
    pays. With ``OMP_WAIT_POLICY=PASSIVE`` every parallel region wakes sleeping
    threads, which costs more than it gains. Measured on 2 cores (ViT-B click at
    1200 x 1600 / embedded model at 512 x 512): default policy, 2 threads 21 /
    4.9 ms vs 1 thread 40 / 6.3 ms (``benchmarks/bench_click.py --threads N``);
    passive policy, 2 threads 45 / 10.9 ms vs 1 thread 38 / 6.3 ms (a one-off
    timing, session 3). Only the calling thread's pool is affected (OpenMP
    thread counts are per thread); large prompt batches keep every thread.
    """
    n = torch.get_num_threads()
    if n == 1 or batch > SINGLE_THREAD_MAX_BATCH or not _openmp_threads_sleep():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _head_weights(linear: torch.nn.Linear, heads: int) -> torch.Tensor:
    """(D, C) projection weight -> (heads, D / heads, C)."""
    d, c = linear.weight.shape
    return linear.weight.view(heads, d // heads, c)


def _t2i(attn, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """Token -> image attention. q_in (B, T, C); k_in, v_in (B|1, L, C) -> (B, T, C)."""
    b, t, c = q_in.shape
    h = attn.num_heads
    d = attn.q_proj.out_features // h
    q = attn.q_proj(q_in).view(b, t, h, d).transpose(1, 2) * d**-0.5  # (B, H, T, d)
    qk = torch.matmul(q, _head_weights(attn.k_proj, h)).reshape(b, h * t, c)
    a = torch.softmax(torch.matmul(qk, k_in.transpose(1, 2)), dim=-1)  # (B, H*T, L)
    av = torch.matmul(a, v_in).view(b, h, t, c)
    out = torch.matmul(av, _head_weights(attn.v_proj, h).transpose(1, 2))
    out = out + attn.v_proj.bias.view(h, 1, d)  # (B, H, T, d)
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, h * d))


def _t2i_cached(attn, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Token -> image attention with projected keys/values k, v (H, L, d) shared by the batch."""
    b, t, _ = q_in.shape
    h, _, d = k.shape
    q = attn.q_proj(q_in).view(b * t, h, d).transpose(0, 1) * d**-0.5  # (H, B*T, d)
    a = torch.softmax(torch.matmul(q, k.transpose(1, 2)), dim=-1)  # (H, B*T, L)
    out = torch.matmul(a, v)  # (H, B*T, d)
    return attn.out_proj(out.transpose(0, 1).reshape(b, t, h * d))


def _projected_values(attn, v: torch.Tensor) -> torch.Tensor:
    """v (B, H, T, d) -> per-head values through out_proj, (B, H*T, C)."""
    b, h, t, d = v.shape
    c = attn.out_proj.out_features
    wo = attn.out_proj.weight.view(c, h, d)
    return torch.einsum("bhtd,chd->bhtc", v, wo).reshape(b, h * t, c)


def _image_update(
    a: torch.Tensor,
    vo: torch.Tensor,
    keys: torch.Tensor,
    norm: torch.nn.Module,
    pe: torch.Tensor | None,
    out: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish an image -> token attention block: ``keys' = norm(keys + a^T vo)``.

    a (B, H*T, L) attention, vo (B, H*T, C) (:func:`_projected_values` plus
    out_proj's bias / H: each head's attention sums to 1 over the tokens, so
    a^T (vo + bias / H) = a^T vo + bias), keys (B|1, L, C), pe (1, L, C).
    Returns keys' and keys' + pe, both (B, L, C), written to ``out`` if given
    (must not alias ``keys``; an entry None skips that output, as does pe None
    for the second). With ``stats`` (two (B, L) tensors; ``norm``
    must then be a LayerNorm), the norm's per-token mean and reciprocal std
    are written there. Runs in chunks of rows so the intermediates stay in cache.
    """
    b, _, n = a.shape
    c = vo.shape[-1]
    a_t = a.transpose(1, 2)
    new, new_pe = out if out is not None else (keys.new_empty((b, n, c)), keys.new_empty((b, n, c)))
    if pe is None:
        new_pe = None
    step = max(16, _UPDATE_CHUNK // (b * c))
    for s in range(0, n, step):
        z = torch.baddbmm(keys[:, s : s + step], a_t[:, s : s + step], vo)
        if stats is None:
            z = norm(z)
        else:
            z, mean, rstd = torch.native_layer_norm(z, (c,), norm.weight, norm.bias, norm.eps)
            stats[0][:, s : s + step] = mean[..., 0]
            stats[1][:, s : s + step] = rstd[..., 0]
        if new is not None:
            new[:, s : s + step] = z
        if new_pe is not None:
            torch.add(z, pe[:, s : s + step], out=new_pe[:, s : s + step])
    return new, new_pe


def _i2t(attn, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> tuple:
    """Image -> token attention. q_in (B, L, C) image (with PE); k_in, v_in (B, T, C) tokens.

    Returns the attention a (B, H*T, L) and projected values vo (B, H*T, C);
    the image update is ``a^T vo + out_proj.bias`` (see :func:`_image_update`).
    """
    b, t, c = k_in.shape
    n = q_in.shape[1]
    h = attn.num_heads
    d = attn.q_proj.out_features // h
    k = attn.k_proj(k_in).view(b, t, h, d).transpose(1, 2) * d**-0.5  # (B, H, T, d)
    kq = torch.matmul(k, _head_weights(attn.q_proj, h)).reshape(b, h * t, c)
    bias = torch.matmul(k, attn.q_proj.bias.view(h, d, 1)).reshape(b, h * t, 1)
    logits = torch.baddbmm(bias, kq, q_in.transpose(1, 2))  # (B, H*T, L)
    a = torch.softmax(logits.view(b, h, t, n), dim=2).view(b, h * t, n)
    v = attn.v_proj(v_in).view(b, t, h, d).transpose(1, 2)
    return a, _projected_values(attn, v)


def _i2t_cached(attn, q: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> tuple:
    """:func:`_i2t` with projected, pre-scaled queries q (H, d, L) shared by the batch."""
    b, t, _ = k_in.shape
    h, d, n = q.shape
    k = attn.k_proj(k_in).view(b * t, h, d).transpose(0, 1)  # (H, B*T, d)
    logits = torch.matmul(k, q).view(h, b, t, n)
    a = torch.softmax(logits, dim=2).transpose(0, 1).reshape(b, h * t, n)
    v = attn.v_proj(v_in).view(b, t, h, d).transpose(1, 2)
    return a, _projected_values(attn, v)


def _token_self_attention(layer, queries: torch.Tensor, qpe: torch.Tensor) -> torch.Tensor:
    """A two-way block's token self-attention and first norm on (B, T, C) tokens."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + qpe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    return layer.norm1(queries)


def _map_chain(
    layers, w: torch.Tensor, last_bias: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """For ``keys_D @ w`` after the blocks ``layers`` (D of them), the maps
    ``M_i = diag(g_i) ... diag(g_D) w`` (i = 1..D, then w itself) and per block the
    rows of B' for its mean term (column sums of M_i) and its norm bias
    (``b_i M_{i+1}``, plus ``last_bias`` for the last block), each (1, w.shape[1])."""
    maps = [w]
    for layer in reversed(layers):
        maps.insert(0, layer.norm4.weight[:, None] * maps[0])
    rows = []
    for i, layer in enumerate(layers):
        bias = layer.norm4.bias @ maps[i + 1]
        if last_bias is not None and i == len(layers) - 1:
            bias = bias + last_bias
        rows.append((maps[i].sum(0, keepdim=True), bias[None]))
    return maps, rows


def _factor_rows(
    values: list[torch.Tensor],
    maps: list[torch.Tensor],
    rows: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """B' (B, K, n) of a factored map (see :func:`_map_chain`): per block, its
    projected values (B, H T, C) through M_i, then its mean and bias rows."""
    b = values[0].shape[0]
    out = []
    for v, m, (col_sums, bias) in zip(values, maps, rows, strict=False):
        out += [v @ m, col_sums.expand(b, 1, -1), bias.expand(b, 1, -1)]
    return torch.cat(out, 1)


def _fill_factor_rows(
    a_aug: torch.Tensor, q: torch.Tensor, i: int, attn: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor,
) -> torch.Tensor:
    """Write block i's columns of A' (B, L, K): its attention (B, H T, L) and mean
    (B, L) scaled by q (the product of 1 / rstd over the earlier blocks), and
    q / rstd for its bias term. Returns q / rstd."""
    ht = attn.shape[1]
    off = i * (ht + 2)
    torch.mul(attn, q[:, None, :], out=a_aug[..., off : off + ht].transpose(1, 2))
    torch.mul(mean, -q, out=a_aug[..., off + ht])
    q = q / rstd
    a_aug[..., off + ht + 1] = q
    return q


def _factored_logits(
    qh: torch.Tensor, fm: FactoredMap, b_aug: torch.Tensor, a_aug: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """qh (B, H, T, d) against the image tokens' projection ``keys W + P W`` given in
    factored form (xm (H, d, L), b_aug (B, K, H d), a_aug (B, L, K), scale (B, L)).
    Returns (B, H T, L) logits, without W's bias."""
    b, h, t, d = qh.shape
    n, k = a_aug.shape[1:]
    logits = qh.new_empty((b, h, t, n))
    for i in range(b):  # per prompt: a batched matmul would copy the shared xm B times
        torch.bmm(qh[i], fm.xm, out=logits[i])
    qb = torch.matmul(qh, b_aug.view(b, k, h, d).permute(0, 2, 3, 1)).view(b, h * t, k)
    logits.view(b, h * t, n).baddbmm_(qb, a_aug.transpose(1, 2)).mul_(scale[:, None, :])
    for i in range(b):
        logits[i].baddbmm_(qh[i], fm.pe)
    return logits.view(b, h * t, n)


def _factored_values(
    a: torch.Tensor, fm: FactoredMap, b_aug: torch.Tensor, a_aug: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Attention a (B, H T, L) times the image tokens' value projection ``keys W``
    given in factored form (xm (H, L, d)). Returns (B, H, T, d), without W's bias."""
    b, ht, n = a.shape
    h, _, d = fm.xm.shape
    k = a_aug.shape[2]
    a = a * scale[:, None, :]
    out = a.new_empty((b, h, ht // h, d))
    for i in range(b):  # per prompt, as in _factored_logits
        torch.bmm(a[i].view(h, ht // h, n), fm.xm, out=out[i])
    g = torch.bmm(a, a_aug).view(b, h, ht // h, k)
    return out.add_(torch.matmul(g, b_aug.view(b, k, h, d).transpose(1, 2)))
