"""``speechssl export``: the model file of a run, from its newest complete checkpoint or a given one.

The file is the one the run writes to ``model.pt`` at its end, made the same way: the weights of
the checkpoint's module (DeepSpeed's ``mp_rank_00_model_states.pt``, whole at ZeRO stages 0 to 2)
go through the job's own export (``PretrainTask.export``, ``FinetuneTask.export``), built from
the run folder's ``config.yaml``. A pretraining run gives a file for :func:`speechssl.load_model`;
a fine-tuning run a CTC model file, whose architecture comes from its ``pretrained`` model and whose
tokenizer is rebuilt as a resumed run rebuilds it (the training shards' characters, or the run's
``tokenizer.model``), so both must still be there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

MODULE_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's file of the module's weights (no model parallelism)


def find_checkpoint(source: Path) -> tuple[Path, Path]:
    """``(run folder, checkpoint folder)`` of a run folder (its newest complete checkpoint) or of a
    checkpoint folder (``RUN/checkpoints/update_NNNNNNNN``); FileNotFoundError naming what is missing."""
    from speechssl.training import checkpoint

    if (source / checkpoint.COMPLETE).is_file():
        return source.parent.parent, source
    if source.name.startswith("update_") and source.is_dir():
        raise FileNotFoundError(f"{source} is not a complete checkpoint (no {checkpoint.COMPLETE}: its save did not "
                                "finish); give the run folder to take its newest complete one")
    root = source / "checkpoints"
    if not source.is_dir():
        raise FileNotFoundError(f"{source} does not exist (a run folder or a checkpoint folder)")
    folder = checkpoint.latest(root) if root.is_dir() else None
    if folder is None:
        raise FileNotFoundError(f"{source} holds no complete checkpoint (looked in {root})")
    return source, folder


def export(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write the model file of ``source`` (a run folder or a checkpoint folder) to ``output``;
    returns what was written from what. ConfigError, FileNotFoundError, ValueError (UnsafeCheckpoint
    among them) or FileExistsError for what is wrong with the inputs."""
    import yaml

    from speechssl.training import checkpoint
    from speechssl.training.run_folder import CONFIG_FILE

    run_dir, folder = find_checkpoint(Path(source))
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; give --overwrite to replace it")
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {CONFIG_FILE} (written by the run when it starts)")
    tree = yaml.safe_load(config_path.read_text()) or {}
    states = folder / MODULE_STATES
    if not states.is_file():
        raise FileNotFoundError(f"{folder} has no {MODULE_STATES} (not a DeepSpeed checkpoint of this project)")
    weights = checkpoint.safe_load(states, map_location="cpu")["module"]
    model = SimpleNamespace(state_dict=lambda: weights)  # what a task's export reads of the trained model
    kind = "fine-tuning" if "pretrained" in tree else "pretraining"
    task = _finetune_task(tree, run_dir) if kind == "fine-tuning" else _pretrain_task(tree)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    try:
        task.export(model, partial)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    update = int((folder / checkpoint.COMPLETE).read_text().split()[0])
    return {"output": str(output), "checkpoint": str(folder), "update": update, "run": kind}


def _pretrain_task(tree: dict):
    from pretrain.config import PretrainConfig
    from pretrain.task import PretrainTask
    from speechssl.config import build

    config = build(PretrainConfig, tree)
    return PretrainTask(config.model, config.trainer.max_updates)


def _finetune_task(tree: dict, run_dir: Path):
    import dataclasses

    from finetune.__main__ import load_pretrained, make_tokenizer
    from finetune.config import FinetuneConfig
    from finetune.task import FinetuneTask
    from speechssl.config import ConfigError, build
    from speechssl.data.shardset import ShardSet

    config = build(FinetuneConfig, tree)
    # The run's tokenizer as a resumed run rebuilds it; a BPE model is read from the run folder only.
    config = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, output_dir=str(run_dir)))
    if config.tokenizer.type == "bpe" and not config.tokenizer.model and not (run_dir / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{run_dir} has no tokenizer.model (the BPE model the run trained)")
    try:
        shardset = ShardSet(config.data.shards)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.shards (the tokenizer's characters): {e}") from None
    tokenizer = make_tokenizer(config, shardset, rank=0)
    return FinetuneTask(config, load_pretrained(config.pretrained, config.trainer.seed), tokenizer,
                        shardset.sample_rate)


def export_elsewhere(source: str, output: str | os.PathLike, form: str, overwrite: bool = False,
                     layers: str | None = None) -> dict:
    """``source`` (anything :func:`speechssl.load` takes) as a Hugging Face folder (``hf``),
    torchaudio's model scripted with TorchScript (``torchaudio``: ``torch.jit.load`` reads it
    without speechssl; a CTC model's head as ``aux`` with its ``labels``), an ONNX file
    (``onnx``), a fairseq checkpoint (``fairseq``; a character CTC model's ``dict.ltr.txt``
    beside it) or a fairseq2 checkpoint (``fairseq2``; its config beside it as ``.yaml``); what was
    written."""
    import torch

    import speechssl

    target = Path(output)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    if layers is not None and form != "onnx":
        raise ValueError("--layers is for --format onnx")
    model = speechssl.load(source)
    if form == "hf":
        from speechssl.interop.huggingface import save_huggingface

        save_huggingface(model, target)
    elif form == "fairseq":
        from speechssl.interop.fairseq import save_fairseq

        save_fairseq(model, target)
    elif form == "fairseq2":
        from speechssl.interop.fairseq2 import save_fairseq2_checkpoint

        save_fairseq2_checkpoint(model, target)
    elif form == "torchaudio":
        from speechssl.interop.torchaudio import to_torchaudio

        target.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(torch.jit.script(to_torchaudio(model).eval()), target)
    else:
        from speechssl.interop.onnx import export_onnx

        chosen = None if layers is None else layers if layers in ("last", "all") else \
            [int(i) for i in layers.split(",")]
        export_onnx(model, target, layers=chosen)
    return {"output": str(target), "format": form, "model": type(model).__name__}


def run(args: argparse.Namespace) -> int:
    """``speechssl export``; prints what was written as JSON."""
    from speechssl.config import ConfigError

    try:
        if args.format != "model":
            done = export_elsewhere(args.source, args.output, args.format, args.overwrite, args.layers)
        else:
            if args.layers is not None:
                raise ValueError("--layers is for --format onnx")
            done = export(args.source, args.output, args.overwrite)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(done))
    return 0
