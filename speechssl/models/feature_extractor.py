"""The convolutional waveform encoder of wav2vec 2.0 (fairseq ``ConvFeatureExtractionModel``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from speechssl.models.config import FeatureExtractorConfig


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, T)`` tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ConvBlock(nn.Module):
    """Conv1d, optional normalisation, GELU: ``(B, C_in, S) -> (B, C_out, S')``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, bias: bool,
                 norm: nn.Module | None):
        super().__init__()
        self.kernel = kernel
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return nn.functional.gelu(x)


class FeatureExtractor(nn.Module):
    """Waveforms ``(B, S)`` to frame features ``(B, T, C)``; 50 Hz at 16 kHz with the default layers.

    ``group_norm`` mode normalises each channel over time after the first conv only (fairseq
    "default", BASE); ``layer_norm`` mode normalises over channels after every conv (LARGE).
    """

    def __init__(self, config: FeatureExtractorConfig):
        super().__init__()
        blocks = []
        in_channels = 1
        for i, (channels, kernel, stride) in enumerate(config.conv_layers):
            if config.mode == "layer_norm":
                norm: nn.Module | None = ChannelLayerNorm(channels)
            elif i == 0:
                norm = nn.GroupNorm(channels, channels)
            else:
                norm = None
            blocks.append(ConvBlock(in_channels, channels, kernel, stride, config.conv_bias, norm))
            in_channels = channels
        self.blocks = nn.ModuleList(blocks)
        self.output_dim = in_channels

    @property
    def receptive_field(self) -> int:
        """Samples needed for one output frame (400 for the default layers)."""
        field = 1
        for block in reversed(self.blocks):
            field = (field - 1) * block.stride + block.kernel
        return field

    @property
    def stride(self) -> int:
        """Samples per output frame (320 for the default layers)."""
        return math.prod(block.stride for block in self.blocks)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Exact number of frames for inputs of ``lengths`` samples: ``(B,) -> (B,)``."""
        for block in self.blocks:
            lengths = torch.div(lengths - block.kernel, block.stride, rounding_mode="floor") + 1
            lengths = lengths.clamp_min(0)
        return lengths

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``(B, S)`` float waveforms to ``(B, T, C)`` features. With ``lengths (B,)`` (on the
        waveforms' device) the ``group_norm`` mode normalises each row over its own frames, so the
        valid frames of a row are what it gives alone whatever the padding; without, over all
        frames, padding included (as fairseq, torchaudio and Hugging Face)."""
        x = waveforms.unsqueeze(1)
        for i, block in enumerate(self.blocks):
            if i == 0 and lengths is not None and isinstance(block.norm, nn.GroupNorm):
                x = block.conv(x)
                frames = torch.div(lengths - block.kernel, block.stride, rounding_mode="floor") + 1
                x = nn.functional.gelu(_group_norm_over(block.norm, x, frames))
            else:
                x = block(x)
        return x.transpose(1, 2)


def _group_norm_over(norm: nn.GroupNorm, x: Tensor, frames: Tensor) -> Tensor:
    """``norm`` (one group per channel) on ``x (B, C, T)`` with each row's statistics taken over
    its first ``frames[b]`` frames only (in fp32, as GroupNorm under autocast)."""
    dtype, x = x.dtype, x.float()
    mask = (torch.arange(x.shape[-1], device=x.device) < frames[:, None]).unsqueeze(1)
    count = frames.clamp_min(1).view(-1, 1, 1).float()
    mean = x.masked_fill(~mask, 0.0).sum(-1, keepdim=True) / count
    var = (x - mean).masked_fill(~mask, 0.0).square().sum(-1, keepdim=True) / count
    y = (x - mean) * torch.rsqrt(var + norm.eps)
    if norm.affine:
        y = y * norm.weight.float()[:, None] + norm.bias.float()[:, None]
    return y.to(dtype)
