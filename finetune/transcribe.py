"""Transcription and evaluation with a fine-tuned CTC model: greedy or beam search, with a lexicon
and an n-gram LM.

    python -m finetune transcribe MODEL AUDIO... [--output hyps.tsv] [--decoder beam --lm LM_DIR]
    python -m finetune evaluate MODEL DATA [--output DIR] [--decoder beam --lm LM_DIR]
    python -m finetune emissions MODEL DATA --output FILE   (then: evaluate --emissions FILE ...)

AUDIO and DATA are audio files, directories (recursive, or a LibriSpeech tree), manifests (TSV,
JSONL, fairseq) or shard directories. Audio is resampled to the model's 16 kHz. Files that cannot
be read are skipped, counted and listed with their reason on stderr; evaluation needs transcripts.
``--lm`` is a folder from ``python -m finetune build-lm`` (its tuned weights from ``tune-lm`` are
used unless ``--lm-weight``/``--word-score``/``--blank-penalty`` are given) or an ARPA file.
``--blank-penalty`` is subtracted from the blank's log-probability before decoding (icefall's
``blank_penalty``): above 0 it trades deletions for insertions. ``emissions`` saves the model's
log-probabilities over DATA (:mod:`finetune.emissions`), which ``evaluate --emissions`` and
``tune-lm --emissions`` decode without the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from speechssl.data.audio import normalize_audio
from speechssl.data.inputs import Utterance, batches, read_utterances

Decoder = Callable[[Tensor, Tensor], list[str]]  # (log_probs (B, T, V), frames (B,)) -> texts


@torch.no_grad()
def emissions(model, utterances: Iterator[Utterance], device: torch.device,
              max_seconds: float = 300.0) -> Iterator[tuple[list[Utterance], Tensor, Tensor]]:
    """Batches of ``(utterances, log_probs (B, T, V) float32 on the CPU, frames (B,))``, batched by
    padded audio length. Each utterance's output does not depend on what it is batched with."""
    model.eval().to(device)
    model.extract_per_utterance = True
    for batch in batches(utterances, max_seconds):
        lengths = torch.tensor([len(u.audio) for u in batch])
        waves = torch.zeros(len(batch), int(lengths.max()))
        for i, u in enumerate(batch):
            # as in training (data.normalize)
            waves[i, : len(u.audio)] = torch.from_numpy(normalize_audio(u.audio) if model.normalize_audio else u.audio)
        logits, frames = model(waves.to(device), lengths)
        yield batch, logits.float().log_softmax(-1).cpu(), frames.cpu()


def greedy_decoder(tokenizer, blank: int, blank_penalty: float = 0.0) -> Decoder:
    from finetune.decoding import greedy_decode, penalize_blank

    def decode(log_probs: Tensor, frames: Tensor) -> list[str]:
        best = greedy_decode(penalize_blank(log_probs, blank, blank_penalty), frames, blank)
        return [tokenizer.decode(ids) for ids in best]

    return decode


def load_model(path: str, device: str):
    from speechssl.models.ctc import load_ctc_model

    model = load_ctc_model(path)
    if model.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer (it was not written by the fine-tuning job)")
    chosen = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    return model, chosen


def add_decoder_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decoder", choices=("greedy", "beam"), default=None,
                        help="greedy (the default without --lm) or beam (the default with --lm)")
    parser.add_argument("--lm", help="a build-lm folder (lm.arpa, lexicon.txt, tuned decoding.json) or an ARPA file")
    parser.add_argument("--lexicon", help="WORD<TAB>tokens per line (default: the LM folder's, or the LM's "
                                          "words spelled with the model's tokenizer)")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default 50)")
    parser.add_argument("--beam-threshold", type=float, default=None, help="pruning margin (default 50)")
    parser.add_argument("--lm-weight", type=float, default=None, help="LM weight (default: tuned, else 2)")
    parser.add_argument("--word-score", type=float, default=None, help="score per word (default: tuned, else 0)")
    parser.add_argument("--blank-penalty", type=float, default=None,
                        help="subtracted from the blank's log-probability (default: tuned with the LM, else 0)")


def make_decoder(args: argparse.Namespace, tokenizer, blank: int) -> tuple[Decoder, dict]:
    """The decoder the options ask for, and its settings (to report with the scores)."""
    from finetune.beam import BeamDecoder, DecoderSettings, LanguageModel

    kind = args.decoder or ("beam" if args.lm else "greedy")
    if kind == "greedy":
        if args.lm or args.lexicon:
            raise ValueError("--lm and --lexicon need --decoder beam")
        penalty = args.blank_penalty or 0.0
        return greedy_decoder(tokenizer, blank, penalty), {"decoder": "greedy", "blank_penalty": penalty}
    if args.lexicon and not args.lm:
        raise ValueError("--lexicon needs --lm (a lexicon-free beam search uses no lexicon)")
    lm = LanguageModel.load(args.lm, args.lexicon) if args.lm else None
    tuned = (lm.settings or {}) if lm else {}
    fields = ("beam", "beam_threshold", "lm_weight", "word_score", "blank_penalty")
    chosen = {f: getattr(args, f) if getattr(args, f) is not None else tuned.get(f) for f in fields}
    settings = DecoderSettings(**{k: v for k, v in chosen.items() if v is not None})
    decoder = BeamDecoder(tokenizer, lm, settings)
    return decoder, {"decoder": "beam", "lm": args.lm, **decoder.to_dict()}


