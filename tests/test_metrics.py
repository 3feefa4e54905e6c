"""Downstream metrics (:mod:`speechssl.metrics`) on cases worked out by hand."""

from __future__ import annotations

import pytest
import torch

from speechssl.metrics import accuracy, eer, macro_f1, min_dcf


def test_accuracy_and_macro_f1() -> None:
    labels, predicted = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0])
    assert accuracy(predicted, labels) == pytest.approx(0.6)
    # F1: class 0 2*1/(2+1+1) = 0.5, class 1 2*2/(4+1) = 0.8, class 2 0; class 3 never occurs
    assert macro_f1(predicted, labels, num_labels=4) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(labels, labels, num_labels=4) == 1.0
    with pytest.raises(ValueError, match="one shape"):
        accuracy(predicted, labels[:3])


def test_equal_error_rate_and_detection_cost() -> None:
    target = torch.tensor([True, True, False, False])
    assert eer(torch.tensor([0.9, 0.8, 0.1, 0.2]), target) == 0.0
    assert eer(torch.tensor([0.1, 0.2, 0.9, 0.8]), target) == 1.0
    # sorted 0.1 (non), 0.4 (target), 0.6 (non), 0.9 (target): misses 0 0 .5 .5 1, false alarms 1 .5 .5 0 0
    mixed = torch.tensor([0.9, 0.4, 0.6, 0.1])
    assert eer(mixed, target) == pytest.approx(0.5)
    assert min_dcf(mixed, target, p_target=0.5) == pytest.approx(0.25 / 0.5)
    assert min_dcf(torch.tensor([0.9, 0.8, 0.1, 0.2]), target) == 0.0
    assert min_dcf(torch.tensor([0.1, 0.2, 0.9, 0.8]), target) == pytest.approx(1.0)  # the trivial decision
    # one target among three non-targets, ranked second from the top: sorted 0.1 0.4 0.5 (target) 0.9,
    # misses 0 0 0 1 1, false alarms 1 2/3 1/3 1/3 0: they cross a third of the way from the third
    # threshold to the fourth, at 1/3 each
    assert eer(torch.tensor([0.1, 0.5, 0.4, 0.9]), torch.tensor([False, True, False, False])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="target and non-target"):
        eer(torch.tensor([0.1, 0.2]), torch.tensor([True, True]))
