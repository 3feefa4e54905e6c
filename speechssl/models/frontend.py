"""Between the extractor and the context network: normalisation, projection, masking."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from speechssl.models.masker import Masker, MaskingConfig


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

    forward: features ``(B, T, C)``, optional time mask ``(B, T)`` and channel mask ``(B, D)`` (drawn
    by ``masker``) -> ``(x (B, T, D), normalized (B, T, C))``. ``normalized`` are the unmasked
    features the quantizer reads.
    """

    def __init__(self, feature_dim: int, embed_dim: int, dropout_input: float, masking: MaskingConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(feature_dim)
        self.projection = nn.Linear(feature_dim, embed_dim)
        self.dropout = nn.Dropout(dropout_input)
        self.masker = Masker(masking, embed_dim)
        self._register_load_state_dict_pre_hook(self._rename_mask_emb)

    @staticmethod
    def _rename_mask_emb(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Model files written before the masker had its own module keep the embedding here."""
        if prefix + "mask_emb" in state_dict:
            state_dict[prefix + "masker.mask_emb"] = state_dict.pop(prefix + "mask_emb")

    def forward(self, features: Tensor, time_mask: Tensor | None = None,
                channel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        normalized = self.layer_norm(features)
        x = self.dropout(self.projection(normalized))
        return self.masker(x, time_mask, channel_mask), normalized
