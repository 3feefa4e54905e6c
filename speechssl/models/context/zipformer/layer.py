"""The Zipformer layer and its modules (icefall's Zipformer2 ``ZipformerEncoderLayer``), batch-first.

One layer: attention weights computed once from the input and compact relative positions; a
feed-forward; non-linear attention (reusing the first head's weights); self-attention; a
convolution module; a feed-forward; the mid-layer bypass; a second self-attention (same weights);
a second convolution module; a third feed-forward; BiasNorm; the end bypass. Parameter names
follow the reference, so its checkpoints load by name.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.models.context.zipformer.scaling import (
    Balancer,
    BiasNorm,
    FloatLike,
    ScheduledFloat,
    Whiten,
    chance,
    limit_param_value,
    penalize_abs_values_gt,
    read,
    scaled_linear,
    swoosh_l,
    swoosh_r,
    whitening_schedule,
)

MASKED_SCORE = -1000.0  # exp(-1000) is exactly 0, and no row of scores is left all -inf


def compact_relative_positions(offsets: Tensor, dim: int, length_factor: float = 1.0) -> Tensor:
    """Compact relative positional encodings ``(N, dim)`` of integer ``offsets (N,)``: the offset is
    compressed logarithmically, mapped through atan to a finite interval, then Fourier features;
    the last channel is a constant 1 (a bias)."""
    x = offsets.float().unsqueeze(1)
    freqs = 1 + torch.arange(dim // 2, device=offsets.device)
    compression = dim ** 0.5
    compressed = compression * x.sign() * ((x.abs() + compression).log() - math.log(compression))
    angles = (compressed / (length_factor * dim / (2.0 * math.pi))).atan() * freqs
    pe = torch.stack((angles.cos(), angles.sin()), dim=-1).reshape(len(offsets), dim)
    pe[:, -1] = 1.0
    return pe


class RelPositionAttentionWeights(nn.Module):
    """Attention weights ``(B, H, T, S)`` from queries, keys and a positional query per head; the
    1/sqrt(d) scaling lives in ``in_proj``'s initial scale."""

    def __init__(self, embed_dim: int, pos_dim: int, num_heads: int, query_head_dim: int, pos_head_dim: int):
        super().__init__()
        self.num_heads, self.query_head_dim, self.pos_head_dim = num_heads, query_head_dim, pos_head_dim
        self.in_proj = scaled_linear(embed_dim, (2 * query_head_dim + pos_head_dim) * num_heads,
                                     initial_scale=query_head_dim ** -0.25)
        self.whiten_keys = Whiten(num_heads, whitening_schedule(3.0), (0.025, 0.25), 0.025)
        self.balance_keys = Balancer(-1, 0.4, 0.6, min_abs=0.0, max_abs=100.0, prob=0.025)
        self.linear_pos = scaled_linear(pos_dim, num_heads * pos_head_dim, bias=False, initial_scale=0.05)
        self.pos_emb_skip_rate = ScheduledFloat((0.0, 0.5), (4000.0, 0.0))

    def forward(self, x: Tensor, pos_emb: Tensor, key_padding_mask: Tensor | None = None,
                attn_mask: Tensor | None = None, cached_key: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: ``(B, T, C)``; pos_emb: ``(L + 2T - 1, pos_dim)`` for offsets ``-(L+T-1) .. T-1``;
        cached_key: ``(B, L, H*Dq)`` keys of ``L`` earlier frames (streaming). key_padding_mask:
        ``(B, L + T)``; attn_mask: ``(T, L + T)``; True = not attended. Returns the weights
        ``(B, H, T, L + T)`` and the keys ``(B, L + T, H*Dq)``."""
        batch, length, _ = x.shape
        heads, dq, dp = self.num_heads, self.query_head_dim, self.pos_head_dim
        q, k, p = self.in_proj(x).split([heads * dq, heads * dq, heads * dp], dim=-1)
        k = self.whiten_keys(self.balance_keys(k))
        if cached_key is not None:
            k = torch.cat((cached_key, k), dim=1)
        keys = k
        sources = k.shape[1]
        q = q.view(batch, length, heads, dq).transpose(1, 2)
        k = k.view(batch, sources, heads, dq).permute(0, 2, 3, 1)
        scores = q @ k  # (B, H, T, S)
        skip_positions = self.training and chance(read(self.pos_emb_skip_rate), x.device)
        if skip_positions is not True:
            pos = self.linear_pos(pos_emb).view(-1, heads, dp).permute(1, 2, 0)  # (H, Dp, L + 2T - 1)
            p = p.view(batch, length, heads, dp).transpose(1, 2)
            pos_scores = (p @ pos).contiguous()  # (B, H, T, L + 2T - 1), by relative offset
            s0, s1, s2, s3 = pos_scores.stride()
            # Query i, source j reads offset j - i - L: column (T - 1) - i + j.
            pos_scores = pos_scores.as_strided((batch, heads, length, sources), (s0, s1, s2 - s3, s3),
                                               storage_offset=s3 * (length - 1))
            if skip_positions is not False:
                pos_scores = torch.where(skip_positions, 0.0, pos_scores)
            scores = scores + pos_scores
        penalize = self.training and chance(0.1, x.device)
        if penalize is not False:
            scores = penalize_abs_values_gt(scores, limit=25.0, penalty=1e-4, on=penalize)
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, MASKED_SCORE)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], MASKED_SCORE)
        return scores.softmax(dim=-1), keys


class SelfAttention(nn.Module):
    """Values weighted by precomputed attention weights, then an output projection."""

    def __init__(self, embed_dim: int, num_heads: int, value_head_dim: int):
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, num_heads * value_head_dim)
        self.out_proj = scaled_linear(num_heads * value_head_dim, embed_dim, initial_scale=0.05)
        self.whiten = Whiten(1, whitening_schedule(7.5, ratio=3.0), (0.025, 0.25), 0.01)

    def forward(self, x: Tensor, weights: Tensor, cached_values: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: ``(B, T, C)``; weights: ``(B, H, T, L + T)``; cached_values: ``(B, L, H*Dv)``.
        Returns ``(B, T, C)`` and the values ``(B, L + T, H*Dv)``."""
        values = self.in_proj(x)
        if cached_values is not None:
            values = torch.cat((cached_values, values), dim=1)
        batch, sources, _ = values.shape
        heads = weights.shape[1]
        out = weights @ values.view(batch, sources, heads, -1).transpose(1, 2)
        out = out.transpose(1, 2).reshape(batch, x.shape[1], -1)
        return self.whiten(self.out_proj(out)), values


class NonlinAttention(nn.Module):
    """A convolution module with the convolution replaced by one head's attention weights:
    ``out_proj(attend(x * tanh(s)) * y)`` for ``s, x, y`` from one projection."""

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.in_proj = nn.Linear(channels, 3 * hidden_channels)
        self.balancer = Balancer(-1, ScheduledFloat((0.0, 0.25), (20000.0, 0.05)),
                                 ScheduledFloat((0.0, 0.75), (20000.0, 0.95)), min_abs=0.5, max_abs=5.0)
        self.out_proj = scaled_linear(hidden_channels, channels, initial_scale=0.05)
        self.whiten1 = Whiten(1, whitening_schedule(5.0), (0.025, 0.25), 0.01)
        self.whiten2 = Whiten(1, whitening_schedule(5.0, ratio=3.0), (0.025, 0.25), 0.01)

    def forward(self, x: Tensor, weights: Tensor, cached_x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: ``(B, T, C)``; weights: ``(B, 1, T, L + T)``; cached_x: ``(B, L, hidden)``, the gated
        inputs of ``L`` earlier frames. Returns ``(B, T, C)`` and the gated inputs ``(B, L + T, hidden)``."""
        s, v, y = self.in_proj(x).chunk(3, dim=-1)
        gated = self.whiten1(v) * torch.tanh(self.balancer(s))
        if cached_x is not None:
            gated = torch.cat((cached_x, gated), dim=1)
        out = (weights[:, 0] @ gated) * y
        return self.whiten2(self.out_proj(out)), gated


class ActivationDropoutLinear(nn.Module):
    """Swoosh activation, dropout (its mask shared over time), then a linear map; ``weight`` and
    ``bias`` sit directly on the module as in the reference's ``ActivationDropoutAndLinear``."""

    def __init__(self, in_channels: int, out_channels: int, activation: str, dropout: FloatLike,
                 initial_scale: float):
        super().__init__()
        linear = scaled_linear(in_channels, out_channels, initial_scale=initial_scale)
        self.weight, self.bias = linear.weight, linear.bias
        self.activation = swoosh_l if activation == "swoosh_l" else swoosh_r
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        """x: ``(B, T, C_in)`` -> ``(B, T, C_out)``."""
        x = self.activation(x)
        p = read(self.dropout)
        if self.training and (isinstance(p, Tensor) or p > 0):
            keep = torch.rand(x.shape[0], 1, x.shape[2], device=x.device) > p
            x = x * keep.to(x.dtype) / (1.0 - p)
        return F.linear(x, self.weight, self.bias)


class FeedForward(nn.Module):
    """Linear, SwooshL, dropout, linear."""

    def __init__(self, embed_dim: int, hidden_dim: int, dropout: FloatLike):
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, hidden_dim)
        self.hidden_balancer = Balancer(-1, 0.3, 1.0, min_abs=0.75, max_abs=5.0)
        self.out_proj = ActivationDropoutLinear(hidden_dim, embed_dim, "swoosh_l", dropout, initial_scale=0.1)
        self.out_whiten = Whiten(1, whitening_schedule(7.5), (0.025, 0.25), 0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_whiten(self.out_proj(self.hidden_balancer(self.in_proj(x))))


class ChunkCausalDepthwiseConv1d(nn.Module):
    """A depthwise convolution that is causal by chunks: a causal convolution of half the width
    plus a full-width convolution inside each chunk, scaled by learned factors near the chunk's
    edges. Inside a chunk a frame sees the whole chunk, as the chunk attention mask allows."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.causal_conv = nn.Conv1d(channels, channels, (kernel_size + 1) // 2, groups=channels)
        self.chunkwise_conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.chunkwise_conv_scale = nn.Parameter(torch.zeros(2, channels, kernel_size))
        with torch.no_grad():
            nn.init.uniform_(self.causal_conv.bias, -0.1, 0.1)

    def _chunk_scale(self, chunk_size: int) -> Tensor:
        """``(C, chunk_size)``: 1 plus the learned corrections at the chunk's left and right edges."""
        left, right = self.chunkwise_conv_scale
        if chunk_size < self.kernel_size:
            left, right = left[:, :chunk_size], right[:, -chunk_size:]
        else:
            pad = left.new_zeros(left.shape[0], chunk_size - self.kernel_size)
            left, right = torch.cat((left, pad), dim=-1), torch.cat((pad, right), dim=-1)
        return 1.0 + left + right

    def forward(self, x: Tensor, chunk_size: int = -1, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: ``(B, C, T)``; cache: ``(B, C, k // 2)`` earlier inputs (zeros at the start), for
        streaming, where ``x`` is one chunk. Returns ``(B, C, T)`` and the new cache."""
        batch, channels, length = x.shape
        left_pad = self.kernel_size // 2
        if chunk_size < 0 or chunk_size > length:
            chunk_size = length
        history = x.new_zeros(batch, channels, left_pad) if cache is None else cache
        padded = torch.cat((history, x), dim=-1)
        causal = self.causal_conv(padded)
        right_pad = -length % chunk_size
        chunks = F.pad(x, (0, right_pad)).view(batch, channels, -1, chunk_size).transpose(1, 2)
        chunks = self.chunkwise_conv(chunks.reshape(-1, channels, chunk_size)) * self._chunk_scale(chunk_size)
        chunks = chunks.view(batch, -1, channels, chunk_size).transpose(1, 2).reshape(batch, channels, -1)
        return chunks[..., :length] + causal, padded[..., padded.shape[-1] - left_pad:]


class ConvolutionModule(nn.Module):
    """Linear to 2C, sigmoid gate, depthwise convolution (chunk-causal when ``causal``), SwooshR,
    linear. Padded frames are zeroed before the convolution."""

    def __init__(self, channels: int, kernel_size: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.in_proj = nn.Linear(channels, 2 * channels)
        self.balancer1 = Balancer(-1, ScheduledFloat((0.0, 0.05), (8000.0, 0.025)), 1.0, min_abs=1.5,
                                  max_abs=ScheduledFloat((0.0, 5.0), (8000.0, 10.0), default=1.0))
        self.depthwise_conv = (ChunkCausalDepthwiseConv1d(channels, kernel_size) if causal else
                               nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels))
        self.balancer2 = Balancer(1, ScheduledFloat((0.0, 0.1), (8000.0, 0.05)), 1.0,
                                  min_abs=ScheduledFloat((0.0, 0.2), (20000.0, 0.5)), max_abs=10.0)
        self.whiten = Whiten(1, whitening_schedule(7.5), (0.025, 0.25), 0.01)
        self.out_proj = ActivationDropoutLinear(channels, channels, "swoosh_r", 0.0, initial_scale=0.05)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, chunk_size: int = -1,
                cache: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x: ``(B, T, C)``; padding_mask: ``(B, T)``. Returns ``(B, T, C)`` and, when causal, the
        convolution cache for the next chunk."""
        x, s = self.in_proj(x).chunk(2, dim=-1)
        x = x * torch.sigmoid(self.balancer1(s))
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x.transpose(1, 2)
        new_cache = None
        if self.causal:
            x, new_cache = self.depthwise_conv(x, chunk_size, cache)
        else:
            x = self.depthwise_conv(x)
        x = self.whiten(self.balancer2(x).transpose(1, 2))
        return self.out_proj(x), new_cache


class Bypass(nn.Module):
    """``x_orig + (x - x_orig) * scale`` with a learned per-channel ``scale`` (``bypass_scale``),
    held in ``[scale_min, scale_max]`` during training; with probability ``skip_rate`` a training
    sequence skips the module altogether (scale 0)."""

    def __init__(self, embed_dim: int, skip_rate: FloatLike = 0.0,
                 scale_min: FloatLike | None = None, scale_max: FloatLike = 1.0):
        super().__init__()
        self.bypass_scale = nn.Parameter(torch.full((embed_dim,), 0.5))
        self.skip_rate = skip_rate
        self.scale_min = ScheduledFloat((0.0, 0.9), (20000.0, 0.2), default=0.0) if scale_min is None else scale_min
        self.scale_max = scale_max

    def forward(self, x_orig: Tensor, x: Tensor) -> Tensor:
        scale = self.bypass_scale
        if self.training:
            scale = limit_param_value(scale, read(self.scale_min), read(self.scale_max), True)
            skip_rate = read(self.skip_rate)
            if isinstance(skip_rate, Tensor) or skip_rate > 0:
                keep = torch.rand(x.shape[0], 1, 1, device=x.device) > skip_rate
                scale = scale * keep.to(scale.dtype)
        return x_orig + (x - x_orig) * scale


def _sequence_keep(x: Tensor, rate: FloatLike, training: bool) -> Tensor | None:
    """A ``(B, 1, 1)`` 0/1 mask that drops whole sequences with probability ``rate`` in training."""
    if not training:
        return None
    rate = read(rate)
    if not isinstance(rate, Tensor) and rate == 0.0:
        return None
    return (torch.rand(x.shape[0], 1, 1, device=x.device) > rate).to(x.dtype)


def _apply(x: Tensor, keep: Tensor | None) -> Tensor:
    return x if keep is None else x * keep


class ZipformerLayer(nn.Module):
    """One Zipformer layer on ``(B, T, C)``. ``streaming`` state per layer: keys, non-linear
    attention inputs, values of both self-attentions (the last ``L`` frames each) and the two
    convolution caches."""

    def __init__(self, embed_dim: int, pos_dim: int, num_heads: int, query_head_dim: int, pos_head_dim: int,
                 value_head_dim: int, feedforward_dim: int, dropout: FloatLike, cnn_module_kernel: int,
                 causal: bool):
        super().__init__()
        self.embed_dim, self.cnn_module_kernel = embed_dim, cnn_module_kernel
        self.bypass = Bypass(embed_dim)  # its skip rate is set by the stack (layer warm-up)
        self.bypass_mid = Bypass(embed_dim)
        self.attention_skip_rate = ScheduledFloat((0.0, 0.2), (4000.0, 0.05), (16000, 0.0), default=0)
        self.conv_skip_rate = ScheduledFloat((0.0, 0.2), (4000.0, 0.05), (16000, 0.0), default=0)
        self.const_attention_rate = ScheduledFloat((0.0, 0.25), (4000.0, 0.025), default=0)
        self.ff2_skip_rate = ScheduledFloat((0.0, 0.1), (4000.0, 0.01), (50000.0, 0.0))
        self.ff3_skip_rate = ScheduledFloat((0.0, 0.1), (4000.0, 0.01), (50000.0, 0.0))
        self.self_attn_weights = RelPositionAttentionWeights(embed_dim, pos_dim, num_heads, query_head_dim,
                                                             pos_head_dim)
        self.self_attn1 = SelfAttention(embed_dim, num_heads, value_head_dim)
        self.self_attn2 = SelfAttention(embed_dim, num_heads, value_head_dim)
        self.feed_forward1 = FeedForward(embed_dim, feedforward_dim * 3 // 4, copy.deepcopy(dropout))
        self.feed_forward2 = FeedForward(embed_dim, feedforward_dim, copy.deepcopy(dropout))
        self.feed_forward3 = FeedForward(embed_dim, feedforward_dim * 5 // 4, copy.deepcopy(dropout))
        self.nonlin_attention = NonlinAttention(embed_dim, 3 * embed_dim // 4)
        self.conv_module1 = ConvolutionModule(embed_dim, cnn_module_kernel, causal)
        self.conv_module2 = ConvolutionModule(embed_dim, cnn_module_kernel, causal)
        self.norm = BiasNorm(embed_dim)
        self.balancer1 = Balancer(-1, 0.45, 0.55, min_abs=0.2, max_abs=4.0)
        self.balancer_na = Balancer(-1, 0.3, 0.7, min_abs=ScheduledFloat((0.0, 0.004), (4000.0, 0.02)), prob=0.05)
        self.balancer_ff2 = Balancer(-1, 0.3, 0.7, min_abs=ScheduledFloat((0.0, 0.0), (4000.0, 0.1), default=0.0),
                                     max_abs=2.0, prob=0.05)
        self.balancer_ff3 = Balancer(-1, 0.3, 0.7, min_abs=ScheduledFloat((0.0, 0.0), (4000.0, 0.2), default=0.0),
                                     max_abs=4.0, prob=0.05)
        self.whiten = Whiten(1, whitening_schedule(4.0, ratio=3.0), (0.025, 0.25), 0.01)
        self.balancer2 = Balancer(-1, 0.45, 0.55, min_abs=0.1, max_abs=4.0)

    def init_state(self, batch_size: int, left_frames: int, device: torch.device | None = None) -> list[Tensor]:
        """The streaming state before the first chunk, all zeros: keys ``(B, L, H*Dq)``, gated
        non-linear attention inputs ``(B, L, 3C/4)``, values of each self-attention ``(B, L, H*Dv)``
        and the two convolution caches ``(B, C, kernel // 2)``."""
        weights, values = self.self_attn_weights, self.self_attn1.in_proj.out_features
        widths = [weights.num_heads * weights.query_head_dim, self.nonlin_attention.hidden_channels, values, values]
        conv_cache = (batch_size, self.embed_dim, self.cnn_module_kernel // 2)
        return ([torch.zeros(batch_size, left_frames, width, device=device) for width in widths]
                + [torch.zeros(conv_cache, device=device), torch.zeros(conv_cache, device=device)])

    def _conv_then_feed_forward(self, x: Tensor, conv_module: ConvolutionModule, conv_cache: Tensor | None,
                                feed_forward: FeedForward, balancer: Balancer, ff_skip_rate: FloatLike,
                                frame_padding: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor | None]:
        """A convolution module then a balanced feed-forward, each residual and skipped on a random
        share of the sequences in training. Returns ``x`` and the convolution's new cache."""
        conv_keep = _sequence_keep(x, self.conv_skip_rate, self.training)
        conv, conv_cache = conv_module(x, frame_padding, chunk_size, conv_cache)
        x = x + _apply(conv, conv_keep)
        ff_keep = _sequence_keep(x, ff_skip_rate, self.training)
        return x + _apply(balancer(feed_forward(x)), ff_keep), conv_cache

    def forward(self, x: Tensor, pos_emb: Tensor, padding_mask: Tensor | None = None,
                attn_mask: Tensor | None = None, chunk_size: int = -1,
                state: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor] | None]:
        """x: ``(B, T, C)``; pos_emb: ``(L + 2T - 1, pos_dim)``; padding_mask: ``(B, L + T)``;
        attn_mask: ``(T, L + T)``. ``state`` (streaming, eval only): the six caches of
        :meth:`init_state`; the new ones come back, else None."""
        training = self.training
        x_orig = x
        cached_key = cached_na = cached_v1 = cached_v2 = conv1 = conv2 = None
        if state is not None:
            cached_key, cached_na, cached_v1, cached_v2, conv1, conv2 = state
        left = 0 if cached_key is None else cached_key.shape[1]
        frame_padding = None if padding_mask is None else padding_mask[:, left:]

        weights, keys = self.self_attn_weights(x, pos_emb, padding_mask, attn_mask, cached_key)
        x = x + self.feed_forward1(x)
        attn_keep = _sequence_keep(x, self.attention_skip_rate, training)

        first = weights[:, :1]
        flatten = training and chance(read(self.const_attention_rate), x.device)
        if flatten is not False:
            # Uniform weights over the attended frames: the module learns to average over time.
            flat = (first > 0.0).to(first.dtype)
            flat = flat / flat.sum(-1, keepdim=True)
            first = flat if flatten is True else torch.where(flatten, flat, first)
        na, gated = self.nonlin_attention(x, first, cached_na)
        x = x + _apply(self.balancer_na(na), attn_keep)
        attn, values1 = self.self_attn1(x, weights, cached_v1)
        x = x + _apply(attn, attn_keep)

        x, conv1 = self._conv_then_feed_forward(x, self.conv_module1, conv1, self.feed_forward2, self.balancer_ff2,
                                                self.ff2_skip_rate, frame_padding, chunk_size)

        x = self.bypass_mid(x_orig, x)

        attn, values2 = self.self_attn2(x, weights, cached_v2)
        x = x + _apply(attn, attn_keep)
        x, conv2 = self._conv_then_feed_forward(x, self.conv_module2, conv2, self.feed_forward3, self.balancer_ff3,
                                                self.ff3_skip_rate, frame_padding, chunk_size)

        x = self.norm(self.balancer1(x))
        x = self.bypass(x_orig, x)
        x = self.whiten(self.balancer2(x))
        if state is None:
            return x, None
        keep = cached_key.shape[1]
        new_state = [keys[:, keys.shape[1] - keep:], gated[:, gated.shape[1] - keep:],
                     values1[:, values1.shape[1] - keep:], values2[:, values2.shape[1] - keep:], conv1, conv2]
        return x, new_state
