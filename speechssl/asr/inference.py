"""A CTC model's log-probabilities over utterances: batched by padded length, and in overlapping
windows for recordings too long for one pass.

    for batch, log_probs, frames in emissions(model, utterances, device):   # (B, T, V), (B,)
        ...

A recording longer than ``Windows.max_seconds`` (60) runs in windows of ``window_seconds`` (30)
overlapping by ``overlap_seconds`` (4), as ``speechssl.extract`` does: each window keeps the
frames nearest its centre, stitched into the single pass's frames, so memory is bounded by the
window whatever the recording's length.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from speechssl.data.audio import normalize_audio, pad_waveforms
from speechssl.data.inputs import SAMPLE_RATE, Utterance, batches
from speechssl.features import LayerFeatures, window_batches


@dataclass(frozen=True)
class Windows:
    """Recordings longer than ``max_seconds`` run in windows of ``window_seconds`` overlapping by
    ``overlap_seconds`` (``speechssl.extract``'s options and defaults)."""

    max_seconds: float = 60.0
    window_seconds: float = 30.0
    overlap_seconds: float = 4.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value!r}")
        if self.overlap_seconds >= self.window_seconds:
            raise ValueError(f"--overlap-seconds ({self.overlap_seconds:g}) must be less than --window-seconds "
                             f"({self.window_seconds:g})")


DEFAULT_WINDOWS = Windows()


class WindowedCTC:
    """A CTC model's logits over one long recording, computed in overlapping windows and
    stitched: ``audio (S,)`` -> ``(T, V)`` with T the single pass's frames, in memory bounded by
    ``batch_windows`` windows. The plan is :meth:`LayerFeatures.window_plan`'s (each window keeps
    its frames up to the middle of its overlaps), and the extractor normalises every window with
    the whole recording's statistics as :meth:`LayerFeatures.windowed` does, so only the context
    network's reach beyond a window differs from one pass.

    Window and overlap are rounded down to whole output frames (the overlap to an even number,
    so that each cut falls on a frame); the overlap must cover twice the receptive field."""

    def __init__(self, model, windows: Windows, batch_windows: int = 4):
        self.model, self.batch_windows, self.max_seconds = model, batch_windows, windows.max_seconds
        self.features = LayerFeatures(model, "last")
        context = model.config.context
        # The Zipformer's output may run at a lower rate than the extractor's frames, and its
        # stacks downsample in groups of frames: windows start where the single pass starts a group.
        self.factor = getattr(context, "output_downsampling_factor", 1)
        self.frame = self.features.stride * self.factor  # samples per output frame
        self.unit = self.features.stride * math.lcm(self.factor, *getattr(context, "downsampling_factor", [1]))
        self.window = int(windows.window_seconds * SAMPLE_RATE) // self.unit * self.unit
        self.overlap = int(windows.overlap_seconds * SAMPLE_RATE) // (2 * self.unit) * (2 * self.unit)
        least = max(2 * model.feature_extractor.receptive_field, 2 * self.unit)
        if not least <= self.overlap < self.window:
            raise ValueError(f"--overlap-seconds {windows.overlap_seconds:g} and --window-seconds "
                             f"{windows.window_seconds:g}: this model needs an overlap of at least "
                             f"{least / SAMPLE_RATE:g} s and a window longer than the overlap")

    @torch.no_grad()
    def __call__(self, audio: Tensor) -> Tensor:
        """``audio (S,)`` float32 on the model's device -> logits ``(T, V)``."""
        model, features = self.model, self.features
        plan = features.window_plan(audio.shape[-1], self.window, self.overlap)
        pieces, per_utterance = [], model.extract_per_utterance
        with features.recording_statistics(audio, plan) as norm_hooked:
            if norm_hooked:
                model.extract_per_utterance = False  # the norm module itself runs, so its hook applies
            try:
                for first, group, waves, lengths in window_batches(audio, plan, self.batch_windows):
                    logits, frames = model(waves, lengths)
                    for row, (start, _, keep_from, keep_to) in enumerate(group):
                        offset = start // self.frame
                        # The last window runs to the recording's end: its frames are the single pass's last.
                        end = int(frames[row]) if first + row == len(plan) - 1 else keep_to // self.factor - offset
                        pieces.append(logits[row, keep_from // self.factor - offset: end])
            finally:
                model.extract_per_utterance = per_utterance
        return torch.cat(pieces)


def emissions(model, utterances: Iterator[Utterance], device: torch.device, max_seconds: float = 300.0,
              windows: Windows | None = Windows(), report: bool = True
              ) -> Iterator[tuple[list[Utterance], Tensor, Tensor]]:
    """Batches of ``(utterances, log_probs (B, T, V) float32 on the CPU, frames (B,))``, in input
    order, batched by padded audio length. Each utterance's output does not depend on what it is
    batched with. An utterance longer than ``windows.max_seconds`` is a batch of its own, run
    through :class:`WindowedCTC` (its audio normalised in place when the model normalises);
    ``windows=None`` runs everything in one pass. The windows are checked against the model here,
    before any utterance is read. ``report``: say on stderr how many recordings were windowed."""
    model.eval().to(device)
    model.extract_per_utterance = True
    windowed = WindowedCTC(model, windows) if windows is not None else None
    return _emissions(model, utterances, device, max_seconds, windowed, report)


@torch.no_grad()
def _emissions(model, utterances: Iterator[Utterance], device: torch.device, max_seconds: float,
               windowed: WindowedCTC | None, report: bool) -> Iterator[tuple[list[Utterance], Tensor, Tensor]]:
    limit = windowed.max_seconds * SAMPLE_RATE if windowed is not None else math.inf
    count = 0
    for long, group in itertools.groupby(utterances, key=lambda u: len(u.audio) > limit):
        if long:
            for utt in group:
                audio = torch.from_numpy(utt.audio)
                if model.normalize_audio:  # as normalize_audio, in place: no second copy of a long recording
                    var, mean = torch.var_mean(audio, correction=0)
                    audio.sub_(mean).div_(torch.sqrt(var + 1e-5))
                log_probs = windowed(audio.to(device)).float().log_softmax(-1).cpu()
                count += 1
                yield [utt], log_probs[None], torch.tensor([len(log_probs)])
            continue
        for batch in batches(group, max_seconds):
            # normalised as in training (data.normalize)
            waves, lengths = pad_waveforms([normalize_audio(u.audio) if model.normalize_audio else u.audio
                                            for u in batch])
            logits, frames = model(waves.to(device), lengths)
            yield batch, logits.float().log_softmax(-1).cpu(), frames.cpu()
    if count and report:
        print(f"windowed {count} recording(s) longer than {windowed.max_seconds:g} s (windows of "
              f"{windowed.window / SAMPLE_RATE:g} s overlapping by {windowed.overlap / SAMPLE_RATE:g} s)",
              file=sys.stderr)
