"""Interactive prompting: the rule that turns successive prompts into predictions.

No Qt and no napari: the interactive widget, the click protocol of
:mod:`napari_sam.evaluation.interactive`, training's prompt simulation
(:func:`decode_plan`, on tensors) and scripts share it.

Coordinates are image data pixels, napari/numpy order: points ``(row, col)``,
boxes ``(row0, col0, row1, col1)``, masks ``(H, W)``.

The rule (:func:`plan_decode`), as in SAM's interactive use and training:

* one point and no box -> three candidate masks (a single click is ambiguous:
  part, object or group); anything else -> one mask;
* points only *appended* since the shown prediction (same earlier points and
  labels, same box) -> the shown candidate's low-res logits are fed back as
  ``mask_input`` (the previous mask guides the model). Any other change starts
  afresh.

Models without a mask prompt (EfficientSAM: ``accepts_mask_prompt = False``)
never refine with logits: a correction click is simply added to the points and
every step decodes all prompts afresh (the previous logits are ignored). Such a
model also takes a limited number of points (6, a box counts as 2): beyond it
the predictor keeps the first and the latest points
(:func:`limit_prompt_points`) and warns;
:attr:`PromptRequest.note` says the same for a status line.

:class:`InteractiveSession` holds the shown prediction and its selected
candidate. :meth:`InteractiveSession.update` does a whole step; a caller that
decodes in a worker thread splits it into :meth:`~InteractiveSession.request`
(main thread), :meth:`~InteractiveSession.decode` (any thread: it reads no
session state) and :meth:`~InteractiveSession.accept` (main thread).

Batches: points ``(B, N, 2)``, labels ``(B, N)`` and box ``(B, 4)`` run B
independent sessions at once (every row follows the same rule, the number of
points is the same in all rows); :meth:`InteractiveSession.keep` drops rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from napari_sam.errors import InvalidInputError

if TYPE_CHECKING:
    from napari_sam.engine.predictor import Prediction, Predictor

__all__ = [
    "DecodePlan", "InteractiveSession", "PromptRequest", "Prompts", "decode_plan",
    "limit_prompt_points", "plan_decode",
]


@dataclass(frozen=True)
class Prompts:
    """The prompts of one prediction.

    Attributes:
      points: ``(N, 2)`` float ``(row, col)`` (``(B, N, 2)`` for a batch).
      labels: ``(N,)`` int, 1 positive, 0 negative (``(B, N)``).
      box: ``(4,)`` float ``(row0, col0, row1, col1)`` (``(B, 4)``) or None.
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None

    @classmethod
    def make(
        cls, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None = None
    ) -> Prompts:
        """Unbatched prompts; copies the arrays (the caller's layers may change them later)."""
        pts = np.asarray(points, dtype=float).reshape(-1, 2).copy()
        lab = np.asarray(labels, dtype=np.int32).reshape(-1).copy()
        b = None if box is None else np.asarray(box, dtype=float).reshape(4).copy()
        return cls(pts, lab, b)

    @property
    def n_points(self) -> int:
        """Points per prompt (per row of a batch)."""
        return int(self.points.shape[-2])

    @property
    def batched(self) -> bool:
        """Whether the arrays have a leading batch axis."""
        return self.points.ndim == 3

    @property
    def empty(self) -> bool:
        """No point and no box."""
        return self.n_points == 0 and self.box is None

    def same_as(self, other: Prompts | None) -> bool:
        """Equal points, labels and box (within float tolerance for the coordinates)."""
        if other is None or self.points.shape != other.points.shape:
            return False
        return (
            np.allclose(self.points, other.points)
            and np.array_equal(self.labels, other.labels)
            and _same_box(self.box, other.box)
        )

    def extends(self, other: Prompts | None) -> bool:
        """``self`` = ``other`` plus more points (same order, same labels, same box)."""
        if other is None or self.n_points <= other.n_points:
            return False
        if self.points.shape[:-2] != other.points.shape[:-2]:
            return False  # another batch size
        n = other.n_points
        return (
            np.array_equal(self.points[..., :n, :], other.points)
            and np.array_equal(self.labels[..., :n], other.labels)
            and _same_box(self.box, other.box)
        )


@dataclass(frozen=True)
class DecodePlan:
    """How to decode a set of prompts.

    Attributes:
      multimask: ask for three candidates instead of one.
      refine: feed the shown candidate's low-res logits back as ``mask_input``.
    """

    multimask: bool
    refine: bool


def plan_decode(prompts: Prompts, previous: Prompts | None, have_logits: bool) -> DecodePlan:
    """The decoding rule (see the module doc).

    Arguments:
      prompts: the new prompts.
      previous: the prompts of the shown prediction (None: there is none).
      have_logits: the shown prediction's logits are available.
    """
    return decode_plan(prompts.n_points, prompts.box is not None,
                       appended=prompts.extends(previous), have_logits=have_logits)


