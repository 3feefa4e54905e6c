from __future__ import annotations

import math

import pytest
import torch

from speechssl.objectives.losses import contrastive_logits, contrastive_loss, diversity_loss
from speechssl.objectives.negatives import Negatives


def test_hand_computed_example() -> None:
    # One utterance, three masked slots, 2-d vectors; each slot takes the other two as negatives.
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    targ = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]]])
    codes = torch.tensor([[[0], [1], [2]]])
    local = torch.tensor([[[1, 2], [0, 2], [0, 1]]])
    empty = torch.zeros(1, 3, 0, dtype=torch.long)
    neg = Negatives(local, torch.ones_like(local, dtype=torch.bool), empty, torch.ones_like(empty, dtype=torch.bool))
    logits = contrastive_logits(pred, targ, codes, neg, logit_temp=0.5)
    r = 1 / math.sqrt(2)
    # slot 0: pos cos((1,0),(2,0))=1; negs (1,1): r, (0,-3): 0
    # slot 1: pos cos((0,2),(1,1))=r; negs (2,0): 0, (0,-3): -1
    # slot 2: pos cos((1,1),(0,-3))=-r; negs (2,0): r, (1,1): 1
    expected = torch.tensor([[[1.0, r, 0.0], [r, 0.0, -1.0], [-r, r, 1.0]]]) / 0.5
    torch.testing.assert_close(logits, expected)
    loss, correct = contrastive_loss(logits, torch.ones(1, 3, dtype=torch.bool))
    manual = sum(-torch.log_softmax(expected[0, i], 0)[0] for i in range(3))
    torch.testing.assert_close(loss, manual)
    assert correct.item() == 2  # slots 0 and 1 rank the positive first


def test_negative_equal_to_positive_gets_minus_inf_and_invalid_slots_do_not_count() -> None:
    pred = torch.randn(1, 3, 4)
    targ = torch.randn(1, 3, 4)
    codes = torch.tensor([[[5], [5], [7]]])  # slots 0 and 1 quantized to the same entry
    local = torch.tensor([[[1, 2], [0, 2], [0, 1]]])
    empty = torch.zeros(1, 3, 0, dtype=torch.long)
    neg = Negatives(local, torch.ones_like(local, dtype=torch.bool), empty, torch.ones_like(empty, dtype=torch.bool))
    logits = contrastive_logits(pred, targ, codes, neg, logit_temp=0.1)
    assert logits[0, 0, 1] == float("-inf") and logits[0, 1, 1] == float("-inf")
    assert torch.isfinite(logits[0, 2]).all()
    valid = torch.tensor([[True, True, False]])
    loss, _ = contrastive_loss(logits, valid)
    per_slot = torch.logsumexp(logits, -1) - logits[..., 0]
    torch.testing.assert_close(loss, per_slot[0, :2].sum())


def test_diversity_loss() -> None:
    assert diversity_loss(torch.tensor(640.0), 640).item() == 0.0
    assert diversity_loss(torch.tensor(2.0), 640).item() == pytest.approx((640 - 2) / 640)
