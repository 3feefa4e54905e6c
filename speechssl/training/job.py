"""What every training job (pretraining, fine-tuning) checks and sets up the same way, and the
command both run as (:func:`run_job`): ``--print-config``, ``--dry-run``, errors as one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from speechssl.config import ConfigError
from speechssl.data.loader import AudioLoader, DataConfig, make_loader
from speechssl.data.shardset import ShardSet
from speechssl.device import is_gpu
from speechssl.locking import FolderLocked
from speechssl.training.checkpoint import UnsafeCheckpoint
from speechssl.training.config import TrainerConfig, deepspeed_config
from speechssl.training.trainer import TrainingStopped

# What a job reports as one line on stderr (exit status 2) rather than a traceback: the user's
# input or the run folder is at fault, not the code.
JOB_ERRORS = (ConfigError, FolderLocked, UnsafeCheckpoint, TrainingStopped)


def check_job(data: DataConfig, valid_shards: list[str], trainer: TrainerConfig) -> None:
    """Everything that needs no model: the shard directories and the DeepSpeed config (ConfigError)."""
    if not data.shards:
        raise ConfigError("data.shards: no training shards given")
    for key, sources in (("data.shards", data.shards), ("valid_shards", valid_shards)):
        try:
            if sources:
                ShardSet(sources, data.weights if key == "data.shards" else None)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
    deepspeed_config(trainer, is_gpu(trainer.device))


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


# The keys of a job's result printed as its last line (JSON) on rank 0.
SUMMARY_KEYS = ("output_dir", "checkpoint", "model", "update", "skipped_updates", "data")


def run_job(args: argparse.Namespace, schema: type, check: Callable[[Any], Any], train: Callable[[Any, Any], dict],
            describe_model: Callable[[Any, Any], str]) -> int:
    """A training job's command, on ``args.config``, ``args.overrides``, ``args.print_config`` and
    ``args.dry_run``; returns the exit status.

    The config is built as ``schema`` (``--print-config``: printed as YAML, then exit 0), then
    ``check(config)`` runs every check that needs no training (shards, DeepSpeed settings, the
    job's own) and returns what ``train(config, checked)`` needs besides the config (fine-tuning:
    the pretrained model, loaded before any process group). ``--dry-run`` prints the plan
    (:func:`plan`, with ``describe_model(config, checked)``) and exits 0, with nothing built that
    training needs and nothing written. A config error is ``config error: ...`` on stderr, exit 2;
    the errors of a run that are the input's or the run folder's fault (``JOB_ERRORS``) are
    ``error: ...``, exit 2. The result's summary is the last line of stdout, as JSON, on rank 0.
    """
    from speechssl.config import build

    try:
        config = build(schema, args.config, args.overrides)
        if args.print_config:
            print(config_yaml(config), end="")
            return 0
        checked = check(config)
        if args.dry_run:
            print(plan(config, describe_model(config, checked)))
            return 0
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(config, checked)
    except JOB_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({k: result[k] for k in SUMMARY_KEYS}))
    return 0


def config_yaml(config: Any) -> str:
    """The resolved config as YAML (what the run folder's ``config.yaml`` holds)."""
    import yaml

    from speechssl.config import to_dict

    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _shards_line(sources: list[str], weights: list[float] | None, shardset: ShardSet) -> str:
    """``sources`` (read as ``shardset``): shards, utterances and hours."""
    shards = [s for source in shardset.shards for s in source]
    utterances = sum(len(s.keys) for s in shards)
    hours = sum(sum(s.lengths) for s in shards) / shardset.sample_rate / 3600
    weighted = f", weights {weights}" if weights else ""
    count = f"{len(shards)} shard{'s' * (len(shards) != 1)}"
    return (f"{', '.join(sources)}: {count}, {utterances} utterances, {hours:.3f} h at "
            f"{shardset.sample_rate} Hz{weighted}")


def plan(config: Any, model: str) -> str:
    """What a job with this (checked) config would do: its model, shards, updates, batch, run folder
    and device; read from the config, the shard indexes and the DeepSpeed JSON only."""
    from speechssl.training import checkpoint
    from speechssl.training.config import precision
    from speechssl.training.run_folder import resume_changes

    data, trainer = config.data, config.trainer
    train = ShardSet(data.shards, data.weights)
    rate = train.sample_rate
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = data.max_tokens / rate
    per_update = micro * trainer.update_freq * world
    updates = f"{trainer.max_updates} (trainer.max_updates; the LR schedule's length)"
    if trainer.stop_at:
        updates += f", this run stopping at update {trainer.stop_at}"
    if trainer.max_minutes:
        updates += f", or after {trainer.max_minutes:g} minutes of training"
    output = Path(trainer.output_dir)
    point = checkpoint.resume_point(trainer.resume, output / "checkpoints")
    state = (f"resumes from {point}" if point is not None else "new" if not output.exists() else
             "exists, with no checkpoint to resume: starts at update 0")
    changes = resume_changes(config, output)  # ConfigError for a change the resume would refuse
    if changes:
        state += "; changes taken on resume: " + "; ".join(f"{k} {old!r} -> {new!r}"
                                                            for k, (old, new) in changes.items())
    on_gpu = is_gpu(trainer.device)
    ds = deepspeed_config(trainer, on_gpu)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    rows = [
        ("model", model),
        ("train data", _shards_line(data.shards, data.weights, train)),
        ("valid data", _shards_line(config.valid_shards, None, ShardSet(config.valid_shards))
         if config.valid_shards else "none"),
        ("updates", updates),
        ("batch", f"{micro:g} s of padded audio per micro-batch (data.max_tokens {data.max_tokens} / {rate} Hz) "
                  f"x {trainer.update_freq} (trainer.update_freq) x {world} rank(s) = {per_update:g} s per update"),
        ("output_dir", f"{output} ({state})"),
        ("device", f"{'cuda' if on_gpu else 'cpu'} (trainer.device {trainer.device}); DeepSpeed {trainer.deepspeed}: "
                   f"{precision(ds)}, ZeRO stage {stage}"),
    ]
    width = max(len(k) for k, _ in rows) + 1
    return "\n".join(["dry run: the config, shards and DeepSpeed settings are valid; nothing was trained or written",
                      *(f"{k + ':':<{width}} {v}" for k, v in rows)])
