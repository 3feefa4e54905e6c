"""What every training job (pretraining, fine-tuning) checks and sets up the same way."""

from __future__ import annotations

import dataclasses

from speechssl.config import ConfigError
from speechssl.data.loader import AudioLoader, DataConfig, make_loader
from speechssl.data.shardset import ShardSet
from speechssl.locking import FolderLocked
from speechssl.training.checkpoint import UnsafeCheckpoint
from speechssl.training.config import TrainerConfig, deepspeed_config
from speechssl.training.trainer import TrainingStopped

# What a job reports as one line on stderr (exit status 2) rather than a traceback: the user's
# input or the run folder is at fault, not the code.
JOB_ERRORS = (ConfigError, FolderLocked, UnsafeCheckpoint, TrainingStopped)


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


def make_loaders(data: DataConfig, valid_shards: list[str], rank: int, world_size: int,
                 min_input_samples: int = 0) -> tuple[AudioLoader, AudioLoader | None]:
    """The training loader and, when there are validation shards, the validation loader; both drop
    (and count) samples shorter than ``min_input_samples``, the model's receptive field."""
    train = make_loader(data, train=True, rank=rank, world_size=world_size, min_input_samples=min_input_samples)
    if not valid_shards:
        return train, None
    valid_data = dataclasses.replace(data, shards=valid_shards, weights=None)
    return train, make_loader(valid_data, train=False, rank=rank, world_size=world_size,
                              min_input_samples=min_input_samples)
