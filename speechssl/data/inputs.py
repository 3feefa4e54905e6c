"""Reading utterances to run a model on: audio files, directories (recursive, or a LibriSpeech
tree), manifests (TSV, JSON lines and NeMo's, fairseq, lhotse cuts; segments cut as the manifest
says) or shard directories, resampled to 16 kHz.

    skipped = Counter()
    for utt in read_utterances(["audio/", "data/dev"], skipped):   # Utterance(id, audio, text, meta)
        ...
    skipped    # unreadable (or too short) inputs by reason, each also reported on stderr

Used by transcription, evaluation and feature extraction.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speechssl.data.audio import BadAudio, prepare
from speechssl.data.entry import Entry, read_entry
from speechssl.data.manifest import read_source
from speechssl.data.shardset import INDEX

SAMPLE_RATE = 16000


@dataclass
class Utterance:
    """audio: ``(S,)`` float32 at 16 kHz; meta: the sample's json (shards) or the manifest fields."""

    id: str
    audio: np.ndarray
    text: str | None
    meta: dict = field(default_factory=dict)


def skip(skipped: Counter, name: str, reason: str, detail: str) -> None:
    """Count ``name`` as skipped for ``reason`` and say why on stderr."""
    skipped[reason] += 1
    print(f"skipped {name}: {detail}", file=sys.stderr)


def _too_short(skipped: Counter, name: str, samples: int, min_samples: int) -> bool:
    """Whether an utterance of ``samples`` is under ``min_samples`` (then counted as skipped)."""
    if samples >= min_samples:
        return False
    skip(skipped, name, "too_short", f"too_short: {samples} samples, fewer than the {min_samples} needed")
    return True


def _shard_utterances(directory: Path, skipped: Counter, workers: int, min_samples: int) -> Iterator[Utterance]:
    from speechssl.data import DataConfig, make_loader

    config = DataConfig(shards=[str(directory)], max_tokens=SAMPLE_RATE * 600, max_sample_size=SAMPLE_RATE * 600,
                        min_sample_size=0, crop=False, crop_to_shortest=False, num_workers=workers)
    for batch in make_loader(config, train=False):
        for key, reason in batch.metadata["skipped"]:
            skip(skipped, key, reason.split(":")[0], reason)
        for row, n, meta in zip(batch.waveforms, batch.lengths.tolist(), batch.metadata["samples"], strict=True):
            meta = {k: v for k, v in meta.items() if k != "__shard__"}
            uid = meta.get("id", meta["__key__"])
            if not _too_short(skipped, uid, n, min_samples):
                yield Utterance(uid, row[:n].numpy(), meta.get("text"), meta)


def read_utterances(inputs: list[str], skipped: Counter, workers: int = 0,
                    min_samples: int = 0) -> Iterator[Utterance]:
    """Every utterance of ``inputs``, in order; unreadable ones are counted in ``skipped`` by reason,
    and so are those of fewer than ``min_samples`` samples at 16 kHz (reason ``too_short``: a model
    cannot run on less than its receptive field, see :func:`speechssl.features.min_input_samples`).
    ``workers``: processes decoding shards (0: this one)."""
    for name in inputs:
        path = Path(name)
        if (path / INDEX).is_file():
            yield from _shard_utterances(path, skipped, workers, min_samples)
            continue
        is_audio_file = path.is_file() and path.suffix.lower() not in (".tsv", ".jsonl", ".json", ".gz", ".txt", ".csv")
        entries = [Entry(id=path.stem, path=str(path))] if is_audio_file else read_source(path)[0]
        for entry in entries:
            try:
                samples, rate = read_entry(entry)
                audio = prepare(samples, rate, SAMPLE_RATE, min_seconds=0.03, max_seconds=float("inf"))
            except BadAudio as e:
                skip(skipped, entry.id, e.reason, str(e))
                continue
            if _too_short(skipped, entry.id, len(audio), min_samples):
                continue
            meta = {"id": entry.id, "path": entry.path, **({"text": entry.text} if entry.text is not None else {}),
                    **({"speaker": entry.speaker} if entry.speaker is not None else {}), **entry.extra}
            yield Utterance(entry.id, audio, entry.text, meta)


def batches(utterances: Iterator[Utterance], max_seconds: float) -> Iterator[list[Utterance]]:
    """Consecutive utterances grouped so that a batch's padded audio stays under ``max_seconds``
    (an utterance longer than that is a batch of its own)."""
    batch: list[Utterance] = []
    for utt in utterances:
        longest = max([len(u.audio) for u in batch] + [len(utt.audio)])
        if batch and longest * (len(batch) + 1) > max_seconds * SAMPLE_RATE:
            yield batch
            batch = []
        batch.append(utt)
    if batch:
        yield batch
