"""ScaledAdam and the Eden schedule against their definitions and against the reference package."""

from __future__ import annotations

import math

import pytest
import torch

from speechssl.training.config import TrainerConfig
from speechssl.training.scaled_adam import ScaledAdam
from speechssl.training.schedule import eden, lr_lambda
from tests.zipformer_reference import reference_optim


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    """Two tensors of one shape (updated stacked), a vector, and two scalars."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (6, 5), (7,), (1,), (1,)]
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in shapes]


def test_first_step_follows_the_definition() -> None:
    params = _params()
    before = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    lr, beta1, eps = 0.05, 0.9, 1e-8
    ScaledAdam(params, lr=lr, betas=(beta1, 0.98), eps=eps).step()
    for p, p0, g in zip(params, before, grads, strict=True):
        # Step 0: v = (1 - beta2) g^2, bias-corrected to g^2, so the Adam step is lr * g / (|g| + eps);
        # scaled by the tensor's RMS (scalars: lr * scalar_lr_scale instead); momentum keeps 1 - beta1.
        if p.numel() == 1:
            expected = p0 - (1 - beta1) * lr * 0.1 * g / (g.abs() + eps)
        else:
            expected = p0 - (1 - beta1) * lr * p0.pow(2).mean().sqrt() * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=1e-6)


def test_scalars_are_clamped() -> None:
    scalar = torch.nn.Parameter(torch.tensor([9.99]))
    optimizer = ScaledAdam([scalar], lr=1.0, scalar_max=10.0)
    for _ in range(20):
        scalar.grad = torch.tensor([-1.0])  # pushes up
        optimizer.step()
    assert scalar.item() == pytest.approx(10.0)


def test_matches_the_reference_scaled_adam() -> None:
    """Many steps, including size updates, the clipping threshold's early and periodic estimates,
    a gradient spike that gets clipped, and a tensor without a gradient in some steps."""
    ref_optim = reference_optim()
    ours, theirs = _params(), _params()
    settings = dict(lr=0.03, clipping_scale=2.0, size_update_period=4, clipping_update_period=20)
    opt_ours, opt_theirs = ScaledAdam(ours, **settings), ref_optim.ScaledAdam(theirs, **settings)
    g = torch.Generator().manual_seed(1)
    for step in range(60):
        for a, b in zip(ours, theirs, strict=True):
            grad = torch.randn(a.shape, generator=g) * (50.0 if step == 45 else 1.0)
            a.grad, b.grad = grad.clone(), grad.clone()
        if step % 7 == 3:
            ours[2].grad = theirs[2].grad = None
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-5)
    assert any(state.get("model_norm_threshold", 0) > 0 for state in opt_ours.state.values())  # clipping was on


def test_eden_follows_its_formula() -> None:
    b, h = 7500.0, 100.0
    assert eden(0, 0.0, b, h, 500, 0.1) == pytest.approx(0.1)
    assert eden(250, 0.0, b, h, 500, 0.1) == pytest.approx(0.55 * (1 + (250 / b) ** 2) ** -0.25)
    # After warm-up: the batch factor halves the LR at sqrt(15) * lr_batches, the hours factor at
    # sqrt(15) * lr_hours.
    assert eden(b * math.sqrt(15), 0.0, b, h, 500, 0.1) == pytest.approx(0.5)
    assert eden(600, h * math.sqrt(15), b, h, 500, 0.1) == pytest.approx(0.5 * (1 + (600 / b) ** 2) ** -0.25)


def test_eden_matches_the_reference_scheduler() -> None:
    ref_optim = reference_optim()
    param = torch.nn.Parameter(torch.zeros(1))
    reference = ref_optim.Eden(ref_optim.ScaledAdam([param], lr=0.045), lr_batches=7500, lr_epochs=3.5,
                               warmup_batches=500, warmup_start=0.1)
    config = TrainerConfig(lr=0.045, lr_schedule="eden", eden_lr_batches=7500, eden_lr_hours=3.5,
                           warmup_updates=500, eden_warmup_start=0.1)
    hours_per_update = 0.002
    schedule = lr_lambda(config, hours_per_update)
    for step in (0, 1, 100, 499, 500, 5000, 30000):
        reference.step_batch(step)
        reference.step_epoch(step * hours_per_update)
        assert 0.045 * schedule(step) == pytest.approx(reference.get_last_lr()[0], rel=1e-12)
