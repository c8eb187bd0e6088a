"""Training the mask refiner (:mod:`napari_sam.models.mask_refiner`) of any model.

The refiner learns from the model's own masks: for every object of every training
image (up to ``max_objects`` an image), the frozen model is prompted three times, as
a user would: a click at the object's innermost pixel and one at a random pixel of
the object (multimask, the mask with the best predicted IoU), and the object's tight
box. With ``corrections``, each click is followed by one correction click as a user
would place it (:func:`~napari_sam.training.prompts.correction_points`, on the mask the
user sees: refined by the model's own refiner when it has one) and the two-point
prediction (the first one's low-res logits as mask input, one mask, as
:func:`~napari_sam.engine.session.decode_plan` decides) is one more sample, so the
refiner also learns negative clicks. Each prediction becomes one sample: the
refiner's input built by :func:`napari_sam.engine.refine.window_features` from the window
:func:`~napari_sam.engine.refine.refine_window` chooses, and the object's true mask on
the same grid (area-averaged, so a soft target at the rim). The refiner is then
trained on these samples with BCE + soft Dice, random 90-degree rotations, flips and
intensity jitter of the image channels, AdamW and a one-cycle schedule.

``scripts/train_refiner.py`` runs both steps and saves the model with its refiner;
the samples and checkpoints stay in the run folder, so a stopped run resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.engine.predictor import Predictor
from napari_sam.engine.refine import refine_window, window_features, window_target
from napari_sam.engine.session import decode_plan
from napari_sam.models.build import build_sam
from napari_sam.models.mask_refiner import MaskRefiner
from napari_sam.training.prompts import correction_points, innermost_points, prompt_boxes

__all__ = ["RefinerSamples", "refiner_samples", "train_refiner", "with_refiner"]

log = logging.getLogger("napari_sam.training")


@dataclasses.dataclass
class RefinerSamples:
    """x: (N, 6, S, S) float16 refiner inputs; y: (N, S, S) float16 targets in [0, 1];
    kind: (N,) 0 innermost click, 1 random click, 2 box, 3 click + correction click."""

    x: np.ndarray
    y: np.ndarray
    kind: np.ndarray

    def save(self, path: str | Path) -> None:
        np.savez(path, x=self.x, y=self.y, kind=self.kind)

    @classmethod
    def load(cls, path: str | Path) -> RefinerSamples:
        with np.load(path) as d:
            return cls(d["x"], d["y"], d["kind"])

    def __add__(self, other: RefinerSamples) -> RefinerSamples:
        return RefinerSamples(np.concatenate([self.x, other.x]),
                              np.concatenate([self.y, other.y]),
                              np.concatenate([self.kind, other.kind]))


def refiner_samples(
    model: torch.nn.Module,
    images: Iterable[tuple[np.ndarray, np.ndarray]],
    max_objects: int = 20,
    min_area: int = 10,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    prompts: str = "all",
) -> RefinerSamples:
    """Samples of the refiner from ``model``'s predictions on ``images``.

    Arguments:
      model: the model whose masks are refined (frozen; its own refiner is not used).
      images: ``(rgb (H, W, 3) uint8, labels (H, W) int)`` pairs.
      max_objects: objects per image at most (a random choice of them).
      min_area: smaller objects are skipped.
      seed: the choice of objects and of the random clicks.
      progress: called with the number of images done.
      prompts: ``"all"`` (kinds 0-2), ``"corrections"`` (kind 3 only: a correction
        after each of the two clicks; the clicks are drawn as for ``"all"`` with the
        same seed) or ``"both"``.
    """
    if prompts not in ("all", "corrections", "both"):
        from napari_sam.errors import InvalidInputError

        raise InvalidInputError(f"prompts must be 'all', 'corrections' or 'both', got {prompts!r}")
    base, corrections = prompts in ("all", "both"), prompts in ("corrections", "both")
    predictor = Predictor(model, refine=False)
    has_refiner = getattr(model, "mask_refiner", None) is not None
    correction_rng = np.random.default_rng([seed, 1])
    rng = np.random.default_rng(seed)
    xs, ys, kinds = [], [], []
    for n, (rgb, labels) in enumerate(images, start=1):
        predictor.set_image(rgb)
        ids, area = np.unique(labels, return_counts=True)
        ids = ids[(ids != 0) & (area >= min_area)]
        if len(ids) > max_objects:
            ids = rng.choice(ids, max_objects, replace=False)
        for obj in ids:
            truth = labels == obj
            rows, cols = np.nonzero(truth)
            k = rng.integers(len(rows))
            clicks = [innermost_points(truth[None])[0], np.array([rows[k], cols[k]])]
            for kind, click in enumerate(clicks):
                pred = predictor.predict(points=click[None].astype(np.float64), multimask=True,
                                         return_logits=True)
                best = int(np.argmax(pred.scores))
                logits = pred.masks[best]
                if base:
                    window = refine_window(logits > 0, click[None])
                    xs.append(window_features(rgb, logits, window, click[None]).half().numpy())
                    ys.append(_target(truth, window))
                    kinds.append(kind)
                if corrections:
                    sample = _correction_sample(predictor, rgb, truth, click, pred, best,
                                                has_refiner, correction_rng)
                    if sample is not None:
                        xs.append(sample[0])
                        ys.append(sample[1])
                        kinds.append(3)
            if base:
                box = prompt_boxes(truth[None])[0]
                logits = predictor.predict(box=box, multimask=False, return_logits=True).masks[0]
                window = refine_window(logits > 0, None, box)
                xs.append(window_features(rgb, logits, window).half().numpy())
                ys.append(_target(truth, window))
                kinds.append(2)
        if progress is not None:
            progress(n)
    if not xs:
        from napari_sam.errors import InvalidInputError

        raise InvalidInputError("No object to learn from: the label images hold no object of "
                                f"at least {min_area} pixels.")
    return RefinerSamples(np.stack(xs), np.stack(ys), np.asarray(kinds, np.int8))


def _correction_sample(
    predictor: Predictor, rgb: np.ndarray, truth: np.ndarray, click: np.ndarray, pred,
    best: int, has_refiner: bool, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The sample of a correction click after ``click``'s prediction ``pred`` (None when
    the mask the user sees is already perfect)."""
    point = click[None].astype(np.float64)
    if has_refiner:
        predictor.refine = None
        shown = predictor.predict(points=point, multimask=True).masks[best]
        predictor.refine = False
    else:
        shown = pred.masks[best] > 0
    coords, labels = correction_points(torch.from_numpy(shown[None]),
                                       torch.from_numpy(truth[None]), mode="interior", rng=rng)
    if int(labels[0]) < 0:
        return None
    second = np.array([[float(coords[0, 1]), float(coords[0, 0])]])  # (x, y) -> (row, col)
    points = np.concatenate([point, second])
    point_labels = np.array([1, int(labels[0])])
    plan = decode_plan(2, False, True, True)
    logits = predictor.predict(points=points, labels=point_labels,
                               mask_input=pred.logits[best][None] if plan.refine else None,
                               multimask=plan.multimask, return_logits=True).masks[0]
    positive = points[point_labels == 1]
    negative = points[point_labels == 0]
    window = refine_window(logits > 0, positive)
    x = window_features(rgb, logits, window, positive, negative if len(negative) else None)
    return x.half().numpy(), _target(truth, window)


