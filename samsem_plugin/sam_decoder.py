"""SAM's mask decoder for many prompts on one image embedding, with less work than
``MaskDecoder.forward`` (same function up to float rounding; see the comment block below).

:func:`decode_prompts` takes the prompt encoder's sparse embeddings ``(B, T, C)`` and a
:class:`DecoderImage` (the prompt-independent tensors of one image embedding, computed once per
image) and returns low-res mask logits ``(K, M, 4h, 4w)`` (256 x 256 for SAM's 64 x 64 embedding,
in the padded 1024-square input frame) with predicted IoU ``(K, M)``. Decoders whose design differs
from SAM's (layer count, norms, upscaling) fall back to module calls. Used by
:class:`~samsem_plugin.proposer.SamProposer` for clicks and the automatic point grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from segment_anything.modeling import MaskDecoder, Sam
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.transformer import Attention as DecoderAttention
from segment_anything.modeling.transformer import TwoWayAttentionBlock, TwoWayTransformer
from torch import nn
from torch.nn import functional as F

__all__ = ["DecoderImage", "decode_prompts"]

FACTORED_UPSCALING = False
"""Whether the first upscaling convolution also runs on the factored image tokens (fewer
operations) rather than on tokens materialised with SAM's layer norms. Both are exact algebra, but
the mask logits are sensitive to sub-ulp changes of the tokens (the tiny test model amplifies them
~100x, beyond segment-anything's own float32 error), so the materialised tokens, rounded as
SAM's, are the default."""

# -- SAM's mask decoder, prompts on one image ----------------------------------------------------
#
# Computes what ``MaskDecoder.forward`` computes for prompts without a mask input, with less work:
# (1) the image side of the first two-way attention layer (token-to-image keys and values,
# image-to-token queries) does not depend on the prompt and is computed once per image; (2) the IoU
# head needs only the transformer, so masks are upsampled and predicted only for prompts that have a
# level above the predicted-IoU threshold; (3) softmax over the few prompt tokens runs along the
# image axis.
#
# (4) Factored image tokens (SAM's design: two layers, LayerNorm, transposed-conv upscaling). The
# image-to-token attention adds to the N image tokens ``sum_h A_h V_h Wo_h^T + 1 bo^T``, a rank
# (heads x T + 1) update of the prompt-independent tokens K0 (A_h (N, T) attention weights over the
# T prompt tokens). A LayerNorm over channels keeps the form ``X = diag(s) B + L^T Z``: with B
# row-centred, ``Y = diag(s) B + L^T Z`` has centred rows ``diag(s) B + L^T Zc`` (Zc: rows of Z
# centred), per-token variance ``(s^2 |B_i|^2 + 2 s_i L_i . (B_i Z^T) + L_i Zc Zc^T L_i^T) / C``, and
# ``LN(Y) = diag(s / sigma) (B diag(gamma)) + (L / sigma)^T (Zc diag(gamma)) + 1 beta^T``. So every
# projection ``(X + PE) W`` of image tokens is ``diag(s) (B W) + (PE W) + L^T (Z W)``, with ``B W``
# and ``PE W`` computed once per image: per prompt only (N, r) x (r, c) work, r = rank of the
# update (2 x heads x T + 3 after the two layers), instead of (N, C) x (C, c). The cross terms
# ``B_i . Z_j`` for rows ``Z_j = v_h Wo_h^T`` are ``(B Wo_h) v_h^T`` with ``B Wo`` per image. The
# first upscaling convolution is a per-token linear map, factored the same way; LayerNorm2d, GELU,
# the second convolution and the hypernetwork product are computed per prompt. Exact algebra: only
# float rounding differs (rows whose variance cancels are recomputed directly, see
# ``_token_variance``).


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, C)`` → ``(B, heads, N, C / heads)`` (``Attention._separate_heads``)."""
    batch, tokens, channels = x.shape
    return x.reshape(batch, tokens, heads, channels // heads).transpose(1, 2)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (B, heads, m, k) @ b (B or 1, heads, k, n)`` → ``(B, heads, m, n)``; a ``b`` shared by
    the batch is not expanded: one product per head with the batch folded into the rows."""
    if b.shape[0] == 1 and a.shape[0] > 1:
        batch, heads, rows, inner = a.shape
        out = a.transpose(0, 1).reshape(heads, batch * rows, inner) @ b[0]
        return out.view(heads, batch, rows, -1).transpose(0, 1)
    return a @ b


