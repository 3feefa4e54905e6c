"""The encoder every speechssl model shares: convolutional extractor, frontend, context network.

:class:`SpeechEncoder` holds the three parts and the ways to run them without the pretraining
objective (``extract_features``, ``encode``); the pretraining model and the CTC model extend it, so
their parameter names (``feature_extractor.*``, ``frontend.*``, ``context.*``) are the same.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from speechssl.device import to_device
from speechssl.models.config import ModelConfig
from speechssl.models.context import build_context
from speechssl.models.fbank import FbankExtractor
from speechssl.models.feature_extractor import FeatureExtractor
from speechssl.models.frontend import Frontend, GradMultiply
from speechssl.models.masker import Masker


def receptive_field_of(config: ModelConfig) -> int:
    """The fewest samples a model of ``config`` gives a frame for (its feature extractor's receptive
    field), without building the model."""
    fbank = config.extractor.type == "fbank"
    return (FbankExtractor(config.extractor) if fbank else FeatureExtractor(config.extractor)).receptive_field


# The state-dict prefixes of the encoder every speechssl model of one architecture shares (what a
# CTC model takes from a pretrained one, and what must fit when weights move between models).
ENCODER_PARTS = ("feature_extractor.", "frontend.", "context.")


class SpeechEncoder(nn.Module):
    """Extractor, frontend and context network built from a :class:`ModelConfig`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        fbank = config.extractor.type == "fbank"
        self.feature_extractor = FbankExtractor(config.extractor) if fbank else FeatureExtractor(config.extractor)
        self.context = build_context(config.context)
        self.frontend = Frontend(self.feature_extractor.output_dim, self.context.input_dim, config.dropout_input,
                                config.masking)
        # The group_norm extractor normalises over time, padding included, so a padded utterance's
        # features depend on its batch (as in fairseq, torchaudio and Hugging Face). True
        # normalises each utterance over its own frames instead (inference: transcripts that do
        # not depend on batching); it changes nothing for unpadded batches.
        self.extract_per_utterance = False

    # ------------------------------------------------------------------ inputs and features

    def validate_inputs(self, waveforms: Tensor, lengths: Tensor | None, check_values: bool | None) -> None:
        """Raise ValueError naming the problem. Shape and dtype are always checked; values (NaN or
        Inf, lengths too short for the receptive field) when ``check_values`` is True, or when it is
        None and the tensors are on the CPU, where checking costs no device synchronisation."""
        if not isinstance(waveforms, Tensor):
            raise ValueError(f"waveforms must be a torch.Tensor, got {type(waveforms).__name__}")
        if waveforms.ndim != 2:
            raise ValueError(f"waveforms must have shape (batch, samples), got {tuple(waveforms.shape)}")
        if not waveforms.is_floating_point():
            raise ValueError(f"waveforms must be floating point, got {waveforms.dtype}")
        if waveforms.shape[0] == 0 or waveforms.shape[1] == 0:
            raise ValueError(f"empty batch: waveforms have shape {tuple(waveforms.shape)}")
        if lengths is not None:
            if lengths.ndim != 1 or lengths.shape[0] != waveforms.shape[0]:
                raise ValueError(f"lengths must have shape ({waveforms.shape[0]},), got {tuple(lengths.shape)}")
            if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
                raise ValueError(f"lengths must be integers, got {lengths.dtype}")
        field = self.feature_extractor.receptive_field
        if lengths is None and waveforms.shape[1] < field:
            raise ValueError(f"waveforms of {waveforms.shape[1]} samples are shorter than the receptive "
                             f"field of the feature extractor ({field} samples)")
        if lengths is not None and (check_values or (check_values is None and lengths.device.type == "cpu")):
            too_long = (lengths > waveforms.shape[1]).nonzero()
            if len(too_long):
                i = int(too_long[0])
                raise ValueError(f"lengths[{i}]={int(lengths[i])} exceeds the {waveforms.shape[1]} samples given")
            too_short = (lengths < field).nonzero()
            if len(too_short):
                i = int(too_short[0])
                raise ValueError(f"waveform {i} has {int(lengths[i])} samples, fewer than the receptive field "
                                 f"of the feature extractor ({field} samples)")
        if check_values or (check_values is None and waveforms.device.type == "cpu"):
            bad = (~torch.isfinite(waveforms)).any(1).nonzero()
            if len(bad):
                raise ValueError(f"waveform {int(bad[0])} contains NaN or Inf samples")

    @torch.compiler.disable
    def _checked_lengths(self, waveforms: Tensor, lengths: Tensor | None, check_values: bool | None) -> Tensor | None:
        """:meth:`validate_inputs`, then ``lengths`` on the waveforms' device (queued before any
        kernel, no wait on the device). Outside ``torch.compile``: its checks read values on the
        host and the pinned copy is not traceable."""
        self.validate_inputs(waveforms, lengths, check_values)
        if lengths is not None and lengths.device != waveforms.device:
            lengths = to_device(lengths, waveforms.device)
        return lengths

    def _features(self, waveforms: Tensor, lengths: Tensor | None,
                  check_values: bool | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Extractor output ``(B, T, C)``, padding mask ``(B, T)`` and frame lengths ``(B,)``."""
        lengths = self._checked_lengths(waveforms, lengths, check_values)
        mult = self.config.feature_grad_mult
        with torch.set_grad_enabled(torch.is_grad_enabled() and mult > 0):
            # The filterbanks are computed per utterance whatever the padding (their standardization
            # takes each row's own frames), so they always get the lengths.
            per_utterance = self.extract_per_utterance or isinstance(self.feature_extractor, FbankExtractor)
            features = self.feature_extractor(waveforms, lengths if per_utterance else None)
        if features.requires_grad and mult != 1.0:
            features = GradMultiply.apply(features, mult)
        if lengths is None:
            return features, None, None
        frames = self.feature_extractor.output_lengths(lengths)
        padding_mask = torch.arange(features.shape[1], device=features.device) >= frames.unsqueeze(1)
        return features, padding_mask, frames

    @staticmethod
    def _lengths(padding_mask: Tensor | None) -> Tensor | None:
        return None if padding_mask is None else (~padding_mask).sum(1)

    def extract_features(self, waveforms: Tensor, lengths: Tensor | None = None,
                         num_layers: int | None = None,
                         check_values: bool | None = None) -> tuple[list[Tensor], Tensor | None]:
        """Per-layer context outputs ``[(B, T, D)] * L`` and frame lengths ``(B,)`` (None if
        ``lengths`` is None); ``num_layers`` stops early. No masking, no quantizer."""
        features, padding_mask, _ = self._features(waveforms, lengths, check_values)
        x, _ = self.frontend(features)
        out = self.context(x, padding_mask, num_layers=num_layers)
        return out.hidden_states, self._lengths(out.padding_mask)

    def encode(self, waveforms: Tensor, lengths: Tensor | None = None,
               check_values: bool | None = None) -> tuple[Tensor, Tensor | None]:
        """Final context output ``(B, T, D)`` and frame lengths ``(B,)``, unmasked."""
        features, padding_mask, _ = self._features(waveforms, lengths, check_values)
        x, _ = self.frontend(features)
        out = self.context(x, padding_mask)
        return out.output, self._lengths(out.padding_mask)

    @property
    def masker(self) -> Masker:
        """Draws and applies the span and channel masks of ``config.masking``."""
        return self.frontend.masker

    # ------------------------------------------------------------------ training hooks

    def set_num_updates(self, num_updates: int) -> None:
        """Propagate the trainer's update count to every submodule that follows it."""
        for module in self.modules():
            if module is not self and hasattr(module, "set_num_updates"):
                module.set_num_updates(num_updates)

    def change_attention(self, att_context_size: list[int]) -> None:
        """Full (``[-1, -1]``) or local ``[left, right]`` attention for a context network that
        supports it (the Conformer); the stored config follows."""
        change = getattr(self.context, "change_attention", None)
        if change is None:
            raise ValueError(f"the {self.config.context.type!r} context network has no switchable attention")
        change(att_context_size)
