"""AIS map refiner: a small U-Net that redraws the AIS head's maps at native resolution.

The AIS head (:mod:`napari_sam.models.ais_head`) predicts its four maps on the mask
decoder's low-resolution grid (64 x 64 for a 256 px model input): touching nuclei a
few cells wide share their boundary cells and merge, and outlines are coarse. The
refiner reads the maps upsampled to the image (as :mod:`napari_sam.engine.ais` makes
them) together with the image's own pixels and predicts the same four maps again,
pixel by pixel. Its input channels, in order (:data:`AIS_REFINER_CHANNELS`):

====  ==================  ===========================================================
 ch   name                content
====  ==================  ===========================================================
0-2   rgb                 the image, normalised with SAM's pixel mean / std
3-6   AIS maps            the head's probabilities (foreground, boundary, centre,
                          boundary distance) upsampled to the image
====  ==================  ===========================================================

The output is four logits per pixel, a correction of the head's: ``logit(maps) +
unet(x)`` (the last convolution starts at zero, so an untrained refiner returns the
head's maps). It is fully convolutional: any (H, W) whose sides are multiples of
:func:`AisRefiner.multiple` (engine code pads and tiles). The refiner is ours (SAM has
none); it is stored under the ``ais_refiner.`` prefix, and a model without those keys
(every official checkpoint) has none and loads unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ais_head import AIS_CHANNELS
from .mask_refiner import _double_conv

__all__ = ["AIS_REFINER_CHANNELS", "AisRefiner"]

AIS_REFINER_CHANNELS = ("red", "green", "blue", *AIS_CHANNELS)


class AisRefiner(nn.Module):
    """(B, 7, H, W) image + AIS maps -> (B, 4, H, W) logits of the AIS maps.

    A U-Net: ``widths[i]`` channels at 1/2^i of the image side (max pooling down,
    bilinear up, skip connections), two 3x3 convolutions with batch norm per level.

    Arguments:
      widths: channels per level, finest first (the default model: ``(8, 16, 32, 64)``).
    """

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.enc = nn.ModuleList()
        cin = len(AIS_REFINER_CHANNELS)
        for w in self.widths:
            self.enc.append(_double_conv(cin, w))
            cin = w
        self.dec = nn.ModuleList(
            _double_conv(self.widths[i] + self.widths[i - 1], self.widths[i - 1])
            for i in range(len(self.widths) - 1, 0, -1)
        )
        self.out = nn.Conv2d(self.widths[0], len(AIS_CHANNELS), 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def multiple(self) -> int:
        """Input sides must be multiples of this (one halving per level below the first)."""
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prior = torch.logit(x[:, 3:].clamp(1e-3, 1 - 1e-3))
        skips = []
        for i, level in enumerate(self.enc):
            x = level(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for level, skip in zip(self.dec, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = level(torch.cat([x, skip], 1))
        return self.out(x) + prior
