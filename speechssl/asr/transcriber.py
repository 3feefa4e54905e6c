"""Transcription with a CTC model, from Python (``CTCModel.transcribe``) and for
``speechssl transcribe``.

    model = speechssl.load("runs/ctc")
    model.transcribe("talk.wav").text
    out = model.transcribe(["a.flac", samples], sample_rate=8000, return_timestamps="word")
    out[1].words          # [Span(text="HELLO", start=0.42, end=0.8), ...]
    out[1].notes          # ["resampled from 8000 Hz to 16000 Hz"]

Inputs are audio file paths, or arrays/tensors of samples: ``(S,)``, or ``(C, S)``/``(S, C)``
with a few channels (the shorter side); integer samples (16- or 32-bit PCM) are scaled to
[-1, 1]. Arrays are at ``sample_rate`` (16 kHz when None); files at their own rate. What is done
to an input to make it the model's 16 kHz mono (resampled, down-mixed, scaled, run in windows) is
listed in its transcript's ``notes`` and logged. An input shorter than the model's receptive field
gives an empty transcript with a note; samples that are NaN or infinite, an unreadable file or
an array of another shape raise ValueError naming the input.

Recordings longer than ``windows.max_seconds`` run in overlapping windows
(:mod:`speechssl.asr.inference`), so memory is bounded by the window whatever their length.
``decoder``: ``"greedy"`` (best path), ``"beam"`` (a lexicon-free beam search; needs
flashlight-text) or a decoder object, e.g. ``BeamDecoder(model.text_tokenizer,
LanguageModel.load("runs/lm"))`` for an n-gram LM. ``return_timestamps``: ``"word"``, ``"char"``
or True (both), from the CTC alignment (:mod:`speechssl.asr.timestamps`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import soxr
import torch
from torch import Tensor

from speechssl.asr.decoding import GreedyDecoder
from speechssl.asr.inference import DEFAULT_WINDOWS, Windows, emissions
from speechssl.asr.timestamps import Span, char_spans, token_spans, word_spans
from speechssl.data.audio import BadAudio, read_audio_channels
from speechssl.data.inputs import SAMPLE_RATE, Utterance
from speechssl.features import min_input_samples

log = logging.getLogger("speechssl.transcribe")

Audio = str | os.PathLike | np.ndarray | Tensor
MAX_CHANNELS = 32  # a 2-D input's shorter side, at most: more looks like a batch or a mistake
TIMESTAMPS = (False, True, "word", "char")


@dataclass
class Transcript:
    """text: the transcript; seconds: the input's duration; words and chars: their spans when
    asked for (``return_timestamps``), else None; notes: what was done to the input."""

    text: str
    seconds: float
    words: list[Span] | None = None
    chars: list[Span] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out: dict = {"text": self.text, "seconds": self.seconds}
        for name in ("words", "chars"):
            if getattr(self, name) is not None:
                out[name] = [span.to_dict() for span in getattr(self, name)]
        return {**out, "notes": self.notes}


def _mono(samples: np.ndarray, name: str, notes: list[str]) -> np.ndarray:
    """``(S,)``, ``(C, S)`` or ``(S, C)`` -> ``(S,)`` float32, channels averaged (with a note)."""
    if samples.ndim == 2 and 1 in samples.shape:
        samples = samples.reshape(-1)
    if samples.ndim == 2:
        channels_first = samples.shape[0] < samples.shape[1]
        channels = min(samples.shape)
        if channels > MAX_CHANNELS:
            raise ValueError(f"{name}: audio of shape {tuple(samples.shape)} is not one recording: give (samples,) "
                             f"or (channels, samples) with at most {MAX_CHANNELS} channels; pass a list for several")
        samples = samples.mean(axis=0 if channels_first else 1)
        notes.append(f"down-mixed {channels} channels to mono")
    elif samples.ndim != 1:
        raise ValueError(f"{name}: audio of shape {tuple(samples.shape)}: give (samples,) or (channels, samples)")
    return samples


def _float_samples(samples: np.ndarray, name: str, notes: list[str]) -> np.ndarray:
    """Integer PCM scaled to [-1, 1] (with a note); floats as float32."""
    if np.issubdtype(samples.dtype, np.integer):
        bits = samples.dtype.itemsize * 8
        notes.append(f"scaled {bits}-bit integer samples to [-1, 1]")
        return (samples.astype(np.float64) / 2 ** (bits - 1)).astype(np.float32)
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"{name}: samples of type {samples.dtype} are not audio")
    return samples.astype(np.float32, copy=False)


def prepare_input(item: Audio, sample_rate: int | None, name: str) -> tuple[np.ndarray, list[str]]:
    """One input as 16 kHz mono float32 ``(S,)`` and the notes on what was done to it."""
    notes: list[str] = []
    if isinstance(item, (str, os.PathLike)):
        try:
            samples, rate, channels = read_audio_channels(item)
        except BadAudio as e:
            raise ValueError(f"{name}: {e}") from None
        if sample_rate is not None and rate != sample_rate:
            raise ValueError(f"{name}: the file is at {rate} Hz, not the sample_rate={sample_rate} given "
                             f"(a file is read at its own rate: leave sample_rate out)")
        if channels > 1:
            notes.append(f"down-mixed {channels} channels to mono")
    elif isinstance(item, (np.ndarray, Tensor)):
        samples = item.detach().cpu().numpy() if isinstance(item, Tensor) else item
        samples = _mono(_float_samples(samples, name, notes), name, notes)
        rate = SAMPLE_RATE if sample_rate is None else sample_rate
    else:
        raise TypeError(f"{name}: a path, a numpy array or a tensor of samples, not {type(item).__name__}")
    if not (isinstance(rate, int) and rate > 0):
        raise ValueError(f"sample_rate must be a positive whole number of Hz, got {rate!r}")
    if not np.isfinite(samples).all():
        raise ValueError(f"{name}: the audio holds NaN or infinite samples")
    if rate != SAMPLE_RATE and samples.size:
        samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
        notes.append(f"resampled from {rate} Hz to {SAMPLE_RATE} Hz")
    return samples, notes


def resolve_decoder(decoder, tokenizer, blank: int):
    """``"greedy"``, ``"beam"`` or a decoder object, as a decoder."""
    if decoder == "greedy":
        return GreedyDecoder(tokenizer, blank)
    if decoder == "beam":
        from speechssl.asr.beam import BeamDecoder

        return BeamDecoder(tokenizer)
    if isinstance(decoder, str) or not callable(decoder):
        raise ValueError(f"decoder must be 'greedy', 'beam' or a decoder object, not {decoder!r}")
    return decoder


def seconds_per_frame(model) -> float:
    """The time between two output frames of ``model`` (20 ms for the convolutional encoder)."""
    factor = getattr(model.config.context, "output_downsampling_factor", 1)
    return model.feature_extractor.stride * factor / SAMPLE_RATE


def transcribe_utterances(model, utterances: Iterator[Utterance], device: torch.device, decoder="greedy",
                          batch_seconds: float = 60.0, windows: Windows | None = DEFAULT_WINDOWS,
                          timestamps: bool | str = False, report: bool = True
                          ) -> Iterator[tuple[Utterance, Transcript]]:
    """Each utterance with its transcript, in order (the shared core of :func:`transcribe` and
    ``speechssl transcribe``). ``timestamps``: one of :data:`TIMESTAMPS`."""
    if timestamps not in TIMESTAMPS:
        raise ValueError(f"return_timestamps must be False, True, 'word' or 'char', not {timestamps!r}")
    tokenizer = model.text_tokenizer
    decoder = resolve_decoder(decoder, tokenizer, model.blank)
    if timestamps and not hasattr(decoder, "hypotheses"):
        raise ValueError(f"timestamps need a decoder that gives token times (greedy or BeamDecoder), not {decoder!r}")
    step = seconds_per_frame(model)
    long = windows.max_seconds * SAMPLE_RATE if windows is not None else float("inf")
    for batch, log_probs, frames in emissions(model, utterances, device, batch_seconds, windows, report):
        hypotheses = decoder.hypotheses(log_probs, frames) if hasattr(decoder, "hypotheses") else None
        texts = [h.text for h in hypotheses] if hypotheses is not None else decoder(log_probs, frames)
        best = log_probs.argmax(-1) if timestamps else None
        for row, (utt, text) in enumerate(zip(batch, texts, strict=True)):
            out = Transcript(text, len(utt.audio) / SAMPLE_RATE)
            if len(utt.audio) > long:
                out.notes.append(f"run in windows of {windows.window_seconds:g} s overlapping by "
                                 f"{windows.overlap_seconds:g} s")
            if timestamps:
                spans = token_spans(hypotheses[row], best[row], int(frames[row]))
                if timestamps in (True, "word"):
                    out.words = word_spans(spans, tokenizer, step)
                if timestamps in (True, "char"):
                    out.chars = char_spans(spans, tokenizer, step)
            yield utt, out


def transcribe(model, audio: Audio | Sequence[Audio], sample_rate: int | None = None, batch_seconds: float = 60.0,
               decoder="greedy", return_timestamps: bool | str = False, device: str | torch.device | None = None,
               windows: Windows | None = DEFAULT_WINDOWS) -> Transcript | list[Transcript]:
    """The transcript of one input, or a list of them for a list (see the module's docstring).
    ``batch_seconds``: padded audio per batch; ``device``: where the model runs (None: where it
    is). The model is left as it was (device, train or eval mode)."""
    single = isinstance(audio, (str, os.PathLike, np.ndarray, Tensor))
    items = [audio] if single else list(audio)
    if not items:
        return []
    was_training, per_utterance = model.training, model.extract_per_utterance
    home = next(model.parameters()).device
    target = torch.device(device) if device is not None else home
    results: list[Transcript | None] = [None] * len(items)
    shortest = min_input_samples(model)

    def utterances() -> Iterator[Utterance]:
        # read one at a time: a list of paths is never all in memory
        for i, item in enumerate(items):
            name = str(item) if isinstance(item, (str, os.PathLike)) else f"input {i}"
            samples, notes = prepare_input(item, sample_rate, name)
            for note in notes:
                log.info("%s: %s", name, note)
            if len(samples) < shortest:
                results[i] = Transcript("", len(samples) / SAMPLE_RATE, notes=[
                    *notes, f"not run: {len(samples)} samples, fewer than the {shortest} the model needs"])
                results[i].words, results[i].chars = _empty_spans(return_timestamps)
                continue
            yield Utterance(str(i), samples, None, {"notes": notes})

    try:
        for utt, out in transcribe_utterances(model, utterances(), target, decoder, batch_seconds, windows,
                                              return_timestamps, report=False):
            out.notes[:0] = utt.meta["notes"]
            results[int(utt.id)] = out
    finally:
        model.to(home).train(was_training)
        model.extract_per_utterance = per_utterance
    return results[0] if single else results


def _empty_spans(timestamps: bool | str) -> tuple[list | None, list | None]:
    return ([] if timestamps in (True, "word") else None), ([] if timestamps in (True, "char") else None)
