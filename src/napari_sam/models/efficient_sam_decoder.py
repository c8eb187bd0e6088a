"""EfficientSAM's mask decoder: image embedding + prompt tokens -> mask logits and IoU.

Same scheme as SAM's :mod:`.mask_decoder` (an IoU token and
``num_multimask_outputs + 1`` mask tokens run through the two-way transformer
with the image; token 0 is the single-mask output, tokens 1.. the multi-mask
outputs), with these differences:

* no dense (mask) prompt is added to the image embedding;
* the 4x upscaling is a list of stages ``final_output_upscaling_layers``, each a
  2 x 2 stride-2 transposed convolution, a GroupNorm with one group (every
  stage but the last; it normalises over channels *and* positions, where SAM's
  LayerNorm2d normalises each position over channels) and GELU;
* the hypernetwork and IoU MLPs use GELU
  (:class:`~.efficient_sam_transformer.StackedMLP`).

Low-res logits are (B, C', 4E, 4E) on the stretched S x S model frame (256 x 256
officially), (row, col) order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InvalidInputError
from .efficient_sam_transformer import StackedMLP
from .mask_decoder import check_embedding_batch, decode_tokens


class EfficientMaskDecoder(nn.Module):
    """Predicts (B, C', 4E, 4E) mask logits and (B, C') IoU estimates, C' = 3 or 1."""

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        upscaling_dims: Sequence[int] = (64, 32),
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        stages = []
        width = transformer_dim
        for i, out in enumerate(upscaling_dims):
            last = i == len(upscaling_dims) - 1
            stages.append(nn.Sequential(
                nn.ConvTranspose2d(width, out, kernel_size=2, stride=2),
                nn.Identity() if last else nn.GroupNorm(1, out),
                nn.GELU(),
            ))
            width = out
        self.final_output_upscaling_layers = nn.ModuleList(stages)
        self.output_hypernetworks_mlps = nn.ModuleList(
            StackedMLP(transformer_dim, transformer_dim, width, 2)
            for _ in range(self.num_mask_tokens)
        )
        # iou_head_depth counts linear layers, as SAM's does
        self.iou_prediction_head = StackedMLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth - 1
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks (same call as SAM's decoder).

        Args:
            image_embeddings: (1 or B, C, E, E); a single embedding is shared by all
                B prompt sets, otherwise embedding i goes with prompt set i.
            image_pe: (1, C, E, E) positional encoding of the embedding grid.
            sparse_prompt_embeddings: (B, N, C) point/box tokens.
            dense_prompt_embeddings: must be None (EfficientSAM has no mask prompt).
            multimask_output: True -> the 3 multi-mask outputs, False -> the single one.

        Returns:
            masks (B, C', 4E, 4E) logits and iou_pred (B, C'), C' = 3 or 1.
        """
        if dense_prompt_embeddings is not None:
            raise InvalidInputError("EfficientSAM's decoder takes no dense (mask) prompt.")
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou_pred[:, sel]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks (B, T, 4E, 4E) and IoU predictions (B, T)."""
        check_embedding_batch(image_embeddings, sparse_prompt_embeddings.shape[0])
        return decode_tokens(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                             self._upscale)

    def _upscale(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.final_output_upscaling_layers:
            x = stage(x)
        return x
