"""Word and character times from a CTC alignment.

    spans = token_spans(hypothesis, log_probs.argmax(-1), frames)   # [(token, first frame, end frame)]
    words = word_spans(spans, tokenizer, seconds_per_frame)         # [Span("HELLO", 0.42, 0.80), ...]
    chars = char_spans(spans, tokenizer, seconds_per_frame)

A token starts at the frame its decoder emitted it (the first frame of its run on the best path)
and lasts while the best path stays on it, as Hugging Face's ``output_char_offsets`` count; a
frame's time is its index times the model's frame step (``inputs_to_logits_ratio / 16000``: 20 ms
for the convolutional encoder), so times are Hugging Face's. A word runs from its first token's
start to its last token's end; words are split at the word delimiter ``|`` of a character
vocabulary, or where a SentencePiece piece starts with ``▁``. For a BPE model the "characters"
are its pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from speechssl.asr.decoding import Hypothesis
from speechssl.asr.tokenizer import WORD, CharTokenizer, Tokenizer

PIECE_START = "\u2581"  # SentencePiece's word-start mark


@dataclass(frozen=True)
class Span:
    """A word or character and its time in the input, in seconds."""

    text: str
    start: float
    end: float

    def to_dict(self) -> dict:
        return {"text": self.text, "start": self.start, "end": self.end}


def token_spans(hypothesis: Hypothesis, best_path: Tensor, frames: int) -> list[tuple[int, int, int]]:
    """``(token, first frame, end frame)`` of each token of ``hypothesis``; ``best_path (T,)``: the
    most likely token per frame, of which the first ``frames`` are valid. A token ends where the
    best path leaves it, at least one frame after its start and at the latest where the next
    token starts."""
    path = best_path[:frames].tolist()
    spans = []
    for i, (token, start) in enumerate(zip(hypothesis.tokens, hypothesis.starts, strict=True)):
        limit = hypothesis.starts[i + 1] if i + 1 < len(hypothesis.starts) else frames
        end = start + 1
        while end < limit and path[end] == token:
            end += 1
        spans.append((token, start, end))
    return spans


def _seconds(frame: int, seconds_per_frame: float) -> float:
    return round(frame * seconds_per_frame, 3)


def char_spans(spans: list[tuple[int, int, int]], tokenizer: Tokenizer, seconds_per_frame: float) -> list[Span]:
    """One span per token that is not a word delimiter (a BPE piece without its ``▁``)."""
    out = []
    for token, start, end in spans:
        text = tokenizer.vocab[token].replace(PIECE_START, "")
        if text and text != WORD:
            out.append(Span(text, _seconds(start, seconds_per_frame), _seconds(end, seconds_per_frame)))
    return out


def word_spans(spans: list[tuple[int, int, int]], tokenizer: Tokenizer, seconds_per_frame: float) -> list[Span]:
    """One span per word: its tokens decoded, from the first's start to the last's end."""
    words: list[list[tuple[int, int, int]]] = [[]]
    for span in spans:
        piece = tokenizer.vocab[span[0]]
        if isinstance(tokenizer, CharTokenizer):
            if piece == WORD:
                words.append([])
                continue
        elif piece.startswith(PIECE_START):
            words.append([])
        words[-1].append(span)
    out = []
    for word in words:
        text = tokenizer.decode([token for token, _, _ in word])
        if text:
            out.append(Span(text, _seconds(word[0][1], seconds_per_frame), _seconds(word[-1][2], seconds_per_frame)))
    return out
