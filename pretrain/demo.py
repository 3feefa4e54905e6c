"""The README's main job: pretrain the tiny model on the built-in synthetic corpus, on a CPU, then
fine-tune it with CTC and transcribe held-out speakers.

    speechssl demo [dotted.key=value ...]          (or python -m pretrain.demo, ./run.sh demo)

Writes the synthetic corpus's shards to data/synth (once), pretrains configs/pretrain/tiny.yaml,
renders the report, fine-tunes with configs/finetune/tiny.yaml on the same corpus's transcripts,
transcribes the held-out speakers (data/synth/dev) with the best fine-tuned model and prints their
CER and WER (several minutes on two CPU cores). The overrides go to pretraining; point it at your
own shards with ``data.shards=[DIR] valid_shards=[DIR]`` (then only pretraining runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CONFIG = "configs/pretrain/tiny.yaml"
FINETUNE = "configs/finetune/tiny.yaml"
CORPUS = Path("data/synth")


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.demo``: ``speechssl demo``, whose arguments are defined in
    :mod:`speechssl_cli.jobs` (``--help`` builds nothing)."""
    from speechssl_cli import parser_for

    return run(parser_for("demo", "python -m pretrain.demo").parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The demo, with ``args.overrides`` for pretraining; the exit status."""
    overrides = args.overrides
    own_data = any(o.startswith(("data.shards=", "data=")) for o in overrides)
    start = time.perf_counter()
    if not own_data and not (CORPUS / "train" / "index.json").is_file():
        from data_tools.cli import main as data_tools

        print(f"generating the synthetic corpus into {CORPUS} ...", flush=True)
        data_tools(["synth", "--output", str(CORPUS), "--hours", "0.3", "--speakers", "40", "--dev-speakers", "4",
                    "--max-count", "50"])

    from pretrain.__main__ import load_config, train
    from speechssl.config import ConfigError
    from speechssl.training.report import render

    try:
        config = load_config(CONFIG, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    result = train(config)
    report = render(result["output_dir"])
    train_curve = [json.loads(line) for line in (Path(result["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in train_curve if r["split"] == "train"]
    print()
    if losses:
        print(f"loss per masked frame: {losses[0]:.3f} (first log) -> {losses[-1]:.3f} (update {result['update']})")
    if result["valid"]:
        v = result["valid"]
        print(f"validation: loss {v['loss']:.3f}, accuracy {v['accuracy']:.3f}, "
              f"prob-perplexity {v['prob_perplexity']:.1f}")
    print(f"run:        {result['output_dir']}")
    print(f"checkpoint: {result['checkpoint']}")
    print(f"model:      {result['model']}  (speechssl.load_model)")
    print(f"report:     {report}")
    print(f"metrics:    {Path(result['output_dir']) / 'metrics.jsonl'}, TensorBoard in "
          f"{Path(result['output_dir']) / 'tensorboard'}")
    if not own_data:
        finetune(result["output_dir"])
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def finetune(pretrained: str) -> None:
    """Fine-tune the pretrained model, then score the held-out speakers with ``finetune evaluate``."""
    from finetune.__main__ import load_config, load_pretrained, train
    from finetune.transcribe import main as evaluate

    config = load_config(FINETUNE, [f"pretrained={pretrained}"])
    print(f"\nfine-tuning {pretrained} with CTC ({FINETUNE}) ...", flush=True)
    result = train(config, load_pretrained(pretrained))
    best = Path(result["output_dir"]) / "best.pt"
    scores = Path(result["output_dir"]) / "held_out"
    print(f"\ntranscribing the held-out speakers of {CORPUS / 'dev'} with {best} ...", flush=True)
    evaluate(["evaluate", str(best), str(CORPUS / "dev"), "--output", str(scores)])
    numbers = json.loads((scores / "scores.json").read_text())
    print(f"held-out speakers: CER {numbers['cer']:.1%}, WER {numbers['wer']:.1%} over {numbers['utterances']} "
          f"utterances (hypotheses in {scores / 'hypotheses.tsv'})")


if __name__ == "__main__":
    sys.exit(main())
