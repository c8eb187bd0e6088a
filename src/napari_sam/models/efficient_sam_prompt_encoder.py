"""EfficientSAM's prompt encoder: points and box corners -> a fixed number of tokens.

Coordinates are (x, y) pixels in the model input frame (EfficientSAM stretches
the image to S x S, so ``x = col * S / W`` and ``y = row * S / H``), shape
(B, N, 2); a point is encoded at the centre of its pixel (coordinate + 0.5),
as in SAM. Labels: 1 foreground, 0 background, -1 padding, 2 / 3 top-left /
bottom-right box corner. Boxes (B, 4) ``x0, y0, x1, y1`` become two corner
points labelled 2 and 3, placed after the points.

What differs from SAM's :class:`~.prompt_encoder.PromptEncoder`:

* there is no mask prompt and no "no mask" embedding: :meth:`forward` returns
  ``None`` as the dense embedding and refuses a mask;
* the decoder always sees exactly ``max_points`` tokens (6 officially): shorter
  prompts are padded with label -1 at (x, y) = (-1, -1) and the padding tokens
  keep their positional encoding (SAM zeroes it); more tokens than that raise
  (the engine chooses which points to keep, see
  :func:`napari_sam.engine.session.limit_prompt_points`);
* a background point (label 0) gets no learnt embedding, only its positional
  encoding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidInputError
from .prompt_encoder import PositionEmbeddingRandom

#: the official number of prompt tokens (points + 2 per box) the decoder takes
MAX_PROMPT_POINTS = 6


class EfficientPromptEncoder(nn.Module):
    """Encodes points and boxes into (B, max_points, C) sparse tokens; no dense output."""

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        max_points: int = MAX_PROMPT_POINTS,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.max_points = int(max_points)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.invalid_points = nn.Embedding(1, embed_dim)
        self.point_embeddings = nn.Embedding(1, embed_dim)  # foreground points only
        self.bbox_top_left_embeddings = nn.Embedding(1, embed_dim)
        self.bbox_bottom_right_embeddings = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, (1, C, E, E)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def prompt_sequence(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Points then box corners, padded to ``max_points``: (B, P, 2) xy and (B, P) labels.

        Padding (and any point labelled -1) sits at (-1, -1).
        """
        coords, labels = [], []
        if points is not None:
            coords.append(points[0].float())
            labels.append(points[1].to(points[0].device).long())
        if boxes is not None:
            b = boxes.shape[0]
            coords.append(boxes.float().reshape(b, 2, 2))
            labels.append(torch.tensor([2, 3], device=boxes.device).expand(b, 2))
        if not coords:
            raise InvalidInputError("EfficientSAM needs at least one point or box prompt.")
        xy = torch.cat(coords, dim=1)
        lab = torch.cat(labels, dim=1)
        n = xy.shape[1]
        if n > self.max_points:
            raise InvalidInputError(
                f"EfficientSAM takes at most {self.max_points} prompt points (a box counts as "
                f"2), got {n}; keep fewer points."
            )
        if lab.numel() and (int(lab.min()) < -1 or int(lab.max()) > 3):
            raise InvalidInputError(
                "point labels must be 1 (foreground), 0 (background), -1 (padding) or 2/3 "
                f"(box corners); got values in [{int(lab.min())}, {int(lab.max())}]"
            )
        pad = self.max_points - n
        if pad:
            b = xy.shape[0]
            xy = torch.cat([xy, xy.new_full((b, pad, 2), -1.0)], dim=1)
            lab = torch.cat([lab, lab.new_full((b, pad), -1)], dim=1)
        xy = torch.where((lab == -1).unsqueeze(-1), xy.new_tensor(-1.0), xy)
        return xy, lab

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Embed prompts (same call as SAM's prompt encoder).

        Args:
            points: ``(coords (B, N, 2) xy, labels (B, N))`` or None.
            boxes: (B, 4) xyxy or None.
            masks: must be None (EfficientSAM has no mask prompt).

        Returns:
            sparse (B, max_points, C) tokens and None (no dense embedding).
        """
        if masks is not None:
            raise InvalidInputError(
                "EfficientSAM has no mask prompt; refine with more points instead of mask_input."
            )
        xy, labels = self.prompt_sequence(points, boxes)
        emb = self.pe_layer.forward_with_coords(xy + 0.5, self.input_image_size)
        learnt = torch.cat([
            self.invalid_points.weight, torch.zeros_like(self.point_embeddings.weight),
            self.point_embeddings.weight, self.bbox_top_left_embeddings.weight,
            self.bbox_bottom_right_embeddings.weight,
        ])  # (5, C), row = label + 1
        return emb + learnt[labels + 1], None
