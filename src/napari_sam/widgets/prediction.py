"""The interactive widget's prediction job (no Qt, no napari): runs in its prediction thread.

:func:`predict_candidates` decodes one prompt request through the engine's
:class:`~napari_sam.engine.session.InteractiveSession` (the refinement rule lives there),
then does in the same background thread what the main thread must not: the bounding box
of each candidate mask and its preview pixels (:func:`~.preview.render_preview`), so
the main thread only shows a small crop. Everything is in image data pixels, (row, col).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sam.widgets import preview as P
from napari_sam.widgets.prompting import Prompts, mask_bbox

if TYPE_CHECKING:
    from napari_sam.engine.predictor import Prediction
    from napari_sam.engine.session import InteractiveSession, PromptRequest

__all__ = ["CandidateMasks", "predict_candidates"]


@dataclass
class CandidateMasks:
    """What a prediction job hands to the main thread (masks in image data pixels)."""

    session: InteractiveSession
    request: PromptRequest
    prediction: Prediction
    masks: np.ndarray  # (C, H, W) bool
    boxes: list[tuple[slice, slice] | None]  # bounding box of each candidate (None: empty)
    crops: list[np.ndarray | None]  # preview pixels of each candidate's box
    style: str  # the preview style the crops were drawn in
    route: str = ""  # on a tiled image: the tile(s) the prompt went to (one line)

    @property
    def prompts(self) -> Prompts:
        return self.request.prompts


def predict_candidates(
    session: InteractiveSession,
    applied: dict[str, Any],
    entry: Any,
    request: PromptRequest,
    style: str,
    width: int,
) -> CandidateMasks:
    """Decode ``request`` on embedding ``entry``, then crop and draw each candidate.

    Args:
      session: the widget's session (its predictor decodes).
      applied: remembers which embedding the predictor holds; the embedding is set only
        when ``entry`` differs (only the prediction thread touches the predictor, so
        this is race-free).
      entry: a :class:`~napari_sam.engine.cache.CacheEntry` of the shown plane, or its
        :class:`~napari_sam.engine.tiled.TiledEmbedding` (a large plane in tiles).
      request: from ``session.request(points, labels, box)``.
      style, width: the preview style and outline width (:func:`~.preview.render_preview`).
    """
    predictor = session.predictor
    if applied.get("entry") is not entry:
        predictor.use_embedding(entry)
        applied["entry"] = entry
    pred = session.decode(request)
    masks = np.asarray(pred.masks, dtype=bool)
    boxes = [mask_bbox(m) for m in masks]
    crops = [None if b is None else P.render_preview(m[b], style, width)
             for m, b in zip(masks, boxes, strict=True)]
    return CandidateMasks(session, request, pred, masks, boxes, crops, style,
                          predictor.route_note)
