"""Cross-attentions of SAM's two-way transformer, restructured for few prompt tokens.

The projections move to the token side (see
:class:`~napari_sam.models.fast_decoder.factored.FactoredBackend`); the ``_cached``
variants take the first block's image-side projections computed once per image.
Shapes: B prompts, T tokens, L = E*E image tokens of width C, H heads of width d.
"""

from __future__ import annotations

import torch

__all__: list[str] = []

_UPDATE_CHUNK = 1 << 17  # elements per chunk in _image_update


def _head_weights(linear: torch.nn.Linear, heads: int) -> torch.Tensor:
    """(D, C) projection weight -> (heads, D / heads, C)."""
    d, c = linear.weight.shape
    return linear.weight.view(heads, d // heads, c)


def _t2i(attn, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """Token -> image attention. q_in (B, T, C); k_in, v_in (B|1, L, C) -> (B, T, C)."""
    b, t, c = q_in.shape
    h = attn.num_heads
    d = attn.q_proj.out_features // h
    q = attn.q_proj(q_in).view(b, t, h, d).transpose(1, 2) * d**-0.5  # (B, H, T, d)
    qk = torch.matmul(q, _head_weights(attn.k_proj, h)).reshape(b, h * t, c)
    a = torch.softmax(torch.matmul(qk, k_in.transpose(1, 2)), dim=-1)  # (B, H*T, L)
    av = torch.matmul(a, v_in).view(b, h, t, c)
    out = torch.matmul(av, _head_weights(attn.v_proj, h).transpose(1, 2))
    out = out + attn.v_proj.bias.view(h, 1, d)  # (B, H, T, d)
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, h * d))


def _t2i_cached(attn, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Token -> image attention with projected keys/values k, v (H, L, d) shared by the batch."""
    b, t, _ = q_in.shape
    h, _, d = k.shape
    q = attn.q_proj(q_in).view(b * t, h, d).transpose(0, 1) * d**-0.5  # (H, B*T, d)
    a = torch.softmax(torch.matmul(q, k.transpose(1, 2)), dim=-1)  # (H, B*T, L)
    out = torch.matmul(a, v)  # (H, B*T, d)
    return attn.out_proj(out.transpose(0, 1).reshape(b, t, h * d))


def _projected_values(attn, v: torch.Tensor) -> torch.Tensor:
    """v (B, H, T, d) -> per-head values through out_proj, (B, H*T, C)."""
    b, h, t, d = v.shape
    c = attn.out_proj.out_features
    wo = attn.out_proj.weight.view(c, h, d)
    return torch.einsum("bhtd,chd->bhtc", v, wo).reshape(b, h * t, c)


def _image_update(
    a: torch.Tensor,
    vo: torch.Tensor,
    keys: torch.Tensor,
    norm: torch.nn.Module,
    pe: torch.Tensor | None,
    out: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish an image -> token attention block: ``keys' = norm(keys + a^T vo)``.

    a (B, H*T, L) attention, vo (B, H*T, C) (:func:`_projected_values` plus
    out_proj's bias / H: each head's attention sums to 1 over the tokens, so
    a^T (vo + bias / H) = a^T vo + bias), keys (B|1, L, C), pe (1, L, C).
    Returns keys' and keys' + pe, both (B, L, C), written to ``out`` if given
    (must not alias ``keys``; an entry None skips that output, as does pe None
    for the second). With ``stats`` (two (B, L) tensors; ``norm``
    must then be a LayerNorm), the norm's per-token mean and reciprocal std
    are written there. Runs in chunks of rows so the intermediates stay in cache.
    """
    b, _, n = a.shape
    c = vo.shape[-1]
    a_t = a.transpose(1, 2)
    new, new_pe = out if out is not None else (keys.new_empty((b, n, c)), keys.new_empty((b, n, c)))
    if pe is None:
        new_pe = None
    step = max(16, _UPDATE_CHUNK // (b * c))
    for s in range(0, n, step):
        z = torch.baddbmm(keys[:, s : s + step], a_t[:, s : s + step], vo)
        if stats is None:
            z = norm(z)
        else:
            z, mean, rstd = torch.native_layer_norm(z, (c,), norm.weight, norm.bias, norm.eps)
            stats[0][:, s : s + step] = mean[..., 0]
            stats[1][:, s : s + step] = rstd[..., 0]
        if new is not None:
            new[:, s : s + step] = z
        if new_pe is not None:
            torch.add(z, pe[:, s : s + step], out=new_pe[:, s : s + step])
    return new, new_pe


def _i2t(attn, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> tuple:
    """Image -> token attention. q_in (B, L, C) image (with PE); k_in, v_in (B, T, C) tokens.

    Returns the attention a (B, H*T, L) and projected values vo (B, H*T, C);
    the image update is ``a^T vo + out_proj.bias`` (see :func:`_image_update`).
    """
    b, t, c = k_in.shape
    n = q_in.shape[1]
    h = attn.num_heads
    d = attn.q_proj.out_features // h
    k = attn.k_proj(k_in).view(b, t, h, d).transpose(1, 2) * d**-0.5  # (B, H, T, d)
    kq = torch.matmul(k, _head_weights(attn.q_proj, h)).reshape(b, h * t, c)
    bias = torch.matmul(k, attn.q_proj.bias.view(h, d, 1)).reshape(b, h * t, 1)
    logits = torch.baddbmm(bias, kq, q_in.transpose(1, 2))  # (B, H*T, L)
    a = torch.softmax(logits.view(b, h, t, n), dim=2).view(b, h * t, n)
    v = attn.v_proj(v_in).view(b, t, h, d).transpose(1, 2)
    return a, _projected_values(attn, v)


def _i2t_cached(attn, q: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> tuple:
    """:func:`_i2t` with projected, pre-scaled queries q (H, d, L) shared by the batch."""
    b, t, _ = k_in.shape
    h, d, n = q.shape
    k = attn.k_proj(k_in).view(b * t, h, d).transpose(0, 1)  # (H, B*T, d)
    logits = torch.matmul(k, q).view(h, b, t, n)
    a = torch.softmax(logits, dim=2).transpose(0, 1).reshape(b, h * t, n)
    v = attn.v_proj(v_in).view(b, t, h, d).transpose(1, 2)
    return a, _projected_values(attn, v)


def _token_self_attention(layer, queries: torch.Tensor, qpe: torch.Tensor) -> torch.Tensor:
    """A two-way block's token self-attention and first norm on (B, T, C) tokens."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + qpe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    return layer.norm1(queries)
