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


def chance(p: float | Tensor, device: torch.device) -> bool | Tensor:
    """True with probability ``p``. Eager: a Python bool from :func:`uniform`, so the caller can
    skip work. Inside ``torch.compile``: a 0-dim bool tensor drawn on ``device``, as a branch on a
    host value would split the graph; the caller then computes both ways and selects."""
    if torch.compiler.is_compiling():
        return torch.rand((), device=device) < p
    return uniform() < p


class Float32Buffers(nn.Module):
    """A module whose floating-point buffers keep their float32 values when the model is cast
    (``.half()``, ``.to(torch.bfloat16)``) and only follow its device: they hold schedule points
    and probabilities, not activations."""

    def _apply(self, fn, recurse: bool = True):
        kept = {name: b for name, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            self._buffers[name] = before.to(self._buffers[name].device)
        return self


class UpdateClock(nn.Module):
    """The trainer's update count on the model's device (``count``, a 0-dim int64 buffer that is
    not saved), from which :class:`ScheduledFloat` values are computed inside ``torch.compile``:
    a Python number that changes at every update would make it recompile."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=False)

    def set_num_updates(self, num_updates: int) -> None:
        self.count.fill_(num_updates)


class ScheduledFloat(Float32Buffers):
    """A float that follows the update count piecewise-linearly between ``points`` ``(update,
    value)``, constant outside them. Read it with :func:`read` (or ``float(module)`` in eager code).

    In eval mode it is ``default``. In training mode it needs the trainer's update count through
    ``set_num_updates`` (called on every module that has it); a model trained without one reads the
    value at update 0 and logs a warning once, rather than silently falling back to ``default``.
    Inside ``torch.compile`` the value is computed on the device from an :class:`UpdateClock`
    (:meth:`follow`), which the :class:`~speechssl.models.context.zipformer.Zipformer` sets up,
    and from the points as a buffer (``point_table``, ``(P, 2)``, not saved): as graph inputs
    rather than constants, the schedules of one layer and the next give the same graph, which
    is compiled once.
    """

    _warned = False

    def __init__(self, *points: tuple[float, float], default: float = 0.0):
        super().__init__()
        if not points or any(b[0] <= a[0] for a, b in pairwise(points)):
            raise ValueError(f"ScheduledFloat needs points with increasing updates, got {points}")
        self.points = [(float(x), float(y)) for x, y in points]
        self.register_buffer("point_table", torch.tensor(self.points, dtype=torch.float32), persistent=False)
        self.default = float(default)
        self.num_updates: int | None = None
        self._clock: UpdateClock | None = None

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates

    def follow(self, clock: UpdateClock) -> None:
        """Read the update count from ``clock`` inside ``torch.compile``. The clock is referenced,
        not registered as a submodule: its owner moves and saves it."""
        object.__setattr__(self, "_clock", clock)

    def value_at(self, update: float) -> float:
        """The schedule's value at ``update``."""
        points = self.points
        if update <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in pairwise(points):
            if update <= x1:
                return y0 + (y1 - y0) * (update - x0) / (x1 - x0)
        return points[-1][1]

    def on_device(self) -> Tensor:
        """The training value as a 0-dim float32 tensor on the clock's device, computed from its
        count: the first value plus each segment's rise times its clamped progress."""
        if self._clock is None:
            raise RuntimeError("a ScheduledFloat read inside torch.compile needs an UpdateClock (follow())")
        update = self._clock.count.float()
        (x0, y0), (x1, y1) = self.point_table[:-1].unbind(1), self.point_table[1:].unbind(1)
        return self.point_table[0, 1] + ((y1 - y0) * ((update - x0) / (x1 - x0)).clamp(0.0, 1.0)).sum()

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


def read(value: FloatLike) -> float | Tensor:
    """The current value of a number or schedule: a Python float, except for a schedule in training
    inside ``torch.compile``, where it is a 0-dim tensor (:meth:`ScheduledFloat.on_device`)."""
    if isinstance(value, ScheduledFloat) and value.training and torch.compiler.is_compiling():
        return value.on_device()
    return float(value)


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
    def forward(ctx, x: Tensor, below: Tensor, above: Tensor) -> Tensor:
        ctx.save_for_backward(below, above)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        below, above = ctx.saved_tensors
        # Below the range, gradients that would lower x are flipped; above it, those that would raise it.
        flip = ((grad > 0) & below) | ((grad < 0) & above)
        return torch.where(flip, -grad, grad), None, None


def limit_param_value(x: Tensor, low: float | Tensor, high: float | Tensor, training: bool,
                      prob: float = 0.6) -> Tensor:
    """``x`` unchanged; in training, on a fraction ``prob`` of calls, gradients that would push
    elements further outside ``[low, high]`` are reversed."""
    if not training:
        return x
    on = chance(prob, x.device)
    if on is False:
        return x
    with torch.no_grad():
        below, above = x < low, x > high
        if isinstance(on, Tensor):
            below, above = below & on, above & on
    return _LimitParamValue.apply(x, below, above)


class _WithLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, loss: Tensor) -> Tensor:
        ctx.loss_shape = loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, torch.ones(ctx.loss_shape, dtype=grad.dtype, device=grad.device)


