"""Learning-rate schedules as multipliers of the peak LR, for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

from collections.abc import Callable

from speechssl.training.config import TrainerConfig


def eden(updates: float, hours: float, lr_batches: float, lr_hours: float, warmup_updates: float,
         warmup_start: float) -> float:
    """icefall's Eden schedule (the multiplier of the base LR) after ``updates`` updates and
    ``hours`` hours of audio: ``((u^2 + B^2) / B^2)^-0.25 ((h^2 + H^2) / H^2)^-0.25``, times a
    warmup factor rising linearly from ``warmup_start`` to 1 over ``warmup_updates``."""
    factor = (((updates ** 2 + lr_batches ** 2) / lr_batches ** 2) ** -0.25
              * ((hours ** 2 + lr_hours ** 2) / lr_hours ** 2) ** -0.25)
    if updates < warmup_updates:
        factor *= warmup_start + (1.0 - warmup_start) * updates / warmup_updates
    return factor


def lr_lambda(cfg: TrainerConfig, hours_per_update: float = 0.0) -> Callable[[int], float]:
    """``polynomial``: linear warmup from 0, then linear decay to ``end_lr`` at ``max_updates``
    (fairseq ``polynomial_decay`` with power 1). ``constant``: warmup, then flat. ``tri_stage``:
    from ``init_lr_scale`` up over the first ratio, hold, then exponential decay to
    ``final_lr_scale`` (fairseq ``tri_stage``). ``eden``: :func:`eden`, with the hours estimated
    as ``hours_per_update`` per update (icefall estimates them from its batch duration too)."""
    total, warmup = cfg.max_updates, cfg.warmup_updates
    end = cfg.end_lr / cfg.lr

    def polynomial(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if step >= total:
            return end
        return end + (1.0 - end) * (1.0 - (step - warmup) / max(1, total - warmup))

    def constant(step: int) -> float:
        return (step + 1) / warmup if warmup and step < warmup else 1.0

    def tri_stage(step: int) -> float:
        import math

        w, h, _ = (int(r * total) for r in cfg.tri_stage_ratios)
        d = total - w - h
        if step < w:
            return cfg.init_lr_scale + (1.0 - cfg.init_lr_scale) * step / max(1, w)
        if step < w + h:
            return 1.0
        if step < total:
            return math.exp(math.log(cfg.final_lr_scale) * (step - w - h) / max(1, d))
        return cfg.final_lr_scale

    def eden_schedule(step: int) -> float:
        return eden(step, step * hours_per_update, cfg.eden_lr_batches, cfg.eden_lr_hours, warmup,
                    cfg.eden_warmup_start)

    schedules = {"polynomial": polynomial, "constant": constant, "tri_stage": tri_stage, "eden": eden_schedule}
    return schedules[cfg.lr_schedule]