def decode_plan(n_points: int, has_box: bool, appended: bool, have_logits: bool) -> DecodePlan:
    """The rule of :func:`plan_decode` on counts, for callers that hold their prompts as
    tensors (training's prompt simulation, :mod:`napari_sam.training.simulation`).

    Arguments:
      n_points: points of the new prompt (per row).
      has_box: the prompt has a box.
      appended: the prompt is the shown one plus appended points.
      have_logits: the shown prediction's low-res logits are available.
    """
    return DecodePlan(multimask=n_points == 1 and not has_box, refine=have_logits and appended)


def limit_prompt_points(
    n_points: int, has_box: bool, max_points: int | None
) -> tuple[np.ndarray, str | None]:
    """Which of ``n_points`` prompt points a model that takes at most ``max_points``
    (a box counts as 2; None: no limit) uses, and a one-line note when some are dropped.

    The policy (EfficientSAM, 6 points): the box is always kept; of the points, the
    first one (the click that named the object) and the latest ones are kept, so
    correction clicks keep working; the points in between are ignored.

    Returns (indices of the kept points, ascending; the note or None).
    """
    keep = np.arange(n_points)
    if max_points is None:
        return keep, None
    room = max(0, int(max_points) - (2 if has_box else 0))
    if n_points <= room:
        return keep, None
    keep = keep[:0] if room == 0 else np.r_[0, np.arange(n_points - room + 1, n_points)]
    limit = f"at most {max_points} prompt points" + (" (a box counts as 2)" if has_box else "")
    if room == 0:
        used = "the box and none"
    elif room == 1:
        used = ("the box and " if has_box else "") + "the first"
    else:
        used = ("the box, " if has_box else "") + f"the first and the latest {room - 1}"
    note = (
        f"This model takes {limit}: using {used} of the {n_points} points; "
        f"the other {n_points - len(keep)} are ignored."
    )
    return keep, note


@dataclass(frozen=True)
class PromptRequest:
    """One decoding step: the prompts, the plan and the logits fed back.

    Attributes:
      prompts: what the predictor is asked for.
      plan: multimask and refine flags (:func:`plan_decode`).
      mask_input: ``(1, 4E, 4E)`` (``(B, 1, 4E, 4E)``) low-res logits of the shown
        candidate when ``plan.refine``, else None.
      note: one line for the user when the model cannot use every prompt (too many
        points for EfficientSAM: which ones are used), else None.
    """

    prompts: Prompts
    plan: DecodePlan
    mask_input: np.ndarray | None = field(default=None, repr=False, compare=False)
    note: str | None = field(default=None, compare=False)

    @property
    def points(self) -> np.ndarray:
        return self.prompts.points

    @property
    def labels(self) -> np.ndarray:
        return self.prompts.labels

    @property
    def box(self) -> np.ndarray | None:
        return self.prompts.box

    @property
    def multimask(self) -> bool:
        return self.plan.multimask

    @property
    def refine(self) -> bool:
        return self.plan.refine


