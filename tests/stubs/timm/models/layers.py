"""Stand-ins for ``timm.models.layers``: DropPath, to_2tuple, trunc_normal_."""

from __future__ import annotations

import collections.abc

import torch
from torch import nn


def to_2tuple(x):
    """Repeat a scalar twice; pass iterables through as a tuple."""
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        return tuple(x)
    return (x, x)


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    """Truncated normal init (delegates to torch)."""
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or with p=0)."""

    def __init__(self, drop_prob: float | None = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.drop_prob or 0.0
        if p == 0.0 or not self.training:
            return x
        keep = 1.0 - p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if self.scale_by_keep and keep > 0.0:
            mask.div_(keep)
        return x * mask
