"""Decoding the audio bytes stored in shards."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

# Whatever libsndfile decodes, by extension (plus common aliases).
AUDIO_EXTENSIONS = {f".{fmt.lower()}" for fmt in sf.available_formats()} | {".aif", ".oga", ".opus", ".wave"}


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode audio bytes (FLAC in our shards) to mono float32 ``(S,)`` and the sample rate."""
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples.mean(axis=1), rate


def normalize_audio(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (fairseq's ``normalize``): ``(S,) -> (S,)``, as training saw it."""
    return (audio - audio.mean()) / np.sqrt(audio.var() + 1e-5)
