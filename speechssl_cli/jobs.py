"""The parsers of the training jobs and what goes with a run folder: pretrain, finetune, overfit,
demo, report, export."""

from __future__ import annotations

import argparse

from speechssl_cli.arguments import add_job_arguments

PRETRAIN = """\
Pretrain a model with the wav2vec 2.0 objective on shards, on DeepSpeed (one CPU to many GPUs).

    %(prog)s --config configs/pretrain/tiny.yaml [KEY=VALUE ...]
    %(prog)s --config configs/pretrain/tiny.yaml --dry-run     (check everything, train nothing)
    deepspeed --num_gpus 8 --module pretrain --config configs/pretrain/base.yaml
    torchrun --nproc_per_node 8 -m pretrain --config configs/pretrain/base.yaml

The run folder (trainer.output_dir) gets checkpoints, model.pt (the exported model), metrics.jsonl,
TensorBoard logs and config.yaml; a rerun resumes from its newest complete checkpoint.
"""

FINETUNE = """\
Fine-tune a pretrained model with CTC on labelled shards.

    %(prog)s --config configs/finetune/tiny.yaml pretrained=runs/tiny [KEY=VALUE ...]
    deepspeed --num_gpus 8 --module finetune --config configs/finetune/tiny.yaml pretrained=runs/base

pretrained is a pretraining run folder, a model file, hf:NAME_OR_PATH, or scratch:MODEL_CONFIG (a
random initialisation: training from scratch). The run folder gets model.pt (the last model),
best.pt (the best by validation WER) with best.json, averaged.pt with trainer.average_models,
checkpoints and logs, as pretraining does.
"""

OVERFIT = """\
Sanity check of the pretraining objective: train on one fixed batch of generated audio.

    %(prog)s --config configs/pretrain/overfit_tiny.yaml [KEY=VALUE ...]

A healthy model drives the contrastive loss down while the codebook stays in use (prob-perplexity
well above G). Prints every loss term as it goes.
"""

DEMO = """\
The README's main job: pretrain the tiny model on the built-in synthetic corpus, on a CPU, then
fine-tune it with CTC and transcribe held-out speakers.

    %(prog)s [KEY=VALUE ...]

Writes the synthetic corpus's shards to data/synth (once), pretrains configs/pretrain/tiny.yaml,
renders the report, fine-tunes with configs/finetune/tiny.yaml on the same corpus's transcripts,
transcribes the held-out speakers (data/synth/dev) with the best fine-tuned model and prints their
CER and WER (several minutes on two CPU cores). The overrides go to pretraining; point it at your
own shards with data.shards=[DIR] valid_shards=[DIR] (then only pretraining runs).
"""

EXPORT = """\
Write the model file of a run from its newest complete checkpoint (or from the checkpoint folder
given): what the run itself writes to model.pt at its end, for a run that was stopped before it
(trainer.stop_at, trainer.max_minutes, a crash) or to take the model of an earlier update.

    %(prog)s runs/tiny --output runs/tiny/update_400.pt
    %(prog)s runs/tiny/checkpoints/update_00000400 --output model_400.pt

A pretraining run gives a file for speechssl.load_model, a fine-tuning run a CTC model file with its
tokenizer (rebuilt from the run's training shards or tokenizer.model, as a resumed run does).

--format hf|torchaudio|onnx|fairseq|fairseq2 exports any model speechssl.load takes (a model file, a
run folder's model.pt, hf:NAME, ta:BUNDLE, fairseq:FILE, fairseq2:FILE) for use elsewhere:

    %(prog)s runs/tiny_ctc/best.pt --format hf --output exported_hf     (transformers' ASR pipeline loads it)
    %(prog)s runs/tiny_ctc/best.pt --format onnx --output ctc.onnx      (onnxruntime; --layers for features)
    %(prog)s runs/tiny --format torchaudio --output ta.pt               (TorchScript: torch.jit.load)
    %(prog)s runs/tiny_ctc/best.pt --format fairseq --output fs/checkpoint_best.pt  (+ fs/dict.ltr.txt)
    %(prog)s runs/tiny --format fairseq2 --output fs2/model.pt          (+ fs2/model.yaml, the config)
"""


def add_pretrain(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser, "YAML of a PretrainConfig (configs/pretrain/*.yaml)",
                      "trainer.max_updates=100 model.context.num_layers=4")


def add_finetune(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser, "YAML of a FinetuneConfig (configs/finetune/*.yaml)",
                      "pretrained=runs/tiny trainer.output_dir=runs/my_ctc")


def add_overfit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML of an OverfitConfig (configs/pretrain/overfit_*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. steps=50 model.context.num_layers=4")


def add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the pretraining config, e.g. trainer.max_updates=200")


def add_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder (its metrics.jsonl)")
    parser.add_argument("--output", help="the PNG to write (default: RUN_DIR/report.png)")


def add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_DIR|CHECKPOINT",
                        help="a run folder (its newest complete checkpoint) or one checkpoint folder "
                             "(RUN_DIR/checkpoints/update_NNNNNNNN)")
    parser.add_argument("--output", required=True, help="the model file (a folder for hf) to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--format", choices=("model", "hf", "torchaudio", "onnx", "fairseq", "fairseq2"),
                        default="model",
                        help="model: the run's model file from a checkpoint; hf, torchaudio, onnx, fairseq, "
                             "fairseq2: SOURCE (any model speechssl.load takes) for use elsewhere")
    parser.add_argument("--layers", default=None,
                        help="onnx: the hidden states of these layers ('last', 'all' or e.g. 0,3) instead of "
                             "a CTC model's logits")
