"""The EfficientSAM model (Xiong et al., CVPR 2024): ViT-T/S encoder + prompt encoder +
mask decoder, with the same call interface as :class:`~.sam.Sam` where it can.

Image convention (what the engine's
:class:`~napari_sam.engine.transforms.StretchTransform` implements): the RGB
image is stretched to S x S (bilinear, ``align_corners=False``, the aspect ratio
is *not* kept, nothing is padded), normalised with the ImageNet mean/std of
0..1 values (the same numbers as SAM's 0..255 constants) and encoded. Prompts
are (x, y) pixels of the stretched frame. Low-res logits (4E x 4E) cover the
whole stretched frame and are resized bicubically straight to the original
(H, W) (``StretchTransform.upscale``; the model has no ``postprocess_masks``).

Not supported by EfficientSAM (see docs/api.md): mask prompts (refinement
uses points only) and more than ``max_prompt_points`` prompt points (6; a box
counts as 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import InvalidInputError
from .efficient_sam_decoder import EfficientMaskDecoder
from .efficient_sam_encoder import EfficientViTEncoder
from .efficient_sam_prompt_encoder import EfficientPromptEncoder
from .sam import PIXEL_MEAN, PIXEL_STD, PromptableModel

if TYPE_CHECKING:
    from .build import EfficientSamConfig


class EfficientSam(PromptableModel):
    """EfficientSAM. Attribute and parameter names match the official checkpoints."""

    #: the engine's image convention (:func:`napari_sam.engine.transforms.transform_for`)
    image_convention: str = "stretch"
    #: EfficientSAM has no mask prompt (no ``mask_input``; refinement adds points)
    accepts_mask_prompt: bool = False
    #: no automatic-instance-segmentation head
    ais_head: None = None

    def __init__(
        self,
        image_encoder: EfficientViTEncoder,
        prompt_encoder: EfficientPromptEncoder,
        mask_decoder: EfficientMaskDecoder,
        config: EfficientSamConfig | None = None,
    ) -> None:
        # 0..255 constants, equal to ImageNet's (0.485, ...) / (0.229, ...) on 0..1 values
        super().__init__(image_encoder, prompt_encoder, mask_decoder, PIXEL_MEAN, PIXEL_STD,
                         config)

    @property
    def max_prompt_points(self) -> int:
        """Prompt points the decoder takes at most (a box counts as 2)."""
        return int(self.prompt_encoder.max_points)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB in 0..255, already stretched to S x S -> normalised (B, 3, S, S)."""
        s = self.img_size
        if tuple(x.shape[-2:]) != (s, s):
            raise InvalidInputError(
                f"EfficientSAM takes a {s} x {s} input, got {tuple(x.shape[-2:])}; stretch the "
                "image first (napari_sam.engine.transforms.StretchTransform)."
            )
        return (x - self.pixel_mean) / self.pixel_std
