"""Interactive SAM prediction with numpy in, numpy out.

:class:`Predictor` holds one image embedding and turns point / box / mask
prompts into masks. It speaks the engine's coordinate convention:

* points are ``(row, col)`` in image-data pixels, ``0 <= row < H`` and
  ``0 <= col < W`` (a point outside raises; round or clip napari click
  coordinates first), with labels 1 (foreground) or 0 (background);
* boxes are ``(row0, col0, row1, col1)`` in image-data pixels, both corners
  inclusive (the object's first and last row/column); corners given in
  the wrong order are sorted, a box of zero height or width raises, and a box
  reaching beyond the image is clipped to it (rows ``0..H``, columns ``0..W``:
  SAM draws no mask where the model sees no image, so a box far larger than the
  image would otherwise give empty masks); a box that does not overlap the
  image raises;
* ``mask_input`` is a previous prediction's low-resolution logits.

Everything in SAM's model frame ((x, y) in the resized input, batched torch
tensors) goes through :meth:`Predictor.predict_torch`, which everything-mode
uses directly.

EfficientSAM models follow their own image convention (stretch to S x S, bicubic
upscaling; :class:`~napari_sam.engine.transforms.StretchTransform`), take no
``mask_input`` and at most 6 prompt points.

The mask decoder runs through a backend chosen when the predictor is built
(``decoder="auto" | "reference" | "factored"``, see
:mod:`napari_sam.models.fast_decoder`). Masks are computed like the reference
``Sam.postprocess_masks`` (bilinear to the padded model input, crop, bilinear
to the original size, threshold), with the resize chain applied as one banded
matrix product per axis (:mod:`napari_sam.engine.upsample`).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from napari_sam.engine.cache import EmbeddedImage, EmbeddingCache
from napari_sam.engine.image import to_rgb_uint8
from napari_sam.engine.refine import refine_logits
from napari_sam.engine.session import limit_prompt_points
from napari_sam.engine.store import EmbeddingStore
from napari_sam.engine.threads import compute_threads
from napari_sam.engine.tiled import (
    TiledEmbedding,
    TiledPredictor,
    check_tiling_mode,
    embed_tiles,
    model_input_size,
    tiling_for,
)
from napari_sam.engine.transforms import ImageTransform, transform_for
from napari_sam.errors import InvalidInputError
from napari_sam.models.fast_decoder import (
    FactoredBackend,
    MaskDecoderBackend,
    make_decoder_backend,
)
from napari_sam.models.kernels import threads_for_small_batches

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
      model: a ``napari_sam.models.Sam`` or ``EfficientSam`` (or any module with
        the same interface: ``image_encoder`` with ``img_size``, ``prompt_encoder``,
        ``mask_decoder``, ``preprocess``, ``mask_threshold``; optionally
        ``image_convention``, ``accepts_mask_prompt``, ``max_prompt_points``). Its
        image convention (:func:`~napari_sam.engine.transforms.transform_for`)
        decides how images are resized and masks upscaled.
      cache: embedding cache to use (may be shared between predictors);
        a private one of ``cache_bytes`` is made when None.
      cache_bytes: capacity of the private cache (default
        :attr:`EmbeddingCache.DEFAULT_BYTES`, 512 MiB).
      decoder: the mask-decoder backend: ``"auto"`` (default: the factored
        backend when the model's decoder has SAM's standard layout, else the
        reference), ``"reference"`` (``model.mask_decoder`` itself),
        ``"factored"`` (:class:`~napari_sam.models.fast_decoder.FactoredBackend`),
        or a backend object (:mod:`napari_sam.models.fast_decoder`).
      store: an :class:`~napari_sam.engine.store.EmbeddingStore` (embeddings on
        disk, ``napari-sam embed``) that :meth:`embed` reads before running the
        encoder; see :meth:`use_store`.
      refine: redraw :meth:`predict`'s masks with the model's mask refiner
        (:mod:`napari_sam.engine.refine`; the default model has one, official
        checkpoints have none): None (default) when the model has one, False
        never. Low-res logits and predicted IoUs are the decoder's either way.
      tiling: ``"off"`` (default): an image is always embedded whole, resized to
        the model input; ``"auto"``: :meth:`set_image` (and :meth:`prepare_image`)
        embed an image longer than 2 x the model input at native scale in
        overlapping tiles and :meth:`predict` routes each prompt to its tile and
        stitches masks across tiles (:mod:`napari_sam.engine.tiled`; the interactive
        widget and ``napari-sam evaluate`` use "auto").

    Raises:
      InvalidInputError: an unknown ``decoder``, or ``"factored"`` for a
        decoder without SAM's standard layout; a ``tiling`` other than "auto" / "off".
      StoreMismatchError: ``store`` was made with other weights.

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
        cache_bytes: int = EmbeddingCache.DEFAULT_BYTES,
        decoder: str | MaskDecoderBackend = "auto",
        store: EmbeddingStore | None = None,
        refine: bool | None = None,
        tiling: str = "off",
    ) -> None:
        self.model = model
        self.refine = refine
        #: "auto": large images are embedded and predicted in native-scale tiles; "off": never
        self.tiling: str = check_tiling_mode(tiling)
        self._tiled: TiledPredictor | None = None
        self.cache = cache if cache is not None else EmbeddingCache(cache_bytes)
        #: the model family's image convention (resize + pad for SAM, stretch for EfficientSAM)
        self.transform: ImageTransform = transform_for(model)
        #: the mask-decoder backend (:mod:`napari_sam.models.fast_decoder`)
        self.decoder: MaskDecoderBackend = make_decoder_backend(model, decoder)
        self._decoder_context: Any = None  # the backend's per-image context
        self._upsample_work: dict = {}  # scratch tensors of upscale_logits
        self._lock = threading.Lock()
        self.store: EmbeddingStore | None = None
        self.use_store(store)
        self.reset_image()

    def use_store(self, store: EmbeddingStore | None) -> None:
        """Read embeddings from ``store`` (None: stop). An entry is used only for exactly
        the normalised pixels it was computed from (its key), so a store of another image,
        plane or normalisation is never used; one made with other weights raises
        :class:`~napari_sam.errors.StoreMismatchError` here."""
        if store is not None:
            store.check_model(self.model)
        self.store = store

    @property
    def use_fast_decoder(self) -> bool:
        """Deprecated: whether the factored backend decodes (use ``decoder=`` instead).

        Setting it replaces the backend (True: ``"factored"``, False:
        ``"reference"``) and warns with a DeprecationWarning.
        """
        return isinstance(self.decoder, FactoredBackend)

    @use_fast_decoder.setter
    def use_fast_decoder(self, value: bool) -> None:
        warnings.warn(
            "Predictor.use_fast_decoder is deprecated; build the predictor with "
            "Predictor(model, decoder='factored' | 'reference') instead.",
            DeprecationWarning, stacklevel=2,
        )
        with self._lock:
            self.decoder.release()
            self.decoder = make_decoder_backend(self.model, "factored" if value else "reference")
            self._decoder_context = None

    @property
    def refiner(self) -> torch.nn.Module | None:
        """The mask refiner :meth:`predict` uses now, or None (see ``refine``)."""
        refiner = getattr(self.model, "mask_refiner", None)
        if refiner is None or self.refine is False or self.image is None:
            return None
        return refiner

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
        self.image: np.ndarray | None = None  # (H, W, 3) uint8, for the mask refiner
        self.is_image_set = False
        self._tiled = None
        self._decoder_context = None
        self.decoder.release()

    @property
    def embedding(self) -> EmbeddedImage | None:
        """The current image's :class:`~napari_sam.engine.cache.EmbeddedImage`, or None
        (also while the image is tiled: see :attr:`tiled`)."""
        if not self.is_image_set or self._tiled is not None:
            return None
        return EmbeddedImage(self.features, self.input_size, self.original_size, self.image)

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
        self.use_embedding(self.prepare_image(rgb))

    # ------------------------------------------------------------------ tiles

    @property
    def tiled(self) -> TiledEmbedding | None:
        """The current image's tile embeddings when it is tiled, else None."""
        return None if self._tiled is None else self._tiled.tiled

    @property
    def route_note(self) -> str:
        """One line on how the last tiled prediction was routed ("" when not tiled)."""
        return "" if self._tiled is None else self._tiled.note

    def tiling_for(self, shape: tuple[int, int]) -> tuple[int, int] | None:
        """``(tile, overlap)`` this predictor uses for an (H, W) image under
        :attr:`tiling`, or None (embedded whole): :func:`~napari_sam.engine.tiled.tiling_for`."""
        return tiling_for(shape, model_input_size(self.model), self.tiling)

    def prepare_image(
        self, rgb: np.ndarray, cancel: Callable[[], bool] | None = None,
        progress: Callable[[int, int], Any] | None = None,
    ) -> EmbeddedImage | TiledEmbedding:
        """The embedding :meth:`predict` needs for a normalised (H, W, 3) uint8 image:
        its tile embeddings when :meth:`tiling_for` tiles it (each through :meth:`embed`:
        cached), else :meth:`embed`. Leaves the current image alone (a worker thread may
        call it); apply the result with :meth:`use_embedding`. ``cancel`` and
        ``progress(done, n_tiles)`` apply to tiles."""
        tiling = self.tiling_for(rgb.shape[:2])
        if tiling is None:
            return self.embed(rgb)
        return embed_tiles(self, rgb, tiling, cancel=cancel, progress=progress)

    def use_embedding(self, entry: EmbeddedImage | TiledEmbedding) -> None:
        """Make ``entry`` (from :meth:`prepare_image` or :meth:`embed`) the current image."""
        if isinstance(entry, TiledEmbedding):
            self.reset_image()
            self._tiled = TiledPredictor(self, entry)
            self.original_size = entry.original_size
            self.image = entry.image
            self.is_image_set = True
            return
        self.set_embedding(entry.features, entry.original_size, entry.input_size,
                           image=getattr(entry, "image", None))

    def embed(self, rgb: np.ndarray, use_cache: bool = True) -> EmbeddedImage:
        """Embedding of a normalised (H, W, 3) uint8 image, from the cache or computed.

        Does not change the predictor's current image, so a worker thread can
        call it while the main thread keeps predicting; apply the result with
        :meth:`set_embedding`, or hand it to everything-mode. On a cache miss the
        :attr:`store` (if any) is read before the encoder runs (what it gives is not
        put in the cache). ``use_cache=False``
        neither reads nor fills the cache (nor reads the store).
        """
        if not use_cache:
            original_size = (int(rgb.shape[0]), int(rgb.shape[1]))
            input_size = self.transform.input_size(original_size)
            return EmbeddedImage(self.compute_embedding(rgb), input_size, original_size, rgb)
        key = self.cache.key(self.model, rgb)
        entry = self.cache.get(key)
        if entry is None and self.store is not None:
            # read from disk (one chunk), not cached: reading again is cheap, and a stack
            # read plane by plane then holds one embedding, not as many as the cache takes
            stored = self.store.lookup(key[1])
            if stored is not None:
                return stored._replace(features=stored.features.to(self.device), image=rgb)
        if entry is None:
            original_size = (int(rgb.shape[0]), int(rgb.shape[1]))
            input_size = self.transform.input_size(original_size)
            entry = EmbeddedImage(self.compute_embedding(rgb), input_size, original_size, rgb)
            self.cache.put(key, entry)
        return entry

    def compute_embedding(self, rgb: np.ndarray) -> torch.Tensor:
        """Run the image encoder on a normalised (H, W, 3) uint8 image.

        Pure: no cache, no state change. Returns (1, C, E, E) features on the
        model's device (C = 256, E = 64 for the official models).
        """
        with torch.inference_mode(), compute_threads():
            x = self.transform.model_input(rgb, self.device)  # (1, 3, h, w), 0..255
            return self.model.image_encoder(self.model.preprocess(x))

    def set_embedding(
        self,
        features: torch.Tensor,
        original_size: tuple[int, int],
        input_size: tuple[int, int],
        image: np.ndarray | None = None,
    ) -> None:
        """Use precomputed ``features`` (1, C, E, E) of an image of ``original_size`` (H, W)
        resized to ``input_size`` (h, w). ``image``: the (H, W, 3) uint8 image they were
        computed from (``EmbeddedImage.image``); without it the mask refiner is not used."""
        if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[0] != 1:
            shape = getattr(features, "shape", type(features).__name__)
            raise InvalidInputError(f"features must be a (1, C, E, E) tensor, got {shape}.")
        self.features = features.to(self.device)
        self._tiled = None
        self._decoder_context = None
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.image = image if image is not None and image.shape[:2] == self.original_size else None
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
          box: (4,) (row0, col0, row1, col1), or (B, 4). The corners are pixel
            indices, **both inclusive**: the first and the last row/column of the
            object (``row1 = max row``, not a slice end), as SAM was trained; a box
            with exclusive ends (``bbox_rc``, numpy slice bounds) is one pixel larger
            at the bottom right, which SAM tolerates.
          mask_input: (1, 4E, 4E) low-res logits of an earlier prediction
            (``pred.logits[i][None]``), or (B, 1, 4E, 4E). EfficientSAM has no mask
            prompt: it raises InvalidInputError (refine with more points).
          multimask: return 3 candidate masks (best for a single ambiguous
            click) instead of 1.
          return_logits: return full-size float32 logits instead of bool masks.

        Unbatched prompts are broadcast against batched ones. A model with a point
        limit (EfficientSAM: 6, a box counts as 2) uses the box, the first point and
        the latest ones and warns (:func:`~napari_sam.engine.session.limit_prompt_points`).

        On a tiled image (:attr:`tiled`) each prompt is decoded in the tile that holds
        it and its masks are stitched across tiles (:mod:`napari_sam.engine.tiled`);
        ``logits`` are then the tile's and only serve as ``mask_input`` of this image.

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
        if masks is not None and not getattr(self.model, "accepts_mask_prompt", True):
            raise InvalidInputError(
                "This model (EfficientSAM) takes no mask_input; refine by adding points "
                "instead (mask_input=None)."
            )
        if pts is not None and self._tiled is None:  # tiles limit the points they decode
            pts = self._limit_points(pts, boxes is not None)

        # agree on a batch size; unbatched prompts are broadcast to it
        given = {"points": pts, "box": boxes, "mask_input": masks}
        sizes = {name: len(v[0]) for name, v in given.items() if v is not None and v[-1]}
        if len(set(sizes.values())) > 1:
            desc = ", ".join(f"{name}: {n}" for name, n in sizes.items())
            raise InvalidInputError(f"Batched prompts disagree on the batch size ({desc}).")
        batched = bool(sizes)
        n_batch = next(iter(sizes.values())) if batched else 1
        if self._tiled is not None:
            return self._predict_tiled(pts, boxes, masks, n_batch, batched, multimask,
                                       return_logits)

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

        refiner = self.refiner
        out_masks, iou, low_res = self.predict_torch(
            coords_t, labels_t, boxes_t, mask_t, multimask=multimask,
            return_logits=return_logits or refiner is not None,
        )
        masks_np = out_masks.cpu().numpy()
        if refiner is not None:
            masks_np = self._refine(refiner, masks_np, pts, boxes, n_batch, return_logits)
        out = Prediction(
            masks_np,
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
        if self._tiled is not None:
            raise InvalidInputError(
                "The image is tiled (Predictor(tiling='auto')): predict_torch works on one "
                "embedding; use predict(), or build the predictor with tiling='off'."
            )
        if (coords_xy is None) != (labels is None):
            raise InvalidInputError("coords_xy and labels must be given together.")
        model = self.model
        batch = next(
            (int(t.shape[0]) for t in (coords_xy, boxes_xy, mask_input) if t is not None), 1
        )
        # one prediction at a time: the decoder and postprocessing reuse scratch tensors
        with (self._lock, torch.inference_mode(), compute_threads(),
              threads_for_small_batches(batch)):
            points = (coords_xy, labels) if coords_xy is not None else None
            sparse, dense = model.prompt_encoder(points=points, boxes=boxes_xy, masks=mask_input)
            if self._decoder_context is None:
                self._decoder_context = self.decoder.prepare(self.features)
            with torch.profiler.record_function("napari_sam.decode"):
                low_res, iou = self.decoder.decode(self._decoder_context, sparse, dense,
                                                   multimask, mask_prompt=mask_input is not None)
            masks = None
            if upscale:
                threshold = None if return_logits else float(model.mask_threshold)
                masks = self.transform.upscale(
                    low_res, self.input_size, self.original_size,
                    threshold=threshold, work=self._upsample_work,
                )
        return masks, iou, low_res

    def upscale_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """(B, C, 4E, 4E) low-res logits -> (B, C, H, W) logits at the original image size.

        Same result (to float32 rounding) as the reference ``Sam.postprocess_masks``:
        bilinear (align_corners=False) to the padded model input, crop to the
        resized image, bilinear to the original size; computed as one banded
        linear map per axis (see :func:`~napari_sam.engine.upsample.upscale_logits`).
        """
        if not self.is_image_set or self._tiled is not None:
            raise InvalidInputError("No single-embedding image is set; call "
                                    "predictor.set_image(image) with tiling='off' first.")
        with torch.inference_mode():
            return self.transform.upscale(low_res, self.input_size, self.original_size)

    # ------------------------------------------------------------------ helpers

    def _predict_tiled(self, pts, boxes, masks, n_batch: int, batched: bool,
                       multimask: bool, return_logits: bool) -> Prediction:
        """:meth:`predict` on a tiled image: one prompt (row of a batch) at a time."""
        def row(v, b):  # the b-th prompt of a checked (array, ..., batched) tuple
            return None if v is None else (v[0][b] if v[-1] else v[0])

        logits, scores, low = [], [], []
        for b in range(n_batch):
            rc = row(pts, b)
            lab = None if pts is None else (pts[1][b] if pts[2] else pts[1])
            out = self._tiled.predict_one(rc, lab, row(boxes, b), row(masks, b), multimask)
            logits.append(out[0])
            scores.append(out[1])
            low.append(out[2])
        full = np.stack(logits)
        refiner = self.refiner
        if refiner is not None:
            full = self._refine(refiner, full, pts, boxes, n_batch, True)
        threshold = float(self.model.mask_threshold)
        out = Prediction(full if return_logits else full > threshold,
                         np.stack(scores).astype(np.float32), np.stack(low).astype(np.float32))
        return out if batched else Prediction(*(a[0] for a in out))

    def _refine(self, refiner, logits, pts, boxes, n_batch: int, return_logits: bool):
        """(B, C, H, W) decoder logits -> refined logits (or masks) for :meth:`predict`.
        ``logits`` (a fresh array of :meth:`predict_torch`'s) is refined in place."""
        points = labels = box = None
        if pts is not None:
            rc, lab, batched = pts
            points = rc if batched else np.broadcast_to(rc, (n_batch, *rc.shape))
            labels = lab if batched else np.broadcast_to(lab, (n_batch, *lab.shape))
        if boxes is not None:
            box = boxes[0] if boxes[1] else np.broadcast_to(boxes[0], (n_batch, 4))
        threshold = float(self.model.mask_threshold)
        with self._lock, compute_threads():
            refined = refine_logits(refiner, self.image, logits, points, labels, box, threshold,
                                    out=logits)
        return refined if return_logits else refined > threshold

    def _low_res_size(self) -> tuple[int, int]:
        size = getattr(self.model.prompt_encoder, "mask_input_size", None)
        if size is None:
            features = self.features if self._tiled is None else self.tiled.tiles[0].features
            size = (4 * features.shape[-2], 4 * features.shape[-1])
        return int(size[0]), int(size[1])

    def _limit_points(self, pts, has_box: bool):
        """Keep the points the model can take (:func:`limit_prompt_points`); warns when
        some are dropped. ``pts`` as returned by :meth:`_check_points`."""
        rc, lab, batched = pts
        keep, note = limit_prompt_points(
            rc.shape[-2], has_box, getattr(self.model, "max_prompt_points", None)
        )
        if note is None:
            return pts
        warnings.warn(note, UserWarning, stacklevel=3)
        if len(keep) == 0:
            return None
        return rc[..., keep, :], lab[..., keep], batched

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