class InteractiveSession:
    """Successive prompts on one image -> predictions, following :func:`plan_decode`.

    Arguments:
      predictor: a :class:`~napari_sam.engine.predictor.Predictor` (or anything
        with its ``predict``) whose image is set by the caller.

    After each accepted prediction the candidate with the highest predicted IoU is
    selected (per row of a batch); :meth:`select` picks another one.
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        model = getattr(predictor, "model", None)
        #: whether the model takes the previous logits as a mask prompt (refinement)
        self.mask_prompts = bool(getattr(model, "accepts_mask_prompt", True))
        #: the most prompt points the model takes (a box counts as 2), None: no limit
        self.max_points: int | None = getattr(model, "max_prompt_points", None)
        self.reset()

    @property
    def limits_note(self) -> str | None:
        """One line on what the model cannot do that SAM does (for a status line), or None."""
        parts = []
        if not self.mask_prompts:
            parts.append("refines with points only (no mask prompt)")
        if self.max_points is not None:
            parts.append(f"takes at most {self.max_points} points (a box counts as 2)")
        return f"This model {' and '.join(parts)}." if parts else None

    def reset(self) -> None:
        """Forget the shown prediction: the next request starts afresh."""
        self.last_request: PromptRequest | None = None
        self._masks: np.ndarray | None = None  # (B, C, H, W) bool
        self._scores: np.ndarray | None = None  # (B, C)
        self._logits: np.ndarray | None = None  # (B, C, 4E, 4E)
        self._candidate: np.ndarray | None = None  # (B,) int

    # ------------------------------------------------------------ stepping

    def request(
        self,
        points: np.ndarray | None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
    ) -> PromptRequest:
        """The decoding step for new prompts, planned against the shown prediction.

        Arguments:
          points: ``(N, 2)`` or ``(B, N, 2)`` (row, col); None or ``(0, 2)``: none.
          labels: ``(N,)`` or ``(B, N)``; all 1 when None.
          box: ``(4,)`` or ``(B, 4)`` (row0, col0, row1, col1), or None.
        """
        prompts = _make_prompts(points, labels, box)
        if prompts.empty:
            raise InvalidInputError(
                "No prompt given; add at least one point (row, col) or a box."
            )
        plan = plan_decode(prompts, self.last_request and self.last_request.prompts,
                           self._logits is not None and self.mask_prompts)
        mask_input = None
        if plan.refine:
            rows = np.arange(len(self._candidate))
            chosen = self._logits[rows, self._candidate][:, None]  # (B, 1, 4E, 4E)
            mask_input = chosen if prompts.batched else chosen[0]
        note = None
        if self.max_points is not None:
            _, note = limit_prompt_points(prompts.n_points, prompts.box is not None,
                                          self.max_points)
        return PromptRequest(prompts, plan, mask_input, note)

    def decode(self, request: PromptRequest) -> Prediction:
        """Run the predictor for ``request``; reads no session state (any thread)."""
        p = request.prompts
        has_points = p.n_points > 0
        return self.predictor.predict(
            points=p.points if has_points else None,
            labels=p.labels if has_points else None,
            box=p.box,
            mask_input=request.mask_input,
            multimask=request.plan.multimask,
        )

    def accept(self, request: PromptRequest, prediction: Prediction) -> None:
        """Make ``prediction`` (of ``request``) the shown one; select its best candidate."""
        masks = np.asarray(prediction.masks, dtype=bool)
        scores = np.asarray(prediction.scores, dtype=float)
        logits = np.asarray(prediction.logits)
        if not request.prompts.batched:
            masks, scores, logits = masks[None], scores.reshape(1, -1), logits[None]
        self.last_request = request
        self._masks, self._scores, self._logits = masks, scores, logits
        self._candidate = scores.argmax(axis=1)

    def update(
        self,
        points: np.ndarray | None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
    ) -> Prediction:
        """Request, decode and accept in one call; returns the predictor's output."""
        request = self.request(points, labels, box)
        prediction = self.decode(request)
        self.accept(request, prediction)
        return prediction

    # --------------------------------------------------------------- state

    def select(self, i: int) -> None:
        """Select candidate ``i`` (0-based; in every row of a batch)."""
        if self._masks is None:
            raise InvalidInputError("There is no prediction yet: add a point or a box first.")
        n = self._masks.shape[1]
        if not 0 <= i < n:
            raise InvalidInputError(f"Candidate {i} does not exist; this prediction has {n}.")
        self._candidate = np.full(len(self._masks), int(i))

    def keep(self, rows: np.ndarray) -> None:
        """Keep only ``rows`` (indices or a bool mask) of a batched session."""
        if self.last_request is None or not self.last_request.prompts.batched:
            raise InvalidInputError("keep() needs a batched prediction.")
        p, plan = self.last_request.prompts, self.last_request.plan
        box = None if p.box is None else p.box[rows]
        self.last_request = PromptRequest(Prompts(p.points[rows], p.labels[rows], box), plan)
        self._masks, self._scores = self._masks[rows], self._scores[rows]
        self._logits, self._candidate = self._logits[rows], self._candidate[rows]

    def _unbatch(self, a: np.ndarray | None) -> np.ndarray | None:
        if a is None or self.last_request is None or self.last_request.prompts.batched:
            return a
        return a[0]

    @property
    def candidate(self) -> int | np.ndarray | None:
        """Index of the selected candidate (``(B,)`` for a batch), None without prediction."""
        c = self._unbatch(self._candidate)
        return None if c is None else (c if np.ndim(c) else int(c))

    @property
    def masks(self) -> np.ndarray | None:
        """``(C, H, W)`` bool candidates (``(B, C, H, W)``)."""
        return self._unbatch(self._masks)

    @property
    def scores(self) -> np.ndarray | None:
        """``(C,)`` predicted IoU of each candidate (``(B, C)``)."""
        return self._unbatch(self._scores)

    @property
    def logits(self) -> np.ndarray | None:
        """``(C, 4E, 4E)`` low-res logits of each candidate (``(B, C, 4E, 4E)``)."""
        return self._unbatch(self._logits)

    @property
    def mask(self) -> np.ndarray | None:
        """The selected candidate: ``(H, W)`` bool (``(B, H, W)``)."""
        if self._masks is None:
            return None
        rows = np.arange(len(self._masks))
        return self._unbatch(self._masks[rows, self._candidate])


def _make_prompts(
    points: np.ndarray | None, labels: np.ndarray | None, box: np.ndarray | None
) -> Prompts:
    if points is not None and np.ndim(points) == 3:
        pts = np.array(points, dtype=float)
        lab = np.ones(pts.shape[:2], dtype=np.int32) if labels is None else np.array(labels)
        b = None if box is None else np.array(box, dtype=float)
        return Prompts(pts, lab, b)
    if box is not None and np.ndim(box) == 2 and points is None:
        b = np.array(box, dtype=float)
        return Prompts(np.zeros((len(b), 0, 2)), np.zeros((len(b), 0), dtype=np.int32), b)
    pts = np.zeros((0, 2)) if points is None else np.asarray(points, dtype=float)
    lab = np.ones(len(pts.reshape(-1, 2)), dtype=np.int32) if labels is None else labels
    return Prompts.make(pts, lab, box)


def _same_box(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.allclose(a, b))
