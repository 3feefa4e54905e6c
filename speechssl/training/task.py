"""The contract between the trainer and a job: :class:`Task`, and what one step gives back.

A task builds the model, turns a loader batch into device inputs, runs the forward, and turns
summed statistics into metrics. Pretraining (``pretrain/task.py``) and CTC fine-tuning
(``finetune/task.py``) are the two tasks; the trainer knows nothing else about either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from speechssl.data.loader import AudioBatch


@dataclass
class StepOutput:
    """loss: summed over the batch's targets (a tensor, no host sync); sample_size: number of
    targets; stats: more sums (device scalars) the task turns into metrics."""

    loss: Tensor
    sample_size: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


class Task:
    """What the trainer needs from a job. Subclasses implement the methods that raise
    NotImplementedError; the others have defaults that do nothing special.

    stat_keys: the names of :attr:`StepOutput.stats`, summed over micro-batches, updates and ranks.
    progress_keys: the metrics shown in the progress bar (besides the LR and the throughput) and
        printed after each validation.
    best_metric: a validation metric to minimise; the best model is exported to ``best.pt`` and
        the models to average are ranked by it. None: no ``best.pt``, averaging ranks by loss.
    """

    stat_keys: tuple[str, ...] = ()
    progress_keys: tuple[str, ...] = ("loss",)
    best_metric: str | None = None

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def prepare(self, model: nn.Module, batch: AudioBatch, device: torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
        """Move a batch to the device and fix what must be known before the forward; returns a
        dict with at least ``sample_size`` (device scalar) and ``audio_seconds`` (float)."""
        raise NotImplementedError

    def forward(self, engine: nn.Module, prepared: dict[str, Any]) -> StepOutput:
        raise NotImplementedError

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn summed stats (``loss``, ``sample_size`` and :attr:`stat_keys`) into logged metrics."""
        raise NotImplementedError

    def export(self, model: nn.Module, path: Path) -> None:
        """Write the standalone model file (``model.pt``, ``best.pt``)."""
        raise NotImplementedError

    def check_health(self, update: int, metrics: dict[str, float]) -> None:
        """Warn about a run going wrong, from the training metrics of a log line (rank 0)."""

    def param_group(self, name: str) -> str:
        """The optimizer group of parameter ``name``: groups get their own LR factor."""
        return ""

    def lr_factor(self, group: str, update: int) -> float:
        """Scales the LR of ``group`` at ``update`` (0 freezes it)."""
        return 1.0