def _attend(attention: DecoderAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` after the input projections: ``q, k, v`` are projected, split in heads
    ``(B or 1, heads, tokens, c)`` and broadcast over the batch.

    With many queries and few keys (image tokens attending to the prompt tokens) the scores are
    laid out keys-first, so that the softmax runs along the long contiguous axis (same values)."""
    scale = math.sqrt(q.shape[-1])
    if q.shape[-2] > 8 * k.shape[-2]:
        scores = torch.softmax(_matmul(k, q.transpose(-1, -2)) / scale, dim=-2)
        out = scores.transpose(-1, -2) @ v
    else:
        out = _matmul(torch.softmax(_matmul(q, k.transpose(-1, -2)) / scale, dim=-1), v)
    batch, heads, tokens, channels = out.shape
    return attention.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * channels))


def _factorable(decoder: MaskDecoder) -> bool:
    """Whether ``decoder`` has SAM's design, which the factored image tokens rely on."""
    transformer = decoder.transformer
    if type(transformer) is not TwoWayTransformer or len(transformer.layers) != 2:
        return False
    first, second = transformer.layers
    if not all(type(layer) is TwoWayAttentionBlock for layer in (first, second)):
        return False
    if not first.skip_first_layer_pe or second.skip_first_layer_pe:
        return False
    attentions = (
        first.cross_attn_token_to_image,
        first.cross_attn_image_to_token,
        second.cross_attn_token_to_image,
        second.cross_attn_image_to_token,
        transformer.final_attn_token_to_image,
    )
    linears_fit = all(
        type(attention) is DecoderAttention
        and all(
            type(linear) is nn.Linear and linear.bias is not None
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj)
        )
        for attention in attentions
    )
    norms_fit = all(
        type(norm) is nn.LayerNorm
        and norm.weight is not None
        and norm.bias is not None
        and tuple(norm.normalized_shape) == (transformer.embedding_dim,)
        for norm in (first.norm4, second.norm4)
    )
    return linears_fit and norms_fit and _upscaling_fits(decoder)


def _upscaling_fits(decoder: MaskDecoder) -> bool:
    """SAM's upscaling: 2x2 stride-2 transposed convolutions around a LayerNorm2d."""
    if len(decoder.output_upscaling) != 5:
        return False
    first, norm, _, second, _ = decoder.output_upscaling
    convolutions_fit = all(
        isinstance(conv, nn.ConvTranspose2d)
        and conv.kernel_size == conv.stride == (2, 2)
        and conv.padding == (0, 0)
        and conv.output_padding == (0, 0)
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.bias is not None
        for conv in (first, second)
    )
    return convolutions_fit and isinstance(norm, LayerNorm2d)


def _first_upscaling_weight(decoder: MaskDecoder) -> torch.Tensor:
    """ConvTranspose2d weight ``(C, mid, 2, 2)`` → ``(C, [2 x 2 sub-pixels] x mid)``."""
    first = decoder.output_upscaling[0]
    return first.weight.permute(0, 2, 3, 1).reshape(first.in_channels, 4 * first.out_channels)


def _centred(x: torch.Tensor) -> torch.Tensor:
    """Rows minus their mean over the last axis."""
    return x - x.mean(dim=-1, keepdim=True)


@dataclass(frozen=True)
class _FactoredImage:
    """Per-image tensors of the factored decoder (comment above; N image tokens, C channels,
    ``(1, heads, N, c)`` tensors split in the attention's heads, c = C / 2 / heads for SAM).

    Attributes:
        norm0, cross0, cross0_bias: ``|B0_i|^2 (N,)``, ``B0 Wo0`` split, ``B0 . bo0 (N,)`` with B0
            the row-centred image tokens and Wo0, bo0 layer 0's image-to-token output projection.
        k1, v1, q1: ``B1 W`` split for layer 1's token-to-image keys / values and image-to-token
            queries (no bias), B1 = ``B0 diag(gamma0)`` (layer 0's norm4).
        pe_k1, pe_q1: ``PE W + b`` split for the same keys / queries.
        norm1, cross1_first, cross1_first_bias, cross1, cross1_bias: for layer 1's norm4, with B1c
            the row-centred B1: ``|B1c_i|^2``, ``(B1c diag(gamma0)) Wo0c`` split and
            ``(B1c diag(gamma0)) . bo0c`` (Wo0, bo0 centred over channels), ``B1c Wo1`` split,
            ``B1c . (beta0 + bo1)``.
        kf, vf, pe_kf: the final attention's ``B2 W`` keys / values and ``PE W + b`` keys, split;
            B2 = ``B1c diag(gamma1)``.
        upscale: ``(N, 4 mid)`` B2 times the first upscaling convolution as a per-token matrix, or
            None unless :data:`FACTORED_UPSCALING` was on when the image was prepared (which then
            decides how its prompts are upscaled).

    For ViT-B/L/H (N = 4096, C = 256): eleven (N, 128) float32, ~22 MiB (+ 4 MiB ``upscale``).
    """

    norm0: torch.Tensor
    cross0: torch.Tensor
    cross0_bias: torch.Tensor
    k1: torch.Tensor
    v1: torch.Tensor
    q1: torch.Tensor
    pe_k1: torch.Tensor
    pe_q1: torch.Tensor
    norm1: torch.Tensor
    cross1_first: torch.Tensor
    cross1_first_bias: torch.Tensor
    cross1: torch.Tensor
    cross1_bias: torch.Tensor
    kf: torch.Tensor
    vf: torch.Tensor
    pe_kf: torch.Tensor
    upscale: torch.Tensor | None

    @staticmethod
    def of(decoder: MaskDecoder, keys: torch.Tensor, key_pe: torch.Tensor) -> _FactoredImage:
        """From the image tokens ``keys`` and their positional encoding ``key_pe``, ``(N, C)``."""
        first, second = decoder.transformer.layers
        final = decoder.transformer.final_attn_token_to_image
        out0, out1 = first.cross_attn_image_to_token.out_proj, second.cross_attn_image_to_token.out_proj
        to_image, to_token = second.cross_attn_token_to_image, second.cross_attn_image_to_token

        def split(x: torch.Tensor, attention: DecoderAttention) -> torch.Tensor:
            return _split_heads(x[None], attention.num_heads)

        base0 = _centred(keys)
        base1 = base0 * first.norm4.weight
        base1c = _centred(base1)
        base2 = base1c * second.norm4.weight
        heads0 = first.cross_attn_image_to_token
        return _FactoredImage(
            norm0=(base0 * base0).sum(-1),
            cross0=split(base0 @ out0.weight, heads0),
            cross0_bias=base0 @ out0.bias,
            k1=split(base1 @ to_image.k_proj.weight.T, to_image),
            v1=split(base1 @ to_image.v_proj.weight.T, to_image),
            q1=split(base1 @ to_token.q_proj.weight.T, to_token),
            pe_k1=split(to_image.k_proj(key_pe), to_image),
            pe_q1=split(to_token.q_proj(key_pe), to_token),
            norm1=(base1c * base1c).sum(-1),
            cross1_first=split((base1c * first.norm4.weight) @ (out0.weight - out0.weight.mean(0)), heads0),
            cross1_first_bias=(base1c * first.norm4.weight) @ (out0.bias - out0.bias.mean()),
            cross1=split(base1c @ out1.weight, to_token),
            cross1_bias=base1c @ (first.norm4.bias + out1.bias),
            kf=split(base2 @ final.k_proj.weight.T, final),
            vf=split(base2 @ final.v_proj.weight.T, final),
            pe_kf=split(final.k_proj(key_pe), final),
            upscale=base2 @ _first_upscaling_weight(decoder) if FACTORED_UPSCALING else None,
        )


@dataclass(frozen=True)
class DecoderImage:
    """The prompt-independent decoder tensors of one image embedding.

    Attributes:
        keys: ``(1, N, C)`` image tokens: embedding plus SAM's no-mask dense embedding, N = h x w.
        key_pe: ``(1, N, C)`` their positional encoding.
        first_k, first_v: ``(1, heads, N, c)`` layer-0 token-to-image key / value projections.
        first_image_q: ``(1, heads, N, c)`` layer-0 image-to-token query projection.
        grid: ``(h, w)`` of the embedding.
        factored: the per-image tensors of the factored decoder, or None (another decoder design,
            or autocast: the expanded variances need float32).

    ViT-B/L/H: 14 MiB plus 22 MiB factored.
    """

    keys: torch.Tensor
    key_pe: torch.Tensor
    first_k: torch.Tensor
    first_v: torch.Tensor
    first_image_q: torch.Tensor
    grid: tuple[int, int]
    factored: _FactoredImage | None = None

    @staticmethod
    def of(sam: Sam, features: torch.Tensor, factored: bool = True) -> DecoderImage:
        """From ``features`` ``(1, C, h, w)`` (call under ``inference_mode``); ``factored``: also
        the factored decoder's tensors, if the decoder has SAM's design."""
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        keys = (features + dense).flatten(2).permute(0, 2, 1)
        key_pe = sam.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)
        first = sam.mask_decoder.transformer.layers[0]
        to_image, to_token = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        use_factored = factored and _factorable(sam.mask_decoder)
        return DecoderImage(
            keys=keys,
            key_pe=key_pe,
            first_k=_split_heads(to_image.k_proj(keys + key_pe), to_image.num_heads),
            first_v=_split_heads(to_image.v_proj(keys), to_image.num_heads),
            first_image_q=_split_heads(to_token.q_proj(keys + key_pe), to_token.num_heads),
            grid=(int(features.shape[2]), int(features.shape[3])),
            factored=_FactoredImage.of(sam.mask_decoder, keys[0], key_pe[0]) if use_factored else None,
        )


def _query_side(
    layer: TwoWayAttentionBlock, queries: torch.Tensor, query_pe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention and ``norm1`` of the prompt tokens ``(B, T, C)``; also the token-to-image
    queries split in heads ``(B, heads, T, c)``."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    to_image = layer.cross_attn_token_to_image
    return queries, _split_heads(to_image.q_proj(queries + query_pe), to_image.num_heads)


def _two_way_transformer(
    decoder: MaskDecoder, image: DecoderImage, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward`` for ``tokens`` ``(B, T, C)`` on one image: ``(queries (B, T,
    C), image tokens (B, N, C))``."""
    transformer = decoder.transformer
    queries, query_pe, keys = tokens, tokens, image.keys
    for index, layer in enumerate(transformer.layers):
        queries, q = _query_side(layer, queries, query_pe)
        to_image = layer.cross_attn_token_to_image
        if index == 0:
            k, v = image.first_k, image.first_v
        else:
            k = _split_heads(to_image.k_proj(keys + image.key_pe), to_image.num_heads)
            v = _split_heads(to_image.v_proj(keys), to_image.num_heads)
        queries = layer.norm2(queries + _attend(to_image, q, k, v))
        queries = layer.norm3(queries + layer.mlp(queries))
        to_token = layer.cross_attn_image_to_token
        if index == 0:
            image_q = image.first_image_q
        else:
            image_q = _split_heads(to_token.q_proj(keys + image.key_pe), to_token.num_heads)
        k = _split_heads(to_token.k_proj(queries + query_pe), to_token.num_heads)
        v = _split_heads(to_token.v_proj(queries), to_token.num_heads)
        keys = layer.norm4(keys + _attend(to_token, image_q, k, v))
    final = transformer.final_attn_token_to_image
    q = _split_heads(final.q_proj(queries + query_pe), final.num_heads)
    k = _split_heads(final.k_proj(keys + image.key_pe), final.num_heads)
    v = _split_heads(final.v_proj(keys), final.num_heads)
    return transformer.norm_final_attn(queries + _attend(final, q, k, v)), keys


@dataclass(frozen=True)
class _FactoredTokens:
    """Image tokens of B prompts ``diag(scale) base + coeff^T rows`` (``base`` per image).

    Attributes:
        scale: ``(B, N)``.
        coeff: ``(B, r, N)``.
        rows: ``(B, r, C)``.
    """

    scale: torch.Tensor
    coeff: torch.Tensor
    rows: torch.Tensor

    def select(self, index: torch.Tensor) -> _FactoredTokens:
        return _FactoredTokens(self.scale[index], self.coeff[index], self.rows[index])


def _attend_factored(
    attention: DecoderAttention,
    q: torch.Tensor,
    tokens: _FactoredTokens,
    base_k: torch.Tensor,
    pe_k: torch.Tensor,
    base_v: torch.Tensor,
) -> torch.Tensor:
    """``Attention.forward`` of prompt-token queries ``q`` (projected, split: ``(B, heads, T, c)``)
    on factored image tokens, with ``base_k = base Wk^T``, ``pe_k = PE Wk^T + bk``, ``base_v = base
    Wv^T``, each ``(1, heads, N, c)``: ``(B, T, C)``."""
    batch, heads, count, channels = q.shape
    rank = tokens.rows.shape[1]
    scale = tokens.scale[:, None, None, :]
    k_rows = _split_heads(tokens.rows @ attention.k_proj.weight.T, heads)  # (B, heads, r, c)
    low_rank = (q @ k_rows.transpose(-1, -2)).view(batch, heads * count, rank) @ tokens.coeff
    scores = _matmul(q, base_k.transpose(-1, -2)) * scale + _matmul(q, pe_k.transpose(-1, -2))
    scores = scores + low_rank.view(batch, heads, count, -1)
    probs = torch.softmax(scores / math.sqrt(channels), dim=-1)  # (B, heads, T, N)
    v_rows = _split_heads(tokens.rows @ attention.v_proj.weight.T, heads)
    weights = probs.reshape(batch, heads * count, -1) @ tokens.coeff.transpose(1, 2)  # (B, heads x T, r)
    out = (
        _matmul(probs * scale, base_v)
        + weights.view(batch, heads, count, rank) @ v_rows
        + attention.v_proj.bias.view(heads, 1, channels)
    )
    return attention.out_proj(out.transpose(1, 2).reshape(batch, count, heads * channels))


def _output_rows(attention: DecoderAttention, v: torch.Tensor) -> torch.Tensor:
    """Image-to-token attention: ``v`` ``(B, heads, T, c)`` → the rows ``v_h Wo_h^T`` ``(B, heads x T,
    C)`` that the attention weights combine."""
    batch, heads, count, channels = v.shape
    weight = attention.out_proj.weight.view(-1, heads, channels).permute(1, 2, 0)  # (heads, c, C)
    return (v @ weight).view(batch, heads * count, -1)


def _token_variance(
    tokens: _FactoredTokens,
    base: Callable[[], torch.Tensor],
    base_norm: torch.Tensor,
    cross: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Per-token variance over channels of ``diag(s) base + coeff^T rows`` (base row-centred), plus
    ``eps``: ``(B, N)``.

    Args:
        base: gives the ``(N, C)`` row-centred base (needed only if some variance cancels);
            ``base_norm``: its squared row norms ``(N,)``.
        cross: ``(B, N)`` ``sum_j coeff_j (base . rows_j)``.

    Expanded as ``s^2 |base_i|^2 + 2 s_i cross_i + coeff_i Zc Zc^T coeff_i`` (Zc: centred rows);
    tokens whose variance is less than a quarter of the two square terms (cancellation) are
    recomputed from their materialised values."""
    centred = _centred(tokens.rows)
    gram = centred @ centred.transpose(1, 2)
    quadratic = ((gram @ tokens.coeff) * tokens.coeff).sum(1)
    squares = tokens.scale.square() * base_norm + quadratic
    total = squares + 2.0 * tokens.scale * cross
    cancelled = total < 0.25 * squares
    if cancelled.any():
        image_base = base()
        total = total.clone()
        for prompt in torch.nonzero(cancelled.any(dim=1)).flatten().tolist():
            token = torch.nonzero(cancelled[prompt]).flatten()
            values = tokens.scale[prompt, token, None] * image_base[token]
            values = values + tokens.coeff[prompt][:, token].T @ centred[prompt]
            total[prompt, token] = (values * values).sum(-1)
    return total / squares.new_tensor(float(centred.shape[-1])) + eps


@dataclass(frozen=True)
class _KeyUpdates:
    """The image-to-token attention updates of B prompts, ``attention^T rows`` per layer.

    Attributes:
        attention0, attention1: ``(B, heads x T, N)`` attention weights of the image tokens.
        rows0, rows1: ``(B, heads x T, C)`` the rows ``v_h Wo_h^T`` they weight.
    """

    attention0: torch.Tensor
    rows0: torch.Tensor
    attention1: torch.Tensor
    rows1: torch.Tensor

    def select(self, index: torch.Tensor) -> _KeyUpdates:
        return _KeyUpdates(
            self.attention0[index], self.rows0[index], self.attention1[index], self.rows1[index]
        )

    def keys(self, decoder: MaskDecoder, image: DecoderImage) -> torch.Tensor:
        """The image tokens after the transformer ``(B, N, C)``, with SAM's layer norms on
        materialised tokens (rounded as ``TwoWayTransformer``)."""
        keys = image.keys
        for layer, attention, rows in zip(
            decoder.transformer.layers,
            (self.attention0, self.attention1),
            (self.rows0, self.rows1),
            strict=True,
        ):
            bias = layer.cross_attn_image_to_token.out_proj.bias
            keys = layer.norm4(keys + torch.baddbmm(bias, attention.transpose(1, 2), rows))
        return keys


def _factored_transformer(
    decoder: MaskDecoder, image: DecoderImage, tokens: torch.Tensor
) -> tuple[torch.Tensor, _FactoredTokens, _KeyUpdates]:
    """:func:`_two_way_transformer` with factored image tokens (SAM's design only): ``(queries (B,
    T, C), image tokens (base B2 of :class:`_FactoredImage`), their updates)``."""
    factored = image.factored
    assert factored is not None
    transformer = decoder.transformer
    first, second = transformer.layers

    def base0() -> torch.Tensor:
        return _centred(image.keys[0])

    def base1c() -> torch.Tensor:
        return _centred(base0() * first.norm4.weight)

    # layer 0: image side precomputed
    queries, query_pe = tokens, tokens
    queries, q = _query_side(first, queries, query_pe)
    queries = first.norm2(queries + _attend(first.cross_attn_token_to_image, q, image.first_k, image.first_v))
    queries = first.norm3(queries + first.mlp(queries))
    to_token = first.cross_attn_image_to_token
    k = _split_heads(to_token.k_proj(queries + query_pe), to_token.num_heads)
    v0 = _split_heads(to_token.v_proj(queries), to_token.num_heads)
    batch, heads, count, channels = k.shape
    scores = _matmul(k, image.first_image_q.transpose(-1, -2)) / math.sqrt(channels)
    attention0 = torch.softmax(scores, dim=-2).reshape(batch, heads * count, -1)  # A0: (B, heads x T, N)
    ones = attention0.new_ones(batch, 1, attention0.shape[-1])
    update0 = torch.cat([_output_rows(to_token, v0), to_token.out_proj.bias.expand(batch, 1, -1)], dim=1)
    stage0 = _FactoredTokens(ones[:, 0], torch.cat([attention0, ones], dim=1), update0)
    cross0 = _matmul(v0, factored.cross0.transpose(-1, -2)).reshape(batch, heads * count, -1)
    cross = (attention0 * cross0).sum(1)
    norm = first.norm4
    inverse0 = _token_variance(stage0, base0, factored.norm0, cross + factored.cross0_bias, norm.eps).rsqrt()
    stage1 = _FactoredTokens(
        inverse0,
        torch.cat([stage0.coeff * inverse0[:, None], ones], dim=1),
        torch.cat([_centred(update0) * norm.weight, norm.bias.expand(batch, 1, -1)], dim=1),
    )
    # layer 1: image side factored
    queries, q = _query_side(second, queries, query_pe)
    to_image = second.cross_attn_token_to_image
    attended = _attend_factored(to_image, q, stage1, factored.k1, factored.pe_k1, factored.v1)
    queries = second.norm2(queries + attended)
    queries = second.norm3(queries + second.mlp(queries))
    to_token = second.cross_attn_image_to_token
    k = _split_heads(to_token.k_proj(queries + query_pe), to_token.num_heads)
    v1 = _split_heads(to_token.v_proj(queries), to_token.num_heads)
    batch, heads, count, channels = k.shape
    q_rows = _split_heads(stage1.rows @ to_token.q_proj.weight.T, heads)  # (B, heads, r1, c)
    low_rank = (k @ q_rows.transpose(-1, -2)).view(batch, heads * count, -1) @ stage1.coeff
    scores = _matmul(k, factored.q1.transpose(-1, -2)) * stage1.scale[:, None, None, :]
    scores = scores + _matmul(k, factored.pe_q1.transpose(-1, -2)) + low_rank.view(batch, heads, count, -1)
    attention1 = torch.softmax(scores / math.sqrt(channels), dim=-2).reshape(batch, heads * count, -1)
    norm = second.norm4
    merged_bias = first.norm4.bias + to_token.out_proj.bias
    joint = _FactoredTokens(
        stage1.scale,
        torch.cat([stage1.coeff[:, :-1], attention1, ones], dim=1),
        torch.cat([stage1.rows[:, :-1], _output_rows(to_token, v1), merged_bias.expand(batch, 1, -1)], dim=1),
    )
    first_heads = first.cross_attn_image_to_token.num_heads
    first_cross = _matmul(v0, factored.cross1_first.transpose(-1, -2)).reshape(batch, first_heads * count, -1)
    second_cross = _matmul(v1, factored.cross1.transpose(-1, -2)).reshape(batch, heads * count, -1)
    cross = (
        inverse0 * ((attention0 * first_cross).sum(1) + factored.cross1_first_bias)
        + (attention1 * second_cross).sum(1)
        + factored.cross1_bias
    )
    inverse1 = _token_variance(joint, base1c, factored.norm1, cross, norm.eps).rsqrt()
    stage2 = _FactoredTokens(
        joint.scale * inverse1,
        torch.cat([joint.coeff * inverse1[:, None], ones], dim=1),
        torch.cat([_centred(joint.rows) * norm.weight, norm.bias.expand(batch, 1, -1)], dim=1),
    )
    # final attention
    final = transformer.final_attn_token_to_image
    q = _split_heads(final.q_proj(queries + query_pe), final.num_heads)
    attended = _attend_factored(final, q, stage2, factored.kf, factored.pe_kf, factored.vf)
    updates = _KeyUpdates(attention0, update0[:, :-1], attention1, joint.rows[:, -1 - heads * count : -1])
    return transformer.norm_final_attn(queries + attended), stage2, updates


def decode_prompts(
    decoder: MaskDecoder,
    image: DecoderImage,
    sparse: torch.Tensor,
    *,
    multimask: bool = True,
    pred_iou_thresh: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM's mask outputs for ``B`` prompts given as sparse embeddings ``(B, T, C)`` (no mask input).

    Args:
        multimask: SAM's three granularity levels (True) or its single-output mask.
        pred_iou_thresh: if > 0, masks are predicted only for the prompts with a level whose
            predicted IoU exceeds it.

    Returns:
        low-res logits ``(K, M, 4h, 4w)`` and predicted IoU ``(K, M)`` (M = 3 or 1) of the ``K``
        decoded prompts, and their indices ``(K,) int64`` into the batch.
    """
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse), dim=1)
    if image.factored is not None:
        queries, factored_keys, updates = _factored_transformer(decoder, image, tokens)
        keys = updates if image.factored.upscale is None else factored_keys
    else:
        queries, keys = _two_way_transformer(decoder, image, tokens)
    levels = range(1, decoder.num_mask_tokens) if multimask else range(1)
    iou = decoder.iou_prediction_head(queries[:, 0])[:, levels.start : levels.stop]
    decoded = torch.arange(len(iou), device=iou.device)
    if pred_iou_thresh > 0.0:
        decoded = torch.nonzero((iou > pred_iou_thresh).any(dim=1)).flatten()
        keys = keys.select(decoded) if isinstance(keys, (_FactoredTokens, _KeyUpdates)) else keys[decoded]
        queries, iou = queries[decoded], iou[decoded]
    if len(decoded) == 0:
        height, width = (4 * size for size in image.grid)
        return iou.new_zeros((0, iou.shape[1], height, width)), iou, decoded
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + i]) for i in levels], dim=1)
    if isinstance(keys, _KeyUpdates):
        keys = keys.keys(decoder, image)
    elif isinstance(keys, _FactoredTokens):
        low_rank = keys.rows @ _first_upscaling_weight(decoder)  # (B, r, 4 mid)
        first = image.factored.upscale * keys.scale[..., None] + keys.coeff.transpose(1, 2) @ low_rank
        return _upscaled_masks(decoder, first, hyper, image.grid, first_done=True), iou, decoded
    return _upscaled_masks(decoder, keys, hyper, image.grid), iou, decoded


def _upscaled_masks(
    decoder: MaskDecoder,
    keys: torch.Tensor,
    hyper: torch.Tensor,
    grid: tuple[int, int],
    first_done: bool = False,
) -> torch.Tensor:
    """``hyper @ output_upscaling(image tokens)``: ``(B, M, 4h, 4w)`` low-res mask logits.

    Args:
        keys: ``(B, h*w, C)`` image tokens after the transformer (row-major grid ``(h, w)``), or
            with ``first_done`` (SAM's design only) already multiplied by the first convolution's
            weight (:func:`_first_upscaling_weight`, no bias): ``(B, h*w, 4 mid)``.
        hyper: ``(B, M, C / 8)`` hypernetwork outputs of the M mask tokens.

    SAM's upscaling (two 2x2 stride-2 transposed convolutions, LayerNorm2d and GELU) maps every
    token to its own 4x4 output pixels, so it is computed token-major as two matrix products and a
    layer norm over channels (no image-layout copies), and the M masks are put in image layout
    last. Falls back to the modules for any other upscaling design.
    """
    if not _upscaling_fits(decoder):
        batch, _, channels = keys.shape
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(batch, channels, *grid))
        batch, channels, height, width = upscaled.shape
        return (hyper @ upscaled.view(batch, channels, height * width)).view(batch, -1, height, width)
    first, norm, first_act, second, second_act = decoder.output_upscaling
    batch, tokens, _ = keys.shape
    height, width = grid
    mid, out = first.out_channels, second.out_channels
    flat = keys.reshape(batch * tokens, -1)
    if first_done:
        x = flat + first.bias.repeat(4)
    else:
        x = torch.addmm(first.bias.repeat(4), flat, _first_upscaling_weight(decoder))
    x = first_act(F.layer_norm(x.view(-1, mid), (mid,), norm.weight, norm.bias, norm.eps))
    x = torch.addmm(second.bias.repeat(4), x, second.weight.permute(0, 2, 3, 1).reshape(mid, 4 * out))
    x = second_act(x.view(batch, tokens * 16, out))
    masks = x @ hyper.transpose(1, 2)  # (B, tokens x 4 x 4, M)
    levels = masks.shape[-1]
    # token (i, j), first sub-pixel (a, b), second (c, d) → pixel (4i + 2a + c, 4j + 2b + d)
    masks = masks.view(batch, height, width, 2, 2, 2, 2, levels).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return masks.reshape(batch, levels, 4 * height, 4 * width)
