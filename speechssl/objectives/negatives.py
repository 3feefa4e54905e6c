"""Negative sampling for the contrastive task, in the "slot" layout of masked frames.

Row ``b`` of a slot tensor holds that utterance's masked frames in time order in slots
``0 .. counts[b]-1``; later slots are unused. Negatives of slot ``j`` are other masked slots: never
``j`` itself, never an unused slot (and so never padding), uniform over the candidates, drawn with
replacement as in fairseq. All on the device, with no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Negatives:
    """local: ``(B, T, N)`` slot indices in the same row; cross: ``(B, T, C)`` flat indices into
    ``B * T`` slots of any row; ``*_valid``: False where no candidate exists (a row with one masked
    frame)."""

    local: Tensor
    local_valid: Tensor
    cross: Tensor
    cross_valid: Tensor


def _uniform_excluding(high: Tensor, exclude: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Integers uniform in ``[0, high)`` minus ``exclude`` (broadcast to ``shape``), and validity."""
    span = (high - 1).clamp_min(0)
    r = (torch.rand(shape, device=high.device) * span).long()
    r = torch.minimum(r, (span - 1).clamp_min(0))  # guard against float rounding up to span
    r = r + (r >= exclude).long()
    valid = r < high
    return torch.where(valid, r, 0), valid  # an invalid draw still indexes in range


def sample_negatives(counts: Tensor, length: int, num_negatives: int,
                     cross_sample_negatives: int = 0) -> Negatives:
    """counts: ``(B,)`` masked frames per row; length: slots per row (T)."""
    batch = counts.shape[0]
    device = counts.device
    slots = torch.arange(length, device=device).view(1, length, 1)
    local, local_valid = _uniform_excluding(counts.view(batch, 1, 1), slots, (batch, length, num_negatives))

    ends = counts.cumsum(0)
    offsets = ends - counts
    flat_self = offsets.view(batch, 1, 1) + slots
    r, cross_valid = _uniform_excluding(ends[-1], flat_self, (batch, length, cross_sample_negatives))
    row = torch.searchsorted(ends, r, right=True).clamp_max(batch - 1)
    cross = row * length + (r - offsets[row])
    return Negatives(local, local_valid, cross, cross_valid)
