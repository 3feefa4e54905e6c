"""Span masking of the context network's input, in one place: its config, the random draws, and the
learned embedding that replaces masked frames.

The draws follow fairseq's ``compute_mask_indices`` semantics, vectorised in torch: everything runs
on the tensors' device with no host synchronisation and no per-row Python loop (random choices of
``k`` items per row, ``k`` varying by row, are made by ranking random scores). Pretraining masks the
frames whose quantized targets are predicted; fine-tuning uses the same masks as SpecAugment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from speechssl.config import check


@dataclass
class MaskingConfig:
    """Span masking of the context network's input, with fairseq's semantics and names.

    mask_prob / mask_length / min_masks: each row gets ``max(min_masks, int(mask_prob * T /
        mask_length + U[0,1)))`` span starts of ``mask_length`` frames (``mask_selection: static``).
    require_same_masks: trim every row to the smallest masked count of the batch.
    mask_dropout: fraction of the masked frames unmasked again.
    no_overlap / min_space: fairseq ``no_mask_overlap`` / ``mask_min_space``.
    channel_prob / channel_length: fairseq ``mask_channel_prob`` / ``mask_channel_length``
        (channels of the projected features are zeroed).
    """

    mask_prob: float = 0.65
    mask_length: int = 10
    min_masks: int = 2
    require_same_masks: bool = True
    mask_dropout: float = 0.0
    no_overlap: bool = False
    min_space: int = 1
    channel_prob: float = 0.0
    channel_length: int = 10

    def __post_init__(self) -> None:
        check(0.0 <= self.mask_prob <= 1.0, "model.masking.mask_prob", "must be in [0, 1]")
        check(self.mask_length >= 1, "model.masking.mask_length", "must be >= 1")
        check(self.min_masks >= 0, "model.masking.min_masks", "must be >= 0")
        check(0.0 <= self.mask_dropout < 1.0, "model.masking.mask_dropout", "must be in [0, 1)")
        check(self.min_space >= 0, "model.masking.min_space", "must be >= 0")
        check(0.0 <= self.channel_prob <= 1.0, "model.masking.channel_prob", "must be in [0, 1]")
        check(self.channel_length >= 1, "model.masking.channel_length", "must be >= 1")



def _choose(candidates: Tensor, counts: Tensor) -> Tensor:
    """Pick ``counts[b]`` random True entries of each row of ``candidates (B, T)``: ``(B, T)`` bool."""
    scores = torch.rand(candidates.shape, device=candidates.device)
    scores = scores.masked_fill(~candidates, 2.0)  # never picked before a candidate
    rank = scores.argsort(dim=1).argsort(dim=1)
    return candidates & (rank < counts.unsqueeze(1))


def _spans(starts: Tensor, span: int) -> Tensor:
    """Frames covered by spans of ``span`` frames beginning at the True entries of ``starts (B, T)``."""
    c = torch.nn.functional.pad(starts.long().cumsum(1), (span, 0))
    return (c[:, span:] - c[:, :-span]) > 0


def compute_span_mask(
    shape: tuple[int, int],
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
    lengths: Tensor | None = None,
    require_same_masks: bool = True,
    mask_dropout: float = 0.0,
    no_overlap: bool = False,
    min_space: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """A ``(B, T)`` bool mask of spans of ``mask_length`` frames.

    Each row draws ``max(min_masks, int(mask_prob * len / mask_length + U[0,1)))`` span starts among
    its ``len`` valid frames (``lengths (B,)``; padding is never masked); overlapping spans merge, so
    the masked fraction at 0.65/10 is about 49%. ``require_same_masks`` then trims every row to the
    batch's smallest count, and ``mask_dropout`` unmasks that fraction again. ``no_overlap`` places
    spans at least ``min_space`` frames apart, uniformly over such placements (fairseq splits the
    free intervals recursively instead; the spacing guarantee is the same). At least one valid
    frame of each row stays unmasked. ``mask_prob`` 0 masks nothing.
    """
    batch, length = shape
    if mask_prob <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=device if lengths is None else lengths.device)
    # Without padding fairseq draws one span count for the whole batch; with it, one per row.
    draw = torch.rand(1 if lengths is None else batch, device=device if lengths is None else lengths.device)
    if lengths is None:
        lengths = torch.full((batch,), length, device=device, dtype=torch.long)
    lengths = lengths.to(device=device if device is not None else lengths.device, dtype=torch.long)
    dev = lengths.device
    positions = torch.arange(length, device=dev).unsqueeze(0)
    num = (mask_prob * lengths / mask_length + draw.to(dev)).long().clamp_min(min_masks)

    if no_overlap:
        # k spans with gaps >= min_space <-> k distinct slots among (free frames + k); the j-th chosen
        # slot s_j (sorted) starts its span at s_j + j * (mask_length + min_space - 1).
        stride = mask_length + min_space
        num = torch.minimum(num, torch.div(lengths + min_space, stride, rounding_mode="floor"))
        free = lengths - num * mask_length - (num - 1).clamp_min(0) * min_space
        chosen = _choose(positions < (free + num).unsqueeze(1), num)
        start = positions + (chosen.long().cumsum(1) - 1) * (stride - 1)
        hits = torch.zeros(batch, length, dtype=torch.long, device=dev)
        starts = hits.scatter_add_(1, start.clamp(0, length - 1), chosen.long()) > 0
    else:
        # fairseq: starts uniform in [0, len - mask_length), widened when too few positions remain.
        num_starts = torch.maximum(lengths - mask_length, num + 1).clamp_max(lengths)
        num = torch.minimum(num, num_starts)
        starts = _choose(positions < num_starts.unsqueeze(1), num)
    mask = _spans(starts, mask_length) & (positions < lengths.unsqueeze(1))

    counts = torch.minimum(mask.sum(1), (lengths - 1).clamp_min(0))
    if require_same_masks:
        counts = counts.min().expand(batch)
    if mask_dropout > 0:
        counts = counts - torch.round(counts * mask_dropout).long()
    return _choose(mask, counts)


def compute_channel_mask(batch: int, channels: int, prob: float, length: int,
                         device: torch.device | str | None = None) -> Tensor:
    """A ``(B, D)`` bool mask of channel spans (fairseq ``mask_channel_prob`` / ``_length``)."""
    return compute_span_mask((batch, channels), prob, length, min_masks=0, device=device)


class Masker(nn.Module):
    """Draws and applies the masks of ``config`` over context inputs of ``dim`` channels.

    :meth:`draw` gives a time mask ``(B, T)`` and a channel mask ``(B, D)`` (each None when its
    probability is 0); ``forward(x (B, T, D), time_mask, channel_mask)`` replaces masked frames by
    the learned ``mask_emb (D,)`` and zeroes masked channels.
    """

    def __init__(self, config: MaskingConfig, dim: int):
        super().__init__()
        self.config, self.dim = config, dim
        self.mask_emb = nn.Parameter(torch.empty(dim).uniform_())

    def time_mask(self, frames: Tensor | None, shape: tuple[int, int], device: torch.device,
                  require_same_masks: bool | None = None) -> Tensor:
        """The span mask ``(B, T)`` of rows with ``frames (B,)`` valid frames (all ``T`` when None);
        ``require_same_masks`` overrides the config's. All False when ``mask_prob`` is 0."""
        m = self.config
        same = m.require_same_masks if require_same_masks is None else require_same_masks
        return compute_span_mask(shape, m.mask_prob, m.mask_length, m.min_masks, frames, same,
                                 m.mask_dropout, m.no_overlap, m.min_space, device=device)

    def channel_mask(self, batch: int, device: torch.device) -> Tensor | None:
        """The channel mask ``(B, D)``, or None when channel masking is off."""
        m = self.config
        if m.channel_prob <= 0:
            return None
        return compute_channel_mask(batch, self.dim, m.channel_prob, m.channel_length, device=device)

    def draw(self, frames: Tensor | None, shape: tuple[int, int], device: torch.device,
             require_same_masks: bool | None = None) -> tuple[Tensor | None, Tensor | None]:
        """Both masks, time first: ``(time (B, T) or None, channel (B, D) or None)``."""
        time = self.time_mask(frames, shape, device, require_same_masks) if self.config.mask_prob > 0 else None
        return time, self.channel_mask(shape[0], device)

    def forward(self, x: Tensor, time_mask: Tensor | None = None, channel_mask: Tensor | None = None) -> Tensor:
        if time_mask is not None:
            x = torch.where(time_mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        if channel_mask is not None:
            x = x.masked_fill(channel_mask.unsqueeze(1), 0.0)
        return x
