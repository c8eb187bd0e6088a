"""The reference decoder backend: the model's own ``mask_decoder``, unchanged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["ReferenceBackend", "ReferenceContext"]


@dataclass
class ReferenceContext:
    """Per-image state of :class:`ReferenceBackend`: the image embedding
    ``features`` (1, C, Eh, Ew) and the grid's positional encoding ``dense_pe``
    (1, C, Eh, Ew)."""

    features: torch.Tensor
    dense_pe: torch.Tensor


class ReferenceBackend:
    """Decode with ``model.mask_decoder`` itself (any decoder with SAM's call signature).

    The slower, structure-agnostic counterpart of
    :class:`~napari_sam.models.fast_decoder.factored.FactoredBackend`; it keeps
    no state between calls, so it is thread-safe.
    """

    kind = "reference"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def fresh(self) -> ReferenceBackend:
        """A new backend for the same model."""
        return ReferenceBackend(self.model)

    def prepare(self, features: torch.Tensor) -> ReferenceContext:
        """The per-image context of ``features`` (1, C, Eh, Ew)."""
        with torch.inference_mode():
            dense_pe = self.model.prompt_encoder.get_dense_pe().to(features.device)
        return ReferenceContext(features, dense_pe)

    def release(self) -> None:
        """Nothing to release (no scratch tensors)."""

    def decode(self, ctx: ReferenceContext, sparse: torch.Tensor, dense: torch.Tensor,
               multimask: bool, mask_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) sparse and (B, C, Eh, Ew) dense prompt embeddings -> low-res logits
        (B, C', 4 Eh, 4 Ew) and IoU (B, C'), C' = 3 or 1 (``mask_prompt`` is not needed)."""
        return self.model.mask_decoder(
            image_embeddings=ctx.features,
            image_pe=ctx.dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )

    def decode_selected(self, ctx: ReferenceContext, sparse: torch.Tensor, dense: torch.Tensor,
                        select: Callable[[torch.Tensor], torch.Tensor], sub_batch: int = 16,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Multimask decoding, then the logits of the outputs ``select`` picks; see
        :meth:`~napari_sam.models.fast_decoder.factored.FactoredBackend.decode_selected`
        (``sub_batch`` is ignored: the whole batch is decoded at once)."""
        low, iou = self.decode(ctx, sparse, dense, True)
        chosen = select(iou)
        return iou, chosen, low[chosen]
