"""Pseudo-labelling (self-training): transcribe unlabelled audio with a fine-tuned CTC model and
write the transcripts as a manifest to shard and fine-tune on, beside the labelled data.

    speechssl pseudo-label TEACHER.pt UNLABELLED... --output pseudo.tsv [--keep-fraction 0.9]
        [--min-confidence 0.5] [--decoder beam --lm LM_DIR]
    speechssl data make-shards --input pseudo.tsv --output data/pseudo
    speechssl finetune ... data.shards=[data/labelled,data/pseudo]

This is the self-training of Kahn et al. (2020) and Xu et al. (2021, "Self-training and
pre-training are complementary"): a model fine-tuned on the few labelled utterances labels the
rest, and a student is fine-tuned on both. Each utterance gets a confidence from the model's
posteriors (:func:`confidence`); ``--min-confidence`` and ``--keep-fraction`` drop the least
confident, and every dropped utterance is listed with its reason and confidence in
``OUTPUT.rejected.tsv``, so nothing is lost without a record. The manifest keeps each
utterance's audio path, speaker and other fields, with ``text`` replaced by the hypothesis and a
``confidence`` column added; shard inputs need the audio paths make-shards recorded in them.
Prints a JSON summary (kept, rejected by reason, mean confidence).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from finetune.transcribe import (
    _partial,
    check_inputs,
    load_model,
    make_decoder,
    read_inputs,
    window_options,
)
from speechssl.asr.inference import emissions

REJECTED_SUFFIX = ".rejected.tsv"
STANDARD_FIELDS = ("id", "path", "text", "speaker", "confidence")
# what make-shards records of the audio itself: it measures them again from the file
SHARD_FIELDS = ("sample_rate", "original_sample_rate", "num_samples", "duration", "clipped_samples")


def confidence(log_probs: Tensor, frames: Tensor, blank: int) -> list[float]:
    """Per utterance, the mean over the greedy path's emitted tokens of each token's posterior (its
    highest frame probability within its run of frames); 0 when the path emits nothing.
    ``log_probs (B, T, V)``, ``frames (B,)`` -> ``B`` values in [0, 1].

    Blank frames, which are most of them and nearly always confident, do not count: an utterance
    whose few tokens are uncertain scores low however long its silences."""
    best, ids = log_probs.max(-1)
    out = []
    for row_best, row_ids, n in zip(best, ids, frames.tolist(), strict=True):
        row_best, row_ids = row_best[:n], row_ids[:n]
        if n == 0:
            out.append(0.0)
            continue
        starts = torch.ones(n, dtype=torch.bool)
        starts[1:] = row_ids[1:] != row_ids[:-1]
        run = torch.cumsum(starts, 0) - 1  # the index of each frame's run of one token
        run_best = torch.full((int(run[-1]) + 1,), -torch.inf).scatter_reduce(0, run, row_best, "amax")
        emitted = row_ids[starts] != blank
        out.append(float(run_best[emitted].exp().mean()) if emitted.any() else 0.0)
    return out


def check_selection(min_confidence: float, keep_fraction: float) -> None:
    """ValueError naming the option out of its range."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"--keep-fraction must be in (0, 1], got {keep_fraction}")
    if not 0 <= min_confidence <= 1:
        raise ValueError(f"--min-confidence must be in [0, 1], got {min_confidence}")


def select(rows: list[dict], min_confidence: float, keep_fraction: float) -> tuple[list[dict], list[dict]]:
    """``(kept, rejected)``: rejected rows get a ``reason``: ``empty`` (no transcript),
    ``low_confidence`` (under ``min_confidence``) or ``least_confident`` (outside the
    ``keep_fraction`` most confident of the rest; ties kept in input order). Both lists keep the
    input order."""
    check_selection(min_confidence, keep_fraction)
    reasons: dict[int, str] = {}
    for i, row in enumerate(rows):
        if not row["text"].strip():
            reasons[i] = "empty"
        elif row["confidence"] < min_confidence:
            reasons[i] = "low_confidence"
    candidates = sorted((i for i in range(len(rows)) if i not in reasons), key=lambda i: -rows[i]["confidence"])
    for i in candidates[round(keep_fraction * len(candidates)):]:
        reasons[i] = "least_confident"
    kept = [row for i, row in enumerate(rows) if i not in reasons]
    rejected = [{**row, "reason": reasons[i]} for i, row in enumerate(rows) if i in reasons]
    return kept, rejected


def _write_tsv(path: Path, rows: list[dict], fields: list[str]) -> None:
    partial = _partial(path)
    try:
        with partial.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, delimiter="\t", extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    """``speechssl pseudo-label``: the exit status."""
    from speechssl.asr.tokenizer import tokenizer_from_dict

    target = Path(args.output)
    try:
        if target.suffix.lower() != ".tsv":
            raise ValueError(f"--output {args.output}: the manifest to write must be a .tsv file")
        check_selection(args.min_confidence, args.keep_fraction)
        windows = window_options(args)
        check_inputs(args.inputs, args.output)
        model, device = load_model(args.model, args.device)
        tokenizer, blank = tokenizer_from_dict(model.tokenizer), model.blank
        decoder, settings = make_decoder(args, tokenizer, blank)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped: Counter = Counter()
    rows, extra_fields = [], {}
    try:
        for batch, log_probs, frames in emissions(model, read_inputs(args.inputs, skipped, model), device,
                                                  args.batch_seconds, windows):
            for utt, hypothesis, score in zip(batch, decoder(log_probs, frames),
                                              confidence(log_probs, frames, blank), strict=True):
                path = utt.meta.get("path")
                if not path or not Path(path).is_file():
                    skipped["no_audio_path"] += 1
                    print(f"skipped {utt.id}: no_audio_path: the manifest needs the audio's path, and "
                          f"{path or 'none'} is not a file", file=sys.stderr)
                    continue
                meta = {k: v for k, v in utt.meta.items() if k not in (*STANDARD_FIELDS, *SHARD_FIELDS)
                        and not k.startswith("__") and isinstance(v, (str, int, float))}
                extra_fields.update(dict.fromkeys(meta))
                rows.append({**meta, "id": utt.id, "path": path, "text": hypothesis,
                             "speaker": utt.meta.get("speaker") or "", "confidence": round(score, 4)})
    except (FileNotFoundError, ValueError) as err:  # an input found bad while it is read
        print(f"error: {err}", file=sys.stderr)
        return 2
    kept, rejected = select(rows, args.min_confidence, args.keep_fraction)
    fields = [*STANDARD_FIELDS, *extra_fields]
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_tsv(target, kept, fields)
    _write_tsv(target.with_name(target.stem + REJECTED_SUFFIX), rejected, [*fields, "reason"])
    if skipped:
        print(f"skipped {sum(skipped.values())} input(s): {dict(skipped)}", file=sys.stderr)
    summary = {"output": str(target), "kept": len(kept), "rejected": dict(Counter(r["reason"] for r in rejected)),
               "skipped": dict(skipped),
               "mean_confidence_kept": round(sum(r["confidence"] for r in kept) / max(len(kept), 1), 4),
               **settings}
    print(json.dumps(summary))
    return 0