def model_or_emissions(args: argparse.Namespace):
    """``(tokenizer, blank, batches, skipped)`` for the evaluation and tuning commands: the model
    run over the data, or the saved emissions of ``--emissions`` decoded without a model. Batches
    are ``(utterances, log_probs (B, T, V), frames (B,))``; ``skipped`` fills as they are read."""
    from finetune.emissions import load_emissions
    from finetune.tokenizer import tokenizer_from_dict

    if args.emissions:
        if args.model or args.data:
            raise ValueError("give a model and data, or --emissions, not both")
        saved = load_emissions(args.emissions)
        return tokenizer_from_dict(saved.tokenizer), saved.blank, saved.batches(), Counter(saved.skipped)
    if not args.model or not args.data:
        raise ValueError("give a model and the data to run it on (or --emissions FILE)")
    model, device = load_model(args.model, args.device)
    skipped: Counter = Counter()
    batches = emissions(model, read_utterances(args.data, skipped), device, args.batch_seconds)
    return tokenizer_from_dict(model.tokenizer), model.blank, batches, skipped


def add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="a fine-tuned CTC model file")
    parser.add_argument("data", nargs="*", help="manifests or shard directories with transcripts")
    parser.add_argument("--emissions", nargs="+", help="emissions files (`emissions`) instead of MODEL and DATA")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch-seconds", type=float, default=300.0, help="padded audio per batch")


def score(tokenizer, rows: list[tuple[str, str, str]]) -> tuple[dict, list[str]]:
    """WER and CER of ``(id, text, hypothesis)`` rows; the references in the model's case and spacing."""
    from finetune.decoding import error_counts

    references = [tokenizer.decode(tokenizer.encode(text)) for _, text, _ in rows]
    counts = error_counts(references, [h for _, _, h in rows])
    rates = {"wer": counts["word_errors"] / max(counts["words"], 1),
             "cer": counts["char_errors"] / max(counts["chars"], 1)}
    return {**rates, "utterances": len(rows), **counts}, references


def save_emissions(args: argparse.Namespace) -> int:
    from finetune.emissions import Emissions

    model, device = load_model(args.model, args.device)
    skipped: Counter = Counter()
    saved = Emissions(model.tokenizer, model.blank, model=str(args.model))
    for batch, log_probs, frames in emissions(model, read_utterances(args.data, skipped), device, args.batch_seconds):
        saved.add(batch, log_probs, frames)
    saved.skipped = dict(skipped)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    saved.save(args.output)
    if skipped:
        print(f"skipped {sum(skipped.values())} unreadable input(s): {dict(skipped)}", file=sys.stderr)
    print(json.dumps({"output": str(args.output), "utterances": len(saved.rows), "skipped": dict(skipped)}))
    return 0


def write_scores(folder: Path, rows: list[tuple[str, str, str]], references: list[str], scores: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "hypotheses.tsv").open("w") as f:
        f.write("id\treference\thypothesis\n")
        for (uid, _, hyp), ref in zip(rows, references, strict=True):
            f.write(f"{uid}\t{ref}\t{hyp}\n")
    (folder / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transcribe", help="print or write id<TAB>transcript")
    t.add_argument("model", help="a fine-tuned model file (model.pt or best.pt of a fine-tuning run)")
    t.add_argument("inputs", nargs="+", help="audio files, directories, manifests or shard directories")
    t.add_argument("--output", help="write id<TAB>transcript lines here instead of stdout")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda")
    t.add_argument("--batch-seconds", type=float, default=300.0, help="padded audio per batch")
    e = sub.add_parser("evaluate", help="WER and CER against the transcripts")
    add_source_options(e)
    e.add_argument("--output", help="folder for hypotheses.tsv and scores.json")
    for p in (t, e):
        add_decoder_options(p)
    m = sub.add_parser("emissions", help="save the model's log-probabilities over the data")
    m.add_argument("model", help="a fine-tuned CTC model file")
    m.add_argument("data", nargs="+", help="audio files, directories, manifests or shard directories")
    m.add_argument("--output", required=True, help="the emissions file to write")
    m.add_argument("--device", default="auto", help="auto, cpu or cuda")
    m.add_argument("--batch-seconds", type=float, default=300.0, help="padded audio per batch")
    args = parser.parse_args(argv)
    from finetune.tokenizer import tokenizer_from_dict

    try:
        if args.command == "emissions":
            return save_emissions(args)
        if args.command == "transcribe":
            model, device = load_model(args.model, args.device)
            tokenizer, blank = tokenizer_from_dict(model.tokenizer), model.blank
            skipped: Counter = Counter()
            source = emissions(model, read_utterances(args.inputs, skipped), device, args.batch_seconds)
        else:
            tokenizer, blank, source, skipped = model_or_emissions(args)
        decoder, settings = make_decoder(args, tokenizer, blank)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = []
    out = open(args.output, "w") if args.command == "transcribe" and args.output else sys.stdout  # noqa: SIM115
    try:
        for batch, log_probs, frames in source:
            for utt, hypothesis in zip(batch, decoder(log_probs, frames), strict=True):
                if args.command == "transcribe":
                    print(f"{utt.id}\t{hypothesis}", file=out, flush=True)
                elif utt.text is None:
                    print(f"error: {utt.id} has no transcript; evaluate needs labelled data", file=sys.stderr)
                    return 2
                else:
                    rows.append((utt.id, utt.text, hypothesis))
    finally:
        if out is not sys.stdout:
            out.close()
    if skipped:
        print(f"skipped {sum(skipped.values())} unreadable input(s): {dict(skipped)}", file=sys.stderr)
    if args.command == "transcribe":
        return 0
    scores, references = score(tokenizer, rows)
    scores = {**scores, "skipped": dict(skipped), **settings}
    print(json.dumps(scores))
    if args.output:
        write_scores(Path(args.output), rows, references, scores)
    return 0
