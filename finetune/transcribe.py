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

A recording longer than ``--max-seconds`` (60) runs in windows of ``--window-seconds`` (30)
overlapping by ``--overlap-seconds`` (4), as ``speechssl.extract`` does: each window keeps the
frames nearest its centre, stitched into the single pass's frames, so memory is bounded by the
window whatever the recording's length; how many were windowed is reported on stderr. Utterances
shorter than the model's receptive field are skipped and counted (``too_short``).
``transcribe --output`` is written to a temporary file next to it and renamed when every input
has been read and decoded; an output that is one of the inputs is refused.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from speechssl.data.audio import normalize_audio, pad_waveforms
from speechssl.data.inputs import SAMPLE_RATE, Utterance, batches, read_utterances
from speechssl.device import pick_device
from speechssl.features import LayerFeatures, min_input_samples, window_batches

Decoder = Callable[[Tensor, Tensor], list[str]]  # (log_probs (B, T, V), frames (B,)) -> texts


@dataclass(frozen=True)
class Windows:
    """Recordings longer than ``max_seconds`` run in windows of ``window_seconds`` overlapping by
    ``overlap_seconds`` (``speechssl.extract``'s options and defaults)."""

    max_seconds: float = 60.0
    window_seconds: float = 30.0
    overlap_seconds: float = 4.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value!r}")
        if self.overlap_seconds >= self.window_seconds:
            raise ValueError(f"--overlap-seconds ({self.overlap_seconds:g}) must be less than --window-seconds "
                             f"({self.window_seconds:g})")


