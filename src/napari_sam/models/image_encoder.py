"""SAM's ViT image encoder (ViT-B/L/H backbones with a convolutional neck).

Input: (B, 3, S, S) normalised image, S = ``img_size``.
Output: (B, out_chans, S / patch_size, S / patch_size) image embedding.

Tokens are kept channels-last, (B, h, w, C), through the transformer blocks.
Blocks attend inside non-overlapping ``window_size`` windows (zero-padded at the
bottom/right when the grid is not a multiple of the window) except the blocks
listed in ``global_attn_indexes``, which attend over the whole grid. Every
attention adds a decomposed relative position bias (separate height and width
tables, ``rel_pos_h``/``rel_pos_w`` of shape (2 * size - 1, head_dim)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .common import LayerNorm2d, MLPBlock

# Upper bound (bytes) for the additive attention bias materialised at once. Global
# attention over a 64x64 grid would need heads * 4096 * 4096 floats (~800 MB for
# ViT-B); queries are processed in row chunks so the bias stays below this.
ATTN_BIAS_BUDGET_BYTES = 32 * 2**20


class ImageEncoderViT(nn.Module):
    """ViT backbone + neck, parameter names identical to the official checkpoints."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        # absolute position embedding, channels-last (1, grid, grid, C)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        global_set = set(global_attn_indexes)
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                window_size=0 if i in global_set else window_size,
                grid_size=grid,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, out_chans, S/p, S/p)."""
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, S, S) -> (B, S/p, S/p, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block with windowed (``window_size > 0``) or global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        grid_size: int,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = window_size if window_size > 0 else grid_size
        self.attn = Attention(dim, num_heads, rel_pos_size=attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) -> (B, h, w, C)."""
        x = x + self.attn(self.norm1(x), self.window_size)
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention with decomposed relative position bias.

    The bias for query (i, j) and key (k, l) is ``q_ij . Rh[i - k] + q_ij . Rw[j - l]``
    (q unscaled); it is passed to ``scaled_dot_product_attention`` as an additive mask.
    """

    def __init__(self, dim: int, num_heads: int, rel_pos_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))

    def forward(self, x: torch.Tensor, window_size: int = 0) -> torch.Tensor:
        """(B, h, w, C) -> (B, h, w, C).

        With ``window_size > 0`` tokens attend inside non-overlapping windows; the grid
        is zero-padded bottom/right to a multiple of the window first and the padding
        tokens take part as keys (as in the official model). Otherwise every token
        attends to the whole grid.
        """
        b, h, w, c = x.shape
        qkv = kernels.linear(x, self.qkv.weight, self.qkv.bias)  # (B, h, w, 3C)
        if window_size <= 0:
            return self._project(self._attend(qkv).reshape(b, h, w, c))
        # The projection of a zero padding token is the qkv bias: pad after the
        # projection so the padded tokens cost no matmul.
        pad_h, pad_w = -h % window_size, -w % window_size
        if pad_h or pad_w:
            padded = qkv.new_empty(b, h + pad_h, w + pad_w, 3 * c)
            padded[:, :h, :w] = qkv
            padded[:, h:] = self.qkv.bias
            padded[:, :h, w:] = self.qkv.bias
            qkv = padded
        windows, padded_hw = window_partition(qkv, window_size)
        out = self._attend(windows).reshape(-1, window_size, window_size, c)
        # crop before the output projection (per token) to skip the padding
        return self._project(window_unpartition(out, window_size, padded_hw, (h, w)))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.proj.weight, self.proj.bias)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, h, w, 3C) projected tokens -> (B, h * w, heads, hd) attention output."""
        b, h, w, c3 = qkv.shape
        nh = self.num_heads
        hd = c3 // (3 * nh)
        n = h * w
        # (B, heads, N, hd) strided views of the projection (no copy)
        q, k, v = qkv.view(b, n, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)

        # decomposed relative position terms: (B, heads, h, w, h) and (B, heads, h, w, w)
        q_grid = q.reshape(b, nh, h, w, hd)
        table_h = relative_position_table(self.rel_pos_h, h)  # (h, h, hd)
        table_w = relative_position_table(self.rel_pos_w, w)  # (w, w, hd)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, table_h).contiguous()
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, table_w).contiguous()

        # query rows per chunk so that the (B, heads, rows * w, N) float bias fits the budget
        bytes_per_row = b * nh * w * n * qkv.element_size()
        rows = max(1, min(h, ATTN_BIAS_BUDGET_BYTES // max(bytes_per_row, 1)))
        if rows >= h:
            bias = _decomposed_bias(rel_h, rel_w).view(b, nh, n, n)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
        out = qkv.new_empty(b, n, nh, hd)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            bias = _decomposed_bias(rel_h[:, :, r0:r1], rel_w[:, :, r0:r1])
            bias = bias.view(b, nh, (r1 - r0) * w, n)
            chunk = F.scaled_dot_product_attention(q[:, :, r0 * w : r1 * w], k, v, attn_mask=bias)
            out[:, r0 * w : r1 * w] = chunk.transpose(1, 2)
        return out


def _decomposed_bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """(B, heads, r, w, h) and (B, heads, r, w, w) -> contiguous (B, heads, r, w, h, w) sum."""
    if torch.is_grad_enabled() and (rel_h.requires_grad or rel_w.requires_grad):
        return rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)  # out= is not differentiable
    b, nh, r, w, h = rel_h.shape
    out = rel_h.new_empty(b, nh, r, w, h, w)
    return torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=out)


def relative_position_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """Gather relative embeddings for a ``size`` x ``size`` query/key axis.

    Args:
        rel_pos: (L, C) table indexed by offset ``q - k + size - 1``. When L differs
            from ``2 * size - 1`` (an encoder run at another resolution) the table is
            resampled linearly along L first.
        size: number of query (= key) positions along the axis.

    Returns:
        (size, size, C) tensor ``T[q, k] = rel_pos[q - k + size - 1]``.
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear")[0].t()
    pos = torch.arange(size, device=rel_pos.device)
    return rel_pos[pos[:, None] - pos[None, :] + (size - 1)]


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, h, w, C) -> (B * nWindows, window, window, C), zero-padding bottom/right.

    Returns the windows and the padded grid size (hp, wp).
    """
    b, h, w, c = x.shape
    pad_h = -h % window
    pad_w = -w % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nWindows, window, window, C) -> (B, h, w, C)."""
    hp, wp = padded_hw
    h, w = hw
    nh, nw = hp // window, wp // window
    b = windows.shape[0] // (nh * nw)
    x = windows.view(b, nh, nw, window, window, -1).transpose(2, 3).reshape(b, hp, wp, -1)
    if hp != h or wp != w:
        x = x[:, :h, :w]
    return x
