"""Per-image state of the factored decoder backend, and the decoder layout it needs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from napari_sam.models.fast_decoder.low_rank import FactoredMap

__all__ = ["Conv1Cache", "DecoderContext", "has_standard_layout"]


@dataclass
class Conv1Cache:
    """Per image, the mask head's first convolution through the blocks' norms
    (:meth:`FactoredBackend.conv1_factors`): ``x M_1`` (L, 4 C/4), the maps M_i and
    per block the rows of B' for its mean and bias terms."""

    image_term: torch.Tensor
    maps: list[torch.Tensor]
    rows: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DecoderContext:
    """Per-image state of :class:`FactoredBackend` (made by :meth:`FactoredBackend.prepare`).

    Attributes:
      features: (1, C, Eh, Ew) image embedding (read for mask prompts).
      dense_pe: (1, C, Eh, Ew) positional encoding of the embedding grid.
      image_tokens: (1, L, C) image tokens X with the no-mask embedding added.
      pos_encoding: (1, L, C) positional encoding P as tokens.
      block1_keys: (H, L, d) first block's token -> image keys ``(X + P) Wk``.
      block1_values: (H, L, d) first block's token -> image values ``X Wv``.
      block1_queries: (H, d, L) first block's image -> token queries
        ``(X + P) Wq``, pre-scaled by d**-0.5.
      grid: (Eh, Ew).
      factored_maps: per-image parts of the later blocks' projections in factored
        form, by name (``"block1.t2i.k"``, ``"final.t2i.v"``, ...), filled on first use.
      conv1: the mask head's first convolution in factored form, made on first use.
    """

    features: torch.Tensor
    dense_pe: torch.Tensor
    image_tokens: torch.Tensor
    pos_encoding: torch.Tensor
    block1_keys: torch.Tensor
    block1_values: torch.Tensor
    block1_queries: torch.Tensor
    grid: tuple[int, int]
    factored_maps: dict[str, FactoredMap] = dataclasses.field(default_factory=dict)
    conv1: Conv1Cache | None = None


def has_standard_layout(model: torch.nn.Module) -> bool:
    """True if ``model.mask_decoder`` has the standard SAM layout the factored backend
    relies on (projections with biases, 2x2 stride-2 transposed convolutions, ...)."""
    nn = torch.nn
    try:
        dec = model.mask_decoder
        tr = dec.transformer
        up = dec.output_upscaling
        attns = [tr.final_attn_token_to_image]
        for layer in tr.layers:
            attns += [layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
            for name in ("self_attn", "norm1", "norm2", "norm3", "norm4", "mlp"):
                getattr(layer, name)
            bool(layer.skip_first_layer_pe)
        ok = len(tr.layers) > 0 and all(
            isinstance(getattr(a, n), nn.Linear) and getattr(a, n).bias is not None
            and isinstance(a.num_heads, int)
            for a in attns for n in ("q_proj", "k_proj", "v_proj", "out_proj")
        )
        convs = (up[0], up[3])
        ok = ok and len(up) == 5 and all(
            type(c) is nn.ConvTranspose2d and c.kernel_size == (2, 2) and c.stride == (2, 2)
            and c.padding == (0, 0) and c.output_padding == (0, 0) and c.groups == 1
            and c.dilation == (1, 1) and c.bias is not None
            for c in convs
        )
        ok = ok and all(
            type(g) is nn.GELU and g.approximate == "none" for g in (up[2], up[4])
        )
        ok = ok and all(hasattr(up[1], n) for n in ("weight", "bias", "eps"))
        ok = ok and type(up[1]).__name__ == "LayerNorm2d"
        for name in ("iou_token", "mask_tokens", "output_hypernetworks_mlps",
                     "iou_prediction_head", "num_mask_tokens"):
            getattr(dec, name)
        model.prompt_encoder.no_mask_embed.weight  # noqa: B018
    except (AttributeError, IndexError, TypeError):
        return False
    return bool(ok)
