"""Generated speech-like audio: the built-in, deterministic demo corpus.

Utterances are words from a small lexicon, spelled with "phones" named by letters and rendered by a
simple source-filter synthesizer: voiced phones are harmonic sources shaped by formant resonances,
fricatives are band-limited noise, stops are a closure and a burst, words are separated by pauses.
Speakers differ in pitch, vocal-tract length (formant scale), speaking rate, loudness, breathiness
and background noise. Formants glide between phones, so neighbouring frames are correlated as in
speech. The transcript is the words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Phone:
    formants: tuple[float, float, float]  # Hz; voiced part
    voiced: float                         # gain of the harmonic source
    noise: float                          # gain of the noise source
    band: tuple[float, float]             # Hz; noise band
    duration: float                       # seconds at speaking rate 1
    stop: bool = False                    # closure then burst


PHONES: dict[str, Phone] = {
    "A": Phone((730, 1090, 2440), 1.0, 0.0, (0, 0), 0.13),
    "E": Phone((530, 1840, 2480), 1.0, 0.0, (0, 0), 0.12),
    "I": Phone((270, 2290, 3010), 0.9, 0.0, (0, 0), 0.11),
    "O": Phone((570, 840, 2410), 1.0, 0.0, (0, 0), 0.13),
    "U": Phone((300, 870, 2240), 0.9, 0.0, (0, 0), 0.12),
    "M": Phone((250, 1000, 2200), 0.5, 0.0, (0, 0), 0.08),
    "N": Phone((250, 1700, 2600), 0.5, 0.0, (0, 0), 0.08),
    "L": Phone((360, 1300, 2900), 0.7, 0.0, (0, 0), 0.08),
    "R": Phone((420, 1300, 1600), 0.7, 0.0, (0, 0), 0.08),
    "S": Phone((500, 1500, 2500), 0.0, 0.35, (4000, 7500), 0.12),
    "F": Phone((500, 1500, 2500), 0.0, 0.2, (1200, 6000), 0.11),
    "Z": Phone((300, 1500, 2500), 0.35, 0.25, (3500, 7000), 0.10),
    "K": Phone((400, 1800, 2500), 0.0, 0.5, (1500, 3500), 0.09, stop=True),
    "T": Phone((400, 1800, 2500), 0.0, 0.5, (3000, 6500), 0.08, stop=True),
}

LEXICON = [
    "AT", "IN", "ON", "SO", "TO", "NO", "ME", "KIT", "SAT", "TEN", "FAN", "SUN", "RUN", "NET", "LOT", "MAN",
    "FIT", "ZOO", "OAK", "ELM", "NOSE", "MILK", "LEAF", "FORK", "RAIN", "SNAIL", "LAKE", "ROSE", "SALT",
    "KITE", "TREE", "FIRE", "STONE", "LEMON", "ROTOR", "MELON", "TRAIN", "SMILE", "FROZEN", "MINUTE",
]


@dataclass(frozen=True)
class Speaker:
    f0: float             # Hz
    formant_scale: float
    rate: float           # > 1 speaks faster
    breath: float         # aspiration noise gain on voiced phones
    gain_db: float        # loudness
    noise_db: float       # background noise level relative to full scale


def random_speaker(rng: np.random.Generator) -> Speaker:
    return Speaker(f0=float(rng.uniform(90, 230)), formant_scale=float(rng.uniform(0.88, 1.15)),
                   rate=float(rng.uniform(0.85, 1.2)), breath=float(rng.uniform(0.0, 0.05)),
                   gain_db=float(rng.uniform(-12, 0)), noise_db=float(rng.uniform(-60, -35)))


def random_text(rng: np.random.Generator, seconds: float) -> str:
    """Lexicon words adding up to about ``seconds`` at speaking rate 1."""
    words, total = [], 0.25
    while total < seconds or not words:
        word = str(rng.choice(LEXICON))
        words.append(word)
        total += sum(PHONES[c].duration for c in word) + 0.11
    return " ".join(words)


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    kernel = np.hanning(width)
    kernel /= kernel.sum()
    padded = np.pad(x, (width, width), mode="edge")
    return np.convolve(padded, kernel, mode="same")[width:-width]


def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spectrum[(freqs < lo) | (freqs > hi)] = 0.0
    noise = np.fft.irfft(spectrum, n)
    return noise / (noise.std() + 1e-8)


def synthesize(text: str, speaker: Speaker, rng: np.random.Generator) -> np.ndarray:
    """Render ``text`` (phone letters and spaces) in ``speaker``'s voice: float32 samples in [-1, 1]."""
    segments: list[tuple[Phone | None, int]] = [(None, int(rng.uniform(0.05, 0.2) * SAMPLE_RATE))]
    for i, word in enumerate(text.split()):
        if i:
            segments.append((None, int(rng.uniform(0.06, 0.16) * SAMPLE_RATE)))
        for letter in word:
            phone = PHONES[letter]
            seconds = phone.duration / speaker.rate * rng.uniform(0.8, 1.25)
            segments.append((phone, int(seconds * SAMPLE_RATE)))
    segments.append((None, int(rng.uniform(0.05, 0.2) * SAMPLE_RATE)))
    n = sum(length for _, length in segments)

    formants = np.zeros((3, n))
    voiced = np.zeros(n)
    noise = np.zeros(n)
    pos = 0
    last_formants = np.array(PHONES["A"].formants)
    for phone, length in segments:
        if phone is not None:
            last_formants = np.array(phone.formants) * speaker.formant_scale
            voiced[pos: pos + length] = phone.voiced
            if phone.noise > 0:
                closure = int(0.6 * length) if phone.stop else 0
                burst = _band_noise(rng, length - closure, *phone.band) * phone.noise
                if phone.stop:
                    burst *= np.exp(-np.arange(length - closure) / (0.015 * SAMPLE_RATE))
                    voiced[pos: pos + closure] = 0.0
                noise[pos + closure: pos + length] = burst
        formants[:, pos: pos + length] = last_formants[:, None]
        pos += length

    ms = SAMPLE_RATE // 1000
    formants = np.stack([_smooth(f, 25 * ms) for f in formants])  # coarticulation glides
    voiced = _smooth(voiced, 10 * ms)
    t = np.arange(n) / SAMPLE_RATE
    f0 = speaker.f0 * (1.0 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t + rng.uniform(0, 6.3))
                       - 0.1 * t / max(t[-1], 1e-3))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    harmonic = np.zeros(n)
    for k in range(1, int(5000 / speaker.f0) + 1):
        freq = k * f0
        gain = sum(np.exp(-(((freq - formants[j]) / (60 + 40 * j)) ** 2)) for j in range(3)) / k**0.5
        harmonic += gain * np.sin(k * phase)
    harmonic /= harmonic.std() + 1e-8
    breath = _band_noise(rng, n, 300, 6000) * speaker.breath
    signal = voiced * (harmonic + breath) + noise
    signal = 0.5 * signal / (np.abs(signal).max() + 1e-8) * 10 ** (speaker.gain_db / 20)
    signal += 10 ** (speaker.noise_db / 20) * rng.standard_normal(n)
    return np.clip(signal, -1.0, 1.0).astype(np.float32)


