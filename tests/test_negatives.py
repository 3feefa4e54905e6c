from __future__ import annotations

import torch

from speechssl.objectives.negatives import sample_negatives


def test_local_negatives_never_self_never_unused_slots() -> None:
    counts = torch.tensor([20, 7, 2, 13])
    neg = sample_negatives(counts, length=30, num_negatives=100)
    assert neg.local.shape == (4, 30, 100)
    slots = torch.arange(30).view(1, 30, 1)
    used = slots < counts.view(4, 1, 1)
    assert not (neg.local == slots)[used.expand_as(neg.local)].any()
    assert (neg.local < counts.view(4, 1, 1))[used.expand_as(neg.local)].all()
    assert neg.local_valid[used.expand_as(neg.local)].all()


def test_local_negatives_are_uniform() -> None:
    counts = torch.tensor([11])
    neg = sample_negatives(counts, length=11, num_negatives=20000)
    hist = torch.bincount(neg.local[0, 4], minlength=11).float()
    assert hist[4] == 0
    others = torch.cat([hist[:4], hist[5:]])
    expected = 20000 / 10
    assert ((others - expected).abs() / expected < 0.06).all(), others  # 6% is > 4 sigma here


def test_single_masked_frame_has_no_valid_negative() -> None:
    neg = sample_negatives(torch.tensor([1, 5]), length=5, num_negatives=10)
    assert not neg.local_valid[0, 0].any() and neg.local_valid[1, :5].all()


def test_cross_sample_negatives() -> None:
    counts = torch.tensor([4, 6, 3])
    length = 8
    neg = sample_negatives(counts, length, num_negatives=0, cross_sample_negatives=5000)
    row, col = neg.cross // length, neg.cross % length
    assert (col < counts[row]).all()  # only used slots of any row
    self_row = torch.arange(3).view(3, 1, 1).expand_as(row)
    self_col = torch.arange(length).view(1, length, 1).expand_as(col)
    assert not ((row == self_row) & (col == self_col))[:, :3].any()
    assert set(row[0, 0].tolist()) == {0, 1, 2}  # other utterances too


def test_rows_without_candidates_still_index_in_range() -> None:
    neg = sample_negatives(torch.tensor([0, 1]), length=1, num_negatives=5, cross_sample_negatives=3)
    assert not neg.local_valid.any() and not neg.cross_valid.any()
    assert (neg.local == 0).all() and (neg.cross < 2).all()
