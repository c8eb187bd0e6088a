"""EfficientSAM's two-way transformer (mask decoder) and its MLP blocks.

Prompt tokens (B, N, C) and image tokens (B, HW, C) update each other as in
SAM's :mod:`.transformer`: token self-attention, token-to-image attention, a
token MLP, image-to-token attention, then a final token-to-image attention.
The attention layers are SAM's (:class:`~.transformer.Attention`, same
parameter names). What differs from SAM:

* the token positional encoding (the prompt embedding itself) is added to the
  token stream before self-attention in every block but the first, and is kept
  there (SAM adds it to the queries and keys only); the first block's
  self-attention is residual too (SAM's replaces the tokens);
* the MLPs are :class:`StackedMLP` (GELU, parameter names ``layers.i.0`` and
  ``fc``) instead of ``lin1``/``lin2`` with ReLU.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import InvalidInputError
from . import kernels
from .transformer import Attention, TwoWayTransformer


class StackedMLP(nn.Module):
    """``num_layers`` (Linear -> GELU) stages of width ``hidden_dim``, then a Linear ``fc``.

    (..., input_dim) -> (..., output_dim); ``num_layers + 1`` linear layers in all.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * num_layers
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.GELU()) for a, b in zip(dims[:-1], dims[1:],
                                                                     strict=True)
        )
        self.fc = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.layers:
            x = kernels.linear(x, stage[0].weight, stage[0].bias, "gelu")
        return kernels.linear(x, self.fc.weight, self.fc.bias)


class EfficientTwoWayTransformer(TwoWayTransformer):
    """SAM's two-way transformer (same ``forward``) with :class:`EfficientTwoWayBlock`
    layers and GELU MLPs."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__(depth, embedding_dim, num_heads, mlp_dim, nn.GELU,
                         attention_downsample_rate, block=EfficientTwoWayBlock)


class EfficientTwoWayBlock(nn.Module):
    """Token self-attn, token->image cross-attn, token MLP, image->token cross-attn."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.GELU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        if activation is not nn.GELU:
            raise InvalidInputError("EfficientSAM's two-way blocks use GELU MLPs")
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = StackedMLP(embedding_dim, mlp_dim, embedding_dim, 1)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        """queries (B, N, C), keys (B, HW, C) and their encodings -> updated (queries, keys)."""
        if not self.skip_first_layer_pe:  # the first layer's tokens already carry their PE
            queries = queries + query_pe
        queries = self.norm1(queries + self.self_attn(q=queries, k=queries, v=queries))
        k = keys + key_pe
        q = queries + query_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys
