"""Training's prompt rounds follow the interactive session's rule (engine/session.decode_plan)."""

from __future__ import annotations

import pytest
import torch

from napari_sam.training import simulation
from napari_sam.training.losses import soft_targets
from napari_sam.training.simulation import ObjectBatch, run_rounds


@pytest.mark.parametrize("first, rounds, mask_only, multimask, fed", [
    ("point", 3, 0, [True, False, False], [False, True, True]),
    ("point", 3, 1, [True, False, False], [False, True, True]),
    ("box", 2, 0, [False, False], [False, True]),
])
def test_rounds_decode_as_the_session_does(tiny_sam, monkeypatch, first, rounds, mask_only,
                                           multimask, fed):
    S = tiny_sam.img_size
    low = 4 * tiny_sam.image_encoder(torch.zeros(1, 3, S, S)).shape[-1]
    gt = torch.zeros(2, S, S, dtype=torch.bool)
    gt[0, 20:50, 30:60] = True
    gt[1, 70:90, 10:40] = True
    objects = ObjectBatch(torch.zeros(2, dtype=torch.int64), gt, soft_targets(gt, low),
                          torch.ones(2, S, S, dtype=torch.bool))
    with torch.no_grad():
        emb = tiny_sam.image_encoder(tiny_sam.preprocess(torch.rand(1, 3, S, S) * 255))
    plans, seen = [], []
    real_plan = simulation.decode_plan

    def spy_plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs))
        return plans[-1]

    real_encoder = tiny_sam.prompt_encoder.forward
    real_decoder = tiny_sam.mask_decoder.forward

    def spy_encoder(points=None, boxes=None, masks=None):
        seen.append({"fed": masks is not None})
        return real_encoder(points=points, boxes=boxes, masks=masks)

    def spy_decoder(**kwargs):
        seen[-1]["multimask"] = kwargs["multimask_output"]
        return real_decoder(**kwargs)

    monkeypatch.setattr(simulation, "decode_plan", spy_plan)
    monkeypatch.setattr(tiny_sam.prompt_encoder, "forward", spy_encoder)
    monkeypatch.setattr(tiny_sam.mask_decoder, "forward", spy_decoder)
    with torch.no_grad():
        losses = run_rounds(tiny_sam, emb, objects, rounds, first=first,
                            mask_only_rounds=mask_only, generator=torch.Generator().manual_seed(0))
    assert len(losses) == rounds
    assert [s["multimask"] for s in seen] == multimask
    assert [s["fed"] for s in seen] == fed
    # every round that adds a point (or the first) asked the session's rule
    assert len(plans) == rounds - mask_only
