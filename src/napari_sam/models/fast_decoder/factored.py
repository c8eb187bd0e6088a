"""The factored decoder backend: SAM's mask decoder restructured for few prompt tokens.

:class:`FactoredBackend` gives the same IoU predictions and low-res logits as
``model.mask_decoder`` (to float32 rounding) with the same weights; its
per-image state is a :class:`DecoderContext`. Shapes: B prompts, T tokens
(IoU token, mask tokens, prompt tokens), L = Eh * Ew image tokens of width C
in row-major grid order, H heads of width d, D two-way blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from napari_sam.models import kernels
from napari_sam.models.fast_decoder.attention import (
    _i2t,
    _i2t_cached,
    _image_update,
    _projected_values,
    _t2i,
    _t2i_cached,
    _token_self_attention,
)
from napari_sam.models.fast_decoder.context import (
    Conv1Cache,
    DecoderContext,
    has_standard_layout,
)
from napari_sam.models.fast_decoder.low_rank import (
    Conv1Factors,
    FactoredMap,
    FactoredState,
    ImageUpdates,
    _factor_rows,
    _factored_logits,
    _factored_values,
    _fill_factor_rows,
    _map_chain,
)
from napari_sam.models.fast_decoder.mask_head import up_conv_matrix, upscale_masks

__all__ = ["DecoderContext", "FactoredBackend"]


class FactoredBackend:
    """SAM's mask decoder, restructured for few prompt tokens; same weights, same maths.

    The reference decoder projects all E*E image tokens to queries/keys/values in
    every cross-attention (E*E x C x C/2 multiply-adds each). With only a handful
    of prompt tokens T it is cheaper to move the projection to the token side:

    * token -> image: ``(q Wk_h) (X + P)^T`` gives the logits (the key bias only
      adds a per-row constant, which softmax ignores) and
      ``(A X) Wv_h^T + bv_h`` the values (rows of A sum to 1);
    * image -> token: ``(X + P) (Wq_h^T k_h^T) + bq_h k_h^T`` gives the logits
      and ``A (v_h Wo_h^T)`` summed over heads the projected output.

    Each costs E*E x C x heads*T multiply-adds. In the first block, for prompts
    without a mask, the image side is the same for every click, so its
    projections are computed once per image (:meth:`context`). The output
    upscaling (two 2x2 stride-2 transposed convolutions) runs as matrix
    products on pixel-major features, in cache-sized chunks, so no layout
    copies of the large tensors are needed; for prompts of few tokens its first
    convolution is evaluated in factored form through the blocks' image updates
    (:meth:`conv1_factors`). For such prompts every block after the first works
    on the image tokens in that factored form too (:meth:`decode_factored`).
    Token-side modules (self-attention, MLPs, norms, heads) are the model's own.

    Arguments:
      model: a SAM model whose ``mask_decoder`` has the standard layout
        (:meth:`supports`).
      low_rank: use the factored image tokens (:meth:`decode_factored`) when it
        pays (None, :meth:`factor_pays`), wherever it applies (True: prompts
        without a mask, plain LayerNorms), or never (False).
      conv2_dtype: dtype of the mask head's second convolution (float32; other
        dtypes only for experiments, see :func:`upscale_masks`).

    Not thread-safe (scratch tensors are reused between calls): one backend per
    thread (:meth:`fresh`); the Predictor serialises its calls.
    """

    kind = "factored"

    def __init__(
        self,
        model: torch.nn.Module,
        low_rank: bool | None = None,
        conv2_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.dec = decoder = model.mask_decoder
        self.low_rank = low_rank
        self.conv2_dtype = conv2_dtype
        # Scratch tensors reused between calls: fresh multi-MB allocations cost
        # page faults (about 1 us per 4 KiB page), a noticeable part of a click.
        self._work: dict[tuple, torch.Tensor] = {}
        # the image updates' norms are plain affine LayerNorms: factored forms apply
        self._plain_layer_norms = all(
            type(layer.norm4) is torch.nn.LayerNorm and len(layer.norm4.normalized_shape) == 1
            and layer.norm4.weight is not None
            and layer.norm4.bias is not None
            for layer in decoder.transformer.layers
        )

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reusable scratch tensor (contents undefined)."""
        return kernels.scratch(self._work, name, shape, like)

    def release(self) -> None:
        """Drop the scratch tensors (they are re-created on the next call)."""
        self._work.clear()

    def fresh(self) -> FactoredBackend:
        """A new backend with the same model and options and its own scratch tensors."""
        return FactoredBackend(self.model, self.low_rank, self.conv2_dtype)

    def prepare(self, features: torch.Tensor) -> DecoderContext:
        """The per-image context of ``features`` (1, C, Eh, Ew) (call under inference mode)."""
        with torch.inference_mode():
            dense_pe = self.model.prompt_encoder.get_dense_pe().to(features.device)
        return self.context(features, self.model.prompt_encoder.no_mask_embed.weight, dense_pe)

    def upscale(
        self,
        keys: torch.Tensor,
        hyper: torch.Tensor,
        grid: tuple[int, int],
        factors: Conv1Factors | None = None,
    ) -> torch.Tensor:
        """:func:`upscale_masks` with this decoder's mask head and scratch tensors."""
        with torch.profiler.record_function("napari_sam.decoder.mask_head"):
            return upscale_masks(self.dec.output_upscaling, keys, hyper, grid, self._work,
                                 factors, self.conv2_dtype)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """True if ``model.mask_decoder`` has the standard SAM layout this class relies on
        (:func:`~napari_sam.models.fast_decoder.context.has_standard_layout`)."""
        return has_standard_layout(model)

    def context(
        self, features: torch.Tensor, no_mask_embed: torch.Tensor, dense_pe: torch.Tensor
    ) -> DecoderContext:
        """Per-image tensors: image tokens X (1, L, C) with the no-mask embedding
        added, positional encoding P (1, L, C), and the first block's image-side
        projections (per head); see :class:`DecoderContext`."""
        layer = self.dec.transformer.layers[0]
        x = (features + no_mask_embed.reshape(1, -1, 1, 1)).flatten(2).transpose(1, 2)
        x = x.contiguous()
        p = dense_pe.flatten(2).transpose(1, 2).contiguous()
        xp = x + p
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        n = x.shape[1]
        k = t2i.k_proj(xp)[0].view(n, t2i.num_heads, -1).transpose(0, 1).contiguous()
        v = t2i.v_proj(x)[0].view(n, t2i.num_heads, -1).transpose(0, 1).contiguous()
        q = i2t.q_proj(xp)[0].view(n, i2t.num_heads, -1).permute(1, 2, 0)
        q = (q * q.shape[1] ** -0.5).contiguous()
        grid = (int(features.shape[-2]), int(features.shape[-1]))
        return DecoderContext(features, dense_pe, x, p, k, v, q, grid)

    def _factored_map(
        self, ctx: DecoderContext, name: str, linear: torch.nn.Linear, depth: int, heads: int,
        values: bool,
    ) -> FactoredMap:
        """The per-image part of ``keys_depth @ linear.weight.T`` in factored form
        (see :meth:`conv1_factors`), cached in ``ctx.factored_maps`` under ``name``."""
        if name not in ctx.factored_maps:
            w = linear.weight.t()
            maps, rows = _map_chain(self.dec.transformer.layers[:depth], w)
            n = ctx.image_tokens.shape[1]
            d = w.shape[1] // heads
            xm = (ctx.image_tokens[0] @ maps[0]).view(n, heads, d)
            xm = xm.transpose(0, 1) if values else xm.permute(1, 2, 0)
            pe = None  # values carry no positional encoding
            if not values:
                pe = (ctx.pos_encoding[0] @ w).view(n, heads, d).permute(1, 2, 0).contiguous()
            ctx.factored_maps[name] = FactoredMap(xm.contiguous(), pe, maps, rows)
        return ctx.factored_maps[name]

    def transformer(
        self,
        ctx: DecoderContext,
        sparse: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The two-way transformer on (B, N, C) sparse prompt tokens, image tokens formed.

        ``image_tokens`` (B, L, C) replaces the cached image side when the dense
        prompt is not the no-mask embedding (mask prompts).

        Returns the tokens (B, T, C) (output tokens, then the prompt tokens), their
        positional encoding (B, T, C), the image tokens ``keys`` (B, L, C)
        and ``keys + pe`` (B, L, C), both scratch buffers that the next call
        overwrites. Not thread-safe; the Predictor serialises calls. For prompts of
        few tokens :meth:`transformer_factored` is cheaper.
        """
        tr = self.dec.transformer
        queries = qpe = self._initial_tokens(sparse)
        p = ctx.pos_encoding
        keys = ctx.image_tokens if image_tokens is None else image_tokens
        keys_pe = None if image_tokens is None else keys + p  # the cached first block needs none
        for i, layer in enumerate(tr.layers):
            queries = _token_self_attention(layer, queries, qpe)
            cached = i == 0 and image_tokens is None
            t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            if cached:
                attn = _t2i_cached(t2i, queries + qpe, ctx.block1_keys, ctx.block1_values)
            else:
                attn = _t2i(t2i, queries + qpe, keys_pe, keys)
            queries = layer.norm2(queries + attn)
            queries = layer.norm3(queries + layer.mlp(queries))
            if cached:
                a, vo = _i2t_cached(i2t, ctx.block1_queries, queries + qpe, queries)
            else:
                a, vo = _i2t(i2t, keys_pe, queries + qpe, queries)
            vo = vo + i2t.out_proj.bias / i2t.num_heads  # see _image_update
            shape = (a.shape[0], a.shape[2], vo.shape[2])
            out = (self._buffer(f"keys{i % 2}", shape, vo), self._buffer(f"kpe{i % 2}", shape, vo))
            keys, keys_pe = _image_update(a, vo, keys, layer.norm4, p, out)
        return queries, qpe, keys, keys_pe

    def _initial_tokens(self, sparse: torch.Tensor) -> torch.Tensor:
        """(B, N, C) sparse prompt tokens -> (B, T, C): IoU and mask tokens, then the prompts."""
        dec = self.dec
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        return torch.cat([out_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], 1)

    def decode(
        self,
        ctx: DecoderContext,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask: bool,
        mask_prompt: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode (B, N, C) sparse prompt tokens and (B, C, Eh, Ew) dense prompt embeddings.

        ``dense`` is read only when ``mask_prompt`` is True (otherwise it is the
        no-mask embedding, already in ``ctx``). Returns (B, C', 4 Eh, 4 Ew) low-res
        logits and (B, C') IoU, C' = 3 or 1. Not thread-safe (scratch tensors).
        """
        image_tokens = None
        if mask_prompt:  # the dense prompt differs from the cached one
            image_tokens = (ctx.features + dense).flatten(2).transpose(1, 2)
        if image_tokens is None and self.uses_low_rank(sparse.shape[1]):
            return self.decode_factored(ctx, sparse, multimask)
        with torch.profiler.record_function("napari_sam.decoder.transformer"):
            queries, qpe, keys, keys_pe = self.transformer(ctx, sparse, image_tokens)
        sel, used = self._selected_tokens(multimask)
        hs = self.final_attention(queries[:, used], qpe[:, used], keys, keys_pe)
        return self._heads(hs, sel, keys, ctx.grid, None)

    def uses_low_rank(self, n_prompt_tokens: int) -> bool:
        """True if prompts of ``n_prompt_tokens`` sparse tokens (no mask) are decoded
        with the image tokens in factored form (the ``low_rank`` option)."""
        if self.low_rank is None:
            return self.factor_pays(n_prompt_tokens)
        return self.low_rank and self._plain_layer_norms

    def decode_factored(
        self, ctx: DecoderContext, sparse: torch.Tensor, multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode` for prompts of few tokens, with the image tokens in factored form
        (:meth:`transformer_factored`); the final attention and the mask head's first
        convolution use that form too."""
        with torch.profiler.record_function("napari_sam.decoder.transformer_factored"):
            state = self.transformer_factored(ctx, sparse)
        sel, used = self._selected_tokens(multimask)
        with torch.profiler.record_function("napari_sam.decoder.final_attention"):
            hs = self.final_attention_factored(ctx, state, used)
        return self._heads(hs, sel, ctx.image_tokens, ctx.grid, self.conv1_factors(ctx, state))

    def transformer_factored(self, ctx: DecoderContext, sparse: torch.Tensor) -> FactoredState:
        """The two-way transformer on (B, N, C) sparse prompt tokens, with the image
        tokens after the first block in factored form.

        After the first block the image tokens are ``keys_i = R_i (x M + A'_i B'_i)``
        for any linear map (:meth:`conv1_factors`), so every later product of
        per-click token matrices with the L image tokens goes through the per-image
        ``x M`` (one head's width) and the L x K_i matrix A'_i instead of the C-wide
        tokens: the later blocks' attentions, and after the transformer the final
        attention and the first convolution of the mask head. Only the intermediate
        blocks' image tokens are formed (each block's LayerNorm needs its input's
        statistics); the last block's only for its statistics. Needs plain
        LayerNorms and no mask prompt; worth it while K_D = D (H T + 2) is well
        below C (:meth:`factor_pays`). Not thread-safe (scratch buffers).
        """
        layers = self.dec.transformer.layers
        queries = qpe = self._initial_tokens(sparse)
        keys = ctx.image_tokens
        updates = ImageUpdates([], [], [], [])
        a_aug = scale = q = None
        k_i = 0  # rows of A' filled so far: H T + 2 per block
        for i, layer in enumerate(layers):
            queries = _token_self_attention(layer, queries, qpe)
            t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            if i == 0:
                attn = _t2i_cached(t2i, queries + qpe, ctx.block1_keys, ctx.block1_values)
            else:
                attn = self._t2i_factored(ctx, f"block{i}", t2i, queries + qpe, i, updates,
                                          a_aug[..., :k_i], scale)
            queries = layer.norm2(queries + attn)
            queries = layer.norm3(queries + layer.mlp(queries))
            if i == 0:
                a, vo = _i2t_cached(i2t, ctx.block1_queries, queries + qpe, queries)
            else:
                a, vo = self._i2t_factored(ctx, f"block{i}", i2t, queries + qpe, queries, i,
                                           updates, a_aug[..., :k_i], scale)
            vo = vo + i2t.out_proj.bias / i2t.num_heads  # see _image_update
            b, ht, n = a.shape
            if i == 0:
                a_aug = self._buffer("factors_a", (b, n, len(layers) * (ht + 2)), a)
                q = torch.ones((b, n), dtype=a.dtype, device=a.device)
            stats = (self._buffer(f"mean{i}", (b, n), vo), self._buffer(f"rstd{i}", (b, n), vo))
            for field, value in zip(updates, (a, vo, *stats), strict=True):
                field.append(value)
            last = i == len(layers) - 1
            # the last block's tokens are only needed for their statistics
            out = (None if last else self._buffer(f"keys{i % 2}", (b, n, vo.shape[2]), vo), None)
            keys = _image_update(a, vo, keys, layer.norm4, None, out, stats)[0]
            q = _fill_factor_rows(a_aug, q, i, a, *stats)
            scale = 1 / q
            k_i += ht + 2
        return FactoredState(queries, qpe, updates, a_aug, scale)

    def final_attention_factored(
        self, ctx: DecoderContext, state: FactoredState, tokens: list[int], index: int | None = None
    ) -> torch.Tensor:
        """Final token -> image attention and norm of the output tokens ``tokens``
        (positions in the token sequence) against the factored image tokens; ``index``
        picks one prompt of the batch. Returns (B or 1, len(tokens), C)."""
        state = state.select(index)
        tr = self.dec.transformer
        queries = state.queries[:, tokens]
        attn = self._t2i_factored(ctx, "final", tr.final_attn_token_to_image,
                                  queries + state.qpe[:, tokens], len(tr.layers),
                                  state.updates, state.a_aug, state.scale)
        return tr.norm_final_attn(queries + attn)

    def conv1_factors(
        self, ctx: DecoderContext, state: FactoredState, index: int | None = None
    ) -> Conv1Factors:
        """The mask head's first convolution on the final image tokens, in factored form.

        The final image tokens are ``keys_D`` with ``keys_i = LN_i(keys_{i-1} +
        A_i^T V_i)`` (``keys_0`` = x, the cached image tokens): per token, a
        LayerNorm is ``r (z - mu) g + b`` with scalars ``mu``, ``r``. Unrolled,

            keys_D W + bias = R (x M_1 + A' B'),

        with ``M_i = diag(g_i) ... diag(g_D) W``, ``R`` the product of the ``r_i``,
        and A' (L, K) / B' (K, 4 C/4) stacking per block the attention ``A_i^T``,
        the mean and bias terms (K = D (H T + 2)). ``x M_1`` is per image
        (cached in ``ctx`` on first use), so a click costs L K 4 C/4 multiply-adds instead of
        L C 4 C/4: K = 116 instead of 256 for ViT SAM with one point.
        ``state`` is a :meth:`transformer_factored` result (A' and R are
        at hand); ``index`` picks one prompt of the batch. Returns the factors
        for :func:`upscale_masks`.
        """
        state = state.select(index)
        if ctx.conv1 is None:  # per image: the maps M_i and the image-only term x M_1
            w1, bias1 = up_conv_matrix(self.dec.output_upscaling[0])
            maps, rows = _map_chain(self.dec.transformer.layers, w1, bias1)
            ctx.conv1 = Conv1Cache(ctx.image_tokens[0] @ maps[0], maps, rows)
        xm, maps, rows = ctx.conv1.image_term, ctx.conv1.maps, ctx.conv1.rows
        b_aug = _factor_rows(state.updates.values, maps, rows)
        return Conv1Factors(xm, state.a_aug, b_aug, state.scale)

    def _t2i_factored(
        self, ctx: DecoderContext, name: str, attn, q_in: torch.Tensor, depth: int,
        updates: ImageUpdates, a_aug: torch.Tensor, scale: torch.Tensor,
    ) -> torch.Tensor:
        """Token -> image attention against the image tokens after ``depth`` blocks in
        factored form (a_aug (B, L, K), scale (B, L)). q_in (B, T, C) -> (B, T, C)."""
        b, t, _ = q_in.shape
        h = attn.num_heads
        d = attn.q_proj.out_features // h
        fk = self._factored_map(ctx, f"{name}.t2i.k", attn.k_proj, depth, h, values=False)
        fv = self._factored_map(ctx, f"{name}.t2i.v", attn.v_proj, depth, h, values=True)
        qh = attn.q_proj(q_in).view(b, t, h, d).transpose(1, 2) * d**-0.5  # (B, H, T, d)
        logits = _factored_logits(qh, fk, _factor_rows(updates.values, fk.maps, fk.rows),
                                  a_aug, scale)  # the key bias is a per-row constant
        a = torch.softmax(logits, dim=-1)
        out = _factored_values(a, fv, _factor_rows(updates.values, fv.maps, fv.rows),
                               a_aug, scale)
        out = out + attn.v_proj.bias.view(h, 1, d)
        return attn.out_proj(out.transpose(1, 2).reshape(b, t, h * d))

    def _i2t_factored(
        self, ctx: DecoderContext, name: str, attn, k_in: torch.Tensor, v_in: torch.Tensor,
        depth: int, updates: ImageUpdates, a_aug: torch.Tensor, scale: torch.Tensor,
    ) -> tuple:
        """:func:`_i2t` against the image tokens after ``depth`` blocks in factored form
        (a_aug (B, L, K), scale (B, L)): the image queries' projection goes through
        :func:`_factored_logits`. k_in, v_in (B, T, C) tokens."""
        b, t, _ = k_in.shape
        h = attn.num_heads
        d = attn.q_proj.out_features // h
        n = a_aug.shape[1]
        fq = self._factored_map(ctx, f"{name}.i2t.q", attn.q_proj, depth, h, values=False)
        k = attn.k_proj(k_in).view(b, t, h, d).transpose(1, 2) * d**-0.5  # (B, H, T, d)
        logits = _factored_logits(k, fq, _factor_rows(updates.values, fq.maps, fq.rows),
                                  a_aug, scale)
        logits += torch.matmul(k, attn.q_proj.bias.view(h, d, 1)).reshape(b, h * t, 1)
        a = torch.softmax(logits.view(b, h, t, n), dim=2).view(b, h * t, n)
        v = attn.v_proj(v_in).view(b, t, h, d).transpose(1, 2)
        return a, _projected_values(attn, v)

    def _selected_tokens(self, multimask: bool) -> tuple[list[int], list[int]]:
        """Mask tokens read for the output, and the output tokens that attend in the
        final attention (the IoU token and those mask tokens; the prompt tokens'
        outputs are unused)."""
        sel = list(range(1, self.dec.num_mask_tokens)) if multimask else [0]
        return sel, [0] + [1 + i for i in sel]

    def _heads(
        self, hs: torch.Tensor, sel: list[int], keys: torch.Tensor, grid: tuple[int, int],
        factors: Conv1Factors | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """IoU head and mask head on the final output tokens hs (B, 1 + len(sel), C)."""
        dec = self.dec
        iou = dec.iou_prediction_head(hs[:, 0])[:, sel]
        hyper = torch.stack(
            [dec.output_hypernetworks_mlps[i](hs[:, 1 + k]) for k, i in enumerate(sel)], 1
        )
        return self.upscale(keys, hyper, grid, factors), iou

    def factor_pays(self, n_prompt_tokens: int) -> bool:
        """True if image tokens in factored form (:meth:`conv1_factors`,
        :meth:`decode_factored`) are cheaper than the tokens themselves: the inner
        size K = D (H T + 2) well below C (few prompt tokens). Needs plain LayerNorms."""
        if not self._plain_layer_norms:
            return False
        tr = self.dec.transformer
        t = 1 + self.dec.num_mask_tokens + n_prompt_tokens
        k = len(tr.layers) * (tr.layers[0].cross_attn_image_to_token.num_heads * t + 2)
        return k <= 0.6 * tr.layers[0].norm4.normalized_shape[0]

    def final_attention(
        self, queries: torch.Tensor, qpe: torch.Tensor, keys: torch.Tensor, keys_pe: torch.Tensor
    ) -> torch.Tensor:
        """Final token -> image attention and norm: (B, T, C) tokens against (B|1, L, C)."""
        tr = self.dec.transformer
        attn = _t2i(tr.final_attn_token_to_image, queries + qpe, keys_pe, keys)
        return tr.norm_final_attn(queries + attn)

    def decode_selected(
        self,
        ctx: DecoderContext,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        select: Callable[[torch.Tensor], torch.Tensor],
        sub_batch: int = 16,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Multimask decoding of (B, N, C) sparse prompt tokens without a mask prompt,
        mask logits only where wanted (everything-mode).

        ``select`` maps IoU predictions (b, 3) to a bool (b, 3) of the outputs
        whose mask logits are wanted; ``dense`` is not read (no mask prompt).
        Returns the IoU predictions (B, 3) of the multimask outputs (mask tokens
        1-3), the selection (B, 3) bool, and the low-res logits (S, 4 Eh, 4 Ew) of
        the selected outputs in (prompt, output) order.

        Prompts go through the transformer ``sub_batch`` at a time. Only the IoU
        token goes through the final attention first (each token attends on its
        own, so this is exact); the mask logits of a sub-batch's selected outputs
        are then computed while its image tokens are at hand, one prompt at a time.
        """
        dec, grid = self.dec, ctx.grid
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        ious, chosens, lows = [], [], []
        factored = self.uses_low_rank(sparse.shape[1])
        for s in range(0, sparse.shape[0], sub_batch):
            if factored:  # the image tokens stay in factored form
                state = self.transformer_factored(ctx, sparse[s : s + sub_batch])
                hs = self.final_attention_factored(ctx, state, [0])
            else:
                q, qpe, keys, keys_pe = self.transformer(ctx, sparse[s : s + sub_batch])
                hs = self.final_attention(q[:, :1], qpe[:, :1], keys, keys_pe)
            iou = dec.iou_prediction_head(hs[:, 0])[:, 1:]
            ious.append(iou)
            chosen = select(iou)
            chosens.append(chosen)
            for j in torch.nonzero(chosen.any(dim=1)).flatten().tolist():
                mask_tokens = [1 + int(k) for k in torch.nonzero(chosen[j]).flatten()]
                rows = [1 + m for m in mask_tokens]  # positions after the IoU token
                if factored:
                    hs = self.final_attention_factored(ctx, state, rows, j)
                    factors = self.conv1_factors(ctx, state, j)
                    tokens = ctx.image_tokens  # not read with factors
                else:
                    hs = self.final_attention(q[j : j + 1, rows], out_tokens[rows][None],
                                              keys[j : j + 1], keys_pe[j : j + 1])
                    factors, tokens = None, keys[j : j + 1]
                hyper = torch.stack(
                    [dec.output_hypernetworks_mlps[m](hs[0, i]) for i, m in enumerate(mask_tokens)]
                )[None]  # (1, K, C/8)
                lows.append(self.upscale(tokens, hyper, grid, factors)[0])
        iou = torch.cat(ious)
        eh, ew = grid
        low = torch.cat(lows) if lows else iou.new_empty((0, 4 * eh, 4 * ew))
        return iou, torch.cat(chosens), low
