"""Mask-decoder backends: how the predictor and everything-mode run SAM's mask decoder.

A backend turns an image embedding and prompt embeddings into low-resolution
mask logits and IoU predictions, torch in / torch out, with the model's own
weights. Two exist:

* ``"reference"`` (:class:`ReferenceBackend`): ``model.mask_decoder`` itself,
  for any decoder with SAM's call signature;
* ``"factored"`` (:class:`FactoredBackend`): the same maths restructured for a
  few prompt tokens (projections on the token side, per-image parts computed
  once, low-rank image tokens after the first block); needs SAM's standard
  decoder layout.

``"auto"`` picks the factored backend when the model's decoder supports it.
Choose one with ``Predictor(model, decoder=...)`` (a kind or a backend object).

Every backend has: ``kind``; ``prepare(features) -> context`` (per image);
``decode(context, sparse, dense, multimask, mask_prompt)``;
``decode_selected(context, sparse, dense, select)`` (everything-mode);
``release()`` (drop scratch tensors) and ``fresh()`` (a new backend of the same
kind and options, for another thread).

Modules: :mod:`.factored` (the backend), :mod:`.context` (its per-image
:class:`DecoderContext`), :mod:`.attention` (restructured cross-attentions),
:mod:`.low_rank` (the factored image tokens), :mod:`.mask_head`
(:func:`upscale_masks`), :mod:`.reference`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from napari_sam.errors import InvalidInputError
from napari_sam.models.fast_decoder.context import DecoderContext
from napari_sam.models.fast_decoder.factored import FactoredBackend
from napari_sam.models.fast_decoder.mask_head import upscale_masks
from napari_sam.models.fast_decoder.reference import ReferenceBackend, ReferenceContext

__all__ = [
    "DECODER_KINDS",
    "DecoderContext",
    "FactoredBackend",
    "MaskDecoderBackend",
    "ReferenceBackend",
    "ReferenceContext",
    "make_decoder_backend",
    "upscale_masks",
]

#: the accepted ``decoder=`` kinds
DECODER_KINDS = ("auto", "reference", "factored")


class MaskDecoderBackend(Protocol):
    """What the predictor and everything-mode need from a mask-decoder backend."""

    kind: str

    def prepare(self, features: torch.Tensor) -> Any:
        """Per-image context of (1, C, Eh, Ew) ``features``."""

    def decode(
        self, ctx: Any, sparse: torch.Tensor, dense: torch.Tensor, multimask: bool,
        mask_prompt: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) sparse, (B, C, Eh, Ew) dense -> logits (B, C', 4Eh, 4Ew), IoU (B, C')."""

    def decode_selected(
        self, ctx: Any, sparse: torch.Tensor, dense: torch.Tensor,
        select: Callable[[torch.Tensor], torch.Tensor], sub_batch: int = 16,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Multimask IoU (B, 3), selection (B, 3) bool, selected logits (S, 4Eh, 4Ew)."""

    def release(self) -> None:
        """Drop scratch tensors."""

    def fresh(self) -> MaskDecoderBackend:
        """A new backend of the same kind and options."""


def make_decoder_backend(model: torch.nn.Module, decoder: Any = "auto") -> MaskDecoderBackend:
    """The backend ``decoder`` names for ``model``: "auto", "reference" or "factored",
    or a backend object (returned as is).

    Raises:
      InvalidInputError: an unknown kind, or "factored" for a decoder without
        SAM's standard layout.
    """
    if not isinstance(decoder, str):
        if all(hasattr(decoder, n) for n in ("prepare", "decode", "decode_selected", "fresh")):
            return decoder
        raise InvalidInputError(
            f"decoder must be one of {', '.join(map(repr, DECODER_KINDS))} or a decoder "
            f"backend, got {type(decoder).__name__}."
        )
    if decoder not in DECODER_KINDS:
        raise InvalidInputError(
            f"decoder must be one of {', '.join(map(repr, DECODER_KINDS))}, got {decoder!r}."
        )
    supported = FactoredBackend.supports(model)
    if decoder == "factored" and not supported:
        raise InvalidInputError(
            "This model's mask decoder has no fast path (not SAM's standard layout); "
            "use decoder='reference' or 'auto'."
        )
    if decoder == "reference" or not supported:
        return ReferenceBackend(model)
    return FactoredBackend(model)
