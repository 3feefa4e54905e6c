"""Freezing schedules in NeMo's ``freeze_updates`` form, per top-level module of the CTC model.

    freeze_updates:
      feature_extractor: -1    # frozen for the whole run (the default)
      context: 500             # frozen for the first 500 updates (0 .. 499)
      frontend: [100, 200]     # frozen from update 100 to update 200, both included
      lm_head: [1000, -1]      # frozen from update 1000 to the end

Updates count from 0. A frozen module runs without gradients and gets no optimizer update (its
parameter groups get a learning rate of 0, which leaves them exactly unchanged with any ZeRO stage).
As NeMo's ``freeze()`` does, it also runs in eval mode: no dropout or layer drop, and a BatchNorm
uses its running statistics and leaves them unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from speechssl.config import check

MODULES = ("feature_extractor", "frontend", "context", "lm_head")


def check_schedule(schedule: Mapping[str, Any], key: str = "freeze_updates") -> dict[str, int | list[int]]:
    """The schedule as plain values, or a ConfigError naming the bad entry."""
    out: dict[str, int | list[int]] = {}
    for module, spec in schedule.items():
        where = f"{key}.{module}"
        check(module in MODULES, where, f"unknown module; freezable: {', '.join(MODULES)}")
        if isinstance(spec, int) and not isinstance(spec, bool):
            check(spec == -1 or spec >= 0, where,
                  f"must be -1 (always), N >= 0 (the first N updates) or [a, b], got {spec}")
            out[module] = spec
            continue
        spec = list(spec) if isinstance(spec, (list, tuple)) else spec
        check(isinstance(spec, list) and len(spec) == 2 and all(isinstance(v, int) for v in spec), where,
              f"must be -1, N or [a, b], got {spec!r}")
        start, end = spec
        check(start >= 0 and (end == -1 or end >= start), where, f"[a, b] needs 0 <= a <= b or b = -1, got {spec}")
        out[module] = [start, end]
    return out


def is_frozen(spec: int | list[int], update: int) -> bool:
    """Whether a module with schedule ``spec`` is frozen at (0-based) ``update``."""
    if isinstance(spec, int):
        return spec == -1 or update < spec
    start, end = spec
    return update >= start and (end == -1 or update <= end)


def frozen_modules(schedule: Mapping[str, int | list[int]], update: int) -> frozenset[str]:
    return frozenset(module for module, spec in schedule.items() if is_frozen(spec, update))
