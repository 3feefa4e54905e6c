"""Pretraining; ``python -m pretrain`` is an alias of ``speechssl pretrain`` (and ``python -m pretrain
report`` of ``speechssl report``), whose arguments are defined in :mod:`speechssl_cli.jobs`.

    python -m pretrain --config configs/pretrain/tiny.yaml [dotted.key=value ...]
    python -m pretrain --config configs/pretrain/tiny.yaml --dry-run     (or --print-config)
    deepspeed --num_gpus 8 --module pretrain --config configs/pretrain/base.yaml
    torchrun --nproc_per_node 8 -m pretrain --config configs/pretrain/base.yaml
    python -m pretrain report RUN_DIR            # metrics.jsonl -> RUN_DIR/report.png
"""

from __future__ import annotations

import argparse
import sys

# The library is imported where it is used, so that --help answers without importing torch.


def load_config(path: str, overrides: list[str]):
    """The validated job config; every check that needs no model runs here (shards, DeepSpeed)."""
    from pretrain.config import PretrainConfig
    from speechssl.config import build

    return check_config(build(PretrainConfig, path, overrides))


def check_config(config):
    """``config`` after the checks that need no model (ConfigError): shards, DeepSpeed settings, and
    that an ``init`` file or folder exists."""
    from pathlib import Path

    from speechssl.config import ConfigError
    from speechssl.models.loading import NAMED_SOURCES
    from speechssl.training.job import check_job

    if config.init and not config.init.startswith(NAMED_SOURCES) and not Path(config.init).exists():
        raise ConfigError(f"init: {config.init} does not exist (a model file or run folder, hf:NAME, a Hugging Face "
                          "folder or ta:BUNDLE)")
    check_job(config.data, config.valid_shards, config.trainer)
    return config


def train(config) -> dict:
    from pretrain.task import PretrainTask
    from speechssl.device import pick_device
    from speechssl.models.encoder import receptive_field_of
    from speechssl.training.distributed import init_distributed
    from speechssl.training.job import make_loaders
    from speechssl.training.run_folder import open_run_folder
    from speechssl.training.trainer import Trainer, setup_logging

    device = pick_device(config.trainer.device)
    rank, world = init_distributed(device)
    setup_logging(rank)
    lock = open_run_folder(config, rank, device)  # noqa: F841  (held until the process ends)
    train_loader, valid_loader = make_loaders(config.data, config.valid_shards, rank, world,
                                              receptive_field_of(config.model))
    task = PretrainTask(config.model, config.trainer.max_updates, train_loader.stream.shardset.sample_rate,
                        config.init)
    return Trainer(task, config.trainer, train_loader, valid_loader).fit()


def describe_model(config, _checked=None) -> str:
    """The plan's model line: the model built on the meta device (shapes only, no memory)."""
    import torch

    from speechssl.models.wav2vec2 import Wav2Vec2Model

    with torch.device("meta"):
        model = Wav2Vec2Model(config.model)
    params = sum(p.numel() for p in model.parameters())
    return f"Wav2Vec2Model, {config.model.context.type} context network: {params / 1e6:.2f}M parameters"


def run(args: argparse.Namespace) -> int:
    """``speechssl pretrain``: train (or ``--print-config``, ``--dry-run``); the exit status."""
    from pretrain.config import PretrainConfig
    from speechssl.training.job import run_job

    return run_job(args, PretrainConfig, check_config, lambda config, _: train(config), describe_model)


def run_report(args: argparse.Namespace) -> int:
    """``speechssl report``: render a run's metrics to a PNG; prints its path."""
    from speechssl.training.report import render

    try:
        print(render(args.run_dir, args.output))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain ...`` (``speechssl pretrain``), ``python -m pretrain report ...``
    (``speechssl report``)."""
    from speechssl_cli import parser_for

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":
        return run_report(parser_for("report", "python -m pretrain report").parse_args(argv[1:]))
    return run(parser_for("pretrain", "python -m pretrain").parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
