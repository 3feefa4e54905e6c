"""CTC fine-tuning; ``python -m finetune ...`` is an alias of ``speechssl finetune|transcribe|evaluate|
emissions|build-lm|tune-lm|average ...`` (the arguments are defined in :mod:`speechssl_cli`).

    python -m finetune --config configs/finetune/tiny.yaml pretrained=runs/tiny [dotted.key=value ...]
    deepspeed --num_gpus 8 --module finetune --config configs/finetune/tiny.yaml pretrained=runs/base
    python -m finetune transcribe MODEL AUDIO... [--output hyps.tsv] [--decoder beam --lm LM_DIR]
    python -m finetune evaluate MODEL DATA [--output DIR] [--decoder beam --lm LM_DIR]
    python -m finetune emissions MODEL DATA --output FILE    (decode later: evaluate/tune-lm --emissions FILE)
    python -m finetune build-lm TRANSCRIPTS... --output LM_DIR [--order 4]
    python -m finetune tune-lm MODEL DEV --lm LM_DIR
    python -m finetune average MODEL... --output averaged.pt  (or RUN_DIR --best N / --last N)

``pretrained`` is a pretraining run folder, a model file (pretraining, or a CTC model's encoder),
``hf:NAME_OR_PATH``, or ``scratch:MODEL_CONFIG`` (a random initialisation: training from scratch).
The run folder gets ``model.pt`` (the last model), ``best.pt`` (the best by validation WER) with
``best.json``, ``averaged.pt`` with ``trainer.average_models``, checkpoints and logs, as
pretraining does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The library is imported where it is used, so that --help answers without importing torch.

SUBCOMMANDS = ("transcribe", "evaluate", "emissions", "build-lm", "tune-lm", "average")


def load_pretrained(source: str, seed: int = 1):
    """The pretrained speech encoder named by ``pretrained``
    (:func:`speechssl.models.loading.load_speech_model`: a run folder, a model file, ``hf:NAME``, or
    ``scratch:MODEL_CONFIG``, a random initialisation drawn with ``seed``); ConfigError if it cannot
    be loaded."""
    from speechssl.config import ConfigError
    from speechssl.models.loading import load_speech_model

    try:
        return load_speech_model(source, seed)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"pretrained: {e}") from None


def load_config(path: str, overrides: list[str]):
    """The validated job config; every check that needs no model runs here (shards, DeepSpeed)."""
    from finetune.config import FinetuneConfig
    from speechssl.config import build

    return check_config(build(FinetuneConfig, path, overrides))


def check_config(config):
    """``config`` after the checks that need no model (ConfigError): the shards (labelled ones) and
    the DeepSpeed settings."""
    from speechssl.config import ConfigError
    from speechssl.data.shardset import ShardSet
    from speechssl.training.job import check_job

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
    from speechssl.asr.tokenizer import BpeTokenizer, CharTokenizer
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
    from speechssl.device import pick_device
    from speechssl.training.distributed import init_distributed
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


def describe_model(config, encoder) -> str:
    """The plan's model line: the encoder taken from ``pretrained`` and the CTC head."""
    from speechssl.asr.tokenizer import BpeTokenizer, CharTokenizer
    from speechssl.data.shardset import ShardSet

    kept = ("feature_extractor.", "frontend.", "context.")  # what fine-tuning takes from the encoder
    params = sum(p.numel() for name, p in encoder.named_parameters() if name.startswith(kept))
    t = config.tokenizer
    if t.type == "char":
        vocab = len(CharTokenizer.build([ShardSet(config.data.shards).charset()], case=t.case))
        head = f"CTC head over {vocab} tokens (characters and the blank)"
    elif t.model:
        vocab = len(BpeTokenizer.load(t.model, t.case))
        head = f"CTC head over {vocab} tokens ({t.model} and the blank)"
    else:
        vocab = t.vocab_size + 1
        head = f"CTC head over up to {vocab} tokens (BPE pieces trained when the run starts, and the blank)"
    total = params + (encoder.context.output_dim + 1) * vocab
    return (f"{config.pretrained} ({encoder.config.context.type} context network): {params / 1e6:.2f}M parameters "
            f"kept, + {head}: {total / 1e6:.2f}M parameters")


def run(args: argparse.Namespace) -> int:
    """``speechssl finetune``: train (or ``--print-config``, ``--dry-run``); the exit status."""
    from finetune.config import FinetuneConfig
    from speechssl.training.job import run_job

    # The encoder is loaded before any process group is set up.
    return run_job(args, FinetuneConfig, lambda config: load_pretrained(check_config(config).pretrained,
                                                                        config.trainer.seed),
                   train, describe_model)


def run_average(args: argparse.Namespace) -> int:
    """``speechssl average``: average model files, or the validated models of a run."""
    import json

    from speechssl.training.averaging import ValidatedModels, average_files

    try:
        if args.best is not None or args.last is not None:
            if len(args.models) != 1 or not Path(args.models[0]).is_dir():
                raise ValueError("--best and --last take one run folder")
            wanted = args.best if args.best is not None else args.last
            kept = ValidatedModels(Path(args.models[0]) / "validated", wanted,
                                   "best" if args.best is not None else "last")
            if not kept.entries:
                raise ValueError(f"{kept.folder}: no validated models (train with trainer.average_models=N)")
            if len(kept.entries) < wanted:
                print(f"{kept.folder} keeps {len(kept.entries)} models; averaging those", file=sys.stderr)
            paths = kept.paths()
        else:
            paths = [Path(p) for p in args.models]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise ValueError(f"no such model file: {', '.join(missing)}")
        average_files(paths, args.output)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output": args.output, "averaged": [str(p) for p in paths]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m finetune [SUBCOMMAND] ...``: ``speechssl finetune`` without a subcommand, else
    ``speechssl SUBCOMMAND``."""
    import speechssl_cli

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return speechssl_cli.run(speechssl_cli.alias_parser("python -m finetune", SUBCOMMANDS).parse_args(argv))
    return run(speechssl_cli.parser_for("finetune", "python -m finetune").parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
