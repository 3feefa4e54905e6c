"""What every training job (pretraining, fine-tuning) checks and sets up the same way."""

from __future__ import annotations

import dataclasses

from speechssl.config import ConfigError
from speechssl.data.loader import AudioLoader, DataConfig, make_loader
from speechssl.data.shardset import ShardSet
from speechssl.training.config import TrainerConfig, deepspeed_config


def check_job(data: DataConfig, valid_shards: list[str], trainer: TrainerConfig) -> None:
    """Everything that needs no model: the shard directories and the DeepSpeed config (ConfigError)."""
    import torch

    if not data.shards:
        raise ConfigError("data.shards: no training shards given")
    for key, sources in (("data.shards", data.shards), ("valid_shards", valid_shards)):
        try:
            if sources:
                ShardSet(sources, data.weights if key == "data.shards" else None)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
    on_gpu = trainer.device == "cuda" or (trainer.device == "auto" and torch.cuda.is_available())
    deepspeed_config(trainer, on_gpu)


def make_loaders(data: DataConfig, valid_shards: list[str], rank: int,
                 world_size: int) -> tuple[AudioLoader, AudioLoader | None]:
    """The training loader and, when there are validation shards, the validation loader."""
    train = make_loader(data, train=True, rank=rank, world_size=world_size)
    if not valid_shards:
        return train, None
    valid_data = dataclasses.replace(data, shards=valid_shards, weights=None)
    return train, make_loader(valid_data, train=False, rank=rank, world_size=world_size)
