"""Mask refiner: a small U-Net that redraws a predicted mask from native-resolution pixels.

SAM's decoder predicts masks at 4x the embedding grid (128 x 128 for a 256 px model
input); an object a few logit pixels wide is then drawn from a handful of values. The
refiner looks at the object where the pixels are: a square window around the
decoder's mask (and the prompt), taken from the *original* image and resampled to
``crop_size`` x ``crop_size`` (:mod:`napari_sam.engine.refine` builds the input and
pastes the result back). Its input channels, in order (:data:`REFINER_CHANNELS`):

====  =============  ================================================================
 ch   name           content
====  =============  ================================================================
0-2   rgb            the image, normalised with SAM's pixel mean / std
 3    mask           the decoder's mask probability (sigmoid of its logits)
 4    positive       Gaussian bumps (sigma 2 crop pixels) at the positive points
 5    negative       the same at the negative points
====  =============  ================================================================

The output is the object's logits on the same grid, computed as a correction of the
decoder's: ``logit(mask) + unet(x)``, so an untrained refiner's output starts near
the decoder's mask. The refiner is ours (SAM has none); it is stored in a model's
weights under the ``mask_refiner.`` prefix, and a model without those keys (every
official checkpoint) has none and loads unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["REFINER_CHANNELS", "REFINER_CROP", "MaskRefiner"]

REFINER_CHANNELS = ("red", "green", "blue", "mask", "positive", "negative")
#: side of the square window the refiner works on
REFINER_CROP = 64


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class MaskRefiner(nn.Module):
    """(B, 6, S, S) window features -> (B, 1, S, S) object logits (S = :data:`REFINER_CROP`).

    A U-Net: ``widths[i]`` channels at 1/2^i of the window side (max pooling down,
    bilinear up, skip connections), two 3x3 convolutions with batch norm per level.

    Arguments:
      widths: channels per level, finest first (e.g. ``(16, 32, 64, 96)``).
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 96)) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.enc = nn.ModuleList()
        cin = len(REFINER_CHANNELS)
        for w in self.widths:
            self.enc.append(_double_conv(cin, w))
            cin = w
        self.dec = nn.ModuleList(
            _double_conv(self.widths[i] + self.widths[i - 1], self.widths[i - 1])
            for i in range(len(self.widths) - 1, 0, -1)
        )
        self.out = nn.Conv2d(self.widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prior = torch.logit(x[:, 3:4].clamp(1e-3, 1 - 1e-3))
        skips = []
        for i, level in enumerate(self.enc):
            x = level(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for level, skip in zip(self.dec, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = level(torch.cat([x, skip], 1))
        return self.out(x) + prior
