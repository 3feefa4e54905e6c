"""Augmentation in the loader, on real shards: speed perturbation, gain, noise; exact under resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data_tools.shards import ShardOptions, make_shards
from speechssl.config import ConfigError, build
from speechssl.data import DataConfig, make_loader
from speechssl.data.augment import AugmentConfig, change_speed
from speechssl.data.manifest import Entry

RATE = 16000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 tones of 0.5-1.5 s (each a 200-950 Hz sine, so a speed change moves its frequency)."""
    root = tmp_path_factory.mktemp("augment")
    entries = []
    for i in range(24):
        n = int(RATE * (0.5 + i / 24))
        t = np.arange(n) / RATE
        path = root / "wav" / f"u{i:02d}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, 0.5 * np.sin(2 * np.pi * (200 + 30 * i) * t), RATE, subtype="PCM_16")
        entries.append(Entry(id=f"u{i:02d}", path=str(path), text="A B"))
    make_shards(entries, root / "shards", ShardOptions(max_count=5, workers=1), progress=False)
    noise = root / "noise"
    noise.mkdir()
    sf.write(noise / "hum.wav", 0.1 * np.random.default_rng(0).standard_normal(8000), 8000)  # resampled to 16k
    return root


def _labelled(corpus: Path, **augment) -> DataConfig:
    return DataConfig(shards=[str(corpus / "shards")], max_tokens=200_000, max_sample_size=100_000,
                      min_sample_size=0, crop=False, crop_to_shortest=False, shuffle_buffer=8, num_workers=2,
                      seed=5, augment=AugmentConfig(**augment))


def _by_key(loader) -> dict[str, np.ndarray]:
    return {m["__key__"]: w[:n].numpy() for batch in loader
            for w, n, m in zip(batch.waveforms, batch.lengths.tolist(), batch.metadata["samples"], strict=True)}


def _peak_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / RATE)[spectrum.argmax()])


def test_speed_perturbation_scales_duration_and_pitch(corpus: Path) -> None:
    clean = _by_key(make_loader(_labelled(corpus), train=True))
    loader = make_loader(_labelled(corpus, speed=[0.9, 1.1]), train=True)
    plan = loader.stream.plan()
    speeds = {plan.shards[it.shard].keys[it.position]: it.speed
              for slot in plan.slots for batch in slot.batches for it in batch}
    assert set(speeds.values()) == {0.9, 1.1}
    fast = _by_key(loader)
    assert fast.keys() == clean.keys()  # nothing lost
    for key, audio in fast.items():
        speed = speeds[key]
        assert len(audio) == round(len(clean[key]) / speed)
        assert _peak_hz(audio) == pytest.approx(_peak_hz(clean[key]) * speed, rel=0.02)


def test_change_speed_is_resampling() -> None:
    tone = np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE).astype(np.float32)
    slow = change_speed(tone, 0.9, RATE)
    assert len(slow) == round(RATE / 0.9) and slow.dtype == np.float32
    assert _peak_hz(slow) == pytest.approx(396, abs=3)
    assert change_speed(tone, 1.0, RATE) is tone


def test_batches_stay_under_max_tokens_after_speed_perturbation(corpus: Path) -> None:
    config = dataclasses.replace(_labelled(corpus, speed=[0.5]), max_tokens=60_000, max_sample_size=30_000)
    plain = make_loader(dataclasses.replace(config, augment=AugmentConfig()), train=True)
    list(plain)
    assert plain.stats["dropped_long"] == 0  # every utterance is under 1.5 s
    batches = list(make_loader(config, train=True))
    assert batches
    for batch in batches:
        assert batch.waveforms.numel() <= 60_000
    # utterances that become longer than max_sample_size are dropped and counted, not cut
    loader = make_loader(config, train=True)
    list(loader)
    assert loader.stats["dropped_long"] > 0


