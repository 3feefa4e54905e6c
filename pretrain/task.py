"""The pretraining objective as a trainer task."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speechssl.data.loader import AudioBatch
from speechssl.device import to_device
from speechssl.models.config import ModelConfig
from speechssl.models.wav2vec2 import Wav2Vec2Model
from speechssl.training.health import HealthMonitor
from speechssl.training.task import StepOutput, Task

log = logging.getLogger("speechssl.pretrain")


def matched_temp_decay(temp_start: float, temp_end: float, max_updates: int, reach: float = 0.69) -> float:
    """The ``temp_decay`` that brings the Gumbel temperature from ``temp_start`` to ``temp_end`` at
    ``reach`` of ``max_updates``, where fairseq's 0.999995 brings it over its 400k-update BASE run."""
    return math.exp(math.log(temp_end / temp_start) / (reach * max_updates))


class PretrainTask(Task):
    """Masks are drawn in ``prepare``, before any forward, so the trainer knows every micro-batch's
    number of masked frames (the loss normaliser) up front."""

    stat_keys = ("contrastive", "diversity", "feature_penalty", "correct", "prob_perplexity", "code_perplexity",
                 "temperature")
    progress_keys = ("loss", "accuracy", "prob_perplexity")

    def __init__(self, model_config: ModelConfig, max_updates: int, sample_rate: int = 16000, init: str = ""):
        self.model_config, self.init = model_config, init
        self.sample_rate = sample_rate
        self.health = HealthMonitor(model_config.quantizer.num_groups, max_updates)
        q = model_config.quantizer
        final = max(q.temp_start * q.temp_decay**max_updates, q.temp_end)
        if max_updates and final > (q.temp_start + q.temp_end) / 2:
            log.warning("the Gumbel temperature only falls from %g to %.3g in max_updates=%d (temp_decay=%g); codes "
                        "stay soft and noisy: model.quantizer.temp_decay=%.6g reaches temp_end=%g at 69%% of the run, "
                        "as fairseq's schedule does in its 400k updates", q.temp_start, final, max_updates,
                        q.temp_decay, matched_temp_decay(q.temp_start, q.temp_end, max_updates), q.temp_end)

    def build_model(self) -> nn.Module:
        """The model of ``model_config``, with the weights of ``init`` where it has them."""
        model = Wav2Vec2Model(self.model_config)
        if self.init:
            from speechssl.models.loading import load, take_weights

            with torch.random.fork_rng(devices=[]):  # building the source (a Hugging Face model) draws random
                source = load(self.init)               # weights: the run's masks must not depend on its format
            done = take_weights(model, source, f"init={self.init}")
            log.info("init=%s: %s", self.init, done.describe())
        return model

    def prepare(self, model: Wav2Vec2Model, batch: AudioBatch, device: torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
        lengths = batch.lengths
        frames = model.feature_extractor.output_lengths(lengths)
        waveforms = to_device(batch.waveforms, device, dtype)
        mask = model.masker.time_mask(to_device(frames, device), (len(lengths), int(frames.max())), device)
        return {"waveforms": waveforms, "lengths": lengths, "mask": mask, "sample_size": mask.sum(),
                "audio_seconds": float(lengths.sum()) / self.sample_rate}

    def forward(self, engine: nn.Module, p: dict[str, Any]) -> StepOutput:
        out = engine(p["waveforms"], p["lengths"], mask=p["mask"])
        n = out.sample_size.float()
        return StepOutput(out.loss, out.sample_size, {
            "contrastive": out.contrastive_loss,
            "diversity": out.diversity_loss * n,
            "feature_penalty": out.feature_penalty * n,
            "correct": out.correct,
            "prob_perplexity": out.prob_perplexity * n,
            "code_perplexity": out.code_perplexity * n,
            "temperature": n * out.temperature,
        })

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["sample_size"], 1.0)
        return {
            "loss": sums["loss"] / n,
            "contrastive": sums["contrastive"] / n,
            "diversity": sums["diversity"] / n,
            "feature_penalty": sums["feature_penalty"] / n,
            "accuracy": sums["correct"] / n,
            "prob_perplexity": sums["prob_perplexity"] / n,
            "code_perplexity": sums["code_perplexity"] / n,
            "temperature": sums["temperature"] / n,
            "masked_frames": sums["sample_size"],
        }

    def check_health(self, update: int, metrics: dict[str, float]) -> None:
        self.health.check(update, metrics)

    def export(self, model: nn.Module, path: Path) -> None:
        """A standalone fp32 model file for :func:`speechssl.load_model`."""
        clean = Wav2Vec2Model(self.model_config)
        clean.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        clean.save(path)
