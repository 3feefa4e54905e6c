"""Audio in and out: reading and checking files (whole, or a segment of one), resampling, FLAC for shards,
decoding shard bytes."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

# Whatever libsndfile decodes, by extension (plus common aliases).
AUDIO_EXTENSIONS = {f".{fmt.lower()}" for fmt in sf.available_formats()} | {".aif", ".oga", ".opus", ".wave"}


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode audio bytes (FLAC in our shards) to mono float32 ``(S,)`` and the sample rate."""
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples.mean(axis=1), rate


def pad_waveforms(waves: Sequence[np.ndarray | torch.Tensor],
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of waveforms ``[(S_i,)]`` zero-padded to the longest: ``(waves (B, S), lengths (B,))``,
    on the device of the first (``(0, 0)`` and ``(0,)`` for no waveform)."""
    rows = [torch.as_tensor(w) for w in waves]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    device = rows[0].device if rows else None
    batch = torch.zeros(len(rows), int(lengths.max()) if rows else 0, dtype=dtype, device=device)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = row
    return batch, lengths


def normalize_audio(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (fairseq's ``normalize``): ``(S,) -> (S,)``, as training saw it."""
    return (audio - audio.mean()) / np.sqrt(audio.var() + 1e-5)


class BadAudio(Exception):
    """An input that cannot go into a shard; ``reason`` is a short code counted in reports."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode a file to mono float32 ``(S,)`` (channels averaged) and its sample rate
    (:func:`read_audio_channels` without the channel count)."""
    samples, rate, _ = read_audio_channels(path)
    return samples, rate


def read_audio_channels(path: str | Path) -> tuple[np.ndarray, int, int]:
    """Decode a file to mono float32 ``(S,)`` (channels averaged), its sample rate and how many
    channels it had.

    Raises :class:`BadAudio` with reason ``missing_file``, ``unreadable`` (not audio libsndfile
    can open), ``corrupt`` (opens, but decoding fails: a cut-off or damaged FLAC/OGG) or
    ``truncated`` (a WAV/AIFF whose data stops before its header says).
    """
    path = Path(path)
    info = _checked_info(path)
    data = _decode(path, info, 0, info.frames)
    return data.mean(axis=1), info.samplerate, data.shape[1]


def seconds_to_samples(seconds: float, rate: int) -> int:
    """The sample count of ``seconds`` at ``rate`` Hz, rounded half up after rounding to 8 decimals
    (as lhotse's ``compute_num_samples``): 0.29 s at 16 kHz is 4640 samples, not 4639.99... -> 4639."""
    return math.floor(round(seconds * rate, 8) + 0.5)


def read_segment(path: str | Path, offset: float = 0.0, duration: float | None = None,
                 channel: int | None = None) -> tuple[np.ndarray, int]:
    """Decode part of a file to float32 ``(S,)`` and its sample rate, seeking to it (the rest of the
    file is not decoded).

    ``offset`` and ``duration`` are seconds, turned into samples at the file's own rate
    (:func:`seconds_to_samples`); ``duration=None`` reads to the end. A segment that ends one
    sample past the file (rounding) ends with the file; one that ends later raises
    :class:`BadAudio` ``segment_past_end``: it is never cut short silently. ``channel``: that
    channel of the file (0-based; ``no_such_channel`` when it has fewer), ``None`` averages them.
    Other reasons as :func:`read_audio_channels`.
    """
    path = Path(path)
    info = _checked_info(path)
    rate = info.samplerate
    start = seconds_to_samples(offset, rate)
    end = info.frames if duration is None else start + seconds_to_samples(duration, rate)
    if start > info.frames or end > info.frames + 1:
        asked = f"{offset:g} s" + ("" if duration is None else f" + {duration:g} s")
        raise BadAudio("segment_past_end", f"{path}: {asked} ends at sample {end}, the file has {info.frames} "
                                           f"at {rate} Hz")
    if channel is not None and not 0 <= channel < info.channels:
        raise BadAudio("no_such_channel", f"{path}: channel {channel}, the file has {info.channels}")
    data = _decode(path, info, start, min(end, info.frames) - start)
    return (data.mean(axis=1) if channel is None else np.ascontiguousarray(data[:, channel])), rate


def _checked_info(path: Path) -> sf._SoundFileInfo:
    """The file's header; BadAudio ``missing_file``, ``unreadable`` or (a cut-off WAV/AIFF) ``truncated``."""
    if not path.is_file():
        raise BadAudio("missing_file", str(path))
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, ValueError, EOFError) as e:
        raise BadAudio("unreadable", f"{path}: {e}") from None
    # libsndfile reads a cut-off WAV/AIFF up to its end without an error; its notes tell.
    cut = re.search(r"data\s*:\s*(\d+)\s*\(should be (\d+)\)", info.extra_info or "")
    if cut and int(cut.group(1)) > int(cut.group(2)) and int(cut.group(1)) < 0xFFFFFFF0:
        raise BadAudio("truncated", f"{path}: data chunk of {cut.group(1)} bytes, {cut.group(2)} in the file")
    return info


def _decode(path: Path, info: sf._SoundFileInfo, start: int, frames: int) -> np.ndarray:
    """``frames`` frames from ``start`` as float32 ``(frames, channels)``; BadAudio ``corrupt`` when
    decoding fails, ``truncated`` when fewer come than the header promised."""
    try:
        with sf.SoundFile(str(path)) as f:
            if start:
                f.seek(start)
            data = f.read(frames if info.frames > 0 else -1, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, EOFError) as e:
        raise BadAudio("corrupt", f"{path}: {e}") from None
    if info.frames > 0 and len(data) < frames:
        raise BadAudio("truncated", f"{path}: header says {info.frames} frames, decoded {start + len(data)}")
    return data


def prepare(samples: np.ndarray, rate: int, target_rate: int, min_seconds: float,
            max_seconds: float) -> np.ndarray:
    """Check decoded audio and resample it to ``target_rate``; raises :class:`BadAudio` with reason
    ``empty``, ``nan_or_inf``, ``too_short`` or ``too_long``."""
    if samples.size == 0:
        raise BadAudio("empty")
    if not np.isfinite(samples).all():
        raise BadAudio("nan_or_inf")
    seconds = samples.size / rate
    if seconds < min_seconds:
        raise BadAudio("too_short", f"{seconds:.3f}s < {min_seconds}s")
    if seconds > max_seconds:
        raise BadAudio("too_long", f"{seconds:.3f}s > {max_seconds}s")
    if rate != target_rate:
        samples = soxr.resample(samples, rate, target_rate, quality="HQ").astype(np.float32)
    return samples


def encode_flac(samples: np.ndarray, rate: int) -> tuple[bytes, int]:
    """16-bit FLAC bytes of float samples in [-1, 1]; returns the bytes and how many samples were
    clipped to fit."""
    clipped = int(np.count_nonzero(np.abs(samples) > 1.0))
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue(), clipped

