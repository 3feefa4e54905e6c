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
log-probabilities over DATA (:mod:`speechssl.asr.emissions`), which ``evaluate --emissions`` and
``tune-lm --emissions`` decode without the model.

A recording longer than ``--max-seconds`` (60) runs in windows of ``--window-seconds`` (30)
overlapping by ``--overlap-seconds`` (4), as ``speechssl.extract`` does: each window keeps the
frames nearest its centre, stitched into the single pass's frames, so memory is bounded by the
window whatever the recording's length; how many were windowed is reported on stderr. Utterances
shorter than the model's receptive field are skipped and counted (``too_short``).
``transcribe --timestamps word|char|all`` writes JSON lines (id, text, seconds, and ``words``
and/or ``chars``: ``{"text", "start", "end"}`` in seconds, :mod:`speechssl.asr.timestamps`) in
place of ``id<TAB>text``. ``transcribe --output`` is written to a temporary file next to it and
renamed when every input has been read and decoded; an output that is one of the inputs is
refused. MODEL is anything :func:`speechssl.load` takes that is a CTC model (a file, a fine-tuning
run folder, ``hf:NAME``, ``ta:BUNDLE``); transcription runs through the code of
``CTCModel.transcribe`` (:mod:`speechssl.asr.transcriber`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from speechssl.asr.decoding import Decoder, GreedyDecoder
from speechssl.asr.inference import Windows, emissions
from speechssl.data.inputs import Utterance, read_utterances
from speechssl.device import pick_device
from speechssl.features import min_input_samples


def check_inputs(inputs: list[str], output: str | None = None) -> None:
    """Every input exists, and ``output`` (a file to write) is none of them: FileNotFoundError or
    ValueError naming the path, before any model is loaded."""
    for name in inputs:
        if not Path(name).exists():
            raise FileNotFoundError(f"input {name} does not exist")
    if output is None:
        return
    target = Path(output)
    if target.is_dir():
        raise ValueError(f"--output {output} is a folder; give the file to write")
    for name in inputs:
        if target.resolve() == Path(name).resolve() or (target.exists() and target.samefile(name)):
            raise ValueError(f"--output {output} is the input {name}: it would be overwritten; choose another file")


def read_inputs(inputs: list[str], skipped: Counter, model) -> Iterator[Utterance]:
    """The utterances of ``inputs`` the model can take: those shorter than its receptive field are
    skipped and counted in ``skipped`` (``too_short``)."""
    return read_utterances(inputs, skipped, min_samples=min_input_samples(model))


def load_model(path: str, device: str):
    """The CTC model ``path`` names (anything :func:`speechssl.load` takes) and the device to run it on."""
    from speechssl.models.ctc import CTCModel
    from speechssl.models.loading import load

    model = load(path)
    if not isinstance(model, CTCModel):
        raise ValueError(f"{path} is a {type(model).__name__}, not a CTC model: fine-tune it first "
                         "(speechssl finetune)")
    if model.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer (it was not written by the fine-tuning job)")
    return model, pick_device(device)


def make_decoder(args: argparse.Namespace, tokenizer, blank: int) -> tuple[Decoder, dict]:
    """The decoder the options ask for, and its settings (to report with the scores)."""
    from speechssl.asr.beam import BeamDecoder, DecoderSettings, LanguageModel

    kind = args.decoder or ("beam" if args.lm else "greedy")
    if kind == "greedy":
        if args.lm or args.lexicon:
            raise ValueError("--lm and --lexicon need --decoder beam")
        penalty = args.blank_penalty or 0.0
        return GreedyDecoder(tokenizer, blank, penalty), {"decoder": "greedy", "blank_penalty": penalty}
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
    from speechssl.asr.emissions import load_emissions
    from speechssl.asr.tokenizer import tokenizer_from_dict

    if args.emissions:
        if args.model or args.data:
            raise ValueError("give a model and data, or --emissions, not both")
        saved = load_emissions(args.emissions)
        return tokenizer_from_dict(saved.tokenizer), saved.blank, saved.batches(), Counter(saved.skipped)
    if not args.model or not args.data:
        raise ValueError("give a model and the data to run it on (or --emissions FILE)")
    windows = window_options(args)
    check_inputs(args.data)
    model, device = load_model(args.model, args.device)
    skipped: Counter = Counter()
    batches = emissions(model, read_inputs(args.data, skipped, model), device, args.batch_seconds, windows)
    return tokenizer_from_dict(model.tokenizer), model.blank, batches, skipped


def window_options(args: argparse.Namespace) -> Windows:
    return Windows(args.max_seconds, args.window_seconds, args.overlap_seconds)


def score(tokenizer, rows: list[tuple[str, str, str]]) -> tuple[dict, list[str]]:
    """WER and CER of ``(id, text, hypothesis)`` rows; the references in the model's case and spacing."""
    from speechssl.asr.decoding import error_counts

    references = [tokenizer.decode(tokenizer.encode(text)) for _, text, _ in rows]
    counts = error_counts(references, [h for _, _, h in rows])
    rates = {"wer": counts["word_errors"] / max(counts["words"], 1),
             "cer": counts["char_errors"] / max(counts["chars"], 1)}
    return {**rates, "utterances": len(rows), **counts}, references


def save_emissions(args: argparse.Namespace) -> int:
    from speechssl.asr.emissions import Emissions

    windows = window_options(args)
    check_inputs(args.data, args.output)
    model, device = load_model(args.model, args.device)
    skipped: Counter = Counter()
    saved = Emissions(model.tokenizer, model.blank, model=str(args.model))
    for batch, log_probs, frames in emissions(model, read_inputs(args.data, skipped, model), device,
                                              args.batch_seconds, windows):
        saved.add(batch, log_probs, frames)
    saved.skipped = dict(skipped)
    target = Path(args.output)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(target)
    saved.save(partial)
    os.replace(partial, target)
    if skipped:
        print(f"skipped {sum(skipped.values())} unreadable input(s): {dict(skipped)}", file=sys.stderr)
    print(json.dumps({"output": str(args.output), "utterances": len(saved.rows), "skipped": dict(skipped)}))
    return 0


def _partial(target: Path) -> Path:
    """A temporary name next to ``target`` (same file system, so the rename is atomic); the pid
    keeps two runs writing one output apart."""
    return target.with_name(f".{target.name}.{os.getpid()}.partial")


def write_scores(folder: Path, rows: list[tuple[str, str, str]], references: list[str], scores: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "hypotheses.tsv").open("w") as f:
        f.write("id\treference\thypothesis\n")
        for (uid, _, hyp), ref in zip(rows, references, strict=True):
            f.write(f"{uid}\t{ref}\t{hyp}\n")
    (folder / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")


TIMESTAMP_CHOICES = {None: False, "word": "word", "char": "char", "all": True}  # --timestamps -> transcribe's


def transcript_line(utt: Utterance, transcript, timestamps: bool | str) -> str:
    """``id<TAB>text``, or with timestamps a JSON line: id, text, seconds and the spans."""
    if not timestamps:
        return f"{utt.id}\t{transcript.text}"
    fields = {k: v for k, v in transcript.to_dict().items() if k != "notes"}
    return json.dumps({"id": utt.id, **fields}, ensure_ascii=False)


def main(argv: list[str]) -> int:
    """``python -m finetune transcribe|evaluate|emissions ...``: ``speechssl transcribe|evaluate|emissions``,
    whose arguments are defined in :mod:`speechssl_cli.decoding`."""
    from speechssl_cli import alias_parser

    return run(alias_parser("python -m finetune", ("transcribe", "evaluate", "emissions")).parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Transcribe, evaluate or save emissions (``args.command``) as the parsed arguments say; the
    exit status."""
    from speechssl.asr.transcriber import transcribe_utterances

    try:
        if args.command == "emissions":
            return save_emissions(args)
        if args.command == "transcribe":
            windows = window_options(args)
            check_inputs(args.inputs, args.output)
            model, device = load_model(args.model, args.device)
            decoder, settings = make_decoder(args, model.text_tokenizer, model.blank)
            skipped: Counter = Counter()
            timestamps = TIMESTAMP_CHOICES[args.timestamps]
            lines = (transcript_line(utt, transcript, timestamps) for utt, transcript in transcribe_utterances(
                model, read_inputs(args.inputs, skipped, model), device, decoder, args.batch_seconds, windows,
                timestamps))
        else:
            tokenizer, blank, source, skipped = model_or_emissions(args)
            decoder, settings = make_decoder(args, tokenizer, blank)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = []
    # Never the output itself while inputs are read: it may be one of them, and a failed run
    # must leave it as it was.
    target = Path(args.output) if args.command == "transcribe" and args.output else None
    partial = None
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = _partial(target)
    out = partial.open("w") if partial is not None else sys.stdout
    try:
        if args.command == "transcribe":
            for line in lines:
                print(line, file=out, flush=True)
        else:
            for batch, log_probs, frames in source:
                for utt, hypothesis in zip(batch, decoder(log_probs, frames), strict=True):
                    if utt.text is None:
                        print(f"error: {utt.id} has no transcript; evaluate needs labelled data", file=sys.stderr)
                        return 2
                    rows.append((utt.id, utt.text, hypothesis))
        if partial is not None:
            out.close()
            os.replace(partial, target)
            partial = None
    except (FileNotFoundError, ValueError) as err:  # an input found bad while it is read
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if out is not sys.stdout:
            out.close()
        if partial is not None:
            partial.unlink(missing_ok=True)
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
