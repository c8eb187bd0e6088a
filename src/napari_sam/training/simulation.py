"""Interactive prompt simulation: the objects of a step and their prompting rounds.

Each object is prompted first with a point (multimask output, best-of-3 loss)
or a box, then correction rounds add a point in the error region and feed the
previous low-res logits back as the mask prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from napari_sam.engine.session import DecodePlan, decode_plan
from napari_sam.errors import InvalidInputError

from .datasets import Sample
from .losses import SamLoss, object_windows, sam_loss, soft_targets
from .prompts import (
    boxes_from_masks,
    correction_points,
    innermost_points,
    instance_masks,
    jitter_boxes,
    sample_instances,
    sample_points_in_masks,
)

__all__ = ["ObjectBatch", "collect_objects", "merge_metrics", "run_rounds", "split_first_prompt",
           "summary"]


@dataclasses.dataclass
class ObjectBatch:
    """The objects prompted in one step, over all images of the batch.

    Attributes:
      image_index: (M,) index of each object's image in the embedding batch.
      gt: (M, S, S) bool ground-truth masks at model resolution.
      target: (M, L, L) float soft low-resolution targets.
      valid: (M, S, S) bool valid (unpadded) region of each object's image.
    """

    image_index: torch.Tensor
    gt: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor

    def select(self, rows: torch.Tensor) -> ObjectBatch:
        return ObjectBatch(
            self.image_index[rows], self.gt[rows], self.target[rows], self.valid[rows]
        )

    def __len__(self) -> int:
        return int(self.image_index.numel())


def collect_objects(
    samples: Sequence[Sample],
    k: int | None,
    low_res_size: int,
    generator: torch.Generator | None = None,
    min_area: int = 1,
) -> ObjectBatch:
    """Pick up to ``k`` objects per sample (all when ``k`` is None) into an :class:`ObjectBatch`."""
    index, gts, valids = [], [], []
    S = samples[0].labels.shape[-1]
    ar = torch.arange(S)
    for i, s in enumerate(samples):
        ids = sample_instances(s.labels, k if k is not None else 1 << 30, generator, min_area)
        if ids.numel() == 0:
            continue
        gts.append(instance_masks(s.labels, ids))
        h, w = s.input_size
        valid = (ar[:, None] < h) & (ar[None, :] < w)
        valids.append(valid.expand(ids.numel(), S, S))
        index.append(torch.full((ids.numel(),), i, dtype=torch.int64))
    if not gts:
        empty = torch.zeros(0, S, S, dtype=torch.bool)
        return ObjectBatch(
            torch.zeros(0, dtype=torch.int64),
            empty,
            torch.zeros(0, low_res_size, low_res_size),
            empty,
        )
    gt = torch.cat(gts)
    return ObjectBatch(torch.cat(index), gt, soft_targets(gt, low_res_size), torch.cat(valids))


# ------------------------------------------------------------------------- rounds


def run_rounds(
    model: torch.nn.Module,
    embeddings: torch.Tensor,
    objects: ObjectBatch,
    rounds: int,
    first: str = "point",
    mask_only_rounds: int = 0,
    point_mode: str = "interior",
    first_point: str = "uniform",
    box_noise: bool = True,
    generator: torch.Generator | None = None,
    rng: np.random.Generator | None = None,
    loss_kwargs: dict[str, float] | None = None,
    backward_scale: float | None = None,
) -> list[SamLoss]:
    """Simulate ``rounds`` interactive prompting rounds for ``objects``.

    Arguments:
      embeddings: (B, C, E, E) image embeddings on the model's device;
        ``objects.image_index`` indexes them. For training pass a leaf tensor
        that requires grad. ``objects`` and the prompts stay on the CPU.
      first: ``"point"`` (multimask output, best-of-C loss) or ``"box"``.
      first_point: ``"uniform"`` in the mask, or ``"center"`` (innermost pixel).
      box_noise: jitter the tight box (SAM's box noise).
      loss_kwargs: keyword arguments of :func:`~napari_sam.training.losses.sam_loss`
        (weights, focal alpha/gamma).
      backward_scale: if given, ``loss.total * backward_scale`` of each round is
        back-propagated right after the round (training).

    Returns:
      one :class:`SamLoss` per round.
    """
    M = len(objects)
    S = objects.gt.shape[-1]
    if first == "point":
        if first_point == "center":
            rc = torch.from_numpy(innermost_points(objects.gt)).float()
            coords = rc.flip(-1)
        else:
            coords, _ = sample_points_in_masks(objects.gt, generator)
        points = coords[:, None, :]
        labels = torch.ones(M, 1, dtype=torch.int64)
        boxes = None
    elif first == "box":
        boxes = boxes_from_masks(objects.gt)
        if box_noise:
            boxes = jitter_boxes(boxes, (S, S), generator)
        points = torch.zeros(M, 0, 2)
        labels = torch.zeros(M, 0, dtype=torch.int64)
    else:
        raise InvalidInputError(f"first must be 'point' or 'box', got {first!r}")
    # prompts are drawn on the CPU (``generator``); what meets the model goes to its device
    device = embeddings.device
    image_index = objects.image_index.to(device)
    target = objects.target.to(device)
    points, labels = points.to(device), labels.to(device)
    boxes = None if boxes is None else boxes.to(device)
    image_pe = model.prompt_encoder.get_dense_pe()
    emb = embeddings.index_select(0, image_index)
    loss_kwargs = dict(loss_kwargs or {})
    factor = float(loss_kwargs.pop("loss_window", 0.0) or 0.0)
    if factor > 0:
        loss_kwargs["window"] = object_windows(objects.target, factor).to(device)
    mask_input = None
    out = []
    for r in range(rounds):
        mask_only = r > 0 and r >= rounds - mask_only_rounds
        if r > 0 and not mask_only:
            pred = F.interpolate(mask_input, (S, S), mode="bilinear", align_corners=False)
            pred = (pred[:, 0] > 0).cpu() & objects.valid
            c, lab = correction_points(pred, objects.gt, point_mode, generator, rng)
            points = torch.cat([points, c[:, None].to(device)], 1)
            labels = torch.cat([labels, lab[:, None].to(device)], 1)
        # the interactive rule (engine/session.py): three masks for a lone point, the last
        # round's logits fed back when points were appended; SAM's mask-only rounds (no new
        # point, the logits fed back) are training's own
        plan = (DecodePlan(multimask=False, refine=True) if mask_only else
                decode_plan(points.shape[1], boxes is not None, appended=r > 0,
                            have_logits=mask_input is not None))
        multimask = plan.multimask
        sparse, dense = model.prompt_encoder(
            points=(points, labels) if points.shape[1] else None, boxes=boxes,
            masks=mask_input if plan.refine else None,
        )
        if r > 0 and backward_scale is not None:
            # each round's backward frees the gather's graph: rebuild it
            emb = embeddings.index_select(0, image_index)
        logits, iou_pred = model.mask_decoder(
            image_embeddings=emb,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        loss = sam_loss(logits, iou_pred, target, **loss_kwargs)
        if backward_scale is not None:
            (loss.total * backward_scale).backward()
        chosen = logits.detach()[torch.arange(M, device=device), loss.best]
        mask_input = chosen[:, None]
        out.append(loss)
    return out


def summary(losses: list[SamLoss]) -> dict[str, float]:
    """Mean loss terms over the rounds ``losses`` of one object group, and the IoU of the
    first and the last round."""
    return {
        "loss": float(sum(float(x.total.detach()) for x in losses) / len(losses)),
        "focal": float(torch.stack([x.focal.mean() for x in losses]).mean()),
        "dice": float(torch.stack([x.dice.mean() for x in losses]).mean()),
        "iou_mse": float(torch.stack([x.iou_mse.mean() for x in losses]).mean()),
        "iou_first": float(losses[0].iou.mean()),
        "iou_last": float(losses[-1].iou.mean()),
    }


def split_first_prompt(
    n: int, box_prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``n`` objects whose first prompt is a point, and those whose first is a box
    (each a box with probability ``box_prob``)."""
    is_box = torch.rand(n, generator=generator) < box_prob
    return torch.nonzero(~is_box).squeeze(1), torch.nonzero(is_box).squeeze(1)


def merge_metrics(groups: list[tuple[list[SamLoss], float]]) -> dict[str, float]:
    """Object-weighted means of the metrics of several object groups."""
    out: dict[str, float] = {}
    for losses, w in groups:
        for k, v in summary(losses).items():
            out[k] = out.get(k, 0.0) + w * v
    return out

