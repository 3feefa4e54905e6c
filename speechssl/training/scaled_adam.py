"""ScaledAdam (icefall, for the Zipformer): Adam whose step for each tensor is scaled by that
tensor's RMS, plus a learned scale per tensor and gradient clipping relative to the median norm.

Per parameter tensor ``p`` (``t`` counts its steps from 0; ``lr_s = lr * scalar_lr_scale``):

- Clipping (per param group, ``clipping_scale`` set): the gradient norm is measured with each
  tensor's gradient times its RMS (scalars: times ``scalar_lr_scale``); every
  ``clipping_update_period`` steps (and at steps 10, 20, 40 with a doubled threshold) the
  threshold becomes ``clipping_scale`` times the median of the recent norms; gradients above it
  are scaled down to it.
- Adam without momentum: ``v = beta2 v + (1 - beta2) g^2``, bias-corrected while
  ``1 - beta2^(t+1) < 0.99``; ``delta = -lr g / (sqrt(v) + eps)`` (``lr_s`` for scalars).
- Tensors (not scalars): ``delta *= max(rms(p), param_min_rms)``, with ``rms(p)`` refreshed every
  ``size_update_period`` steps; every such period the tensor's scale also takes an Adam-like step
  on ``sum(p * g)`` (learning rate ``lr_s``, clamped to +-0.1 and so the RMS stays at most
  ``param_max_rms``; no shrinking below ``param_min_rms``): ``delta += p * scale_step``.
- Momentum: ``m = beta1 m + (1 - beta1) delta``; ``p += m``. Scalars are then clamped to
  ``+-scalar_max``.

A param group whose LR is 0 is left exactly as it is (frozen). Tensors of one shape and dtype are
updated together, stacked, to launch few kernels; their state is kept stacked in the state of the
group's first tensor.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class ScaledAdam(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 0.045, clipping_scale: float | None = 2.0,
                 betas: tuple[float, float] = (0.9, 0.98), scalar_lr_scale: float = 0.1, eps: float = 1e-8,
                 param_min_rms: float = 1e-5, param_max_rms: float = 3.0, scalar_max: float = 10.0,
                 size_update_period: int = 4, clipping_update_period: int = 100):
        if not 0.0 <= betas[0] <= betas[1] < 1.0:
            raise ValueError(f"ScaledAdam needs 0 <= beta1 <= beta2 < 1, got {betas}")
        defaults = dict(lr=lr, clipping_scale=clipping_scale, betas=betas, scalar_lr_scale=scalar_lr_scale, eps=eps,
                        param_min_rms=param_min_rms, param_max_rms=param_max_rms, scalar_max=scalar_max,
                        size_update_period=size_update_period, clipping_update_period=clipping_update_period)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["lr"] == 0:
                continue  # frozen: not even the momentum moves it
            batches = self._batches(group)
            if not batches:
                continue
            scale = self._clipping_scale(group, batches)
            for params, stacked, grad, state in batches:
                if scale != 1.0:
                    grad.mul_(scale)
                stacked += self._momentum_step(group, stacked, state, grad)
                if self._is_scalar(stacked):
                    stacked.clamp_(-group["scalar_max"], group["scalar_max"])
                state["step"] += 1
                for p, value in zip(params, stacked, strict=True):
                    p.copy_(value)
        return loss

    def _batches(self, group: dict) -> list[tuple[list[Tensor], Tensor, Tensor, dict]]:
        """The group's tensors by (dtype, shape), in a fixed order: ``(params, stacked params,
        stacked gradients, state)``. A missing gradient counts as zeros (as in the reference), so
        a module skipped in one step keeps its place in its stack."""
        by_shape: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("ScaledAdam does not support sparse gradients")
            by_shape[(str(p.dtype), *p.shape)].append(p)
        batches = []
        for key in sorted(by_shape):
            params = by_shape[key]
            state = self.state[params[0]]
            state.setdefault("step", 0)
            grads = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
            batches.append((params, torch.stack(params), grads, state))
        return batches

    # ------------------------------------------------------------------ the update

    @staticmethod
    def _is_scalar(p: Tensor) -> bool:
        """``p`` is stacked: one scalar per entry of its first dimension."""
        return p.numel() == p.shape[0]

    def _adam_step(self, group: dict, p: Tensor, state: dict, grad: Tensor) -> Tensor:
        lr = group["lr"] * (group["scalar_lr_scale"] if self._is_scalar(p) else 1.0)
        beta2 = group["betas"][1]
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros(p.shape, device=p.device, dtype=torch.float)
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        correction = 1 - beta2 ** (state["step"] + 1)
        if correction < 0.99:
            exp_avg_sq = exp_avg_sq / correction
        return -lr * grad / (exp_avg_sq.sqrt() + group["eps"])

    def _scaling_step(self, group: dict, p: Tensor, state: dict, grad: Tensor) -> Tensor:
        delta = self._adam_step(group, p, state, grad)
        if self._is_scalar(p):
            return delta
        step, period = state["step"], group["size_update_period"]
        dims = list(range(1, p.ndim))
        if "param_rms" not in state:
            state["param_rms"] = (p ** 2).mean(dim=dims, keepdim=True).sqrt().float()
            state["scale_exp_avg_sq"] = torch.zeros_like(state["param_rms"])
            state["scale_grads"] = torch.zeros(period, *state["param_rms"].shape, dtype=torch.float,
                                               device=p.device)
        param_rms, scale_grads = state["param_rms"], state["scale_grads"]
        scale_grads[step % period] = (p * grad).sum(dim=dims, keepdim=True)
        end_of_period = step % period == period - 1
        if end_of_period:
            param_rms.copy_((p ** 2).mean(dim=dims, keepdim=True).sqrt())
        delta = delta * param_rms.clamp(min=group["param_min_rms"])
        if end_of_period and step > 0:
            beta2 = group["betas"][1] ** period  # one moment update per period
            scale_exp_avg_sq = state["scale_exp_avg_sq"]
            scale_exp_avg_sq.mul_(beta2).add_((scale_grads ** 2).mean(dim=0), alpha=1 - beta2)
            correction = 1 - beta2 ** ((step + 1) // period)
            scale_step = (-group["lr"] * group["scalar_lr_scale"] * correction ** 0.5 * scale_grads.sum(dim=0)
                          / (scale_exp_avg_sq.sqrt() + group["eps"]))
            scale_step.masked_fill_(param_rms < group["param_min_rms"], 0.0)  # too small: do not shrink
            scale_step.clamp_(min=-0.1, max=0.1)
            scale_step = torch.minimum(scale_step, (group["param_max_rms"] - param_rms) / param_rms)
            delta = delta + p * scale_step
        return delta

    def _momentum_step(self, group: dict, p: Tensor, state: dict, grad: Tensor) -> Tensor:
        delta = self._scaling_step(group, p, state, grad)
        if "delta" not in state:
            state["delta"] = torch.zeros(p.shape, device=p.device, dtype=torch.float)
        beta1 = group["betas"][0]
        # No bias correction: the smaller first steps help stability.
        return state["delta"].mul_(beta1).add_(delta, alpha=1 - beta1)

    # ------------------------------------------------------------------ clipping

    def _clipping_scale(self, group: dict, batches: list[tuple[list[Tensor], Tensor, Tensor, dict]]) -> float:
        """The factor (<= 1) the group's gradients are to be multiplied by this step."""
        first = batches[0][3]
        step = first["step"]
        if group["clipping_scale"] is None or step == 0:
            return 1.0
        period = group["clipping_update_period"]
        total = torch.zeros((), device=batches[0][1].device)
        for _, stacked, grad, state in batches:
            if self._is_scalar(stacked):
                total += (grad ** 2).sum() * group["scalar_lr_scale"] ** 2
            else:
                total += ((grad * state["param_rms"]) ** 2).sum()
        norm = total.sqrt()
        if "model_norms" not in first:
            first["model_norms"] = torch.zeros(period, device=norm.device)
        first["model_norms"][step % period] = norm
        early = [s for s in (10, 20, 40) if s < period]
        if step % period == 0 or step in early:
            norms = first["model_norms"].sort()[0].cpu()
            if step in early:
                norms = norms[-step:]
            median = norms[min(len(norms) - 1, len(norms) // 4 * 2)].item()
            if median != median:
                raise RuntimeError("ScaledAdam: too many gradients were not finite")
            first["model_norm_threshold"] = group["clipping_scale"] * median * (2.0 if step in early else 1.0)
            clipped = first.get("num_clipped", 0) * 100.0 / len(norms)
            first["num_clipped"] = 0
            log.info("ScaledAdam clipping threshold %.3e (median gradient norm %.3e), %.1f%% of recent steps clipped",
                     first["model_norm_threshold"], median, clipped)
        if "model_norm_threshold" not in first:
            return 1.0
        scale = min(1.0, (first["model_norm_threshold"] / (norm + 1e-20)).item())
        if scale != scale:  # a non-finite gradient: drop this step's gradients
            scale = 0.0
        if scale < 1.0:
            first["num_clipped"] = first.get("num_clipped", 0) + 1
        if scale == 0.0:
            for _, _, grad, _ in batches:
                grad.zero_()  # rid of the non-finite values
        return scale