def penalize_abs_values_gt(x: Tensor, limit: float, penalty: float, on: bool | Tensor = True) -> Tensor:
    """``x`` unchanged; backward adds the gradient of ``penalty * relu(|x| - limit).sum()`` (where
    ``on``, a 0-dim bool tensor inside ``torch.compile``)."""
    over = (x.abs() > limit).to(x.dtype) * x.sign()
    if isinstance(on, Tensor):
        over = over * on
    return _WithLoss.apply(x, penalty * over * x)


class _AddScaledAbsGrad(torch.autograd.Function):
    """Identity; backward turns ``g`` into ``g + |g| * (offset + slope * x)``, with per-channel
    ``offset`` and ``slope`` (float32, broadcastable to ``x``)."""

    @staticmethod
    def forward(ctx, x: Tensor, offset: Tensor, slope: Tensor) -> Tensor:
        ctx.save_for_backward(x, offset, slope)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        x, offset, slope = ctx.saved_tensors
        g = grad.float()
        return (g + g.abs() * (offset + slope * x.float())).to(grad.dtype), None, None


def balancer_gradient(x: Tensor, channel_dim: int, min_mean: float | Tensor, max_mean: float | Tensor,
                      min_rms: float | Tensor, max_rms: float | Tensor,
                      grad_scale: float | Tensor) -> tuple[Tensor, Tensor]:
    """The gradient of the Balancer's loss with respect to ``x``, normalised to RMS ``grad_scale``
    per channel, as ``offset + slope * x`` with per-channel ``offset`` and ``slope`` (float32,
    dims kept), computed in closed form.

    The loss is, per channel, ``|m - clamp(m, min_mean, max_mean)| + |log(clamp(rms, min_rms,
    max_rms) / rms)|`` with ``m = mean / std``. With ``n`` elements per channel, ``dm/dx_i = 1/(n
    std) - mean (x_i - mean) / (n std^3)`` and ``drms/dx_i = x_i / (n rms)``; the clamps inside
    the square roots pass no gradient below 1e-20, as autograd's do.
    """
    x = x.float()
    dims = [d for d in range(x.ndim) if d != channel_dim % x.ndim]
    n = x.numel() // x.shape[channel_dim]
    mean = x.mean(dims, keepdim=True)
    second = (x * x).mean(dims, keepdim=True)
    variance = second - mean * mean
    std = variance.clamp(min=1e-20).sqrt()
    rms = second.clamp(min=1e-20).sqrt()
    m = mean / std
    if isinstance(min_mean, Tensor) or isinstance(max_mean, Tensor):  # clamp's tensor form takes both as tensors
        min_mean, max_mean = (torch.as_tensor(v, dtype=m.dtype, device=m.device) for v in (min_mean, max_mean))
    dm = torch.sign(m - m.clamp(min=min_mean, max=max_mean))  # d loss / d m: -1, 0 or 1
    dstd = dm * mean / (n * std ** 3) * (variance >= 1e-20)  # the std's share, per (x_i - mean)
    drms = ((rms > max_rms).float() - (rms < min_rms).float()) / (n * rms * rms) * (second >= 1e-20)
    offset, slope = dm / (n * std) + dstd * mean, drms - dstd
    scale = grad_scale / (offset + slope * x).pow(2).mean(dims, keepdim=True).sqrt().clamp(min=1e-20)
    return offset * scale, slope * scale


def _proportion_positive_to_mean(p: float | Tensor) -> float | Tensor:
    """Approximate mean/std of a normal variable that is positive with probability ``p``."""
    x = 2 * p - 1
    eps = 1e-10
    log = torch.log if isinstance(x, Tensor) else math.log
    return 0.8139535143 * (log(1 + x + eps) - log(1 - x + eps)) / 2.0


class Balancer(nn.Module):
    """Keeps each channel's statistics in range by changing gradients only: the proportion of
    positive values in ``[min_positive, max_positive]`` (as a mean/std bound) and the RMS in
    ``[min_abs, max_abs] * sqrt(pi / 2)``. Applied on a random fraction ``prob`` of training calls.

    Backward adds ``|g|`` times the gradient of a loss on those statistics, normalised to RMS
    ``grad_scale`` per channel. The statistics and that gradient's coefficients are computed in
    forward (:func:`balancer_gradient`), so only per-channel values wait for backward.
    """

    def __init__(self, channel_dim: int = -1, min_positive: FloatLike = 0.05, max_positive: FloatLike = 0.95,
                 min_abs: FloatLike = 0.2, max_abs: FloatLike = 100.0, grad_scale: FloatLike = 0.04,
                 prob: FloatLike | None = None):
        super().__init__()
        self.channel_dim = channel_dim
        self.min_positive, self.max_positive = min_positive, max_positive
        self.min_abs, self.max_abs, self.grad_scale = min_abs, max_abs, grad_scale
        self.prob = ScheduledFloat((0.0, 0.5), (8000.0, 0.125), default=0.4) if prob is None else prob

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and x.requires_grad):
            return x
        on = chance(read(self.prob), x.device)
        if on is False:
            return x
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            offset, slope = balancer_gradient(
                x, self.channel_dim, _proportion_positive_to_mean(read(self.min_positive)),
                _proportion_positive_to_mean(read(self.max_positive)), 1.25331413732 * read(self.min_abs),
                1.25331413732 * read(self.max_abs), read(self.grad_scale))
            if isinstance(on, Tensor):
                offset, slope = offset * on, slope * on
        return _AddScaledAbsGrad.apply(x, offset, slope)


