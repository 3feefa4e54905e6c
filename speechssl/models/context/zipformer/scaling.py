"""The Zipformer's building blocks that are not layers: scheduled values, BiasNorm, the Swoosh
activations, and the gradient-only training aids (Balancer, Whiten, value limits).

The training aids change no forward value: they add terms to the gradient in backward, and only
in training mode. They follow icefall's ``scaling.py`` (Zipformer2), whose behaviour they keep.
"""

from __future__ import annotations

import logging
import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


def uniform() -> float:
    """A draw from U(0, 1) on torch's CPU generator, so ``torch.manual_seed`` and the checkpointed
    RNG state fix the random choices of training (and no device synchronisation is needed)."""
    return torch.rand(()).item()


class ScheduledFloat(nn.Module):
    """A float that follows the update count piecewise-linearly between ``points`` ``(update,
    value)``, constant outside them. Read it with ``float(module)``.

    In eval mode it is ``default``. In training mode it needs the trainer's update count through
    ``set_num_updates`` (called on every module that has it); a model trained without one reads the
    value at update 0 and logs a warning once, rather than silently falling back to ``default``.
    """

    _warned = False

    def __init__(self, *points: tuple[float, float], default: float = 0.0):
        super().__init__()
        if not points or any(b[0] <= a[0] for a, b in pairwise(points)):
            raise ValueError(f"ScheduledFloat needs points with increasing updates, got {points}")
        self.points = [(float(x), float(y)) for x, y in points]
        self.default = float(default)
        self.num_updates: int | None = None

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates

    def value_at(self, update: float) -> float:
        """The schedule's value at ``update``."""
        points = self.points
        if update <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in pairwise(points):
            if update <= x1:
                return y0 + (y1 - y0) * (update - x0) / (x1 - x0)
        return points[-1][1]

    def __float__(self) -> float:
        if not self.training:
            return self.default
        if self.num_updates is None:
            if not ScheduledFloat._warned:
                ScheduledFloat._warned = True
                log.warning("a Zipformer schedule is read in training mode before any set_num_updates(): "
                            "using the values of update 0 (the trainer sets the update count)")
            return self.value_at(0)
        return self.value_at(self.num_updates)

    def extra_repr(self) -> str:
        return f"points={self.points}, default={self.default}"


FloatLike = float | ScheduledFloat


def swoosh_l(x: Tensor) -> Tensor:
    """SwooshL(x) = log(1 + exp(x - 4)) - 0.08 x - 0.035."""
    return F.softplus(x - 4.0) - 0.08 * x - 0.035


def swoosh_r(x: Tensor) -> Tensor:
    """SwooshR(x) = log(1 + exp(x - 1)) - 0.08 x - 0.313261687 (zero at x = 0)."""
    return F.softplus(x - 1.0) - 0.08 * x - 0.313261687


class BiasNorm(nn.Module):
    """``x / rms(x - bias) * exp(log_scale)`` over the last dimension: a LayerNorm without the mean
    subtraction and the per-channel gain, with a learned bias inside the RMS and one learned scale.
    ``log_scale`` is kept in ``[log_scale_min, log_scale_max]`` during training."""

    def __init__(self, num_channels: int, log_scale: float = 1.0, log_scale_min: float = -1.5,
                 log_scale_max: float = 1.5):
        super().__init__()
        # Shape (1,), not a scalar as in the reference: DeepSpeed cannot broadcast 0-dim parameters.
        self.log_scale = nn.Parameter(torch.tensor([log_scale]))
        self.bias = nn.Parameter(torch.empty(num_channels).normal_(mean=0.0, std=1e-4))
        self.log_scale_min, self.log_scale_max = log_scale_min, log_scale_max

    def forward(self, x: Tensor) -> Tensor:
        log_scale = limit_param_value(self.log_scale, self.log_scale_min, self.log_scale_max, self.training)
        scales = (x - self.bias).pow(2).mean(-1, keepdim=True).rsqrt() * log_scale.exp()
        return x * scales


def scaled_linear(in_features: int, out_features: int, bias: bool = True, initial_scale: float = 1.0) -> nn.Linear:
    """A Linear whose initial weights are scaled by ``initial_scale`` and bias drawn from
    ``U(-0.1 s, 0.1 s)`` (icefall's ``ScaledLinear``)."""
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(initial_scale)
        if linear.bias is not None:
            nn.init.uniform_(linear.bias, -0.1 * initial_scale, 0.1 * initial_scale)
    return linear


# ---------------------------------------------------------------------- gradient-only training aids


class _LimitParamValue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, low: float, high: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.low, ctx.high = low, high
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        # Below the range, gradients that would lower x are flipped; above it, those that would raise it.
        grad = grad * torch.where((grad > 0) & (x < ctx.low), -1.0, 1.0)
        grad = grad * torch.where((grad < 0) & (x > ctx.high), -1.0, 1.0)
        return grad, None, None


def limit_param_value(x: Tensor, low: float, high: float, training: bool, prob: float = 0.6) -> Tensor:
    """``x`` unchanged; in training, on a fraction ``prob`` of calls, gradients that would push
    elements further outside ``[low, high]`` are reversed."""
    if training and uniform() < prob:
        return _LimitParamValue.apply(x, low, high)
    return x


class _WithLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, loss: Tensor) -> Tensor:
        ctx.loss_shape = loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, torch.ones(ctx.loss_shape, dtype=grad.dtype, device=grad.device)


