"""The wav2vec 2.0 Transformer context network (fairseq ``TransformerEncoder``).

Convolutional positional embedding, then post-LN (BASE, ``layer_norm_first: false``) or pre-LN
(LARGE, ``true``) layers with self-attention through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from speechssl.config import check
from speechssl.models.context.base import ContextNetwork, ContextOutput, init_bert_params, register_context
from speechssl.models.context.blocks import ConvPositionalEmbedding, FeedForward, SelfAttention


@dataclass
class TransformerConfig:
    """Names in brackets: fairseq / torchaudio ``wav2vec2_model``.

    embed_dim: model width [encoder_embed_dim / encoder_embed_dim].
    num_layers [encoder_layers / encoder_num_layers]; num_heads [encoder_attention_heads /
    encoder_num_heads]; ffn_dim [encoder_ffn_embed_dim / encoder_ff_interm_features].
    layer_norm_first: pre-LN if true [layer_norm_first / encoder_layer_norm_first].
    dropout: after attention, feed-forward and positional embedding [dropout / encoder_dropout].
    attention_dropout [attention_dropout / encoder_attention_dropout].
    activation_dropout: inside the feed-forward [activation_dropout / encoder_ff_interm_dropout].
    layer_drop: probability of skipping a layer in training [encoder_layerdrop / encoder_layer_drop].
    pos_conv_kernel / pos_conv_groups [conv_pos / encoder_pos_conv_kernel, conv_pos_groups /
    encoder_pos_conv_groups].
    """

    type: str = "transformer"
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    layer_norm_first: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layer_drop: float = 0.0
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16

    def __post_init__(self) -> None:
        check(self.embed_dim > 0, "model.context.embed_dim", "must be > 0")
        check(self.num_layers >= 1, "model.context.num_layers", "must be >= 1")
        check(self.num_heads >= 1 and self.embed_dim % self.num_heads == 0, "model.context.num_heads",
              f"must divide embed_dim={self.embed_dim}, got {self.num_heads}")
        check(self.embed_dim % self.pos_conv_groups == 0, "model.context.pos_conv_groups",
              f"must divide embed_dim={self.embed_dim}, got {self.pos_conv_groups}")
        check(self.pos_conv_kernel >= 1, "model.context.pos_conv_kernel", "must be >= 1")
        for name in ("dropout", "attention_dropout", "activation_dropout", "layer_drop"):
            check(0.0 <= getattr(self, name) < 1.0, f"model.context.{name}", "must be in [0, 1)")


class TransformerLayer(nn.Module):
    """One encoder layer, post-LN or pre-LN: ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        dim = config.embed_dim
        self.layer_norm_first = config.layer_norm_first
        self.attention = SelfAttention(dim, config.num_heads, config.attention_dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.layer_norm = nn.LayerNorm(dim)
        self.feed_forward = FeedForward(dim, config.ffn_dim, config.activation_dropout, config.dropout)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        if self.layer_norm_first:
            x = x + self.dropout(self.attention(self.layer_norm(x), attn_mask))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, attn_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


@register_context("transformer", TransformerConfig)
class TransformerContext(ContextNetwork):
    """The Transformer context network. The LayerNorm outside the layers runs before them when
    post-LN and after them when pre-LN; hidden states are the layers' raw outputs (as torchaudio's
    ``extract_features``)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.input_dim = self.output_dim = config.embed_dim
        self.pos_conv = ConvPositionalEmbedding(config.embed_dim, config.pos_conv_kernel,
                                                config.pos_conv_groups, config.dropout)
        self.layer_norm = nn.LayerNorm(config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.layer_drop = config.layer_drop
        init_bert_params(self.layers)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None,
                num_layers: int | None = None) -> ContextOutput:
        self._check_num_layers(num_layers, len(self.layers))
        attn_mask = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            attn_mask = ~padding_mask[:, None, None, :]
        x = x + self.pos_conv(x)
        if not self.config.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        first, hidden_states = x, []
        for layer in self.layers[:num_layers]:
            x = self._layer_or_skip(layer, self.layer_drop, x, attn_mask)
            hidden_states.append(x)
        if num_layers is None and self.config.layer_norm_first:
            x = self.layer_norm(x)
        return ContextOutput(x, hidden_states, padding_mask, first)
