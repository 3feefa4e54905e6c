"""The pretraining job's config: model, data, validation shards and trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

from speechssl.data.loader import DataConfig
from speechssl.models.config import ModelConfig
from speechssl.training.config import TrainerConfig


@dataclass
class PretrainConfig:
    """model: the model section or a model YAML path. data: training shards and batching.
    valid_shards: held-out shard directories validated every ``trainer.validate_every`` updates."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    valid_shards: list[str] = field(default_factory=list)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
