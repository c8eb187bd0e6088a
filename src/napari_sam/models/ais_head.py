"""Automatic instance segmentation (AIS) head: dense maps from the image embedding.

A light head on SAM's image embedding predicts, for every pixel of the mask
decoder's low-resolution grid (L = 4 x the embedding side), four maps of *all*
objects at once:

====  ====================  ==========================================================
 ch   name                  target (0 outside objects)
====  ====================  ==========================================================
 0    foreground            1 inside any object
 1    boundary              1 on object pixels with a 4-neighbour of another id
 2    center                ``1 - d / d_max``: d is the distance to the object's
                            innermost pixel, d_max its largest value in the object
 3    boundary_distance     distance to the object's boundary over its largest value
                            in the object (1 at the innermost pixel)
====  ====================  ==========================================================

The head is ours (SAM has no such part). It is trained by ``napari-sam train
--aux-dense`` or ``--head-only`` (:mod:`napari_sam.training.dense_targets` builds the targets) and
stored in a model's weights under the ``ais_head.`` prefix; a model without
those keys (every official checkpoint) has no head and loads unchanged.
:mod:`napari_sam.engine.ais` turns the maps into instances with a seeded
watershed.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AIS_CHANNELS", "AisHead"]

AIS_CHANNELS = ("foreground", "boundary", "center", "boundary_distance")


class AisHead(nn.Module):
    """(B, C, E, E) image embedding -> (B, 4, 4E, 4E) logits of :data:`AIS_CHANNELS`.

    Two stride-2 transposed convolutions (as SAM's mask decoder upscales) and a
    1x1 convolution: deliberately small, so that what it reads has to be in the
    embedding. ``hidden`` is the width after the first upscaling (the second
    has ``hidden // 2``).
    """

    def __init__(self, embed_dim: int, hidden: int = 64, out_channels: int = 4) -> None:
        super().__init__()
        self.hidden = int(hidden)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, hidden, kernel_size=2, stride=2),
            nn.GroupNorm(1, hidden),
            nn.GELU(),
            nn.ConvTranspose2d(hidden, hidden // 2, kernel_size=2, stride=2),
            nn.GELU(),
            nn.Conv2d(hidden // 2, out_channels, kernel_size=1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding)
