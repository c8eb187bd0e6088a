"""Objects from prompts painted into one label image (the rule of ``napari-sam segment``).

The rule: object k (1-based, in the given order) gets label k; where objects
overlap, the earlier object keeps the pixels, so a later object gets only the
pixels still free. Each object's mask is the model's best candidate (highest
predicted IoU) of its point and/or box prompts.

Numpy in, numpy out: the predictor must already hold the image
(:meth:`~napari_sam.engine.predictor.Predictor.set_image`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from napari_sam.errors import InvalidInputError

__all__ = ["SELECT_MODES", "ObjectResult", "SegmentResult", "segment_objects"]

#: how each object's mask is chosen: "best" of 3 candidates (multimask), or one "single" mask
SELECT_MODES = ("best", "single")


class PromptedObject(Protocol):
    """One object's prompts (as :class:`~napari_sam.engine.io.PromptObject`)."""

    points: np.ndarray  # (N, 2) float (row, col); N may be 0
    labels: np.ndarray  # (N,) int, 1 = foreground, 0 = background
    box: np.ndarray | None  # (4,) (row0, col0, row1, col1) or None

    def describe(self, number: int) -> str: ...


@dataclass(frozen=True)
class ObjectResult:
    """What one object got.

    Attributes:
      number: its label value (1-based position in the input).
      area: pixels painted with ``number`` (0 if empty or covered).
      score: predicted IoU of the chosen mask.
      empty: the model's mask was empty.
      covered: the mask was not empty but lay entirely under earlier objects.
    """

    number: int
    area: int
    score: float
    empty: bool
    covered: bool


@dataclass(frozen=True)
class SegmentResult:
    """``labels`` (H, W) uint32 (0 = background, k = object k) and one result per object."""

    labels: np.ndarray
    objects: list[ObjectResult]


def segment_objects(
    predictor: Any,
    objects: Sequence[PromptedObject],
    shape: tuple[int, int],
    select: str = "best",
    on_object: Callable[[PromptedObject, ObjectResult], None] | None = None,
) -> SegmentResult:
    """Predict each object's mask and paint them into one (H, W) label image.

    Args:
      predictor: a :class:`~napari_sam.engine.predictor.Predictor` holding
        the image (``predict(points=, labels=, box=, multimask=)``).
      objects: prompts per object, in label order (object k gets label k).
      shape: (H, W) of the image.
      select: "best" (3 candidates, keep the highest predicted IoU) or
        "single" (one mask).
      on_object: called after each object with it and its result (progress).

    Returns:
      :class:`SegmentResult`; earlier objects keep overlapping pixels.

    Raises:
      InvalidInputError: an unknown ``select``, or a prompt the predictor
        refuses (the message names the object, e.g. ``object 3 ('cell'): ...``).
    """
    if select not in SELECT_MODES:
        raise InvalidInputError(f"select must be one of {', '.join(SELECT_MODES)}, "
                                f"got {select!r}.")
    multimask = select == "best"
    labels = np.zeros(tuple(int(n) for n in shape), dtype=np.uint32)
    results = []
    for number, obj in enumerate(objects, start=1):
        has_points = len(obj.points) > 0
        try:
            pred = predictor.predict(
                points=obj.points if has_points else None,
                labels=obj.labels if has_points else None,
                box=obj.box,
                multimask=multimask,
            )
        except InvalidInputError as err:
            raise InvalidInputError(f"{obj.describe(number)}: {err}") from err
        mask = pred.masks[int(np.argmax(pred.scores))]
        free = mask & (labels == 0)
        labels[free] = number
        result = ObjectResult(
            number=number,
            area=int(free.sum()),
            score=float(np.max(pred.scores)),
            empty=not mask.any(),
            covered=bool(mask.any() and not free.any()),
        )
        results.append(result)
        if on_object is not None:
            on_object(obj, result)
    return SegmentResult(labels=labels, objects=results)
