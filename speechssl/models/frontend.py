"""Between the extractor and the context network: normalisation, projection, masking."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GradMultiply(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (fairseq ``feature_grad_mult``)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class Frontend(nn.Module):
    """LayerNorm over extractor features, projection to the context width, input dropout, masking.

    forward: features ``(B, T, C)``, optional time mask ``(B, T)`` and channel mask ``(B, D)`` ->
    ``(x (B, T, D), normalized (B, T, C))``. Masked frames are replaced by the learned embedding;
    masked channels are zeroed. ``normalized`` are the unmasked features the quantizer reads.
    """

    def __init__(self, feature_dim: int, embed_dim: int, dropout_input: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(feature_dim)
        self.projection = nn.Linear(feature_dim, embed_dim)
        self.dropout = nn.Dropout(dropout_input)
        self.mask_emb = nn.Parameter(torch.empty(embed_dim).uniform_())

    def forward(self, features: Tensor, time_mask: Tensor | None = None,
                channel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        normalized = self.layer_norm(features)
        x = self.dropout(self.projection(normalized))
        if time_mask is not None:
            x = torch.where(time_mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        if channel_mask is not None:
            x = x.masked_fill(channel_mask.unsqueeze(1), 0.0)
        return x, normalized
