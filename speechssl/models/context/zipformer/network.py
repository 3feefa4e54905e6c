"""The Zipformer context network: stacks of Zipformer layers at different frame rates.

Stack ``i`` runs at the input rate divided by ``downsampling_factor[i]`` (learned weighted-sum
downsampling, upsampling by repetition, a learned bypass back to the input), in ``encoder_dim[i]``
channels (the stream is cut or zero-padded between stacks). The output takes each channel from
the latest stack that has it, so it has ``max(encoder_dim)`` channels, and is downsampled by
``output_downsampling_factor`` (1 keeps the 50 Hz of the feature extractor, as pretraining
needs; 2 gives icefall's 25 Hz).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from speechssl.config import check
from speechssl.models.context.base import ContextNetwork, ContextOutput, register_context
from speechssl.models.context.zipformer.layer import Bypass, ZipformerLayer, compact_relative_positions
from speechssl.models.context.zipformer.scaling import FloatLike, ScheduledFloat, UpdateClock


def expand_per_stack(values: Sequence[int] | int, stacks: int, name: str) -> list[int]:
    """One value per encoder stack: a single value is repeated."""
    values = [values] if isinstance(values, int) else list(values)
    if len(values) == 1:
        return values * stacks
    if len(values) != stacks:
        raise ValueError(f"{name} has {len(values)} values for {stacks} stacks")
    return values


@dataclass
class ZipformerConfig:
    """Names as in icefall's Zipformer2 (``--downsampling-factor`` etc.); per-stack lists take
    one value per stack or a single value for all.

    dropout: the feed-forward dropout, a number or a schedule ``[[update, value], ...]`` (default
    0.3 falling to 0.1 at update 20k, as icefall). warmup_batches: the updates over which the
    stacks' layers are warmed up one after another (their skip rate falls from 0.5).
    causal: chunk-causal attention and convolutions; in training each batch draws ``chunk_size``
    and ``left_context_frames`` (input frames; -1 = unlimited) from the lists, in eval the first
    entries are used. Chunk sizes must be multiples of every downsampling factor.
    """

    type: str = "zipformer"
    downsampling_factor: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 4, 2])
    encoder_dim: list[int] = field(default_factory=lambda: [192, 256, 384, 512, 384, 256])
    num_encoder_layers: list[int] = field(default_factory=lambda: [2, 2, 3, 4, 3, 2])
    encoder_unmasked_dim: list[int] = field(default_factory=lambda: [192, 192, 256, 256, 256, 192])
    num_heads: list[int] = field(default_factory=lambda: [4, 4, 4, 8, 4, 4])
    query_head_dim: list[int] = field(default_factory=lambda: [32])
    value_head_dim: list[int] = field(default_factory=lambda: [12])
    pos_head_dim: list[int] = field(default_factory=lambda: [4])
    pos_dim: int = 48
    feedforward_dim: list[int] = field(default_factory=lambda: [512, 768, 1024, 1536, 1024, 768])
    cnn_module_kernel: list[int] = field(default_factory=lambda: [31, 31, 15, 15, 15, 31])
    output_downsampling_factor: int = 1
    # A number or a list of pairs: OmegaConf cannot type that union, so it is checked below.
    dropout: Any = field(default_factory=lambda: [[0.0, 0.3], [20000.0, 0.1]])
    warmup_batches: float = 4000.0
    causal: bool = False
    chunk_size: list[int] = field(default_factory=lambda: [-1])
    left_context_frames: list[int] = field(default_factory=lambda: [-1])

    def per_stack(self, name: str) -> list[int]:
        return expand_per_stack(getattr(self, name), len(self.downsampling_factor), f"model.context.{name}")

    def __post_init__(self) -> None:
        key = "model.context."
        stacks = len(self.downsampling_factor)
        check(stacks >= 1 and all(d >= 1 for d in self.downsampling_factor), key + "downsampling_factor",
              "must be a non-empty list of factors >= 1")
        for name in ("encoder_dim", "num_encoder_layers", "encoder_unmasked_dim", "num_heads", "query_head_dim",
                     "value_head_dim", "pos_head_dim", "feedforward_dim", "cnn_module_kernel"):
            values = [getattr(self, name)] if isinstance(getattr(self, name), int) else getattr(self, name)
            check(len(values) in (1, stacks), key + name, f"needs 1 or {stacks} values (one per stack)")
            check(all(v > 0 for v in values), key + name, "values must be > 0")
        check(all(k % 2 == 1 for k in self.per_stack("cnn_module_kernel")), key + "cnn_module_kernel", "must be odd")
        unmasked, dims = self.per_stack("encoder_unmasked_dim"), self.per_stack("encoder_dim")
        check(all(u <= d for u, d in zip(unmasked, dims, strict=True)), key + "encoder_unmasked_dim",
              "must not exceed encoder_dim")
        check(self.pos_dim % 2 == 0, key + "pos_dim", "must be even")
        if not isinstance(self.dropout, (int, float)):
            points = [list(point) for point in self.dropout]
            check(len(points) >= 1 and all(len(p) == 2 and 0 <= p[1] < 1 for p in points)
                  and all(a[0] < b[0] for a, b in pairwise(points)), key + "dropout",
                  "must be a number in [0, 1) or a schedule [[update, value], ...] with increasing updates")
            self.dropout = points
        check(self.output_downsampling_factor >= 1, key + "output_downsampling_factor", "must be >= 1")
        check(self.causal or (self.chunk_size == [-1] and self.left_context_frames == [-1]), key + "chunk_size",
              "chunked attention needs causal: true")
        for size in self.chunk_size:
            check(size == -1 or (size > 0 and all(size % d == 0 for d in self.downsampling_factor)),
                  key + "chunk_size", f"{size} is not -1 or a multiple of every downsampling factor")
        for frames in self.left_context_frames:
            for size in self.chunk_size:
                if size > 0 and frames >= 0:
                    chunks = max(1, frames // size)
                    kernels = self.per_stack("cnn_module_kernel")
                    need = max(k // 2 * d for k, d in zip(kernels, self.downsampling_factor, strict=True))
                    check(chunks * size >= need, key + "left_context_frames",
                          f"{frames} frames of left context with chunks of {size} cover less than the convolutions "
                          f"need ({need} frames)")

    def dropout_value(self) -> FloatLike:
        if isinstance(self.dropout, (int, float)):
            return float(self.dropout)
        return ScheduledFloat(*[tuple(point) for point in self.dropout])


def chunk_attention_mask(length: int, chunk_size: int, left_chunks: int, device: torch.device) -> Tensor | None:
    """bool ``(T, T)``, True where query frame i may not see key frame j: keys in later chunks, or
    more than ``left_chunks`` chunks back (-1: no limit). None for ``chunk_size <= 0``."""
    if chunk_size <= 0:
        return None
    chunk = torch.arange(length, device=device) // chunk_size
    ahead = chunk[None, :] > chunk[:, None]
    if left_chunks < 0:
        return ahead
    return ahead | (chunk[None, :] < chunk[:, None] - left_chunks)


class Downsample(nn.Module):
    """``(B, T, C)`` -> ``(B, ceil(T / factor), C)``: a learned softmax-weighted sum over each
    window of ``factor`` frames. Frames past each utterance's end repeat its last valid frame, so
    the result does not depend on the padding of the batch."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor
        self.bias = nn.Parameter(torch.zeros(factor))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        batch, length, channels = x.shape
        if padding_mask is not None:
            last = ((~padding_mask).sum(1) - 1).clamp(min=0)
            last_frame = x.gather(1, last.view(batch, 1, 1).expand(batch, 1, channels))
            x = torch.where(padding_mask.unsqueeze(-1), last_frame, x)
        windows = -(-length // self.factor)
        pad = windows * self.factor - length
        if pad:
            x = torch.cat((x, x[:, -1:].expand(batch, pad, channels)), dim=1)
        weights = self.bias.softmax(0).view(1, 1, self.factor, 1)
        return (x.view(batch, windows, self.factor, channels) * weights).sum(2)


class ZipformerStack(nn.Module):
    """``num_layers`` Zipformer layers at one frame rate, with their relative positions and the
    per-layer warm-up of the skip rate (0.5 down to ``final_layerdrop_rate`` between
    ``warmup_begin`` and ``warmup_end`` updates, one layer after the other)."""

    def __init__(self, make_layer, num_layers: int, pos_dim: int, warmup_begin: float, warmup_end: float,
                 final_layerdrop_rate: float):
        super().__init__()
        self.pos_dim = pos_dim
        self.pos_dropout = nn.Dropout(0.15)
        self.layers = nn.ModuleList(make_layer() for _ in range(num_layers))
        step = (warmup_end - warmup_begin) / num_layers
        for i, layer in enumerate(self.layers):
            begin = warmup_begin + i * step
            layer.bypass.skip_rate = ScheduledFloat((begin, 0.5), (begin + step, final_layerdrop_rate), default=0.0)

    def positions(self, length: int, left: int, device: torch.device) -> Tensor:
        """Encodings of offsets ``-(left + length - 1) .. length - 1``: ``(left + 2 length - 1, pos_dim)``."""
        offsets = torch.arange(-(left + length - 1), length, device=device)
        return self.pos_dropout(compact_relative_positions(offsets, self.pos_dim))

    def forward(self, x: Tensor, padding_mask: Tensor | None, attn_mask: Tensor | None, chunk_size: int,
                feature_mask: Tensor | float = 1.0, states: list[list[Tensor]] | None = None,
                ) -> tuple[Tensor, list[list[Tensor]] | None]:
        left = 0 if states is None else states[0][0].shape[1]
        pos_emb = self.positions(x.shape[1], left, x.device).to(x.dtype)
        x = x * feature_mask
        new_states = None if states is None else []
        for i, layer in enumerate(self.layers):
            x, state = layer(x, pos_emb, padding_mask, attn_mask, chunk_size, None if states is None else states[i])
            x = x * feature_mask
            if new_states is not None:
                new_states.append(state)
        return x, new_states


class DownsampledStack(nn.Module):
    """A :class:`ZipformerStack` run at ``1 / factor`` of the frame rate: downsample, the stack,
    upsample by repetition, then a learned bypass with the input."""

    def __init__(self, encoder: ZipformerStack, dim: int, factor: int):
        super().__init__()
        self.factor = factor
        self.downsample = Downsample(factor)
        self.encoder = encoder
        self.out_combiner = Bypass(dim)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    def forward(self, x: Tensor, padding_mask: Tensor | None, attn_mask: Tensor | None, chunk_size: int,
                feature_mask: Tensor | float = 1.0, states: list[list[Tensor]] | None = None,
                ) -> tuple[Tensor, list[list[Tensor]] | None]:
        """x: ``(B, T, C)``; padding_mask: ``(B, L + T)`` at the input rate, ``L`` frames of left
        context (streaming) then the frames of ``x``."""
        length, f = x.shape[1], self.factor
        y = self.downsample(x, None if padding_mask is None else padding_mask[:, padding_mask.shape[1] - length:])
        # A contiguous copy of the padding mask at this rate: when f does not divide the frame count
        # T, the view [:, ::f] has a row stride (T) below f * ceil(T / f), Inductor's overlap check
        # flags it, and Inductor runs a compiled layer that takes it without CUDA graphs, silently.
        y, states = self.encoder(y, None if padding_mask is None else padding_mask[:, ::f].contiguous(),
                                 None if attn_mask is None else attn_mask[::f, ::f],
                                 chunk_size // f if chunk_size > 0 else chunk_size, feature_mask, states)
        y = y.repeat_interleave(f, dim=1)[:, :length]
        return self.out_combiner(x, y), states


@register_context("zipformer", ZipformerConfig)
class Zipformer(ContextNetwork):
    """The Zipformer on ``(B, T, encoder_dim[0])`` frontend features. Hidden states are the
    stacks' outputs, each ``(B, T, encoder_dim[i])`` at the input rate; the output is
    ``(B, T / output_downsampling_factor, max(encoder_dim))``."""

    def __init__(self, config: ZipformerConfig):
        super().__init__()
        self.config = config
        c = config
        factors = c.downsampling_factor
        self.encoder_dim = c.per_stack("encoder_dim")
        self.unmasked_dim = c.per_stack("encoder_unmasked_dim")
        self.input_dim, self.output_dim = self.encoder_dim[0], max(self.encoder_dim)
        dropout = c.dropout_value()
        heads, query, value, pos = (c.per_stack(n) for n in ("num_heads", "query_head_dim", "value_head_dim",
                                                              "pos_head_dim"))
        ffn, kernels, layers = c.per_stack("feedforward_dim"), c.per_stack("cnn_module_kernel"), c.per_stack(
            "num_encoder_layers")
        stacks = []
        for i, factor in enumerate(factors):
            def make_layer(i: int = i) -> ZipformerLayer:
                return ZipformerLayer(self.encoder_dim[i], c.pos_dim, heads[i], query[i], pos[i], value[i], ffn[i],
                                      dropout, kernels[i], c.causal)

            stack = ZipformerStack(make_layer, layers[i], c.pos_dim,
                                   warmup_begin=c.warmup_batches * (i + 1) / (len(factors) + 1),
                                   warmup_end=c.warmup_batches * (i + 2) / (len(factors) + 1),
                                   final_layerdrop_rate=0.035 * factor ** 0.5)
            stacks.append(stack if factor == 1 else DownsampledStack(stack, self.encoder_dim[i], factor))
        self.encoders = nn.ModuleList(stacks)
        self.downsample_output = Downsample(c.output_downsampling_factor)
        # Under torch.compile every schedule reads the update count from this one buffer.
        self.update_clock = UpdateClock()
        for module in self.modules():
            if isinstance(module, ScheduledFloat):
                module.follow(self.update_clock)

    # ------------------------------------------------------------------ training-time draws

    def _feature_masks(self, x: Tensor) -> list[Tensor | float]:
        """In training, per stack ``(B, 1, dim)``: on about 12% of sequences the channels above
        ``encoder_unmasked_dim`` are zeroed (half of them on about twice as many), so the
        network also learns to work in its smaller dimensions. 1.0 in eval."""
        if not self.training:
            return [1.0] * len(self.encoder_dim)
        batch = x.shape[0]
        keep1 = (torch.rand(batch, 1, 1, device=x.device) > 0.125).to(x.dtype)
        keep2 = keep1 * (torch.rand(batch, 1, 1, device=x.device) > 0.125).to(x.dtype)
        masks = []
        for dim, unmasked in zip(self.encoder_dim, self.unmasked_dim, strict=True):
            mask = x.new_ones(batch, 1, dim)
            middle = unmasked + (dim - unmasked) // 2
            mask[..., unmasked:middle] *= keep1
            mask[..., middle:] *= keep2
            masks.append(mask)
        return masks

    def chunk_config(self) -> tuple[int, int]:
        """``(chunk_size, left_context_chunks)``: drawn from the config's lists in training, the
        first entries in eval; ``(-1, -1)`` for a non-causal model."""
        c = self.config
        if not c.causal:
            return -1, -1
        def pick(values: list[int]) -> int:
            return values[int(torch.randint(len(values), ())) if self.training else 0]

        chunk_size = pick(c.chunk_size)
        if chunk_size == -1:
            return -1, -1
        frames = pick(c.left_context_frames)
        return chunk_size, (-1 if frames < 0 else max(1, frames // chunk_size))

    # ------------------------------------------------------------------ forward

    def _combine(self, outputs: list[Tensor]) -> Tensor:
        """Each output channel from the latest stack that has it: ``(B, T, max(encoder_dim))``."""
        pieces, dim = [outputs[-1]], self.encoder_dim[-1]
        for out, d in zip(reversed(outputs[:-1]), reversed(self.encoder_dim[:len(outputs) - 1]), strict=True):
            if d > dim:
                pieces.append(out[..., dim:d])
                dim = d
        return torch.cat(pieces, dim=-1)

    @property
    def depth(self) -> int:
        return len(self.encoders)

    @property
    def layers(self) -> nn.ModuleList:
        """Every Zipformer layer, stack after stack (a view: the layers stay registered in their
        stacks), so that ``trainer.compile: [context.layers]`` compiles each layer as for the other
        context networks. Layers of the same width and frame rate share one compiled graph."""
        return nn.ModuleList(layer for stack in self.encoders for layer in stack.layers)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None,
                num_layers: int | None = None) -> ContextOutput:
        """``num_layers`` counts stacks here: the output is then that stack's output."""
        self._check_num_layers(num_layers, len(self.encoders))
        feature_masks = self._feature_masks(x)
        chunk_size, left_chunks = self.chunk_config()
        attn_mask = chunk_attention_mask(x.shape[1], chunk_size, left_chunks, x.device)
        first, outputs = x, []
        for i, stack in enumerate(self.encoders[:num_layers]):
            x = _convert_channels(x, self.encoder_dim[i])
            x, _ = stack(x, padding_mask, attn_mask, chunk_size, feature_masks[i])
            outputs.append(x)
        if num_layers is not None:
            return ContextOutput(outputs[-1], outputs, padding_mask, first)
        out = self.downsample_output(self._combine(outputs), padding_mask)
        factor = self.config.output_downsampling_factor
        return ContextOutput(out, outputs, None if padding_mask is None else padding_mask[:, ::factor], first)


    # ------------------------------------------------------------------ streaming

    def streaming_context(self) -> tuple[int, int]:
        """``(chunk_size, left_context)`` in input frames for streaming: the first entries of the
        config's lists, with the left context rounded down to whole chunks as the full forward's
        attention mask does."""
        c = self.config
        chunk_size, left_chunks = self.chunk_config() if c.causal and not self.training else (-1, -1)
        if chunk_size <= 0 or left_chunks < 0:
            raise RuntimeError("streaming needs a causal Zipformer in eval mode (model.eval()) whose first "
                               f"chunk_size and left_context_frames are positive; got causal={c.causal}, "
                               f"training={self.training}, chunk_size={c.chunk_size}, "
                               f"left_context_frames={c.left_context_frames}")
        factor = self.config.output_downsampling_factor
        if chunk_size % factor:
            raise RuntimeError(f"chunk_size {chunk_size} is not a multiple of output_downsampling_factor {factor}")
        return chunk_size, left_chunks * chunk_size

    def get_init_states(self, batch_size: int = 1, device: torch.device | None = None) -> list[Tensor]:
        """The states before the first chunk: for every layer of every stack (in order) its six
        caches (see :meth:`ZipformerLayer.init_state`), holding ``left_context / downsampling_factor``
        frames, then the number of frames processed so far ``(B,)``. Every tensor is batch-first."""
        _, left = self.streaming_context()
        states = []
        for stack, factor in zip(self.encoders, self.config.downsampling_factor, strict=True):
            for layer in stack.layers:
                states += layer.init_state(batch_size, left // factor, device)
        states.append(torch.zeros(batch_size, dtype=torch.long, device=device))
        return states

    def streaming_forward(self, x: Tensor, lengths: Tensor, states: list[Tensor],
                          ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """One chunk of a stream. x: ``(B, chunk_size, input_dim)``; lengths ``(B,)``: valid frames
        in the chunk (less than ``chunk_size`` only in an utterance's last chunk). Returns the
        output ``(B, chunk_size / output_downsampling_factor, output_dim)``, its valid lengths and
        the new states. The outputs equal those of the full forward with the same chunk size and
        left context."""
        chunk_size, left = self.streaming_context()
        length = x.shape[1]
        if length != chunk_size:
            raise ValueError(f"streaming_forward takes chunks of chunk_size={chunk_size} frames (pad the last one "
                             f"and give its length), got {length}")
        processed = states[-1]
        # Cache slots are filled from the right; those no frame has reached yet are padding.
        cache_padding = torch.arange(left, device=x.device) < left - processed.unsqueeze(1)
        frame_padding = torch.arange(length, device=x.device) >= lengths.unsqueeze(1)
        padding_mask = torch.cat((cache_padding, frame_padding), dim=1)
        outputs, new_states, offset = [], [], 0
        for i, stack in enumerate(self.encoders):
            layers = len(stack.layers)
            layer_states = [states[offset + 6 * j: offset + 6 * (j + 1)] for j in range(layers)]
            offset += 6 * layers
            x = _convert_channels(x, self.encoder_dim[i])
            x, stack_states = stack(x, padding_mask, None, chunk_size, 1.0, layer_states)
            new_states += [tensor for state in stack_states for tensor in state]
            outputs.append(x)
        factor = self.config.output_downsampling_factor
        out = self.downsample_output(self._combine(outputs), frame_padding)
        new_states.append(processed + lengths)
        return out, (lengths + factor - 1) // factor, new_states


def stack_states(states: Sequence[list[Tensor]]) -> list[Tensor]:
    """Batch the streaming states of several streams (each from :meth:`Zipformer.get_init_states`
    or :meth:`Zipformer.streaming_forward`) into one."""
    return [torch.cat(tensors, dim=0) for tensors in zip(*states, strict=True)]


def unstack_states(states: list[Tensor]) -> list[list[Tensor]]:
    """Split batched streaming states into one state (batch size 1) per stream."""
    return [[tensor[b:b + 1] for tensor in states] for b in range(states[-1].shape[0])]


def _convert_channels(x: Tensor, channels: int) -> Tensor:
    """Keep the first ``channels`` channels, or zero-pad up to them."""
    if channels <= x.shape[-1]:
        return x[..., :channels]
    return torch.cat((x, x.new_zeros(*x.shape[:-1], channels - x.shape[-1])), dim=-1)