def render(text: str, speaker: dict, seed: int) -> np.ndarray:
    """Deterministic rendering of ``text`` by a speaker given as a dict of :class:`Speaker` fields."""
    return synthesize(text, Speaker(**speaker), np.random.default_rng(seed))


def generate_utterance(seed: int, seconds: float = 2.0, speaker: Speaker | None = None) -> tuple[np.ndarray, str]:
    """One deterministic utterance of about ``seconds``: ``(samples float32 (S,), transcript)``."""
    rng = np.random.default_rng(seed)
    if speaker is None:
        speaker = random_speaker(rng)
    text = random_text(rng, seconds)
    return synthesize(text, speaker, rng), text


def generate_batch(batch_size: int, seconds: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A padded batch of generated utterances, each cropped to at most ``seconds``.

    Returns ``(waveforms float32 (B, S), lengths int64 (B,))``; the lengths differ so the batch is
    really padded.
    """
    max_len = int(seconds * SAMPLE_RATE)
    waves = []
    for i in range(batch_size):
        samples, _ = generate_utterance(seed * 100_003 + i, seconds * 1.2)
        target = int(max_len * (1.0 - 0.3 * i / max(batch_size - 1, 1)))
        waves.append(np.resize(samples, target))  # repeats if short: every row has its target length
    lengths = np.array([len(w) for w in waves], dtype=np.int64)
    batch = np.zeros((batch_size, lengths.max()), dtype=np.float32)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    return batch, lengths


def corpus_entries(hours: float, num_speakers: int = 40, seed: int = 0,
                   min_seconds: float = 1.0, max_seconds: float = 5.0) -> list:
    """Entries of a synthetic corpus of about ``hours``: speakers ``spk000..``, utterances of
    ``min_seconds``-``max_seconds``, rendered when the shard builder converts them."""
    from speechssl.data.manifest import Entry

    rng = np.random.default_rng(seed)
    speakers = [random_speaker(rng) for _ in range(num_speakers)]
    entries, total, i = [], 0.0, 0
    while total < hours * 3600:
        spk = i % num_speakers
        text = random_text(rng, float(rng.uniform(min_seconds, max_seconds)) * speakers[spk].rate - 0.3)
        estimate = (sum(PHONES[c].duration for c in text.replace(" ", "")) + 0.11 * text.count(" ") + 0.25)
        total += estimate / speakers[spk].rate
        utt_seed = int(rng.integers(2**31))
        entries.append(Entry(id=f"spk{spk:03d}-{i:06d}", path=f"synth:{utt_seed}", text=text, speaker=f"spk{spk:03d}",
                             synth={"text": text, "speaker": asdict(speakers[spk]), "seed": utt_seed}))
        i += 1
    return entries
