"""Pretraining.

    python -m pretrain --config configs/pretrain/tiny.yaml [dotted.key=value ...]
    deepspeed --num_gpus 8 --module pretrain --config configs/pretrain/base.yaml
    torchrun --nproc_per_node 8 -m pretrain --config configs/pretrain/base.yaml
    python -m pretrain report RUN_DIR            # metrics.jsonl -> RUN_DIR/report.png
"""

from __future__ import annotations

import argparse
import json
import sys

from speechssl.config import ConfigError, build


def load_config(path: str, overrides: list[str]):
    """The validated job config; every check that needs no model runs here (shards, DeepSpeed)."""
    from pretrain.config import PretrainConfig
    from speechssl.training.job import check_job

    config = build(PretrainConfig, path, overrides)
    check_job(config.data, config.valid_shards, config.trainer)
    return config


def train(config) -> dict:
    from pretrain.task import PretrainTask
    from speechssl.models.encoder import receptive_field_of
    from speechssl.training.distributed import init_distributed, pick_device
    from speechssl.training.job import make_loaders
    from speechssl.training.run_folder import open_run_folder
    from speechssl.training.trainer import Trainer, setup_logging

    device = pick_device(config.trainer.device)
    rank, world = init_distributed(device)
    setup_logging(rank)
    lock = open_run_folder(config, rank, device)  # noqa: F841  (held until the process ends)
    train_loader, valid_loader = make_loaders(config.data, config.valid_shards, rank, world,
                                              receptive_field_of(config.model))
    task = PretrainTask(config.model, config.trainer.max_updates, train_loader.stream.shardset.sample_rate)
    return Trainer(task, config.trainer, train_loader, valid_loader).fit()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":
        from pretrain.report import render

        parser = argparse.ArgumentParser(prog="python -m pretrain report")
        parser.add_argument("run_dir")
        parser.add_argument("--output", help="PNG path (default RUN_DIR/report.png)")
        args = parser.parse_args(argv[1:])
        try:
            print(render(args.run_dir, args.output))
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML of a PretrainConfig (configs/pretrain/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. trainer.max_updates=100")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from speechssl.training.job import JOB_ERRORS

    try:
        result = train(config)
    except JOB_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dist.get_rank() == 0:
        print(json.dumps({k: result[k] for k in ("output_dir", "checkpoint", "model", "update", "skipped_updates",
                                                 "data")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
