"""Scores of downstream tasks: accuracy and macro F1 for classification, equal error rate and the
minimum detection cost for speaker-verification trials.

    accuracy(predicted, labels); macro_f1(predicted, labels, num_labels)
    eer(scores, is_target); min_dcf(scores, is_target, p_target=0.01)

Trials are scored pairs: a higher score says "same speaker"; ``is_target`` is True where it is.
The detection cost follows NIST SRE: ``C_miss * P_miss * P_target + C_fa * P_fa * (1 -
P_target)``, normalised by the cost of the better trivial decision, minimised over thresholds.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accuracy(predicted: Tensor, labels: Tensor) -> float:
    """The share of ``predicted`` class ids equal to ``labels`` (any matching shapes)."""
    if predicted.shape != labels.shape or predicted.numel() == 0:
        raise ValueError(f"accuracy needs two non-empty tensors of one shape, got {tuple(predicted.shape)} "
                         f"and {tuple(labels.shape)}")
    return (predicted == labels).double().mean().item()


def macro_f1(predicted: Tensor, labels: Tensor, num_labels: int) -> float:
    """The mean F1 over the classes that occur in ``labels`` or ``predicted`` (a class of the
    ``num_labels`` that occurs in neither is left out)."""
    if predicted.shape != labels.shape or predicted.numel() == 0:
        raise ValueError("macro_f1 needs two non-empty tensors of one shape")
    predicted, labels = predicted.flatten().long(), labels.flatten().long()
    classes = torch.arange(num_labels)
    tp = ((predicted[:, None] == classes) & (labels[:, None] == classes)).sum(0).double()
    fp = ((predicted[:, None] == classes) & (labels[:, None] != classes)).sum(0).double()
    fn = ((predicted[:, None] != classes) & (labels[:, None] == classes)).sum(0).double()
    seen = (tp + fp + fn) > 0
    f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    return f1[seen].mean().item()


def _error_rates(scores: Tensor, is_target: Tensor) -> tuple[Tensor, Tensor]:
    """Miss and false-alarm rates at every threshold between sorted scores, the lowest first
    (everything accepted) to the highest (everything rejected)."""
    is_target = is_target.flatten().bool()
    scores = scores.flatten().double()
    targets, non_targets = int(is_target.sum()), int((~is_target).sum())
    if targets == 0 or non_targets == 0:
        raise ValueError(f"verification needs target and non-target trials; got {targets} and {non_targets}")
    order = torch.argsort(scores, stable=True)
    sorted_target = is_target[order].double()
    zero = torch.zeros(1, dtype=torch.float64)
    # rejecting the k lowest-scored trials: misses are the targets among them, false alarms the rest
    misses = torch.cat([zero, sorted_target.cumsum(0)]) / targets
    false_alarms = 1 - torch.cat([zero, (1 - sorted_target).cumsum(0)]) / non_targets
    return misses, false_alarms


def eer(scores: Tensor, is_target: Tensor) -> float:
    """Equal error rate: where the miss and false-alarm rates cross, linearly interpolated."""
    misses, false_alarms = _error_rates(scores, is_target)
    gap = misses - false_alarms  # rises from -1 to +1
    i = int(torch.nonzero(gap >= 0)[0])
    if i == 0 or gap[i] == 0:
        return ((misses[i] + false_alarms[i]) / 2).item()
    # cross between thresholds i-1 and i
    w = -gap[i - 1] / (gap[i] - gap[i - 1])
    return (misses[i - 1] + w * (misses[i] - misses[i - 1])).item()


def min_dcf(scores: Tensor, is_target: Tensor, p_target: float = 0.01, c_miss: float = 1.0,
            c_fa: float = 1.0) -> float:
    """The normalised minimum detection cost over thresholds (NIST SRE; SpeechBrain's defaults)."""
    if not 0 < p_target < 1:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    misses, false_alarms = _error_rates(scores, is_target)
    cost = c_miss * misses * p_target + c_fa * false_alarms * (1 - p_target)
    return (cost.min() / min(c_miss * p_target, c_fa * (1 - p_target))).item()
