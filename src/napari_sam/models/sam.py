"""The Segment Anything model: image encoder + prompt encoder + mask decoder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .tiny_vit import TinyViT

if TYPE_CHECKING:
    from .build import SamConfig

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class PromptableModel(nn.Module):
    """What SAM-like models share: an ``image_encoder`` with a square input of side
    ``img_size``, the non-persistent ``pixel_mean``/``pixel_std`` buffers (3, 1, 1) of 0..255
    RGB values (the official checkpoints do not store them), the logit threshold."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        config: Any = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.config = config

    @property
    def img_size(self) -> int:
        """Side length S of the square model input."""
        return int(self.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device


class Sam(PromptableModel):
    """SAM. Attribute and parameter names match the official checkpoints.

    The model works on square ``img_size`` inputs: an image is resized so that its
    longest side is ``img_size`` (done by the caller), normalised and zero-padded at
    the bottom/right by :meth:`preprocess`. Prompts use (x, y) pixel coordinates of
    that resized frame. ``pixel_mean``/``pixel_std`` are non-persistent buffers (the
    official checkpoints do not store them).
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT | TinyViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, ...] = PIXEL_MEAN,
        pixel_std: tuple[float, ...] = PIXEL_STD,
        config: SamConfig | None = None,
        ais_head: nn.Module | None = None,
        mask_refiner: nn.Module | None = None,
        ais_refiner: nn.Module | None = None,
    ) -> None:
        super().__init__(image_encoder, prompt_encoder, mask_decoder, pixel_mean, pixel_std,
                         config)
        # optional automatic-instance-segmentation head (models/ais_head.py); official
        # checkpoints have none, and a None attribute adds no state-dict keys
        self.ais_head = ais_head
        # optional native-resolution mask refiner (models/mask_refiner.py); the same
        self.mask_refiner = mask_refiner
        # optional native-resolution refiner of the AIS maps (models/ais_refiner.py); the same
        self.ais_refiner = ais_refiner

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) RGB in 0..255 with max(h, w) <= S -> (B, 3, S, S) normalised,
        zero-padded at the bottom and right."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """Low-res logits (B, C, 4E, 4E) -> (B, C, H, W) logits of the original image.

        Upsamples to (S, S), crops the padding away (``input_size`` = resized image
        size (h, w)), then resizes to ``original_size`` (H, W); bilinear,
        ``align_corners=False``.
        """
        s = self.img_size
        masks = F.interpolate(masks, (s, s), mode="bilinear", align_corners=False)
        masks = masks[..., : int(input_size[0]), : int(input_size[1])]
        return F.interpolate(
            masks,
            (int(original_size[0]), int(original_size[1])),
            mode="bilinear",
            align_corners=False,
        )

    @torch.no_grad()
    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """End-to-end prediction with the same input records as the official model.

        Each record holds ``image`` (3, h, w) already resized, ``original_size``
        (H, W) and optionally ``point_coords`` (B, N, 2) with ``point_labels`` (B, N),
        ``boxes`` (B, 4), ``mask_inputs`` (B, 1, 4E, 4E). Returns per record
        ``masks`` (B, C, H, W) bool, ``iou_predictions`` (B, C), ``low_res_logits``.
        """
        images = torch.stack([self.preprocess(r["image"][None])[0] for r in batched_input])
        embeddings = self.image_encoder(images)
        outputs = []
        for record, emb in zip(batched_input, embeddings, strict=True):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=emb[None],
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res, record["image"].shape[-2:], record["original_size"]
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs
