"""A log-mel filterbank front-end: Kaldi's ``fbank`` computed for a whole batch, frames stacked.

The alternative to the convolutional waveform encoder that w2v-BERT and fairseq2's
``Wav2Vec2FbankFeatureExtractor`` use, and the usual input of ASR systems trained on small corpora:
nothing is learned below the context network, so a few hours of audio (or minutes) go to the part
that needs them. 25 ms windows every 10 ms at 16 kHz, then ``stack`` consecutive frames side by side,
so the default ``stack: 2`` gives 50 Hz frames as the convolutional encoder does.
"""

from __future__ import annotations

import torch
import torchaudio.compliance.kaldi as kaldi
from torch import Tensor, nn

from speechssl.models.config import FeatureExtractorConfig

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms
SHIFT = 160  # 10 ms
FFT = 512  # the window padded to a power of two, as Kaldi does
PREEMPHASIS = 0.97


class FbankExtractor(nn.Module):
    """Waveforms ``(B, S)`` to stacked log-mel frames ``(B, T, num_mel_bins * stack)``.

    Per row, the frames are exactly ``torchaudio.compliance.kaldi.fbank`` of the row's valid samples
    (defaults, no dither: DC removal, pre-emphasis 0.97, Povey window, power spectrum, mel bins from
    20 Hz to Nyquist, log); with ``standardize`` each mel bin is then brought to zero mean and unit
    variance over the utterance (fairseq2's ``standardize``). Frames left over after the last whole
    stack are dropped, as fairseq2 does. No parameters.
    """

    def __init__(self, config: FeatureExtractorConfig):
        super().__init__()
        self.num_mel_bins = config.num_mel_bins
        self.stack = config.stack
        self.standardize = config.standardize
        banks, _ = kaldi.get_mel_banks(config.num_mel_bins, FFT, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0)
        self.register_buffer("mel_banks", nn.functional.pad(banks, (0, 1)).T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(WINDOW, periodic=False).pow(0.85), persistent=False)
        self.output_dim = config.num_mel_bins * config.stack
        # Statistics to standardize with instead of each utterance's own (mean, std), each
        # ``(num_mel_bins,)``: set while a long recording is processed in windows.
        self.fixed_statistics: tuple[Tensor, Tensor] | None = None

    @property
    def receptive_field(self) -> int:
        """Samples needed for one output frame (560 for ``stack: 2``)."""
        return WINDOW + (self.stack - 1) * SHIFT

    @property
    def stride(self) -> int:
        """Samples per output frame (320 for ``stack: 2``)."""
        return SHIFT * self.stack

    def fbank_lengths(self, lengths: Tensor) -> Tensor:
        """10 ms frames in ``lengths`` samples (Kaldi's ``snip_edges``): ``(B,) -> (B,)``."""
        return (torch.div(lengths - WINDOW, SHIFT, rounding_mode="floor") + 1).clamp_min(0)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Exact number of output frames for inputs of ``lengths`` samples: ``(B,) -> (B,)``."""
        return torch.div(self.fbank_lengths(lengths), self.stack, rounding_mode="floor")

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def log_mel(self, waveforms: Tensor) -> Tensor:
        """``(B, S)`` waveforms to ``(B, F, num_mel_bins)`` log-mel energies of every whole
        window, in fp32."""
        frames = waveforms.float().unfold(1, WINDOW, SHIFT)  # (B, F, WINDOW)
        frames = frames - frames.mean(-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        # The buffers in fp32 even in a model cast to bf16 or fp16 (as DeepSpeed does without autocast).
        frames = (frames - PREEMPHASIS * previous) * self.window.float()
        power = torch.fft.rfft(frames, n=FFT).abs().pow(2)
        energies = power @ self.mel_banks.float()
        return energies.clamp_min(torch.finfo(torch.float32).eps).log()

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``(B, S)`` waveforms with valid ``lengths (B,)`` (all S if None) to
        ``(B, T, num_mel_bins * stack)`` in the waveforms' dtype (computed in fp32); frames past
        a row's length are zero."""
        mel = self.log_mel(waveforms)
        batch, count, bins = mel.shape
        frames = (self.fbank_lengths(lengths) if lengths is not None
                  else torch.full((batch,), count, device=mel.device))
        valid = (torch.arange(count, device=mel.device) < frames[:, None]).unsqueeze(-1)
        if self.fixed_statistics is not None:
            mean, std = self.fixed_statistics
            mel = (mel - mean) / std
        elif self.standardize:
            mean, std = standardization(mel, valid)
            mel = (mel - mean) / std
        mel = mel.masked_fill(~valid, 0.0)
        usable = count - count % self.stack
        return mel[:, :usable].reshape(batch, usable // self.stack, bins * self.stack).to(waveforms.dtype)


def standardization(mel: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row mean and standard deviation of every bin over the valid frames: ``mel (B, F, N)``
    and ``valid (B, F, 1)`` to two ``(B, 1, N)``; a floor keeps silent rows finite."""
    count = valid.sum(1, keepdim=True).clamp_min(1)
    mean = mel.masked_fill(~valid, 0.0).sum(1, keepdim=True) / count
    var = (mel - mean).masked_fill(~valid, 0.0).square().sum(1, keepdim=True) / count
    return mean, var.clamp_min(1e-5).sqrt()