def whitening_metric(x: Tensor, num_groups: int) -> Tensor:
    """1.0 when the centred covariance of each channel group of ``x (..., C)`` has equal eigenvalues
    (the same across groups), larger otherwise."""
    return _whitening_statistics(x, num_groups)[0]


def _whitening_statistics(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The metric and what its gradient needs: the centred groups ``(G, frames, C / G)``, their
    covariances ``(G, C / G, C / G)`` and the mean of the covariances' diagonals."""
    x = x.reshape(-1, x.shape[-1])
    frames, channels = x.shape
    x = x.reshape(frames, num_groups, channels // num_groups).transpose(0, 1)
    x = x - x.mean(1, keepdim=True)
    covar = x.transpose(1, 2) @ x
    mean_diag = covar.diagonal(dim1=1, dim2=2).mean()
    mean_sq_diag = (covar ** 2).sum() / channels
    return mean_sq_diag / (mean_diag ** 2 + 1e-20), x, covar, mean_diag


def whitening_gradient(x: Tensor, num_groups: int) -> Tensor:
    """The gradient of :func:`whitening_metric` with respect to ``x (..., C)``, float32, in closed
    form: with centred groups ``X``, covariances ``S = X^T X``, ``d = mean(diag S)``, ``q =
    sum(S^2) / C`` and ``D = d^2 + 1e-20``, it is ``4 / (C D) (X S - (q d / D) X)``. (The
    centring adds nothing: both terms have zero mean over frames.)"""
    shape, channels = x.shape, x.shape[-1]
    metric, centred, covar, mean_diag = _whitening_statistics(x.float(), num_groups)
    denominator = mean_diag ** 2 + 1e-20
    grad = (centred @ covar - (metric * mean_diag) * centred) * (4.0 / (channels * denominator))
    return grad.transpose(0, 1).reshape(shape)


class _WhiteningPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, on: Tensor, num_groups: int, grad_scale: float) -> Tensor:
        ctx.save_for_backward(x, on)
        ctx.num_groups, ctx.grad_scale = num_groups, grad_scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        x, on = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            penalty = whitening_gradient(x, ctx.num_groups)
            scale = ctx.grad_scale * grad.float().norm() / (penalty.norm() + 1e-20) * on
        return grad + (penalty * scale).to(grad.dtype), None, None, None


class Whiten(Float32Buffers):
    """Pushes the features towards a white covariance (per channel group) through the gradient
    when :func:`whitening_metric` exceeds ``whitening_limit``. Runs on a random fraction of training
    calls: ``prob[1]`` after a call that found the limit exceeded, ``prob[0]`` otherwise.

    The metric is measured in forward, on the input that backward would see. Eager code compares it
    on the host (a device synchronisation, as the reference's backward does) and keeps the
    probability in ``prob``; inside ``torch.compile`` the comparison and the probability
    (``device_prob``, a buffer that is not saved) stay on the device.
    """

    def __init__(self, num_groups: int, whitening_limit: FloatLike, prob: tuple[float, float],
                 grad_scale: FloatLike):
        super().__init__()
        self.num_groups, self.whitening_limit, self.grad_scale = num_groups, whitening_limit, grad_scale
        self.min_prob, self.max_prob = prob
        self.prob = self.max_prob
        self.register_buffer("device_prob", torch.tensor(self.max_prob), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and x.requires_grad):
            return x
        compiling = torch.compiler.is_compiling()
        if not compiling and uniform() > self.prob:
            return x
        grad_scale = float(self.grad_scale)
        if grad_scale == 0:
            return x
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            # "Not under the limit", as the reference tests it (a NaN metric counts as over).
            over = ~(whitening_metric(x.float(), self.num_groups) < read(self.whitening_limit))
            if compiling:
                check = torch.rand((), device=x.device) <= self.device_prob
                self.device_prob.copy_(torch.where(check, torch.where(over, self.max_prob, self.min_prob),
                                                   self.device_prob))
                on = check & over
            else:
                exceeded = bool(over)
                self.prob = self.max_prob if exceeded else self.min_prob
                if not exceeded:
                    return x
                on = over
        return _WhiteningPenalty.apply(x, on, self.num_groups, grad_scale)


def whitening_schedule(limit: float, ratio: float = 2.0) -> ScheduledFloat:
    """A whitening limit that loosens from ``limit`` to ``ratio * limit`` over 20k updates."""
    return ScheduledFloat((0.0, limit), (20000.0, ratio * limit), default=limit)

