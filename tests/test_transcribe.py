"""Transcription from Python: ``CTCModel.transcribe`` on paths, arrays and tensors, with the
sample-rate, channel and sample-type conversions recorded, the errors that name the input, long
recordings in windows, the model left as it was, and the same transcripts as ``speechssl
transcribe``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

import speechssl
from finetune.transcribe import main as transcribe_main
from speechssl import load_model_config
from speechssl.asr.inference import Windows
from speechssl.asr.tokenizer import CharTokenizer
from speechssl.models.ctc import CTCModel
from tests.conftest import REPO

TEXTS = ["THE QUICK BROWN FOX", "JUMPS OVER THE LAZY DOG"]


@pytest.fixture(scope="module")
def model() -> CTCModel:
    """A random tiny CTC model whose head favours the blank and the word delimiter, so that its
    transcripts hold words of several characters."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer.build(TEXTS)
    config = load_model_config(REPO / "configs/model/tiny_transformer.yaml")
    model = CTCModel(config, len(tokenizer), vocab=tokenizer.vocab, tokenizer=tokenizer.to_dict(),
                     normalize_audio=True).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
        model.lm_head.bias[0] += 2.0
        model.lm_head.bias[2] += 1.0
    return model


def _speech(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """Tones and noise of varying loudness: a random model's frames differ along it."""
    rng = np.random.default_rng(seed)
    pieces = []
    while sum(map(len, pieces)) < seconds * rate:
        n = int(rng.integers(rate // 20, rate // 4))
        t = np.arange(n) / rate
        pieces.append(np.sin(2 * np.pi * rng.uniform(100, 3000) * t) * rng.uniform(0.05, 0.8)
                      + rng.normal(0, rng.uniform(0.0, 0.3), n))
    return np.concatenate(pieces)[: int(seconds * rate)].astype(np.float32)


def test_paths_arrays_and_tensors_give_one_transcript_each_in_order(model: CTCModel, tmp_path) -> None:
    audio = [_speech(s, seed=i) for i, s in enumerate([1.2, 2.5, 0.7])]
    sf.write(tmp_path / "a.flac", audio[0], 16000, subtype="PCM_24")
    from_file = sf.read(tmp_path / "a.flac", dtype="float32")[0]
    out = model.transcribe([str(tmp_path / "a.flac"), audio[1], torch.from_numpy(audio[2])])
    assert [t.seconds for t in out] == [len(a) / 16000 for a in audio]
    assert all(t.notes == [] and t.words is None and t.chars is None for t in out)
    assert any(len(t.text.split()) >= 2 for t in out), [t.text for t in out]
    alone = [model.transcribe(x).text for x in (from_file, audio[1], audio[2])]
    assert [t.text for t in out] == alone  # each transcript whatever it is batched with
    assert model.transcribe([]) == []


def test_stereo_integer_and_resampled_inputs_are_converted_with_a_note(model: CTCModel, tmp_path) -> None:
    mono = _speech(2.0, seed=3)
    expected = model.transcribe(mono).text
    left, right = mono * 1.5, mono * 0.5  # their mean is the mono signal
    for stereo in (np.stack([left, right]), np.stack([left, right], axis=1), torch.from_numpy(np.stack([left, right]))):
        out = model.transcribe(stereo)
        assert out.notes == ["down-mixed 2 channels to mono"]
        assert out.text == expected
    pcm = np.round(mono * 2 ** 15).astype(np.int16)
    out = model.transcribe(pcm)
    assert out.notes == ["scaled 16-bit integer samples to [-1, 1]"]
    assert out.text == model.transcribe(pcm.astype(np.float32) / 2 ** 15).text

    at_8k = soxr.resample(mono, 16000, 8000, quality="HQ").astype(np.float32)
    out = model.transcribe(at_8k, sample_rate=8000)
    assert out.notes == ["resampled from 8000 Hz to 16000 Hz"]
    assert out.text == model.transcribe(soxr.resample(at_8k, 8000, 16000, quality="HQ")).text
    assert out.seconds == pytest.approx(2.0, abs=1e-3)

    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1) * 0.5, 8000)
    out = model.transcribe(tmp_path / "s.wav")
    assert out.notes == ["down-mixed 2 channels to mono", "resampled from 8000 Hz to 16000 Hz"]
    assert model.transcribe(tmp_path / "s.wav", sample_rate=8000).text == out.text
    with pytest.raises(ValueError, match=r"s\.wav: the file is at 8000 Hz, not the sample_rate=16000"):
        model.transcribe(tmp_path / "s.wav", sample_rate=16000)


def test_bad_inputs_raise_errors_that_name_them(model: CTCModel, tmp_path) -> None:
    good = _speech(1.0)
    with pytest.raises(ValueError, match=r"input 1: the audio holds NaN"):
        model.transcribe([good, np.full(16000, np.nan, np.float32)])
    with pytest.raises(ValueError, match=r"input 0: audio of shape \(4, 100, 100\)"):
        model.transcribe(np.zeros((4, 100, 100), np.float32))
    with pytest.raises(ValueError, match=r"is not one recording.*pass a list"):
        model.transcribe(np.zeros((64, 16000), np.float32))  # a batch as one array
    with pytest.raises(ValueError, match=r"missing\.wav: missing_file"):
        model.transcribe(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(ValueError, match=r"text\.wav: unreadable"):
        model.transcribe(str(tmp_path / "text.wav"))
    with pytest.raises(ValueError, match=r"sample_rate must be a positive whole number"):
        model.transcribe(good, sample_rate=0)
    with pytest.raises(TypeError, match=r"a path, a numpy array or a tensor"):
        model.transcribe([good, 3.5])
    with pytest.raises(ValueError, match=r"return_timestamps must be"):
        model.transcribe(good, return_timestamps="sentence")
    with pytest.raises(ValueError, match=r"decoder must be 'greedy', 'beam'"):
        model.transcribe(good, decoder="viterbi")
    with pytest.raises(ValueError, match=r"timestamps need a decoder that gives token times"):
        model.transcribe(good, decoder=lambda log_probs, frames: ["x"], return_timestamps=True)


def test_an_input_shorter_than_the_receptive_field_gives_an_empty_transcript_with_a_note(model: CTCModel) -> None:
    short, good = np.zeros(300, np.float32), _speech(1.0)
    out = model.transcribe([short, good], return_timestamps="word")
    assert out[0].text == "" and out[0].words == [] and out[0].chars is None
    assert out[0].notes == ["not run: 300 samples, fewer than the 400 the model needs"]
    assert out[1].text == model.transcribe(good).text


def test_the_model_is_left_in_its_mode_and_a_custom_decoder_is_used(model: CTCModel) -> None:
    good = _speech(1.0)
    model.train()
    model.extract_per_utterance = False
    try:
        eval_text = model.transcribe(good).text
        assert model.training and not model.extract_per_utterance
    finally:
        model.eval()
    assert eval_text == model.transcribe(good).text  # it ran in eval mode: no dropout
    seen = []

    def decoder(log_probs: torch.Tensor, frames: torch.Tensor) -> list[str]:
        seen.append((log_probs.shape, frames.tolist()))
        return ["custom"] * len(frames)

    assert model.transcribe(good, decoder=decoder).text == "custom"
    assert seen == [((1, 49, model.vocab_size), [49])]


def test_a_long_recording_runs_in_windows_as_the_cli_does(model: CTCModel, tmp_path) -> None:
    audio = _speech(12.0, seed=5)
    windows = Windows(max_seconds=4.0, window_seconds=4.0, overlap_seconds=1.0)
    out = model.transcribe(audio, windows=windows)
    assert out.notes == ["run in windows of 4 s overlapping by 1 s"]
    single = model.transcribe(audio, windows=None)
    assert single.notes == []
    # only the context network's reach past a window differs from one pass
    ours, theirs = out.text.split(), single.text.split()
    assert len(ours) >= 5 and abs(len(ours) - len(theirs)) <= 2

    model_file, wav = tmp_path / "model.pt", tmp_path / "long.wav"
    model.save(model_file)
    sf.write(wav, audio, 16000, subtype="FLOAT")
    hyps = tmp_path / "hyps.tsv"
    assert transcribe_main(["transcribe", str(model_file), str(wav), "--output", str(hyps), "--max-seconds", "4",
                            "--window-seconds", "4", "--overlap-seconds", "1"]) == 0
    assert hyps.read_text() == f"long\t{out.text}\n"


def test_the_cli_writes_the_timestamps_of_the_python_call(model: CTCModel, tmp_path, capsys) -> None:
    model_file, wav = tmp_path / "model.pt", tmp_path / "u.wav"
    model.save(model_file)
    audio = _speech(3.0, seed=7)
    sf.write(wav, audio, 16000, subtype="FLOAT")
    assert transcribe_main(["transcribe", str(model_file), str(wav), "--timestamps", "all"]) == 0
    line = json.loads(capsys.readouterr().out)
    loaded = speechssl.load(str(model_file))
    expected = loaded.transcribe(str(wav), return_timestamps=True).to_dict()
    assert line == {"id": "u", **{k: v for k, v in expected.items() if k != "notes"}}
    assert line["words"] and line["chars"]
