"""Contrastive logits and loss, in fp32 whatever the autocast state (fairseq ``compute_preds`` and the
``wav2vec`` criterion with ``infonce``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from speechssl.objectives.negatives import Negatives


def contrastive_logits(predictions: Tensor, targets: Tensor, codes: Tensor, negatives: Negatives,
                       logit_temp: float) -> Tensor:
    """Cosine similarities / ``logit_temp``: ``(B, T, 1 + N + C)``, the positive first.

    predictions, targets: ``(B, T, F)`` in the slot layout; codes: ``(B, T, G)`` quantizer entries
    of the targets. A negative whose target equals the positive (same codes) or that has no valid
    candidate gets a logit of -inf. Same-row negatives are read from one ``(B, T, T)`` similarity
    matrix instead of gathering ``(B, T, N, F)`` vectors.
    """
    batch, length, dim = targets.shape
    with torch.autocast(device_type=targets.device.type, enabled=False):
        p = F.normalize(predictions.float(), dim=-1, eps=1e-8)
        t = F.normalize(targets.float(), dim=-1, eps=1e-8)
        positive = (p * t).sum(-1, keepdim=True)

        local = torch.bmm(p, t.transpose(1, 2)).gather(2, negatives.local)
        local_codes = codes.gather(1, negatives.local.view(batch, -1, 1).expand(-1, -1, codes.shape[-1]))
        local_same = (local_codes.view(batch, length, -1, codes.shape[-1]) == codes.unsqueeze(2)).all(-1)

        flat_t = t.reshape(batch * length, dim)
        cross = (p.unsqueeze(2) * flat_t[negatives.cross]).sum(-1)
        cross_same = (codes.reshape(batch * length, -1)[negatives.cross] == codes.unsqueeze(2)).all(-1)

        negative = torch.cat([local, cross], -1)
        invalid = torch.cat([local_same | ~negatives.local_valid, cross_same | ~negatives.cross_valid], -1)
        negative = negative.masked_fill(invalid, float("-inf"))
        return torch.cat([positive, negative], -1) / logit_temp


def contrastive_loss(logits: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy with the positive as target, summed over valid slots.

    logits: ``(B, T, K)``; valid: ``(B, T)`` bool. Returns ``(loss_sum, correct)`` where ``correct``
    counts slots whose positive is the strict maximum (fairseq: argmax is 0 and argmin is not).
    """
    per_slot = torch.logsumexp(logits, -1) - logits[..., 0]
    loss = torch.where(valid, per_slot, 0.0).sum()
    is_max = logits.argmax(-1) == 0
    is_min = logits.argmin(-1) == 0
    correct = (is_max & ~is_min & valid).sum()
    return loss, correct


def diversity_loss(prob_perplexity: Tensor, num_entries: int) -> Tensor:
    """``(G*V - prob_perplexity) / (G*V)``: 0 when every codebook entry is used equally."""
    return (num_entries - prob_perplexity) / num_entries
