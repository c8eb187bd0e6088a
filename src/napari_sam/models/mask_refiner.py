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


#: (weight, bias) of one convolution with its batch norm folded in
_FoldedConv = tuple[torch.Tensor, torch.Tensor]


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
        # (key, encoder levels, decoder levels) of infer(); not part of the state dict
        self._folded: tuple[tuple, list[list[_FoldedConv]], list[list[_FoldedConv]]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 6, S, S) -> (B, 1, S, S) logits; batch norm as the module's mode says."""
        prior = torch.logit(x[:, 3:4].clamp(1e-3, 1 - 1e-3))
        skips = []
        for i, level in enumerate(self.enc):
            x = level(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for level, skip in zip(self.dec, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = level(torch.cat([x, skip], 1))
        return self.out(x) + prior

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 6, S, S) -> (B, 1, S, S) logits for inference, without autograd.

        Equal (to float32 rounding) to :meth:`forward` in eval mode: batch norm uses its
        running statistics whatever the module's mode, folded into the convolutions
        (:meth:`folded`); the activations are channels-last, which the CPU's
        convolution kernels take without reordering.
        """
        with torch.inference_mode():
            enc, dec = self.folded()
            prior = torch.logit(x[:, 3:4].clamp(1e-3, 1 - 1e-3))
            x = x.contiguous(memory_format=torch.channels_last)
            skips = []
            for i, level in enumerate(enc):
                x = _run_folded(x if i == 0 else F.max_pool2d(x, 2), level)
                skips.append(x)
            for level, skip in zip(dec, reversed(skips[:-1]), strict=True):
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
                x = _run_folded(torch.cat([x, skip], 1), level)
            return (F.conv2d(x, self.out.weight, self.out.bias) + prior).contiguous()

    def folded(self) -> tuple[list[list[_FoldedConv]], list[list[_FoldedConv]]]:
        """The (weight, bias) of every 3x3 convolution with its batch norm folded in,
        per encoder and decoder level: ``w * g / sqrt(var + eps)`` and
        ``(b - mean) * g / sqrt(var + eps) + beta``. Cached; recomputed when any
        parameter or buffer has changed (in place, moved or replaced) since."""
        tensors = [*self.parameters(), *self.buffers()]
        key = tuple((t.data_ptr(), _version(t), t.dtype, t.device) for t in tensors)
        folded = self._folded  # one read: another thread may replace it meanwhile
        if folded is None or folded[0] != key:
            with torch.no_grad():
                folded = (key, [_fold(level) for level in self.enc],
                          [_fold(level) for level in self.dec])
            self._folded = folded
        return folded[1], folded[2]


def _version(t: torch.Tensor) -> int | None:
    """``t``'s in-place change counter; None for a tensor made under ``torch.inference_mode``
    (it has none: it cannot change outside that mode, so such weights are folded again
    only when moved or replaced)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _fold(level: nn.Sequential) -> list[_FoldedConv]:
    """A :func:`_double_conv` as two folded (weight, bias) pairs (weights channels-last)."""
    out = []
    for conv, bn in ((level[0], level[1]), (level[3], level[4])):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = (conv.weight * scale[:, None, None, None]).contiguous(
            memory_format=torch.channels_last)
        out.append((weight, (conv.bias - bn.running_mean) * scale + bn.bias))
    return out


def _run_folded(x: torch.Tensor, level: list[_FoldedConv]) -> torch.Tensor:
    """Two folded 3x3 convolutions, each followed by a ReLU."""
    for weight, bias in level:
        x = F.relu_(F.conv2d(x, weight, bias, padding=1))
    return x
