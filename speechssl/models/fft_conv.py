"""Grouped 1-D convolution through the FFT, for long kernels.

The positional convolution of wav2vec 2.0 (kernel 128, 16 groups of 48 channels at BASE) is a poor
fit for cuDNN: on an H200 it took about as long as the twelve Transformer layers together. In the
frequency domain it is one batched complex matrix product per group and frequency, a few hundred
MFLOP, plus FFTs of the input. The result equals ``F.conv1d`` up to fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def conv1d_fft(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int, groups: int) -> Tensor:
    """``F.conv1d(x, weight, bias, padding=padding, groups=groups)`` (stride and dilation 1) in fp32
    through ``torch.fft``.

    x: ``(B, C_in, T)``; weight: ``(C_out, C_in / groups, K)``; bias: ``(C_out,)``. Returns
    ``(B, C_out, T + 2 * padding - K + 1)`` in fp32, whatever the input dtype and autocast state.
    """
    batch, _, length = x.shape
    out_channels, group_in, kernel = weight.shape
    group_out = out_channels // groups
    out_length = length + 2 * padding - kernel + 1
    # Circular cross-correlation equals the linear one when the padded input fits without wrapping.
    n_fft = 1 << (length + 2 * padding - 1).bit_length()
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_f = torch.fft.rfft(F.pad(x.float(), (padding, padding)), n=n_fft)  # (B, C_in, F)
        w_f = torch.fft.rfft(weight.float(), n=n_fft).conj()  # (C_out, C_in / G, F); conj: correlation
        freqs = x_f.shape[-1]
        x_f = x_f.view(batch, groups, group_in, freqs).permute(1, 3, 0, 2)  # (G, F, B, C_in / G)
        w_f = w_f.view(groups, group_out, group_in, freqs).permute(0, 3, 2, 1)  # (G, F, C_in / G, C_out / G)
        y_f = (x_f @ w_f).permute(2, 0, 3, 1).reshape(batch, out_channels, freqs)
        y = torch.fft.irfft(y_f, n=n_fft)[..., :out_length]
        if bias is not None:
            y = y + bias.float()[:, None]
    return y
