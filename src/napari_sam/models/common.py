"""Small building blocks shared by the SAM components."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor.

    Parameters ``weight``/``bias`` have shape (C,), as in the official checkpoints.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise channels-last (a strided view, no copy) with the fused kernel
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class MLPBlock(nn.Module):
    """Two-layer feed-forward block ``lin2(act(lin1(x)))`` on the last axis."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act
        name = "relu" if type(act) is nn.ReLU else None
        if type(act) is nn.GELU and act.approximate == "none":
            name = "gelu"
        if name is None:
            return self.lin2(act(self.lin1(x)))
        hidden = kernels.linear(x, self.lin1.weight, self.lin1.bias, name)
        return kernels.linear(hidden, self.lin2.weight, self.lin2.bias)
