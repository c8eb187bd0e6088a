"""EfficientSAM's image encoder: a plain ViT with global attention and a convolutional neck.

Input: (B, 3, S, S) normalised image, S = ``img_size`` (1024 for the official
models; EfficientSAM stretches any image to S x S, see
:class:`napari_sam.engine.transforms.StretchTransform`).
Output: (B, neck_dim, E, E) image embedding, E = S / patch_size (64 officially).

Unlike SAM's ViT (:mod:`.image_encoder`), every block attends over the whole
token grid, there is no relative position bias, and the absolute position
embedding was learnt at the pre-training size (224 px: a 14 x 14 grid plus a
class-token slot, ``pos_embed`` of shape (1, 1 + 14 * 14, C)). For a larger
input the grid part is resized bicubically (``align_corners=False``) to E x E;
the class-token slot is unused. Tokens are kept as (B, E * E, C) in row-major
(row, col) order through the blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .common import LayerNorm2d
from .image_encoder import PatchEmbed


class EfficientViTEncoder(nn.Module):
    """Plain ViT encoder of EfficientSAM. Parameter names match the official checkpoints.

    Arguments:
      img_size: side S of the square model input.
      patch_size: side of the square patches (stride of the embedding grid).
      embed_dim: token width C (192 for ViT-T, 384 for ViT-S).
      depth: number of transformer blocks.
      num_heads: attention heads per block (C must be divisible by it).
      mlp_ratio: hidden width of the block MLPs relative to C.
      neck_dim: channels of the output embedding (the prompt width, 256).
      pretrain_img_size: input size the position embedding was learnt at.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        neck_dim: int = 256,
        pretrain_img_size: int = 224,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        pretrain_grid = pretrain_img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        # slot 0 is the pre-training class token (kept for the checkpoint, never used)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid**2, embed_dim))
        self.blocks = nn.ModuleList(
            GlobalBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, neck_dim, kernel_size=1, bias=False),
            LayerNorm2d(neck_dim),
            nn.Conv2d(neck_dim, neck_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(neck_dim),
        )

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The learnt grid embedding resized to ``grid`` (h, w) -> (1, h, w, C)."""
        table = self.pos_embed[:, 1:]
        side = math.isqrt(table.shape[1])
        table = table.reshape(1, side, side, -1)
        if (side, side) == tuple(grid):
            return table
        resized = F.interpolate(
            table.permute(0, 3, 1, 2), size=grid, mode="bicubic", align_corners=False
        )
        return resized.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised image -> (B, neck_dim, S / patch, S / patch)."""
        x = self.patch_embed(x)  # (B, h, w, C)
        b, h, w, c = x.shape
        x = (x + self.position_embedding((h, w))).reshape(b, h * w, c)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.reshape(b, h, w, c).permute(0, 3, 1, 2))


class GlobalBlock(nn.Module):
    """Pre-norm transformer block: global self-attention, then a GELU MLP, both residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = GlobalAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GlobalAttention(nn.Module):
    """Multi-head self-attention over all N tokens (fused ``qkv`` projection, no bias terms
    on the logits; scale 1 / sqrt(head_dim))."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        b, n, c = x.shape
        qkv = kernels.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, hd)
        return kernels.linear(out.transpose(1, 2).reshape(b, n, c), self.proj.weight,
                              self.proj.bias)


class FeedForward(nn.Module):
    """``fc2(gelu(fc1(x)))`` on the last axis (names ``fc1``/``fc2`` as in the checkpoints)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = kernels.linear(x, self.fc1.weight, self.fc1.bias, "gelu")
        return kernels.linear(hidden, self.fc2.weight, self.fc2.bias)