class WindowedCTC:
    """A CTC model's logits over one long recording, computed in overlapping windows and
    stitched: ``audio (S,)`` -> ``(T, V)`` with T the single pass's frames, in memory bounded by
    ``batch_windows`` windows. The plan is :meth:`LayerFeatures.window_plan`'s (each window keeps
    its frames up to the middle of its overlaps), and the extractor normalises every window with
    the whole recording's statistics as :meth:`LayerFeatures.windowed` does, so only the context
    network's reach beyond a window differs from one pass.

    Window and overlap are rounded down to whole output frames (the overlap to an even number,
    so that each cut falls on a frame); the overlap must cover twice the receptive field."""

    def __init__(self, model, windows: Windows, batch_windows: int = 4):
        self.model, self.batch_windows, self.max_seconds = model, batch_windows, windows.max_seconds
        self.features = LayerFeatures(model, "last")
        context = model.config.context
        # The Zipformer's output may run at a lower rate than the extractor's frames, and its
        # stacks downsample in groups of frames: windows start where the single pass starts a group.
        self.factor = getattr(context, "output_downsampling_factor", 1)
        self.frame = self.features.stride * self.factor  # samples per output frame
        self.unit = self.features.stride * math.lcm(self.factor, *getattr(context, "downsampling_factor", [1]))
        self.window = int(windows.window_seconds * SAMPLE_RATE) // self.unit * self.unit
        self.overlap = int(windows.overlap_seconds * SAMPLE_RATE) // (2 * self.unit) * (2 * self.unit)
        least = max(2 * model.feature_extractor.receptive_field, 2 * self.unit)
        if not least <= self.overlap < self.window:
            raise ValueError(f"--overlap-seconds {windows.overlap_seconds:g} and --window-seconds "
                             f"{windows.window_seconds:g}: this model needs an overlap of at least "
                             f"{least / SAMPLE_RATE:g} s and a window longer than the overlap")

    @torch.no_grad()
    def __call__(self, audio: Tensor) -> Tensor:
        """``audio (S,)`` float32 on the model's device -> logits ``(T, V)``."""
        model, features = self.model, self.features
        plan = features.window_plan(audio.shape[-1], self.window, self.overlap)
        pieces, per_utterance = [], model.extract_per_utterance
        with features.recording_statistics(audio, plan) as norm_hooked:
            if norm_hooked:
                model.extract_per_utterance = False  # the norm module itself runs, so its hook applies
            try:
                for first, group, waves, lengths in window_batches(audio, plan, self.batch_windows):
                    logits, frames = model(waves, lengths)
                    for row, (start, _, keep_from, keep_to) in enumerate(group):
                        offset = start // self.frame
                        # The last window runs to the recording's end: its frames are the single pass's last.
                        end = int(frames[row]) if first + row == len(plan) - 1 else keep_to // self.factor - offset
                        pieces.append(logits[row, keep_from // self.factor - offset: end])
            finally:
                model.extract_per_utterance = per_utterance
        return torch.cat(pieces)


def emissions(model, utterances: Iterator[Utterance], device: torch.device, max_seconds: float = 300.0,
              windows: Windows | None = Windows()) -> Iterator[tuple[list[Utterance], Tensor, Tensor]]:
    """Batches of ``(utterances, log_probs (B, T, V) float32 on the CPU, frames (B,))``, in input
    order, batched by padded audio length. Each utterance's output does not depend on what it is
    batched with. An utterance longer than ``windows.max_seconds`` is a batch of its own, run
    through :class:`WindowedCTC` (its audio normalised in place when the model normalises);
    ``windows=None`` runs everything in one pass. The windows are checked against the model here,
    before any utterance is read."""
    model.eval().to(device)
    model.extract_per_utterance = True
    windowed = WindowedCTC(model, windows) if windows is not None else None
    return _emissions(model, utterances, device, max_seconds, windowed)


@torch.no_grad()
def _emissions(model, utterances: Iterator[Utterance], device: torch.device, max_seconds: float,
               windowed: WindowedCTC | None) -> Iterator[tuple[list[Utterance], Tensor, Tensor]]:
    limit = windowed.max_seconds * SAMPLE_RATE if windowed is not None else math.inf
    count = 0
    for long, group in itertools.groupby(utterances, key=lambda u: len(u.audio) > limit):
        if long:
            for utt in group:
                audio = torch.from_numpy(utt.audio)
                if model.normalize_audio:  # as normalize_audio, in place: no second copy of a long recording
                    var, mean = torch.var_mean(audio, correction=0)
                    audio.sub_(mean).div_(torch.sqrt(var + 1e-5))
                log_probs = windowed(audio.to(device)).float().log_softmax(-1).cpu()
                count += 1
                yield [utt], log_probs[None], torch.tensor([len(log_probs)])
            continue
        for batch in batches(group, max_seconds):
            # normalised as in training (data.normalize)
            waves, lengths = pad_waveforms([normalize_audio(u.audio) if model.normalize_audio else u.audio
                                            for u in batch])
            logits, frames = model(waves.to(device), lengths)
            yield batch, logits.float().log_softmax(-1).cpu(), frames.cpu()
    if count:
        print(f"windowed {count} recording(s) longer than {windowed.max_seconds:g} s (windows of "
              f"{windowed.window / SAMPLE_RATE:g} s overlapping by {windowed.overlap / SAMPLE_RATE:g} s)",
              file=sys.stderr)


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
    chosen = pick_device(device)
    return model, chosen


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
    from finetune.decoding import error_counts

    references = [tokenizer.decode(tokenizer.encode(text)) for _, text, _ in rows]
    counts = error_counts(references, [h for _, _, h in rows])
    rates = {"wer": counts["word_errors"] / max(counts["words"], 1),
             "cer": counts["char_errors"] / max(counts["chars"], 1)}
    return {**rates, "utterances": len(rows), **counts}, references


def save_emissions(args: argparse.Namespace) -> int:
    from finetune.emissions import Emissions

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


def main(argv: list[str]) -> int:
    """``python -m finetune transcribe|evaluate|emissions ...``: ``speechssl transcribe|evaluate|emissions``,
    whose arguments are defined in :mod:`speechssl_cli.decoding`."""
    from speechssl_cli import alias_parser

    return run(alias_parser("python -m finetune", ("transcribe", "evaluate", "emissions")).parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Transcribe, evaluate or save emissions (``args.command``) as the parsed arguments say; the
    exit status."""
    from finetune.tokenizer import tokenizer_from_dict

    try:
        if args.command == "emissions":
            return save_emissions(args)
        if args.command == "transcribe":
            windows = window_options(args)
            check_inputs(args.inputs, args.output)
            model, device = load_model(args.model, args.device)
            tokenizer, blank = tokenizer_from_dict(model.tokenizer), model.blank
            skipped: Counter = Counter()
            source = emissions(model, read_inputs(args.inputs, skipped, model), device, args.batch_seconds, windows)
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
        for batch, log_probs, frames in source:
            for utt, hypothesis in zip(batch, decoder(log_probs, frames), strict=True):
                if args.command == "transcribe":
                    print(f"{utt.id}\t{hypothesis}", file=out, flush=True)
                elif utt.text is None:
                    print(f"error: {utt.id} has no transcript; evaluate needs labelled data", file=sys.stderr)
                    return 2
                else:
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
