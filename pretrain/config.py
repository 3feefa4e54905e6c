"""The pretraining job's config: model, data, validation shards and trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

from speechssl.data.loader import DataConfig
from speechssl.models.config import ModelConfig
from speechssl.training.config import TrainerConfig


@dataclass
class PretrainConfig:
    """model: the model section or a model YAML path. init: a model to start from instead of a
    random initialisation (continued pretraining, fairseq's ``restore_file`` with its
    ``reset_*`` options, Hugging Face's ``--model_name_or_path``): anything
    :func:`speechssl.load` takes (a model file or run folder, ``hf:NAME`` or a Hugging Face
    folder, ``ta:BUNDLE``); its weights are taken where ``model`` has the same names and shapes,
    the parts it lacks (an imported encoder's quantizer and projections) start fresh and are
    listed in the log; a resumed run goes on from its checkpoint instead. data: training shards and
    batching. valid_shards: held-out shard directories validated every ``trainer.validate_every``
    updates."""

    model: ModelConfig = field(default_factory=ModelConfig)
    init: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    valid_shards: list[str] = field(default_factory=list)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
