"""Word and character times from the CTC alignment.

A tiny Conformer with local attention (a few frames of look-ahead, so its outputs cannot drift far
from what they describe) learns, on the CPU, "words" of tone "letters" separated by silences;
utterances joined from such words at known times are then transcribed with timestamps, and every
word must start within 60 ms of where it was put, also for a long recording at 8 kHz run in
windows. The span arithmetic is checked on hand-made emissions, for the greedy and the beam
decoder and for BPE pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechssl import load_model_config
from speechssl.asr.beam import BeamDecoder
from speechssl.asr.decoding import GreedyDecoder, Hypothesis
from speechssl.asr.inference import Windows
from speechssl.asr.timestamps import Span, char_spans, token_spans, word_spans
from speechssl.asr.tokenizer import BpeTokenizer, CharTokenizer
from speechssl.data.audio import pad_waveforms
from speechssl.models.ctc import CTCModel
from tests.conftest import REPO

RATE = 16000
TONES = {"A": 500.0, "B": 900.0, "C": 1500.0, "D": 2500.0}  # Hz of each letter
LETTER_SECONDS = 0.08
TOLERANCE = 0.06


def _utterance(rng: np.random.Generator, num_words: int,
               rate: int = RATE) -> tuple[np.ndarray, list[tuple[str, float]]]:
    """Silence, then words of 1-3 different letters (each a tone of 80 ms) with a silence of
    150-400 ms after each, in light noise; and each word with the time it starts."""
    pieces = [np.zeros(int(rng.uniform(0.1, 0.3) * rate), np.float32)]
    words, now = [], len(pieces[0]) / rate
    for _ in range(num_words):
        word = "".join(rng.permutation(list(TONES))[: rng.integers(1, 4)])
        words.append((word, now))
        for letter in word:
            t = np.arange(int(LETTER_SECONDS * rate)) / rate
            pieces.append((0.5 * np.sin(2 * np.pi * TONES[letter] * t)).astype(np.float32))
        pieces.append(np.zeros(int(rng.uniform(0.15, 0.4) * rate), np.float32))
        now = sum(map(len, pieces)) / rate
    audio = np.concatenate(pieces)
    return audio + rng.normal(0, 0.01, len(audio)).astype(np.float32), words


@pytest.fixture(scope="module")
def tone_model() -> CTCModel:
    """The tiny Conformer (narrowed) with attention over 8 frames back and none ahead, and a
    depthwise kernel of 3, trained with CTC for 700 updates (about 40 s on two cores)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tokenizer = CharTokenizer.build(["A B C D"])
    config = load_model_config(REPO / "configs/model/tiny_conformer.yaml", [
        "context.att_context_size=[8,0]", "context.depthwise_conv_kernel=3", "context.embed_dim=48",
        "context.ffn_dim=96", "extractor.conv_layers=[[32,10,5],[32,3,2],[32,3,2],[32,3,2],[32,3,2],[32,2,2],[32,2,2]]",
        "context.dropout=0.0", "context.conv_dropout=0.0", "dropout_input=0.0", "masking.mask_prob=0.0",
        "masking.min_masks=0"])
    model = CTCModel(config, len(tokenizer), vocab=tokenizer.vocab, tokenizer=tokenizer.to_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(700):
        batch = [_utterance(rng, int(rng.integers(1, 4))) for _ in range(8)]
        waves, lengths = pad_waveforms([audio for audio, _ in batch])
        targets = [torch.tensor(tokenizer.encode(" ".join(w for w, _ in words))) for _, words in batch]
        logits, frames = model(waves, lengths)
        loss = torch.nn.functional.ctc_loss(logits.log_softmax(-1).transpose(0, 1), torch.cat(targets), frames,
                                            torch.tensor([len(t) for t in targets]), zero_infinity=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _check_words(words: list[Span], truth: list[tuple[str, float]]) -> None:
    assert [w.text for w in words] == [t for t, _ in truth]
    for word, (text, start) in zip(words, truth, strict=True):
        assert abs(word.start - start) <= TOLERANCE, (text, word.start, start)
        end = start + len(text) * LETTER_SECONDS
        assert abs(word.end - end) <= TOLERANCE, (text, word.end, end)


@pytest.mark.slow
def test_words_joined_at_known_times_start_within_60_ms(tone_model: CTCModel) -> None:
    rng = np.random.default_rng(1)
    tests = [_utterance(rng, 3) for _ in range(20)]
    out = tone_model.transcribe([audio for audio, _ in tests], return_timestamps=True)
    right = [(t, words) for t, (_, words) in zip(out, tests, strict=True)
             if t.text == " ".join(w for w, _ in words)]
    assert len(right) >= 16, [(t.text, [w for w, _ in words]) for t, (_, words) in zip(out, tests, strict=True)]
    for transcript, words in right:
        _check_words(transcript.words, words)
        letters = [(c, start + i * LETTER_SECONDS) for w, start in words for i, c in enumerate(w)]
        assert [c.text for c in transcript.chars] == [c for c, _ in letters]
        assert all(abs(c.start - s) <= TOLERANCE for c, (_, s) in zip(transcript.chars, letters, strict=True))


@pytest.mark.slow
def test_a_long_recording_at_8_khz_keeps_its_times_through_the_windows(tone_model: CTCModel) -> None:
    """40 words (about 20 s) at 8 kHz, in windows of 4 s: the times are the recording's own."""
    rng = np.random.default_rng(2)
    audio, words = _utterance(rng, 40, rate=8000)
    out = tone_model.transcribe(audio, sample_rate=8000, return_timestamps="word",
                                windows=Windows(max_seconds=4.0, window_seconds=4.0, overlap_seconds=1.0))
    assert out.notes == ["resampled from 8000 Hz to 16000 Hz", "run in windows of 4 s overlapping by 1 s"]
    assert out.chars is None
    assert 36 <= len(out.words) <= 44
    # the recognised words, matched in order, each start where they were put
    matched = 0
    spans = iter(out.words)
    for text, start in words:
        for span in spans:
            if span.text == text:
                assert abs(span.start - start) <= TOLERANCE, (text, span.start, start)
                matched += 1
                break
    assert matched >= 36


def _emissions(vocab: list[str], path: str) -> torch.Tensor:
    """``(1, T, V)`` log-probabilities whose best path is ``path`` (one vocab character per frame,
    ``.`` for the blank)."""
    index = {t: i for i, t in enumerate(vocab)}
    logits = torch.full((len(path), len(vocab)), -8.0)
    for t, c in enumerate(path):
        logits[t, 0 if c == "." else index[c]] = 0.0
    return logits.log_softmax(-1)[None]


def test_spans_of_the_greedy_and_the_beam_decoder_are_the_best_paths_runs() -> None:
    tokenizer = CharTokenizer.build(["HI HO"])
    emissions = _emissions(tokenizer.vocab, "..HH.I||..HOO.O...")
    frames = torch.tensor([emissions.shape[1]])
    greedy = GreedyDecoder(tokenizer).hypotheses(emissions, frames)[0]
    assert greedy.text == "HI HOO" and greedy.starts == [2, 5, 6, 10, 11, 14]
    beam = BeamDecoder(tokenizer).hypotheses(emissions, frames)[0]
    assert (beam.text, beam.tokens, beam.starts) == (greedy.text, greedy.tokens, greedy.starts)
    spans = token_spans(greedy, emissions[0].argmax(-1), int(frames[0]))
    assert [(tokenizer.vocab[t], s, e) for t, s, e in spans] == [
        ("H", 2, 4), ("I", 5, 6), ("|", 6, 8), ("H", 10, 11), ("O", 11, 13), ("O", 14, 15)]
    assert word_spans(spans, tokenizer, 0.02) == [Span("HI", 0.04, 0.12), Span("HOO", 0.2, 0.3)]
    assert [c.text for c in char_spans(spans, tokenizer, 0.02)] == list("HIHOO")
    # frames past the valid length are not read
    assert token_spans(Hypothesis("H", [3], [2]), emissions[0].argmax(-1), 3) == [(3, 2, 3)]


def test_bpe_words_start_at_the_pieces_that_mark_them() -> None:
    tokenizer = BpeTokenizer.train(["HELLO THERE", "HELLO WORLD", "THERE WORLD"] * 20, vocab_size=24)
    ids = tokenizer.encode("HELLO WORLD")
    spans = [(token, 3 * i, 3 * i + 2) for i, token in enumerate(ids)]
    words = word_spans(spans, tokenizer, 0.02)
    assert [w.text for w in words] == ["HELLO", "WORLD"]
    first_of_world = next(i for i, t in enumerate(ids) if tokenizer.vocab[t].startswith("\u2581W"))
    assert words[0].start == 0.0 and words[1].start == pytest.approx(3 * first_of_world * 0.02)
    assert "".join(c.text for c in char_spans(spans, tokenizer, 0.02)) == "HELLOWORLD"
