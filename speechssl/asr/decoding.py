"""Greedy CTC decoding and error counts (word and character edit distances, with jiwer).

A decoder is called as ``decoder(log_probs (B, T, V), frames (B,))`` and returns the transcripts;
:class:`GreedyDecoder` and :class:`speechssl.asr.beam.BeamDecoder` also give ``hypotheses(...)``:
each transcript with its tokens and the frame where each token starts, from which
:mod:`speechssl.asr.timestamps` computes word and character times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jiwer
import torch
from torch import Tensor

Decoder = Callable[[Tensor, Tensor], list[str]]  # (log_probs (B, T, V), frames (B,)) -> texts


@dataclass
class Hypothesis:
    """A decoded utterance: its text, its token ids (blanks and CTC repeats removed) and the
    frame at which each token starts."""

    text: str
    tokens: list[int]
    starts: list[int]


def greedy_decode(logits: Tensor, lengths: Tensor | None, blank: int = 0) -> list[list[int]]:
    """Best path: per frame the most likely token, repeats merged, blanks removed.
    logits: ``(B, T, V)``; lengths: ``(B,)`` valid frames (None: all). Returns token ids per row."""
    best = logits.argmax(-1).cpu()
    lengths = [best.shape[1]] * best.shape[0] if lengths is None else lengths.tolist()
    out = []
    for row, n in zip(best, lengths, strict=True):
        tokens = torch.unique_consecutive(row[:n])
        out.append([int(t) for t in tokens if t != blank])
    return out


class GreedyDecoder:
    """Best-path decoding into text: ``decoder(log_probs (B, T, V), frames (B,))`` -> transcripts.
    ``blank_penalty`` is subtracted from the blank's log-probability first (icefall's)."""

    def __init__(self, tokenizer, blank: int = 0, blank_penalty: float = 0.0):
        self.tokenizer, self.blank, self.blank_penalty = tokenizer, blank, blank_penalty

    def hypotheses(self, log_probs: Tensor, frames: Tensor | None) -> list[Hypothesis]:
        best = penalize_blank(log_probs, self.blank, self.blank_penalty).argmax(-1).cpu()
        lengths = [best.shape[1]] * best.shape[0] if frames is None else frames.tolist()
        out = []
        for row, n in zip(best, lengths, strict=True):
            path = row[:n]
            # a token starts where the path changes to it from anything else
            changed = torch.ones(n, dtype=torch.bool)
            changed[1:] = path[1:] != path[:-1]
            starts = torch.nonzero(changed & (path != self.blank)).flatten()
            tokens = path[starts].tolist()
            out.append(Hypothesis(self.tokenizer.decode(tokens), tokens, starts.tolist()))
        return out

    def __call__(self, log_probs: Tensor, frames: Tensor | None) -> list[str]:
        return [h.text for h in self.hypotheses(log_probs, frames)]


def penalize_blank(log_probs: Tensor, blank: int, penalty: float) -> Tensor:
    """``log_probs (B, T, V)`` with ``penalty`` subtracted from the blank's (icefall's
    ``blank_penalty``); a copy, or the same tensor when ``penalty`` is 0."""
    if not penalty:
        return log_probs
    out = log_probs.clone()
    out[..., blank] -= penalty
    return out


def error_counts(references: list[str], hypotheses: list[str]) -> dict[str, int]:
    """Word and character edit distances summed over the pairs, and the reference sizes
    (``word_errors / words`` is the WER). An empty reference counts every hypothesis word (and
    character) as an insertion."""
    counts = {"word_errors": 0, "words": 0, "char_errors": 0, "chars": 0}
    pairs = [(r, h) for r, h in zip(references, hypotheses, strict=True) if r.strip()]
    for r, h in zip(references, hypotheses, strict=True):
        if not r.strip():
            counts["word_errors"] += len(h.split())
            counts["char_errors"] += len(h)
    if pairs:
        refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
        words = jiwer.process_words(refs, hyps)
        chars = jiwer.process_characters(refs, hyps)
        counts["word_errors"] += words.substitutions + words.deletions + words.insertions
        counts["words"] += words.substitutions + words.deletions + words.hits
        counts["char_errors"] += chars.substitutions + chars.deletions + chars.insertions
        counts["chars"] += chars.substitutions + chars.deletions + chars.hits
    return counts