def test_gain_and_noise_are_applied_and_keep_the_length(corpus: Path) -> None:
    clean = _by_key(make_loader(_labelled(corpus), train=True))
    gained = _by_key(make_loader(_labelled(corpus, gain_db=[6.0, 6.0]), train=True))
    for key, audio in gained.items():
        np.testing.assert_allclose(audio, clean[key] * 10 ** (6 / 20), rtol=1e-5, atol=1e-6)
    noisy = _by_key(make_loader(_labelled(corpus, noise=[str(corpus / "noise")], noise_snr_db=[10.0, 10.0],
                                          noise_prob=1.0), train=True))
    for key, audio in noisy.items():
        added = audio - clean[key]
        assert len(audio) == len(clean[key])
        snr = 10 * np.log10(np.mean(clean[key] ** 2) / np.mean(added**2))
        assert snr == pytest.approx(10.0, abs=0.01)


def test_noise_from_shards(corpus: Path) -> None:
    noisy = _by_key(make_loader(_labelled(corpus, noise=[str(corpus / "shards")], noise_prob=1.0), train=True))
    clean = _by_key(make_loader(_labelled(corpus), train=True))
    assert all(not np.allclose(noisy[k], clean[k]) for k in clean)


def test_augmented_batches_are_identical_after_resume(corpus: Path) -> None:
    augment = dict(speed=[0.9, 1.0, 1.1], gain_db=[-6.0, 6.0], noise=[str(corpus / "noise")], noise_prob=0.5)
    config = dataclasses.replace(_labelled(corpus, **augment), max_tokens=40_000, max_sample_size=40_000)
    whole = []
    loader = make_loader(config, train=True)
    for _ in range(2):
        whole += list(loader)
    cut = len(whole) // 2 + 1
    first = make_loader(config, train=True)
    seen = []
    for _ in range(2):
        for batch in first:
            seen.append(batch)
            if len(seen) == cut:
                break
        if len(seen) == cut:
            break
    resumed = make_loader(config, train=True)
    resumed.load_state_dict(first.state_dict())
    rest = []
    for _ in range(2):
        rest += list(resumed)
        if len(seen) + len(rest) >= len(whole):
            break
    for a, b in zip(seen + rest, whole, strict=False):
        assert [m["__key__"] for m in a.metadata["samples"]] == [m["__key__"] for m in b.metadata["samples"]]
        torch.testing.assert_close(a.waveforms, b.waveforms, rtol=0, atol=0)



def test_each_epoch_draws_again(corpus: Path) -> None:
    loader = make_loader(_labelled(corpus, speed=[0.9, 1.0, 1.1]), train=True)

    def speeds() -> dict[str, float]:
        plan = loader.stream.plan()
        return {plan.shards[it.shard].keys[it.position]: it.speed
                for slot in plan.slots for batch in slot.batches for it in batch}

    first = speeds()
    loader.stream.epoch = 1
    assert speeds() != first and speeds().keys() == first.keys()


def test_validation_is_never_augmented(corpus: Path) -> None:
    plain = _by_key(make_loader(_labelled(corpus), train=False))
    config = _labelled(corpus, speed=[1.1], gain_db=[3.0, 3.0], noise=[str(corpus / "noise")], noise_prob=1.0)
    for key, audio in _by_key(make_loader(config, train=False)).items():
        np.testing.assert_array_equal(audio, plain[key])


def test_bad_settings_name_the_key(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.augment\.speed"):
        build(DataConfig, {"augment": {"speed": [3.0]}})
    with pytest.raises(ConfigError, match=r"data\.augment\.noise"):
        build(DataConfig, {"augment": {"noise": [str(tmp_path / "absent")]}})
    with pytest.raises(ConfigError, match=r"data\.augment\.gain_db"):
        build(DataConfig, {"augment": {"gain_db": [6.0]}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio found"):
        make_loader(_labelled(corpus, noise=[str(tmp_path / "empty")]), train=True)
