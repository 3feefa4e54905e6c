"""The Conformer context network of Wav2Vec2-Conformer (fairseq ``ConformerEncoder``, Hugging Face
``Wav2Vec2ConformerEncoder``).

Each block: half-step feed-forward, multi-head self-attention, convolution module (pointwise conv
with GLU, depthwise conv, BatchNorm, activation, pointwise conv), half-step feed-forward, final
LayerNorm. Position comes from relative (Transformer-XL) or rotary embeddings inside the attention,
or, with ``position_embeddings: none``, from the convolutional positional embedding of the
Transformer (``pos_conv_kernel > 0``). Attention runs through ``scaled_dot_product_attention``:
the relative scores enter it as an additive bias, and local attention (``att_context_size``) as a
band mask, so one kernel call serves every variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.config import check
from speechssl.models.context.base import ContextNetwork, ContextOutput, init_bert_params, register_context
from speechssl.models.context.blocks import ACTIVATIONS, ConvPositionalEmbedding, FeedForward

POSITION_EMBEDDINGS = ("relative", "rotary", "none")


@dataclass
class ConformerConfig:
    """Names in brackets: Hugging Face ``Wav2Vec2ConformerConfig``.

    embed_dim [hidden_size]; num_layers [num_hidden_layers]; num_heads [num_attention_heads];
    ffn_dim [intermediate_size]; depthwise_conv_kernel [conv_depthwise_kernel_size], odd.
    activation: of the feed-forward and convolution modules, ``swish`` or ``gelu`` [hidden_act].
    position_embeddings: ``relative``, ``rotary`` or ``none`` [position_embeddings_type, None for
    none]; max_source_positions [same]: the relative positions the checkpoint was built for
    (longer inputs still work: the sinusoids are computed for any length);
    rotary_embedding_base [same].
    pos_conv_kernel / pos_conv_groups: the convolutional positional embedding before the layers
    (fairseq's ``abs`` Conformer); 0 turns it off, as in Hugging Face's model.
    att_context_size: ``[left, right]`` frames each frame may attend to; -1 is unlimited, so
    ``[-1, -1]`` is full attention (NeMo's ``att_context_size``).
    dropout: after the input and the feed-forward modules [hidden_dropout];
    attention_dropout: on attention probabilities and the attention output [attention_dropout];
    activation_dropout: inside the feed-forward [activation_dropout]; conv_dropout: at the
    convolution module's output [conformer_conv_dropout]; layer_drop [layerdrop].
    layer_norm_eps: of the context network's own LayerNorm [layer_norm_eps].
    layer_norm_first: where that LayerNorm sits, with fairseq's meaning of the name: True after the
    last block (fairseq's Conformer with ``layer_norm_first``, Hugging Face's only layout), False
    before the first one, after the positional embedding (fairseq's default, and fairseq2's
    ``use_conformer`` models).
    mask_padding_in_conv: zero padded frames before the depthwise convolution, so an utterance's
    output does not depend on the padding of its batch. fairseq and Hugging Face do not (their
    padded frames leak into the last ``kernel // 2`` valid ones); models imported from Hugging Face
    set it false to reproduce their outputs exactly.
    """

    type: str = "conformer"
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    depthwise_conv_kernel: int = 31
    activation: str = "swish"
    position_embeddings: str = "relative"
    max_source_positions: int = 5000
    rotary_embedding_base: int = 10000
    pos_conv_kernel: int = 0
    pos_conv_groups: int = 16
    att_context_size: list[int] = field(default_factory=lambda: [-1, -1])
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    conv_dropout: float = 0.1
    layer_drop: float = 0.0
    layer_norm_eps: float = 1e-5
    layer_norm_first: bool = True
    mask_padding_in_conv: bool = True

    def __post_init__(self) -> None:
        key = "model.context."
        check(self.embed_dim > 0, key + "embed_dim", "must be > 0")
        check(self.num_layers >= 1, key + "num_layers", "must be >= 1")
        check(self.num_heads >= 1 and self.embed_dim % self.num_heads == 0, key + "num_heads",
              f"must divide embed_dim={self.embed_dim}, got {self.num_heads}")
        check(self.ffn_dim > 0, key + "ffn_dim", "must be > 0")
        check(self.depthwise_conv_kernel >= 1 and self.depthwise_conv_kernel % 2 == 1,
              key + "depthwise_conv_kernel", f"must be odd (same padding), got {self.depthwise_conv_kernel}")
        check(self.activation in ACTIVATIONS, key + "activation",
              f"must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        check(self.position_embeddings in POSITION_EMBEDDINGS, key + "position_embeddings",
              f"must be one of {list(POSITION_EMBEDDINGS)}, got {self.position_embeddings!r}")
        check(self.position_embeddings != "rotary" or (self.embed_dim // self.num_heads) % 2 == 0,
              key + "num_heads", "rotary embeddings need an even head dimension")
        check(self.max_source_positions >= 1, key + "max_source_positions", "must be >= 1")
        check(self.rotary_embedding_base > 0, key + "rotary_embedding_base", "must be > 0")
        check(self.pos_conv_kernel >= 0, key + "pos_conv_kernel", "must be >= 0 (0 = off)")
        check(self.pos_conv_kernel == 0 or self.embed_dim % self.pos_conv_groups == 0, key + "pos_conv_groups",
              f"must divide embed_dim={self.embed_dim}, got {self.pos_conv_groups}")
        check_context_size(self.att_context_size, key + "att_context_size")
        for name in ("dropout", "attention_dropout", "activation_dropout", "conv_dropout", "layer_drop"):
            check(0.0 <= getattr(self, name) < 1.0, key + name, "must be in [0, 1)")
        check(self.layer_norm_eps > 0, key + "layer_norm_eps", "must be > 0")


def check_context_size(size: list[int], key: str) -> None:
    check(len(size) == 2 and all(isinstance(s, int) and s >= -1 for s in size), key,
          f"must be [left, right] with each >= -1 (-1 = unlimited), got {list(size)}")


def local_attention_mask(length: int, left: int, right: int, device: torch.device) -> Tensor | None:
    """``(T, T)`` bool, True where query ``i`` may attend key ``j``: ``-left <= j - i <= right``
    (-1 = unlimited); None for full attention."""
    if left < 0 and right < 0:
        return None
    offset = torch.arange(length, device=device)[None, :] - torch.arange(length, device=device)[:, None]
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= offset >= -left
    if right >= 0:
        allowed &= offset <= right
    return allowed


def relative_reach(length: int) -> int:
    """The largest relative position the sinusoid table holds for ``length`` frames: ``T - 1``
    rounded up to a multiple of 8, so every stride of :func:`relative_shift`'s view is a multiple of
    8 elements and attention kernels read it in place instead of copying it to an aligned buffer."""
    return -(-(length - 1) // 8) * 8


def relative_sinusoids(length: int, dim: int, device: torch.device) -> Tensor:
    """``(2R + 1, D)`` fp32 sinusoids of relative positions ``R, ..., 1, 0, -1, ..., -R`` with
    ``R = relative_reach(T)`` (sin at even, cos at odd channels), the layout of Transformer-XL /
    ESPnet / fairseq, whose table is the middle ``2T - 1`` rows of this one."""
    reach = relative_reach(length)
    position = torch.arange(reach, -reach - 1, -1, device=device, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * -(math.log(10000.0) / dim))
    pe = torch.zeros(2 * reach + 1, dim, device=device)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


def relative_shift(scores: Tensor, length: int) -> Tensor:
    """``(B, H, T', 2R + 1)`` scores of ``T' >= T`` queries against relative positions
    ``R .. -R`` -> ``(B, H, T, T)`` with ``out[..., i, j] = scores[..., i, R - i + j]`` (position
    ``i - j``), as a strided view: no copy, no padding trick."""
    batch, heads, rows, width = scores.shape
    reach = (width - 1) // 2
    # A view that starts at element ``reach``: as_strided keeps its offset (no storage_offset() call,
    # which torch.compile cannot trace).
    shifted = scores.contiguous().view(-1)[reach:]
    return shifted.as_strided((batch, heads, length, length), (heads * rows * width, rows * width, width - 1, 1))


def rotary_tables(length: int, head_dim: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin ``(T, Dh)`` in fp32 for rotary embeddings."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor, num_heads: int) -> Tensor:
    """Rotary rotation of ``x (B, T, D)`` per head chunk of ``D / H`` channels."""
    batch, length, dim = x.shape
    x = x.view(batch, length, num_heads, dim // num_heads)
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return (x * cos + rotated * sin).view(batch, length, dim)


class ConformerAttention(nn.Module):
    """Multi-head self-attention with relative, rotary or no position: ``(B, T, D) -> (B, T, D)``.

    As in fairseq and Hugging Face, rotary embeddings rotate the block input before the query and
    key projections (not the projected queries and keys).
    """

    def __init__(self, config: ConformerConfig):
        super().__init__()
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.head_dim = dim // config.num_heads
        self.position_embeddings = config.position_embeddings
        self.dropout = config.attention_dropout
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        if self.position_embeddings == "relative":
            self.linear_pos = nn.Linear(dim, dim, bias=False)
            self.pos_bias_u = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
            self.pos_bias_v = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
            nn.init.xavier_uniform_(self.pos_bias_u)
            nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, allowed: Tensor | None, position: Tensor | tuple[Tensor, Tensor] | None) -> Tensor:
        """allowed: bool ``(B or 1, 1, T, T)``, True where a query may attend a key; position: the
        relative sinusoids ``(2T-1, D)`` or the rotary ``(cos, sin)`` tables."""
        batch, length, dim = x.shape
        qk_in = rotate(x, *position, self.num_heads) if self.position_embeddings == "rotary" else x
        q, k, v = self._heads(self.linear_q(qk_in)), self._heads(self.linear_k(qk_in)), self._heads(self.linear_v(x))
        attn_mask = allowed
        if self.position_embeddings == "relative":
            pos = self.linear_pos(position.to(x.dtype)).view(-1, self.num_heads, self.head_dim)
            # Scaled before the product, not after: the shifted view then goes to the attention
            # kernel as it is. Query rows are padded to a multiple of 8 for the view's alignment.
            q_pos = (q + self.pos_bias_v[:, None, :].to(q.dtype)) * self.head_dim ** -0.5
            q_pos = F.pad(q_pos, (0, 0, 0, -length % 8))
            bias = relative_shift(torch.matmul(q_pos, pos.permute(1, 2, 0)), length)  # (B, H, T, T)
            if allowed is not None:
                bias = bias.masked_fill(~allowed, float("-inf"))
            attn_mask = bias
            q = q + self.pos_bias_u[:, None, :].to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.linear_out(y.transpose(1, 2).reshape(batch, length, dim))


class BatchNorm1dFP32(nn.BatchNorm1d):
    """BatchNorm1d that normalises in fp32 and returns the input's dtype: ``(B, C, T) -> (B, C, T)``.

    DeepSpeed's bf16/fp16 engines cast the parameters but keep the running statistics in fp32, which
    ``F.batch_norm`` refuses; fp32 statistics are also the accurate choice. Same state dict as
    ``nn.BatchNorm1d``."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                            self.training, self.momentum, self.eps).to(x.dtype)


class ConvolutionModule(nn.Module):
    """LayerNorm, pointwise conv to 2D with GLU, depthwise conv, BatchNorm, activation, pointwise
    conv, dropout: ``(B, T, D) -> (B, T, D)``. The pointwise convs are Linear layers (the same
    arithmetic without transposes)."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        dim = config.embed_dim
        self.layer_norm = nn.LayerNorm(dim)
        self.pointwise_conv1 = nn.Linear(dim, 2 * dim, bias=False)
        self.depthwise_conv = nn.Conv1d(dim, dim, config.depthwise_conv_kernel,
                                        padding=(config.depthwise_conv_kernel - 1) // 2, groups=dim, bias=False)
        self.batch_norm = BatchNorm1dFP32(dim)
        self.activation = ACTIVATIONS[config.activation]
        self.pointwise_conv2 = nn.Linear(dim, dim, bias=False)
        self.dropout = nn.Dropout(config.conv_dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        x = F.glu(self.pointwise_conv1(self.layer_norm(x)), dim=-1)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = self.activation(self.batch_norm(self.depthwise_conv(x.transpose(1, 2)))).transpose(1, 2)
        return self.dropout(self.pointwise_conv2(x))


class ConformerLayer(nn.Module):
    """One Conformer block (macaron feed-forwards at half step): ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        dim = config.embed_dim
        self.ffn1_layer_norm = nn.LayerNorm(dim)
        self.ffn1 = FeedForward(config.embed_dim, config.ffn_dim, config.activation_dropout, config.dropout,
                                config.activation)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = ConformerAttention(config)
        self.self_attn_dropout = nn.Dropout(config.attention_dropout)
        self.conv_module = ConvolutionModule(config)
        self.ffn2_layer_norm = nn.LayerNorm(dim)
        self.ffn2 = FeedForward(config.embed_dim, config.ffn_dim, config.activation_dropout, config.dropout,
                                config.activation)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, allowed: Tensor | None, position: Tensor | tuple[Tensor, Tensor] | None,
                conv_padding_mask: Tensor | None) -> Tensor:
        x = x + 0.5 * self.ffn1(self.ffn1_layer_norm(x))
        x = x + self.self_attn_dropout(self.self_attn(self.self_attn_layer_norm(x), allowed, position))
        x = x + self.conv_module(x, conv_padding_mask)
        x = x + 0.5 * self.ffn2(self.ffn2_layer_norm(x))
        return self.final_layer_norm(x)


@register_context("conformer", ConformerConfig)
class ConformerContext(ContextNetwork):
    """The Conformer context network; hidden states are the blocks' outputs, the output is the last
    one through a final LayerNorm (Hugging Face's ``last_hidden_state``), or the last one as it is
    when the LayerNorm comes first (``layer_norm_first: false``)."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.config = config
        self.input_dim = self.output_dim = config.embed_dim
        self.pos_conv = (ConvPositionalEmbedding(config.embed_dim, config.pos_conv_kernel, config.pos_conv_groups,
                                                 config.dropout) if config.pos_conv_kernel > 0 else None)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(ConformerLayer(config) for _ in range(config.num_layers))
        self.layer_norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        init_bert_params(self.layers)

    def change_attention(self, att_context_size: list[int]) -> None:
        """Switch between full (``[-1, -1]``) and local attention on a built or trained model; the
        stored config follows, so a saved model keeps the choice. No weight changes."""
        check_context_size(list(att_context_size), "att_context_size")
        self.config.att_context_size = [int(s) for s in att_context_size]

    def _allowed(self, padding_mask: Tensor | None, length: int, device: torch.device) -> Tensor | None:
        """bool ``(B or 1, 1, T, T)`` of permitted (query, key) pairs, or None for all."""
        left, right = self.config.att_context_size
        local = local_attention_mask(length, left, right, device)
        if padding_mask is None:
            return None if local is None else local[None, None]
        allowed = ~padding_mask[:, None, None, :]
        if local is None:
            return allowed
        allowed = allowed & local
        # A padded query far past the end can see no key at all: let it see everything rather
        # than produce NaN (its output is padding; NaN would poison the next layer's values).
        return allowed | ~allowed.any(-1, keepdim=True)

    def _position(self, length: int, device: torch.device) -> Tensor | tuple[Tensor, Tensor] | None:
        c = self.config
        if c.position_embeddings == "relative":
            return relative_sinusoids(length, c.embed_dim, device)
        if c.position_embeddings == "rotary":
            return rotary_tables(length, c.embed_dim // c.num_heads, c.rotary_embedding_base, device)
        return None

    def forward(self, x: Tensor, padding_mask: Tensor | None = None,
                num_layers: int | None = None) -> ContextOutput:
        self._check_num_layers(num_layers, len(self.layers))
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        if self.pos_conv is not None:
            x = x + self.pos_conv(x)
        if not self.config.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        length = x.shape[1]
        allowed = self._allowed(padding_mask, length, x.device)
        position = self._position(length, x.device)
        conv_padding_mask = padding_mask if self.config.mask_padding_in_conv else None
        first, hidden_states = x, []
        for layer in self.layers[:num_layers]:
            x = self._layer_or_skip(layer, self.config.layer_drop, x, allowed, position, conv_padding_mask)
            hidden_states.append(x)
        if num_layers is None and self.config.layer_norm_first:
            x = self.layer_norm(x)
        return ContextOutput(x, hidden_states, padding_mask, first)
