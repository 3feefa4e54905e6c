"""Data augmentation in the loader: speed perturbation, gain and additive noise.

    data:
      augment:
        speed: [0.9, 1.0, 1.1]      # Kaldi/ESPnet's 3-way speed perturbation, one factor per utterance
        gain_db: [-6, 6]            # a uniform gain in dB
        noise: [data/musan_noise]   # folders of audio files, or shard directories
        noise_snr_db: [5, 20]       # a uniform signal-to-noise ratio in dB
        noise_prob: 0.5             # the share of utterances that get noise

Every random choice comes from generators seeded by ``data.seed``, the epoch and the utterance's
place in the epoch's shards, so an utterance is perturbed the same way whatever the number of
ranks and workers, and an exactly resumed run sees exactly the same audio. Speed is chosen when the epoch is planned
(:mod:`speechssl.data.plan`), since it changes the utterance's length and so its batch; the rest
is applied after decoding, in this order: speed, crop, gain, noise, then ``data.normalize`` (which
undoes a gain: with normalised audio, gain only matters through the noise level it meets).
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from speechssl.config import check
from speechssl.data.audio import AUDIO_EXTENSIONS


@dataclass
class AugmentConfig:
    """speed: factors drawn uniformly per utterance (empty: off); 1.1 is 10% faster and shorter,
    resampled as Kaldi's ``speed`` perturbation does (pitch changes with it).
    gain_db: ``[low, high]`` of a uniform gain in dB (empty: off).
    noise: folders of noise recordings (any format libsndfile reads, searched recursively) or shard
    directories; noise_snr_db: ``[low, high]`` of a uniform SNR in dB; noise_prob: the share of
    utterances that get noise. A noise recording shorter than the utterance is repeated; one at
    another sample rate is resampled."""

    speed: list[float] = field(default_factory=list)
    gain_db: list[float] = field(default_factory=list)
    noise: list[str] = field(default_factory=list)
    noise_snr_db: list[float] = field(default_factory=lambda: [5.0, 20.0])
    noise_prob: float = 0.5

    def __post_init__(self) -> None:
        check(all(0.5 <= s <= 2.0 for s in self.speed), "data.augment.speed", "factors must be in [0.5, 2]")
        check(len(self.gain_db) in (0, 2) and (not self.gain_db or self.gain_db[0] <= self.gain_db[1]),
              "data.augment.gain_db", "must be empty or [low, high] in dB")
        check(len(self.noise_snr_db) == 2 and self.noise_snr_db[0] <= self.noise_snr_db[1],
              "data.augment.noise_snr_db", "must be [low, high] in dB")
        check(0.0 <= self.noise_prob <= 1.0, "data.augment.noise_prob", "must be in [0, 1]")
        for source in self.noise:
            check(Path(source).is_dir(), "data.augment.noise", f"{source} is not a folder of audio or shards")

    @property
    def active(self) -> bool:
        return bool(self.speed and self.speed != [1.0]) or bool(self.gain_db) or bool(self.noise)


def item_rng(seed: int, epoch: int, shard: int, position: int) -> np.random.Generator:
    """The generator of gain and noise for one utterance of one epoch."""
    return np.random.default_rng([seed, epoch, 7, 1, shard, position])


def draw_speeds(factors: list[float], seed: int, epoch: int, shard: int, count: int) -> list[float]:
    """The speed factor of each of the ``count`` samples of epoch shard ``shard`` (one generator
    per shard: planning an epoch of a large corpus stays cheap)."""
    rng = np.random.default_rng([seed, epoch, 7, 0, shard])
    return [float(factors[i]) for i in rng.integers(len(factors), size=count)]


def speed_length(length: int, speed: float) -> int:
    """Samples after speed perturbation: ``round(length / speed)`` (what soxr gives)."""
    return length if speed == 1.0 else max(1, round(length / speed))


def change_speed(audio: np.ndarray, speed: float, rate: int) -> np.ndarray:
    """``(S,) -> (round(S / speed),)``: the audio played ``speed`` times as fast (resampled from
    ``rate * speed`` to ``rate``), cut or zero-padded by a sample where the resampler rounds
    otherwise, so the length is the one the epoch was planned with."""
    if speed == 1.0:
        return audio
    out = soxr.resample(audio, rate * speed, rate).astype(np.float32)
    want = speed_length(len(audio), speed)
    return out[:want] if len(out) >= want else np.pad(out, (0, want - len(out)))


class NoiseBank:
    """The noise recordings of ``sources``: files listed once, decoded when drawn. Shard
    directories are read by member offset, so a draw reads one recording, not the tar."""

    def __init__(self, sources: list[str], rate: int):
        self.rate = rate
        self.items: list[tuple[str, str | None]] = []  # (file, None) or (tar, member name)
        for source in sources:
            folder = Path(source)
            if (folder / "index.json").is_file():
                self.items += [(str(tar), None) for tar in sorted(folder.glob("*.tar"))]
            else:
                self.items += [(str(p), None) for p in sorted(folder.rglob("*"))
                               if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS]
        self._tars: dict[str, tuple[tarfile.TarFile, list[tarfile.TarInfo]]] = {}
        self.items = self._expand_tars(self.items)
        if not self.items:
            raise ValueError(f"data.augment.noise: no audio found in {', '.join(sources)}")

    def _expand_tars(self, items: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
        out = []
        for path, _ in items:
            if not path.endswith(".tar"):
                out.append((path, None))
                continue
            with tarfile.open(path) as tar:
                out += [(path, m.name) for m in tar.getmembers() if m.name.endswith(".flac")]
        return out

    def _read(self, path: str, member: str | None) -> np.ndarray:
        if member is None:
            data, rate = sf.read(path, dtype="float32", always_2d=True)
        else:
            if path not in self._tars:  # opened once per worker, members indexed once
                tar = tarfile.open(path)  # noqa: SIM115  (kept open for the worker's later draws)
                self._tars[path] = (tar, {m.name: m for m in tar.getmembers()})
            tar, members = self._tars[path]
            data, rate = sf.read(io.BytesIO(tar.extractfile(members[member]).read()), dtype="float32",
                                 always_2d=True)
        audio = data.mean(axis=1)
        if rate != self.rate:
            audio = soxr.resample(audio, rate, self.rate).astype(np.float32)
        if audio.size == 0 or not np.isfinite(audio).all():
            raise ValueError("empty or not finite")
        return audio

    def segment(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """``(length,)`` samples of a recording drawn by ``rng``, from a random offset, repeated
        as often as needed. Raises ValueError naming the recording when it cannot be decoded."""
        path, member = self.items[int(rng.integers(len(self.items)))]
        try:
            noise = self._read(path, member)
        except (sf.LibsndfileError, RuntimeError, ValueError, tarfile.TarError, KeyError) as e:
            raise ValueError(f"noise {path}{':' + member if member else ''} unreadable: {e}") from None
        start = int(rng.integers(len(noise)))
        return np.resize(np.roll(noise, -start), length)


class Augmenter:
    """Gain and noise for one utterance (speed is applied before cropping, see the loader)."""

    def __init__(self, config: AugmentConfig, seed: int, rate: int):
        self.config, self.seed = config, seed
        self.noise = NoiseBank(config.noise, rate) if config.noise else None

    def __call__(self, audio: np.ndarray, epoch: int, shard: int, position: int) -> np.ndarray:
        c = self.config
        rng = item_rng(self.seed, epoch, shard, position)
        if c.gain_db:
            audio = audio * np.float32(10 ** (rng.uniform(*c.gain_db) / 20))
        if self.noise is not None and rng.random() < c.noise_prob:
            snr = rng.uniform(*c.noise_snr_db)
            noise = self.noise.segment(len(audio), rng)
            signal_power, noise_power = float(np.mean(audio**2)), float(np.mean(noise**2))
            if signal_power > 0 and noise_power > 0:
                audio = audio + noise * np.float32(np.sqrt(signal_power / (noise_power * 10 ** (snr / 10))))
        return audio.astype(np.float32, copy=False)
