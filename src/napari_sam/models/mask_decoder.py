"""Mask decoder: image embedding + prompt tokens -> mask logits and IoU scores.

Learned output tokens (1 IoU token, ``num_multimask_outputs + 1`` mask tokens) are
prepended to the prompt tokens and run through the two-way transformer with the
image. The image tokens are upscaled 4x by two transposed convolutions; each mask
token goes through its own hypernetwork MLP and is dotted with the upscaled
features to give one mask. Mask token 0 is the single-mask output, tokens
1..num_multimask_outputs the ambiguity-aware multi-mask outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from .common import LayerNorm2d


class MaskDecoder(nn.Module):
    """Predicts (B, C', 4E, 4E) mask logits and (B, C') IoU estimates."""

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks.

        Args:
            image_embeddings: (1 or B, C, E, E); a single embedding is shared by all
                B prompt sets, otherwise embedding i goes with prompt set i.
            image_pe: (1, C, E, E) positional encoding of the embedding grid.
            sparse_prompt_embeddings: (B, N, C) point/box tokens.
            dense_prompt_embeddings: (B or 1, C, E, E) mask prompt embedding.
            multimask_output: True -> the 3 multi-mask outputs, False -> the single one.

        Returns:
            masks (B, C', 4E, 4E) logits and iou_pred (B, C'), C' = 3 or 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou_pred[:, sel]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks (B, T, 4E, 4E) and IoU predictions (B, T)."""
        check_embedding_batch(image_embeddings, sparse_prompt_embeddings.shape[0])
        return decode_tokens(
            self, image_embeddings + dense_prompt_embeddings, image_pe, sparse_prompt_embeddings,
            self.output_upscaling,
        )


def check_embedding_batch(image_embeddings: torch.Tensor, b: int) -> None:
    """InvalidInputError unless the (1 or B, C, E, E) embeddings fit ``b`` prompt sets."""
    if image_embeddings.shape[0] not in (1, b):
        raise InvalidInputError(
            f"image_embeddings has batch {image_embeddings.shape[0]}, expected 1 or "
            f"the number of prompt sets ({b})"
        )


def decode_tokens(
    decoder: nn.Module,
    src: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    upscale: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token scheme shared by SAM's and EfficientSAM's decoders.

    ``decoder`` has ``iou_token``, ``mask_tokens``, ``num_mask_tokens``,
    ``transformer``, ``output_hypernetworks_mlps`` and ``iou_prediction_head``;
    ``src`` (1 or B, C, E, E) is the image embedding (plus any dense prompt),
    ``upscale`` maps (B, C, E, E) to (B, C', 4E, 4E). Returns all masks
    (B, T, 4E, 4E) and IoU predictions (B, T).
    """
    b = sparse_prompt_embeddings.shape[0]
    out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat(
        [out_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1
    )
    if src.shape[0] != b:
        src = src.expand(b, -1, -1, -1)
    pos = image_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape

    hs, src = decoder.transformer(src, pos, tokens)
    iou_token_out = hs[:, 0]
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens]

    upscaled = upscale(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
        dim=1,
    )  # (B, T, C')
    _, cu, hu, wu = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(b, cu, hu * wu)).view(b, -1, hu, wu)
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    return masks, iou_pred


class MLP(nn.Module):
    """``num_layers`` Linear layers (module list ``layers``) with ReLU in between."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
