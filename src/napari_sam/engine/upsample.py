"""Low-resolution mask logits -> full-resolution masks: the banded bilinear resize.

SAM's postprocessing upsamples (B, C, L, L) logits bilinearly
(align_corners=False) to the padded model input, crops the resized image and
resizes bilinearly to the original size. :func:`upscale_logits` computes that
chain as one banded matrix product per axis (:func:`resize_plan`), agreeing
with PyTorch's kernel to float32 rounding. :func:`support_window` gives, from
the same taps (:func:`bilinear_taps`), the low-resolution pixels each output
pixel reads: everything-mode's stability bound (:func:`stability_upper_bound`) is
built on it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from napari_sam.errors import InvalidInputError
from napari_sam.models import kernels

__all__ = [
    "apply_resize",
    "bilinear_taps",
    "resize_matrix",
    "resize_plan",
    "stability_upper_bound",
    "support_window",
    "upscale_logits",
]


def upscale_logits(
    low_res: torch.Tensor,
    target_length: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    threshold: float | None = None,
    work: dict | None = None,
) -> torch.Tensor:
    """(B, C, L, L) logits -> (B, C, H, W) logits, like the reference postprocessing.

    ``target_length`` is the padded model input's side, ``input_size`` (h, w) the
    resized image inside it, ``original_size`` (H, W) the image; ``work`` an
    optional dict of scratch tensors kept between calls.

    With ``threshold``, returns the bool masks ``logits > threshold`` instead,
    computed band by band so the full-size float logits never exist at once.

    The reference upsamples bilinearly to the padded model input
    (``target_length``), crops ``input_size`` and resizes bilinearly to
    ``original_size``. Along each axis that chain is one linear map, an
    (H, L) matrix with at most four non-zeros per row in a narrow band, so it
    is applied here as two batched matrix products over bands of 32 output
    rows (columns). That is several times faster than PyTorch's CPU bilinear
    kernel at these sizes and agrees with it to float32 rounding (the weights
    mirror the kernel's float32 arithmetic).
    """
    b, c, low_h, low_w = low_res.shape
    plan_rows = resize_plan(low_h, target_length, int(input_size[0]), int(original_size[0]))
    plan_cols = resize_plan(low_w, target_length, int(input_size[1]), int(original_size[1]))
    x = low_res.reshape(b * c, low_h, low_w)
    with torch.profiler.record_function("napari_sam.upsample"):
        out = apply_resize(x, plan_rows, plan_cols, threshold, work)
    return out.view(b, c, *out.shape[-2:])


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, ...]:
    """Source indices and weights of a bilinear resize (align_corners=False) along one axis.

    Returns i0, i1 (n_out,) int64 and w0, w1 (n_out,) float64 with output k =
    w0[k] * x[i0[k]] + w1[k] * x[i1[k]]. Mirrors the float32 arithmetic of
    PyTorch's CPU kernel (source index ``scale * (k + 0.5) - 0.5`` rounded once).
    """
    f32 = np.float32
    scale = np.float64(f32(n_in) / f32(n_out))
    src = (scale * (np.arange(n_out) + 0.5) - 0.5).astype(f32)
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, (f32(1.0) - w1).astype(np.float64), w1.astype(np.float64)


def resize_matrix(n_low: int, n_model: int, n_crop: int, n_out: int) -> np.ndarray:
    """(n_out, n_low) matrix of: resize n_low -> n_model, keep [:n_crop], resize -> n_out."""
    i0, i1, w0, w1 = bilinear_taps(n_low, n_model)
    first = np.zeros((n_crop, n_low))
    rows = np.arange(n_crop)
    np.add.at(first, (rows, i0[:n_crop]), w0[:n_crop])
    np.add.at(first, (rows, i1[:n_crop]), w1[:n_crop])
    if n_crop == n_out:  # a same-size bilinear resize is the identity
        return first
    j0, j1, v0, v1 = bilinear_taps(n_crop, n_out)
    return v0[:, None] * first[j0] + v1[:, None] * first[j1]


@lru_cache(maxsize=32)
def resize_plan(
    n_low: int, n_model: int, n_crop: int, n_out: int, block: int = 32
) -> tuple[tuple[int, ...], torch.Tensor, int]:
    """Banded form of :func:`resize_matrix`: output rows in blocks of ``block``; block j
    reads the k consecutive input rows from ``starts[j]``. Returns starts, weights
    (nb, block, k) float32 and n_out."""
    if not (0 < n_crop <= n_model and n_out > 0 and n_low > 0):
        raise InvalidInputError(
            f"Invalid resize geometry: low-res {n_low}, model {n_model}, crop {n_crop}, "
            f"output {n_out}."
        )
    m = resize_matrix(n_low, n_model, n_crop, n_out)
    nz = m != 0
    first = nz.argmax(1)  # every row has a non-zero weight (the weights sum to 1)
    last = n_low - 1 - nz[:, ::-1].argmax(1)
    nb = -(-n_out // block)
    pad = nb * block - n_out
    first_b = np.pad(first, (0, pad), mode="edge").reshape(nb, block).min(1)
    last_b = np.pad(last, (0, pad), mode="edge").reshape(nb, block).max(1)
    k = int((last_b - first_b).max()) + 1
    start = np.minimum(first_b, n_low - k)
    idx = start[:, None] + np.arange(k)  # (nb, k)
    m = np.pad(m, ((0, pad), (0, 0))).reshape(nb, block, n_low)
    w = np.take_along_axis(m, np.broadcast_to(idx[:, None, :], (nb, block, k)), axis=2)
    return tuple(int(v) for v in start), torch.from_numpy(w.astype(np.float32)), n_out


def apply_resize(
    x: torch.Tensor,
    plan_rows: tuple[tuple[int, ...], torch.Tensor, int],
    plan_cols: tuple[tuple[int, ...], torch.Tensor, int],
    threshold: float | None = None,
    work: dict | None = None,
) -> torch.Tensor:
    """x (N, Lh, Lw) -> (N, H, W) with banded plans for rows and columns; bool
    ``> threshold`` when a threshold is given (then the full-size float logits
    never exist at once). ``work`` (a dict) keeps scratch tensors between calls."""
    n = x.shape[0]
    starts_c, w_c, out_w = plan_cols
    starts_r, w_r, out_h = plan_rows
    w_c, w_r = w_c.to(x.device, x.dtype), w_r.to(x.device, x.dtype)
    nbc, bsc, kc = w_c.shape
    nbr, bsr, kr = w_r.shape
    # only the low-res rows the row pass reads (the rest is padding cropped away)
    low_h = max(starts_r) + kr
    x = x[:, :low_h]
    # columns, all blocks at once: (nbc, N*Lh, kc) @ (nbc, kc, bsc)
    idx_c = (torch.tensor(starts_c)[:, None] + torch.arange(kc)).reshape(-1).to(x.device)
    g = x.index_select(2, idx_c).view(n * low_h, nbc, kc).transpose(0, 1)
    t_blocks = kernels.scratch(work, "cols", (nbc, n * low_h, bsc), x)
    torch.bmm(g, w_c.transpose(1, 2), out=t_blocks)
    t = kernels.scratch(work, "rows_in", (n, low_h, nbc * bsc), x)
    t.view(n * low_h, nbc, bsc).copy_(t_blocks.transpose(0, 1))
    t = t[..., :out_w]
    # rows, block by block from slices of t: (bsr, kr) @ (N, kr, W)
    out = x.new_empty((n, nbr * bsr, out_w), dtype=x.dtype if threshold is None else torch.bool)
    band = kernels.scratch(work, "band", (n, bsr, out_w), x)
    # numpy's comparison into strided bool slices is faster than torch.gt here
    # (3 x 1216 x 1600: 0.73 vs 1.21 ms, benchmarks/click_details.py)
    use_numpy = threshold is not None and x.device.type == "cpu"
    if use_numpy:
        band_np, out_np = band.numpy(), out.numpy()
    for j, s in enumerate(starts_r):
        rows = out[:, j * bsr : (j + 1) * bsr]
        w = w_r[j].expand(n, bsr, kr)
        if threshold is None:
            torch.bmm(w, t[:, s : s + kr], out=rows)
        elif use_numpy:
            torch.bmm(w, t[:, s : s + kr], out=band)
            np.greater(band_np, threshold, out=out_np[:, j * bsr : (j + 1) * bsr])
        else:
            torch.gt(torch.bmm(w, t[:, s : s + kr], out=band), threshold, out=rows)
    return out[:, :out_h]


def support_window(n_low: int, target: int, n_in: int, n_out: int) -> tuple[np.ndarray, int]:
    """First low-res index feeding each of ``n_out`` output pixels along one axis.

    Follows the resize chain of :func:`upscale_logits` (``n_low`` -> ``target``,
    keep the first ``n_in``, -> ``n_out``) through the taps of
    :func:`bilinear_taps`, so it reads the same geometry as the resize itself.
    Returns ``lo`` (n_out,) int64 and the largest support width ``k``: every
    output pixel is a convex combination of the low-res pixels in
    ``[lo, lo + k - 1]``.
    """
    i0, i1, _, _ = bilinear_taps(n_low, target)
    lo1, hi1 = i0[:n_in], i1[:n_in]
    if n_in == n_out:  # a same-size bilinear resize is the identity
        lo, hi = lo1, hi1
    else:
        j0, j1, _, _ = bilinear_taps(n_in, n_out)
        lo, hi = lo1[j0], hi1[j1]  # the taps are non-decreasing along the axis
    return lo, int((hi - lo).max()) + 1


# Margin (in logit units) by which the low-resolution stability bound is widened,
# far above float32 rounding of the bilinear upsampling.
_BOUND_EPS = 1e-3


def stability_upper_bound(
    low: torch.Tensor,
    target_length: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    mask_threshold: float,
    offset: float,
) -> torch.Tensor:
    """Upper bound of the full-resolution stability score of (S, L, L) low-res logits.

    An upsampled pixel is a convex combination of the low-res pixels in its
    support (a k x k block starting at ``(lo_y, lo_x)``), so it can only be
    above a threshold if one of them is (bounding the intersection from
    above), and it surely is if all of them are (bounding the union from
    below). Counting full-resolution pixels per block start turns both bounds
    into weighted sums over the low-res grid. A margin of ``_BOUND_EPS`` covers
    float rounding. Returns (S,) float32, ``inf`` when the union bound is 0.
    """
    s, lh, lw = low.shape
    lo_y, ky = support_window(lh, target_length, input_size[0], original_size[0])
    lo_x, kx = support_window(lw, target_length, input_size[1], original_size[1])
    cy = torch.from_numpy(np.bincount(lo_y, minlength=lh)).to(low.device, torch.float32)
    cx = torch.from_numpy(np.bincount(lo_x, minlength=lw)).to(low.device, torch.float32)

    def block(x: torch.Tensor, any_: bool) -> torch.Tensor:
        """any / all of x over the block [i, i + ky) x [j, j + kx) (clipped to the grid)."""
        out = x.clone()
        for dim, k in ((1, ky), (2, kx)):
            src = out.clone() if k > 1 else out
            n = x.shape[dim]
            for j in range(1, min(k, n)):
                dst, shifted = out.narrow(dim, 0, n - j), src.narrow(dim, j, n - j)
                if any_:
                    dst |= shifted
                else:
                    dst &= shifted
        return out

    hi = low > mask_threshold + offset - _BOUND_EPS
    lo = low > mask_threshold - offset + _BOUND_EPS
    inter_ub = torch.einsum("i,sij,j->s", cy, block(hi, True).float(), cx)
    union_lb = torch.einsum("i,sij,j->s", cy, block(lo, False).float(), cx)
    return torch.where(union_lb > 0, inter_ub / union_lb.clamp(min=1), torch.inf)
