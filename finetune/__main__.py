"""CTC fine-tuning.

    python -m finetune --config configs/finetune/tiny.yaml pretrained=runs/tiny [dotted.key=value ...]
    deepspeed --num_gpus 8 --module finetune --config configs/finetune/tiny.yaml pretrained=runs/base
    python -m finetune transcribe MODEL AUDIO... [--output hyps.tsv] [--decoder beam --lm LM_DIR]
    python -m finetune evaluate MODEL DATA [--output DIR] [--decoder beam --lm LM_DIR]
    python -m finetune emissions MODEL DATA --output FILE    (decode later: evaluate/tune-lm --emissions FILE)
    python -m finetune build-lm TRANSCRIPTS... --output LM_DIR [--order 4]
    python -m finetune tune-lm MODEL DEV --lm LM_DIR
    python -m finetune average MODEL... --output averaged.pt  (or RUN_DIR --best N / --last N)

``pretrained`` is a pretraining run folder, a model file (``Wav2Vec2Model.save``),
``hf:NAME_OR_PATH``, or ``scratch:MODEL_CONFIG`` (a random initialisation: training from scratch).
The run folder gets ``model.pt`` (the last model), ``best.pt`` (the best by validation WER) with
``best.json``, ``averaged.pt`` with ``trainer.average_models``, checkpoints and logs, as
pretraining does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speechssl.config import ConfigError, build


def load_pretrained(source: str, seed: int = 1):
    """The pretrained speech encoder named by ``pretrained``; ``scratch:MODEL_CONFIG`` is a random
    initialisation of that architecture (drawn with ``seed``), for from-scratch baselines."""
    from speechssl import load_model

    if source.startswith("scratch:"):
        import torch

        from speechssl import Wav2Vec2Model, load_model_config

        torch.manual_seed(seed)
        return Wav2Vec2Model(load_model_config(source[len("scratch:"):]))
    if source.startswith("hf:"):
        from transformers import AutoModel

        from speechssl.interop.huggingface import from_huggingface

        return from_huggingface(AutoModel.from_pretrained(source[3:]))
    path = Path(source)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise ConfigError(f"pretrained: {path} does not exist (a run folder with model.pt, a model file, or hf:NAME)")
    try:
        return load_model(path)
    except ValueError as e:
        raise ConfigError(f"pretrained: {e}") from None


def load_config(path: str, overrides: list[str]):
    """The validated job config; every check that needs no model runs here (shards, DeepSpeed)."""
    from finetune.config import FinetuneConfig
    from speechssl.data.shardset import ShardSet
    from speechssl.training.job import check_job

    config = build(FinetuneConfig, path, overrides)
    check_job(config.data, config.valid_shards, config.trainer)
    for key, sources in (("data.shards", config.data.shards), ("valid_shards", config.valid_shards)):
        if sources and not ShardSet(sources).charset():
            raise ConfigError(f"{key}: {', '.join(sources)} hold no transcripts (the index lists no characters): "
                              "CTC fine-tuning needs labelled shards (make-shards from a manifest with text)")
    return config


def make_tokenizer(config, shardset, rank: int):
    """Characters from the shard indexes; or BPE: the given SentencePiece model, or one that rank 0
    trains on the training transcripts and writes to ``output_dir/tokenizer.model``, which the
    other ranks, and a resumed run, read."""
    from finetune.tokenizer import BpeTokenizer, CharTokenizer
    from speechssl.training.distributed import barrier

    c = config.tokenizer
    if c.type == "char":
        return CharTokenizer.build([shardset.charset()], case=c.case)
    if c.model:
        return BpeTokenizer.load(c.model, c.case)
    path = Path(config.trainer.output_dir) / "tokenizer.model"
    if rank == 0 and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(BpeTokenizer.train(shardset.transcripts(), c.vocab_size, c.case).model)
        partial.replace(path)
    barrier()
    return BpeTokenizer.load(str(path), c.case)


def train(config, encoder) -> dict:
    from finetune.task import FinetuneTask
    from speechssl.training.distributed import init_distributed, pick_device
    from speechssl.training.job import make_loaders
    from speechssl.training.run_folder import open_run_folder
    from speechssl.training.trainer import Trainer, setup_logging

    device = pick_device(config.trainer.device)
    rank, world = init_distributed(device)
    setup_logging(rank)
    lock = open_run_folder(config, rank, device)  # noqa: F841  (held until the process ends)
    train_loader, valid_loader = make_loaders(config.data, config.valid_shards, rank, world,
                                              encoder.feature_extractor.receptive_field)
    shardset = train_loader.stream.shardset
    tokenizer = make_tokenizer(config, shardset, rank)
    task = FinetuneTask(config, encoder, tokenizer, shardset.sample_rate)
    return Trainer(task, config.trainer, train_loader, valid_loader).fit()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("transcribe", "evaluate", "emissions"):
        from finetune.transcribe import main as transcribe_main

        return transcribe_main(argv)
    if argv and argv[0] in ("build-lm", "tune-lm"):
        from finetune.lm import main as lm_main

        return lm_main(argv)
    if argv and argv[0] == "average":
        from speechssl.training.averaging import main as average_main

        return average_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML of a FinetuneConfig (configs/finetune/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. pretrained=runs/tiny")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        encoder = load_pretrained(config.pretrained, config.trainer.seed)  # before any process group is set up
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from speechssl.training.job import JOB_ERRORS

    try:
        result = train(config, encoder)
    except JOB_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dist.get_rank() == 0:
        print(json.dumps({k: result[k] for k in ("output_dir", "checkpoint", "model", "update", "skipped_updates",
                                                 "data")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
