"""The CTC model: the shared encoder plus dropout and a linear head over the vocabulary.

The quantizer and the pretraining projections are not part of it. During training the context
input is span- and channel-masked with the ``model.masking`` settings (fine-tuning's SpecAugment).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from speechssl.asr.inference import DEFAULT_WINDOWS, Windows
from speechssl.config import check, to_dict
from speechssl.models.config import ModelConfig, load_model_config
from speechssl.models.encoder import ENCODER_PARTS, SpeechEncoder
from speechssl.models.freezing import check_schedule, frozen_modules

FORMAT = "speechssl.CTCModel"


class CTCModel(SpeechEncoder):
    """``forward(waveforms (B, S), lengths (B,))`` -> ``(logits (B, T, vocab_size), frames (B,))``.

    vocab: the token strings (index = class), when known; blank: the CTC blank index.
    tokenizer: the tokenizer's settings (``to_dict()``), saved with the model. normalize_audio:
    whether it was trained on audio normalised per utterance (``data.normalize``), so inference
    does the same. freeze_updates: a
    freezing schedule (:mod:`speechssl.models.freezing`), applied by :meth:`set_num_updates`: a
    frozen module gets no gradients and, as NeMo's ``freeze()``, runs in eval mode while the model
    trains (no dropout or layer drop, BatchNorm statistics used and left unchanged).
    """

    def __init__(self, config: ModelConfig, vocab_size: int, blank: int = 0, final_dropout: float = 0.0,
                 vocab: list[str] | None = None, tokenizer: dict | None = None,
                 freeze_updates: dict[str, Any] | None = None, normalize_audio: bool = False):
        super().__init__(config)
        self.tokenizer, self.normalize_audio = tokenizer, normalize_audio
        self.freeze_updates = check_schedule(freeze_updates or {})
        self.num_updates = 0
        check(vocab_size >= 2, "vocab_size", f"needs the blank and at least one token, got {vocab_size}")
        check(0 <= blank < vocab_size, "blank", f"must index the vocabulary of {vocab_size}, got {blank}")
        check(vocab is None or len(vocab) == vocab_size, "vocab", f"must list {vocab_size} tokens")
        self.vocab_size, self.blank, self.vocab = vocab_size, blank, vocab
        self.final_dropout = nn.Dropout(final_dropout)
        self.lm_head = nn.Linear(self.context.output_dim, vocab_size)

    @classmethod
    def from_pretrained(cls, encoder: SpeechEncoder, vocab_size: int, config: ModelConfig | None = None,
                        **kwargs: Any) -> CTCModel:
        """A CTC model whose encoder weights are copied from ``encoder`` (a pretraining model); the
        head is freshly initialised. ``config``: the encoder's config changed for fine-tuning
        (dropouts, masking; the same shapes), else ``encoder.config``."""
        model = cls(config or encoder.config, vocab_size, **kwargs)
        shared = {k: v for k, v in encoder.state_dict().items()
                  if k.startswith(ENCODER_PARTS)}
        missing, _ = model.load_state_dict(shared, strict=False)
        fresh = sorted({k.split(".")[0] for k in missing})
        if fresh != ["lm_head"]:
            raise ValueError(f"the pretrained model does not provide {fresh}: is it a speech encoder of this kind?")
        return model

    def set_num_updates(self, num_updates: int) -> None:
        """Follow the update count; a module frozen now gets no gradients (they still flow through
        it to the modules before it) and runs in eval mode."""
        super().set_num_updates(num_updates)
        self.num_updates = num_updates
        frozen = frozen_modules(self.freeze_updates, num_updates)
        for name, module in self.named_children():
            module.requires_grad_(name not in frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> CTCModel:
        """``nn.Module.train``, leaving the modules frozen at this update in eval mode."""
        super().train(mode)
        if mode:
            for name in frozen_modules(self.freeze_updates, self.num_updates):
                getattr(self, name).eval()
        return self

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None,
                check_values: bool | None = None) -> tuple[Tensor, Tensor | None]:
        features, padding_mask, frames = self._features(waveforms, lengths, check_values)
        time_mask = channel_mask = None
        if self.training:
            time_mask, channel_mask = self.masker.draw(frames, features.shape[:2], features.device,
                                                       require_same_masks=False)
        x, _ = self.frontend(features, time_mask, channel_mask)
        out = self.context(x, padding_mask)
        return self.lm_head(self.final_dropout(out.output)), self._lengths(out.padding_mask)

    @property
    def text_tokenizer(self):
        """The tokenizer that turns this model's token ids into text (:mod:`speechssl.asr.tokenizer`)."""
        from speechssl.asr.tokenizer import tokenizer_from_dict

        if self.tokenizer is None:
            raise ValueError("this CTC model has no tokenizer: it cannot turn its outputs into text")
        return tokenizer_from_dict(self.tokenizer)

    def transcribe(self, audio, sample_rate: int | None = None, batch_seconds: float = 60.0, decoder="greedy",
                   return_timestamps: bool | str = False, device: str | torch.device | None = None,
                   windows: Windows | None = DEFAULT_WINDOWS):
        """Transcripts of audio files, arrays or tensors (one, or a list):
        :func:`speechssl.asr.transcriber.transcribe`, which says what each argument takes.

            model.transcribe("talk.wav").text
            model.transcribe([samples_8k], sample_rate=8000, return_timestamps="word")[0].words
        """
        from speechssl.asr.transcriber import transcribe

        return transcribe(self, audio, sample_rate, batch_seconds, decoder, return_timestamps, device, windows)

    def save(self, path: str | os.PathLike) -> None:
        """One standalone file with the config, the vocabulary and the weights (:func:`load_ctc_model`)."""
        torch.save({"format": FORMAT, "version": 1, "config": to_dict(self.config), "vocab_size": self.vocab_size,
                    "blank": self.blank, "final_dropout": self.final_dropout.p, "vocab": self.vocab,
                    "tokenizer": self.tokenizer, "normalize_audio": self.normalize_audio,
                    "state_dict": self.state_dict()}, path)


def load_ctc_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CTCModel:
    """Rebuild a model written by :meth:`CTCModel.save`."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a speechssl CTC model file (saved with CTCModel.save)")
    model = CTCModel(load_model_config(blob["config"]), blob["vocab_size"], blob["blank"], blob["final_dropout"],
                     blob["vocab"], blob.get("tokenizer"), normalize_audio=blob.get("normalize_audio", False))
    model.load_state_dict(blob["state_dict"])
    return model