def penalize_abs_values_gt(x: Tensor, limit: float, penalty: float) -> Tensor:
    """``x`` unchanged; backward adds the gradient of ``penalty * relu(|x| - limit).sum()``."""
    over = (x.abs() > limit).to(x.dtype) * x.sign()
    return _WithLoss.apply(x, penalty * over * x)


class _BalancerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, min_mean: float, max_mean: float, min_rms: float, max_rms: float,
                grad_scale: float, channel_dim: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.config = (min_mean, max_mean, min_rms, max_rms, grad_scale, channel_dim % x.ndim)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        min_mean, max_mean, min_rms, max_rms, grad_scale, channel_dim = ctx.config
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            x = x.detach().float().requires_grad_(True)
            dims = [d for d in range(x.ndim) if d != channel_dim]
            second = (x ** 2).mean(dims, keepdim=True)
            mean = x.mean(dims, keepdim=True)
            std = (second - mean * mean).clamp(min=1e-20).sqrt()
            rms = second.clamp(min=1e-20).sqrt()
            m = mean / std
            loss = ((m - m.clamp(min=min_mean, max=max_mean)).abs()
                    + (rms.clamp(min=min_rms, max=max_rms) / rms).log().abs())
            (loss_grad,) = torch.autograd.grad(loss.sum(), x)
        loss_grad = loss_grad * (grad_scale / (loss_grad ** 2).mean(dims, keepdim=True).sqrt().clamp(min=1e-20))
        g = grad.float()
        # Each element's share is scaled by |grad| there: a noisy estimate of its magnitude.
        return (g + g.abs() * loss_grad).to(grad.dtype), None, None, None, None, None, None


def _proportion_positive_to_mean(p: float) -> float:
    """Approximate mean/std of a normal variable that is positive with probability ``p``."""
    x = 2 * p - 1
    eps = 1e-10
    return 0.8139535143 * (math.log(1 + x + eps) - math.log(1 - x + eps)) / 2.0


class Balancer(nn.Module):
    """Keeps each channel's statistics in range by changing gradients only: the proportion of
    positive values in ``[min_positive, max_positive]`` (as a mean/std bound) and the RMS in
    ``[min_abs, max_abs] * sqrt(pi / 2)``. Applied on a random fraction ``prob`` of training calls."""

    def __init__(self, channel_dim: int = -1, min_positive: FloatLike = 0.05, max_positive: FloatLike = 0.95,
                 min_abs: FloatLike = 0.2, max_abs: FloatLike = 100.0, grad_scale: FloatLike = 0.04,
                 prob: FloatLike | None = None):
        super().__init__()
        self.channel_dim = channel_dim
        self.min_positive, self.max_positive = min_positive, max_positive
        self.min_abs, self.max_abs, self.grad_scale = min_abs, max_abs, grad_scale
        self.prob = ScheduledFloat((0.0, 0.5), (8000.0, 0.125), default=0.4) if prob is None else prob

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and x.requires_grad) or uniform() >= float(self.prob):
            return x
        return _BalancerFunction.apply(
            x, _proportion_positive_to_mean(float(self.min_positive)),
            _proportion_positive_to_mean(float(self.max_positive)), 1.25331413732 * float(self.min_abs),
            1.25331413732 * float(self.max_abs), float(self.grad_scale), self.channel_dim)


def whitening_metric(x: Tensor, num_groups: int) -> Tensor:
    """1.0 when the centred covariance of each channel group of ``x (..., C)`` has equal eigenvalues
    (the same across groups), larger otherwise."""
    x = x.reshape(-1, x.shape[-1])
    frames, channels = x.shape
    x = x.reshape(frames, num_groups, channels // num_groups).transpose(0, 1)
    x = x - x.mean(1, keepdim=True)
    covar = x.transpose(1, 2) @ x
    mean_diag = covar.diagonal(dim1=1, dim2=2).mean()
    mean_sq_diag = (covar ** 2).sum() / channels
    return mean_sq_diag / (mean_diag ** 2 + 1e-20)


class _WhiteningPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, module: Whiten) -> Tensor:
        ctx.save_for_backward(x)
        ctx.module = module
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        w = ctx.module
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            x = x.detach().float().requires_grad_(True)
            metric = whitening_metric(x, w.num_groups)
            if metric < float(w.whitening_limit):
                w.prob = w.min_prob
                return grad, None
            w.prob = w.max_prob
            (penalty,) = torch.autograd.grad(metric, x)
        scale = float(w.grad_scale) * grad.float().norm() / (penalty.norm() + 1e-20)
        return grad + (penalty * scale).to(grad.dtype), None


class Whiten(nn.Module):
    """Pushes the features towards a white covariance (per channel group) through the gradient
    when :func:`whitening_metric` exceeds ``whitening_limit``. Runs on a random fraction of training
    calls: ``prob[1]`` after a call that found the limit exceeded, ``prob[0]`` otherwise."""

    def __init__(self, num_groups: int, whitening_limit: FloatLike, prob: tuple[float, float],
                 grad_scale: FloatLike):
        super().__init__()
        self.num_groups, self.whitening_limit, self.grad_scale = num_groups, whitening_limit, grad_scale
        self.min_prob, self.max_prob = prob
        self.prob = self.max_prob

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and x.requires_grad) or uniform() > self.prob or float(self.grad_scale) == 0:
            return x
        return _WhiteningPenalty.apply(x, self)


def whitening_schedule(limit: float, ratio: float = 2.0) -> ScheduledFloat:
    """A whitening limit that loosens from ``limit`` to ``ratio * limit`` over 20k updates."""
    return ScheduledFloat((0.0, limit), (20000.0, ratio * limit), default=limit)

