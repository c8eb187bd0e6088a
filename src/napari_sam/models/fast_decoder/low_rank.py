"""The low-rank ("factored") form of the decoder's image tokens after the first block.

After the first two-way block, the image tokens are ``keys_i = R_i (x M + A'_i B'_i)``
for any linear map applied after them (see
:meth:`~napari_sam.models.fast_decoder.factored.FactoredBackend.conv1_factors`):
a per-image part ``x M`` and a per-click part of inner size K = D (H T + 2).
This module holds the containers of that form and the algebra on it.
Shapes: B prompts, T tokens, L = E*E image tokens of width C, H heads of width d.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Conv1Factors", "FactoredMap", "FactoredState", "ImageUpdates"]


class FactoredState(NamedTuple):
    """Output of :meth:`FactoredBackend.transformer_factored`: the tokens (B, T, C) and their
    positional encoding, the blocks' image updates, and the final image tokens in
    factored form, A' (B, L, K) and the scale R (B, L). A' is a scratch buffer that the
    next call overwrites."""

    queries: torch.Tensor
    qpe: torch.Tensor
    updates: ImageUpdates
    a_aug: torch.Tensor
    scale: torch.Tensor

    def select(self, index: int | None) -> FactoredState:
        """The state of prompt ``index`` alone (batch of 1); all of it for None."""
        if index is None:
            return self
        one = slice(index, index + 1)
        return FactoredState(
            self.queries[one], self.qpe[one],
            ImageUpdates(*([t[one] for t in field] for field in self.updates)),
            self.a_aug[one], self.scale[one],
        )


class FactoredMap(NamedTuple):
    """Per-image part of ``keys_i @ W`` in factored form (:meth:`FactoredBackend.conv1_factors`)
    for an attention projection W of H heads of width d: xm = x M_1 per head, (H, d, L)
    for keys and queries or (H, L, d) for values; pe = P W per head (H, d, L), None
    for values; the maps M_1 ... M_i, W and per block the rows of B' for the mean and
    bias terms."""

    xm: torch.Tensor
    pe: torch.Tensor | None
    maps: list[torch.Tensor]
    rows: list[tuple[torch.Tensor, torch.Tensor]]


class ImageUpdates(NamedTuple):
    """Per transformer block, the terms of its image-token update
    ``keys' = LN(keys + attn^T values)``: attn (B, H*T, L), values (B, H*T, C)
    (out_proj applied, its bias folded in), and the LayerNorm's per-token mean
    and reciprocal std (B, L)."""

    attn: list[torch.Tensor]
    values: list[torch.Tensor]
    mean: list[torch.Tensor]
    rstd: list[torch.Tensor]


class Conv1Factors(NamedTuple):
    """The mask head's first transposed convolution as ``scale * (xm + a^T b)``
    (:meth:`FactoredBackend.conv1_factors`): xm (L, 4 C4) per image, a (B, L, K),
    b (B, K, 4 C4), scale (B, L); columns ordered as in
    :func:`~napari_sam.models.fast_decoder.mask_head.up_conv_matrix`."""

    xm: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor


def _map_chain(
    layers, w: torch.Tensor, last_bias: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """For ``keys_D @ w`` after the blocks ``layers`` (D of them), the maps
    ``M_i = diag(g_i) ... diag(g_D) w`` (i = 1..D, then w itself) and per block the
    rows of B' for its mean term (column sums of M_i) and its norm bias
    (``b_i M_{i+1}``, plus ``last_bias`` for the last block), each (1, w.shape[1])."""
    maps = [w]
    for layer in reversed(layers):
        maps.insert(0, layer.norm4.weight[:, None] * maps[0])
    rows = []
    for i, layer in enumerate(layers):
        bias = layer.norm4.bias @ maps[i + 1]
        if last_bias is not None and i == len(layers) - 1:
            bias = bias + last_bias
        rows.append((maps[i].sum(0, keepdim=True), bias[None]))
    return maps, rows


def _factor_rows(
    values: list[torch.Tensor],
    maps: list[torch.Tensor],
    rows: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """B' (B, K, n) of a factored map (see :func:`_map_chain`): per block, its
    projected values (B, H T, C) through M_i, then its mean and bias rows."""
    b = values[0].shape[0]
    out = []
    for v, m, (col_sums, bias) in zip(values, maps, rows, strict=False):
        out += [v @ m, col_sums.expand(b, 1, -1), bias.expand(b, 1, -1)]
    return torch.cat(out, 1)


def _fill_factor_rows(
    a_aug: torch.Tensor, q: torch.Tensor, i: int, attn: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor,
) -> torch.Tensor:
    """Write block i's columns of A' (B, L, K): its attention (B, H T, L) and mean
    (B, L) scaled by q (the product of 1 / rstd over the earlier blocks), and
    q / rstd for its bias term. Returns q / rstd."""
    ht = attn.shape[1]
    off = i * (ht + 2)
    torch.mul(attn, q[:, None, :], out=a_aug[..., off : off + ht].transpose(1, 2))
    torch.mul(mean, -q, out=a_aug[..., off + ht])
    q = q / rstd
    a_aug[..., off + ht + 1] = q
    return q


def _factored_logits(
    qh: torch.Tensor, fm: FactoredMap, b_aug: torch.Tensor, a_aug: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """qh (B, H, T, d) against the image tokens' projection ``keys W + P W`` given in
    factored form (xm (H, d, L), b_aug (B, K, H d), a_aug (B, L, K), scale (B, L)).
    Returns (B, H T, L) logits, without W's bias."""
    b, h, t, d = qh.shape
    n, k = a_aug.shape[1:]
    logits = qh.new_empty((b, h, t, n))
    for i in range(b):  # per prompt: a batched matmul would copy the shared xm B times
        torch.bmm(qh[i], fm.xm, out=logits[i])
    qb = torch.matmul(qh, b_aug.view(b, k, h, d).permute(0, 2, 3, 1)).view(b, h * t, k)
    logits.view(b, h * t, n).baddbmm_(qb, a_aug.transpose(1, 2)).mul_(scale[:, None, :])
    for i in range(b):
        logits[i].baddbmm_(qh[i], fm.pe)
    return logits.view(b, h * t, n)


def _factored_values(
    a: torch.Tensor, fm: FactoredMap, b_aug: torch.Tensor, a_aug: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Attention a (B, H T, L) times the image tokens' value projection ``keys W``
    given in factored form (xm (H, L, d)). Returns (B, H, T, d), without W's bias."""
    b, ht, n = a.shape
    h, _, d = fm.xm.shape
    k = a_aug.shape[2]
    a = a * scale[:, None, :]
    out = a.new_empty((b, h, ht // h, d))
    for i in range(b):  # per prompt, as in _factored_logits
        torch.bmm(a[i].view(h, ht // h, n), fm.xm, out=out[i])
    g = torch.bmm(a, a_aug).view(b, h, ht // h, k)
    return out.add_(torch.matmul(g, b_aug.view(b, k, h, d).transpose(1, 2)))
