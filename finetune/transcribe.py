"""Transcription and evaluation with a fine-tuned CTC model (greedy decoding).

    python -m finetune transcribe MODEL AUDIO... [--output hyps.tsv]
    python -m finetune evaluate MODEL DATA [--output DIR]

AUDIO and DATA are audio files, directories (recursive, or a LibriSpeech tree), manifests (TSV,
JSONL, fairseq) or shard directories. Audio is resampled to the model's 16 kHz. Files that cannot
be read are skipped, counted and listed with their reason on stderr; evaluation needs transcripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from speechssl.data.audio import normalize_audio
from speechssl.data.inputs import Utterance, batches, read_utterances


@torch.no_grad()
def transcribe(model, utterances: Iterator[Utterance], device: torch.device,
               max_seconds: float = 300.0) -> Iterator[tuple[Utterance, str]]:
    """``(utterance, hypothesis)`` for every utterance, batched by padded audio length."""
    from finetune.decoding import greedy_decode
    from finetune.tokenizer import tokenizer_from_dict

    tokenizer = tokenizer_from_dict(model.tokenizer)
    model.eval().to(device)
    model.extract_per_utterance = True  # transcripts that do not depend on the batching
    for batch in batches(utterances, max_seconds):
        lengths = torch.tensor([len(u.audio) for u in batch])
        waves = torch.zeros(len(batch), int(lengths.max()))
        for i, u in enumerate(batch):
            # as in training (data.normalize)
            waves[i, : len(u.audio)] = torch.from_numpy(normalize_audio(u.audio) if model.normalize_audio else u.audio)
        logits, frames = model(waves.to(device), lengths)
        for utt, ids in zip(batch, greedy_decode(logits, frames, model.blank), strict=True):
            yield utt, tokenizer.decode(ids)


def _load(path: str, device: str):
    from speechssl.models.ctc import load_ctc_model

    model = load_ctc_model(path)
    if model.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer (it was not written by the fine-tuning job)")
    chosen = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    return model, chosen


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transcribe", help="print or write id<TAB>transcript")
    t.add_argument("model", help="a fine-tuned model file (model.pt or best.pt of a fine-tuning run)")
    t.add_argument("inputs", nargs="+", help="audio files, directories, manifests or shard directories")
    t.add_argument("--output", help="write id<TAB>transcript lines here instead of stdout")
    e = sub.add_parser("evaluate", help="WER and CER against the transcripts")
    e.add_argument("model")
    e.add_argument("data", nargs="+", help="manifests or shard directories with transcripts")
    e.add_argument("--output", help="folder for hypotheses.tsv and scores.json")
    for p in (t, e):
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        p.add_argument("--batch-seconds", type=float, default=300.0, help="padded audio per batch")
    args = parser.parse_args(argv)
    from finetune.decoding import error_counts

    try:
        model, device = _load(args.model, args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped: Counter = Counter()
    inputs = args.inputs if args.command == "transcribe" else args.data
    rows = []
    out = open(args.output, "w") if args.command == "transcribe" and args.output else sys.stdout  # noqa: SIM115
    try:
        for utt, hypothesis in transcribe(model, read_utterances(inputs, skipped), device, args.batch_seconds):
            if args.command == "transcribe":
                print(f"{utt.id}\t{hypothesis}", file=out, flush=True)
            else:
                if utt.text is None:
                    print(f"error: {utt.id} has no transcript; evaluate needs labelled data", file=sys.stderr)
                    return 2
                rows.append((utt.id, utt.text, hypothesis))
    finally:
        if out is not sys.stdout:
            out.close()
    if skipped:
        print(f"skipped {sum(skipped.values())} unreadable input(s): {dict(skipped)}", file=sys.stderr)
    if args.command == "transcribe":
        return 0
    from finetune.tokenizer import tokenizer_from_dict

    tokenizer = tokenizer_from_dict(model.tokenizer)
    references = [tokenizer.decode(tokenizer.encode(text)) for _, text, _ in rows]  # the model's case and spacing
    counts = error_counts(references, [h for _, _, h in rows])
    scores = {"wer": counts["word_errors"] / max(counts["words"], 1),
              "cer": counts["char_errors"] / max(counts["chars"], 1),
              "utterances": len(rows), "skipped": dict(skipped), **counts}
    print(json.dumps(scores))
    if args.output:
        folder = Path(args.output)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "hypotheses.tsv").open("w") as f:
            f.write("id\treference\thypothesis\n")
            for (uid, _, hyp), ref in zip(rows, references, strict=True):
                f.write(f"{uid}\t{ref}\t{hyp}\n")
        (folder / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    return 0
