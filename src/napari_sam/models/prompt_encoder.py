"""Prompt encoder: points, boxes and low-resolution masks -> prompt embeddings.

Coordinates are SAM's (x, y) pixels in the model input frame (the image resized so
that its longest side is ``img_size``), shape (B, N, 2). A point is encoded at the
centre of its pixel (coordinate + 0.5). Point labels: 1 foreground, 0 background,
-1 padding ("not a point"), 2 / 3 top-left / bottom-right box corner (as in the
official ONNX export). Boxes are (B, 4) ``x0, y0, x1, y1``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InvalidInputError
from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates.

    ``positional_encoding_gaussian_matrix`` (2, F) is a fixed random projection
    (a persistent buffer, saved in checkpoints); the encoding of (x, y) in [0, 1]^2
    is ``[sin(2 pi p), cos(2 pi p)]`` with ``p = (2 * xy - 1) @ G``, 2F channels.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _encode(self, xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) normalised coordinates -> (..., 2F)."""
        proj = (2.0 * xy - 1.0) @ self.positional_encoding_gaussian_matrix
        proj = (2.0 * math.pi) * proj
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an (h, w) grid -> (2F, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(
            [xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1
        )  # (h, w, 2) as (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(
        self, coords: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """(B, N, 2) pixel (x, y) in an image of size (H, W) -> (B, N, 2F)."""
        scale = coords.new_tensor([1.0 / image_size[1], 1.0 / image_size[0]])
        return self._encode((coords * scale).to(torch.float32))


class PromptEncoder(nn.Module):
    """Encodes prompts into sparse tokens (B, N', C) and a dense map (B, C, E, E)."""

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2/3: box corners
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, (1, C, E, E)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) xy + (B, N) labels -> (B, N (+1 if pad), C)."""
        coords = coords + 0.5
        labels = labels.to(coords.device)
        if pad:  # a "not a point" token stands in for the missing box
            b = coords.shape[0]
            coords = torch.cat([coords, coords.new_zeros(b, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((b, 1), -1)], dim=1)
        if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) > 3):
            raise InvalidInputError(
                "point labels must be 1 (foreground), 0 (background), -1 (padding) "
                f"or 2/3 (box corners); got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        table = torch.cat(
            [self.not_a_point_embed.weight] + [e.weight for e in self.point_embeddings], dim=0
        )  # (5, C), row = label + 1
        label_idx = labels.long() + 1
        emb = emb.masked_fill((label_idx == 0).unsqueeze(-1), 0.0)
        return emb + table[label_idx]

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) xyxy -> (B, 2, C) corner tokens."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat(
            [self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0
        )
        return emb + corner_embed

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            points: ``(coords (B, N, 2) xy, labels (B, N))`` or None.
            boxes: (B, 4) xyxy or None.
            masks: (B, 1, 4E, 4E) mask logits or None.

        Returns:
            sparse (B, N', C) point/box tokens (N' may be 0) and dense (B, C, E, E).
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        weight = self.no_mask_embed.weight
        tokens = [weight.new_empty(bs, 0, self.embed_dim)]
        if points is not None:
            tokens.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        sparse = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense
