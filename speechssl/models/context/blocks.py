"""The blocks the Transformer and the Conformer share: the convolutional positional embedding,
multi-head self-attention with key padding, and the feed-forward module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from speechssl.models.fft_conv import conv1d_fft

ACTIVATIONS = {"swish": F.silu, "gelu": F.gelu}


class ConvPositionalEmbedding(nn.Module):
    """Grouped, weight-normalised conv over time, then GELU: ``(B, T, D) -> (B, T, D)``.

    ``use_fft``: compute the convolution through the FFT (:func:`conv1d_fft`, equal up to fp32
    rounding and many times faster on a GPU than cuDNN's grouped kernels); None, the default, does
    so on CUDA and keeps ``nn.Conv1d`` on the CPU.
    """

    def __init__(self, dim: int, kernel: int, groups: int, dropout: float):
        super().__init__()
        conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4 * (1.0 - dropout) / (kernel * dim)))
        nn.init.zeros_(conv.bias)
        self.conv = weight_norm(conv, name="weight", dim=2)
        self.use_fft: bool | None = None

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        x = x.transpose(1, 2)
        if self.use_fft or (self.use_fft is None and x.is_cuda):
            device = x.device.type
            # The dtype nn.Conv1d would give: autocast's, else the input's.
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            y = conv1d_fft(x, self.conv.weight, self.conv.bias, self.conv.padding[0], self.conv.groups).to(dtype)
        else:
            y = self.conv(x)
        return F.gelu(y[..., :length]).transpose(1, 2)  # an even kernel yields one extra frame


class SelfAttention(nn.Module):
    """Multi-head self-attention with key padding: ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        """attn_mask: ``(B, 1, 1, T)`` bool, True where a key may be attended."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(batch, length, dim))


class FeedForward(nn.Module):
    """``Linear -> activation -> dropout -> Linear -> dropout``: ``(B, T, D) -> (B, T, D)``.

    activation: a name of :data:`ACTIVATIONS` (GELU in the Transformer, Swish in the Conformer).
    """

    def __init__(self, dim: int, hidden: int, activation_dropout: float, dropout: float, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = ACTIVATIONS[activation]
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.activation_dropout(self.activation(self.fc1(x)))))
