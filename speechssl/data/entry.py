"""One utterance to shard or run a model on (:class:`Entry`), as a corpus reader describes it, and
reading its audio: a whole file, or a segment of one on one channel."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from speechssl.data.audio import BadAudio, read_segment


@dataclass
class Entry:
    """One utterance: an id (unique within the corpus), where its audio is, optional transcript and
    speaker, and any other manifest fields.

    offset / duration: the segment of the file, in seconds (``duration=None``: to the end of the
    file); channel: the file's channel to take (0-based; ``None`` averages them). problem:
    ``(reason, detail)`` when the manifest already shows that this utterance cannot be read as
    asked (an unsupported lhotse cut): it is skipped and reported with that reason."""

    id: str
    path: str
    text: str | None = None
    speaker: str | None = None
    extra: dict = field(default_factory=dict)
    synth: dict | None = None  # generated audio: keyword arguments of data_tools.synthetic.render
    offset: float = 0.0
    duration: float | None = None
    channel: int | None = None
    problem: tuple[str, str] | None = None

    @property
    def is_segment(self) -> bool:
        """Whether the audio is less than the whole file mixed down: a cut in time, or one channel."""
        return self.offset != 0 or self.duration is not None or self.channel is not None


def read_entry(entry: Entry) -> tuple[np.ndarray, int]:
    """An entry's audio, float32 ``(S,)`` at the file's rate, and that rate; raises
    :class:`~speechssl.data.audio.BadAudio` (``entry.problem``'s reason, or the file's)."""
    if entry.problem is not None:
        raise BadAudio(*entry.problem)
    return read_segment(entry.path, entry.offset, entry.duration, entry.channel)


def parse_seconds(value: object, what: str) -> float:
    """A manifest's time field as seconds: a finite number >= 0 (a numeric string too), else a
    ValueError that names ``what`` (the file and row or cut, and the field)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what}: {value!r} must be a finite number of seconds >= 0")
    return seconds