def _target(truth: np.ndarray, window) -> np.ndarray:
    return window_target(truth, window).half().numpy()


def train_refiner(
    samples: RefinerSamples,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 2e-3,
    widths: tuple[int, ...] = (16, 32, 64, 96),
    seed: int = 0,
    state: dict | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 100,
    init: dict | None = None,
) -> MaskRefiner:
    """Train a :class:`MaskRefiner` on ``samples`` (see the module doc for the recipe).

    ``state`` (from an earlier ``checkpoint`` call) resumes a run; ``checkpoint`` is
    called with the run's state every ``checkpoint_every`` steps and at the end.
    ``init``: a refiner state dict to start from (a warm start; ``widths`` must match).
    """
    torch.manual_seed(seed)
    x_all = torch.from_numpy(samples.x)
    y_all = torch.from_numpy(samples.y)
    refiner = MaskRefiner(widths)
    if init is not None:
        refiner.load_state_dict(init)
    opt = torch.optim.AdamW(refiner.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    start = 0
    if state is not None:
        refiner.load_state_dict(state["refiner"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        start = int(state["step"])
    refiner.train()
    for step in range(start + 1, steps + 1):
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        x, y = x_all[idx].float(), y_all[idx].float()[:, None]
        k = int(torch.randint(4, (1,), generator=gen))
        if k:
            x, y = torch.rot90(x, k, (2, 3)), torch.rot90(y, k, (2, 3))
        if torch.rand(1, generator=gen) < 0.5:
            x, y = x.flip(3), y.flip(3)
        gain = 1 + 0.2 * torch.randn(batch_size, 1, 1, 1, generator=gen)
        shift = 0.2 * torch.randn(batch_size, 1, 1, 1, generator=gen)
        x = torch.cat([x[:, :3] * gain + shift, x[:, 3:]], 1)
        logits = refiner(x)
        bce = F.binary_cross_entropy_with_logits(logits, y)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * y).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)
        loss = bce + dice.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log.info("refiner step %d/%d loss=%.4f bce=%.4f dice=%.4f", step, steps,
                     loss.item(), bce.item(), dice.mean().item())
        if checkpoint is not None and (step % checkpoint_every == 0 or step == steps):
            # a copy: the live tensors go on changing after the call
            checkpoint(copy.deepcopy({
                "refiner": refiner.state_dict(), "optimizer": opt.state_dict(),
                "schedule": sched.state_dict(), "generator": gen.get_state(), "step": step}))
    return refiner.eval()


def with_refiner(model: torch.nn.Module, refiner: MaskRefiner) -> torch.nn.Module:
    """A copy of ``model`` (a Sam with a config) that has ``refiner`` as its mask refiner."""
    config = dataclasses.replace(model.config, refiner_widths=refiner.widths)
    out = build_sam(config)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("mask_refiner.")}
    out.load_state_dict(own, strict=False)
    out.mask_refiner.load_state_dict(refiner.state_dict())
    return out.eval()
