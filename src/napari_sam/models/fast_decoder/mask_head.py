"""SAM's mask head (two 2x2 stride-2 transposed convolutions) as matrix products.

:func:`upscale_masks` turns the decoder's image tokens and hypernetwork outputs
into low-resolution mask logits, the same as the reference's
``hyper @ output_upscaling(keys)``, on pixel-major tokens in cache-sized chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_sam.models import kernels
from napari_sam.models.fast_decoder.low_rank import Conv1Factors

__all__ = ["up_conv_matrix", "upscale_masks"]

_UPSCALE_CHUNK = 1024  # embedding-grid cells per chunk in upscale_masks


def up_conv_matrix(conv: torch.nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2 stride-2 transposed convolution as a matrix (C, 4 C') and bias (4 C') on
    pixel-major tokens: out[o, 2i+a, 2j+b] = bias[o] + sum_c x[c, i, j] W[c, o, a, b],
    columns ordered (a, b, o)."""
    c, c_out = conv.weight.shape[:2]
    return conv.weight.permute(0, 2, 3, 1).reshape(c, 4 * c_out), conv.bias.repeat(4)


def _up_conv_weight(
    conv: torch.nn.ConvTranspose2d, work: dict | None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`up_conv_matrix` as a (4 C', C) linear weight and its bias, kept in ``work``
    while the convolution's parameters are unchanged (same storage, no in-place edit);
    cast to ``dtype`` when it is not float32."""
    params = (conv.weight, conv.bias)
    key = ("up_conv", id(conv), dtype)
    stamp = tuple((p.data_ptr(), p._version) for p in params)
    hit = None if work is None else work.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    w, bias = up_conv_matrix(conv)
    value = (w.t().contiguous(), bias)
    if dtype != torch.float32:
        value = (value[0].to(dtype), value[1].to(dtype))
    if work is not None:
        work[key] = (stamp, value)
    return value


def upscale_masks(
    upscaling: torch.nn.Sequential,
    keys: torch.Tensor,
    hyper: torch.Tensor,
    grid: tuple[int, int],
    work: dict | None = None,
    conv1_factors: Conv1Factors | None = None,
    conv2_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SAM's mask head: image tokens and hypernetwork outputs -> low-res mask logits.

    Arguments:
      upscaling: the decoder's ``output_upscaling`` (ConvTranspose2d 2x2/2,
        LayerNorm2d, GELU, ConvTranspose2d 2x2/2, GELU).
      keys: (B|1, L, C) image tokens after the two-way transformer, L = Eh * Ew
        in row-major grid order.
      hyper: (B, M, C/8) hypernetwork outputs of the M mask tokens.
      grid: (Eh, Ew).
      work: optional dict of scratch tensors reused between calls.
      conv1_factors: the first convolution in factored form
        (:meth:`FactoredBackend.conv1_factors`, the same prompts as ``keys``);
        then ``keys`` is not read. ``a`` is read as (B, L, K).
      conv2_dtype: dtype of the second convolution's product (float32; a
        lower precision such as bfloat16 only for experiments,
        ``benchmarks/click_details.py``).

    Returns (B, M, 4 Eh, 4 Ew) logits, the same as the reference's
    ``hyper @ upscaling(keys)``. The transposed convolutions run as matrix
    products on pixel-major tokens (:func:`napari_sam.models.kernels.linear`, the
    second with its GELU fused), in chunks of grid cells so that the
    intermediates stay in cache; no large temporary is allocated (fresh
    multi-MB allocations cost page faults, about 1 us per 4 KiB page).
    """
    conv1, norm, conv2 = upscaling[0], upscaling[1], upscaling[3]
    b, m = hyper.shape[:2]
    n = keys.shape[1]
    eh, ew = grid
    c4, c8 = conv1.weight.shape[1], conv2.weight.shape[1]
    w1t, bias1 = _up_conv_weight(conv1, work)
    w2t, bias2 = _up_conv_weight(conv2, work, conv2_dtype)
    # masks (B, L*16, M), rows ordered (i, j, a, b, a2, b2) for the output pixel
    # (4i + 2a + a2, 4j + 2b + b2)
    masks = kernels.scratch(work, "upscale", (b, n * 16, m), keys)
    for i in range(b):
        k = keys[i if keys.shape[0] > 1 else 0]
        for s in range(0, n, _UPSCALE_CHUNK):
            e = s + _UPSCALE_CHUNK
            if conv1_factors is None:
                y = kernels.linear(k[s:e], w1t, bias1).view(-1, c4)
            else:
                xm, a, fb, scale = conv1_factors
                y = kernels.linear(a[i, s:e], fb[i].t()).add_(xm[s:e])
                y = y.mul_(scale[i, s:e, None]).view(-1, c4)
            y = F.gelu(F.layer_norm(y, (c4,), norm.weight, norm.bias, norm.eps))
            if conv2_dtype == torch.float32:
                y = kernels.linear(y, w2t, bias2, "gelu").view(-1, c8)
            else:
                y = F.gelu(kernels.linear(y.to(conv2_dtype), w2t, bias2).float()).view(-1, c8)
            masks[i, 16 * s : 16 * e] = kernels.linear(y, hyper[i])
    result = keys.new_empty((b, m, 4 * eh, 4 * ew))  # fresh: returned to the caller
    result.view(b, m, eh, 2, 2, ew, 2, 2).copy_(
        masks.view(b, eh, ew, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
    )
    return result
