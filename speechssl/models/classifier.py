"""The downstream model: the shared encoder, optionally a weighted sum of its hidden states, and a
head of :mod:`speechssl.models.heads` (sequence or frame classification, x-vector).

As in Hugging Face, the head reads the encoder's final output, or with ``use_weighted_layer_sum``
the softmax-weighted sum of every hidden state (the context input and each layer's output, as
:mod:`speechssl.features` counts them). ``freeze_encoder`` makes it a probe (SUPERB's setting):
the encoder gets no gradients and runs in eval mode; only the layer weights and the head train.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from speechssl.config import to_dict
from speechssl.models.config import ModelConfig, load_model_config
from speechssl.models.encoder import ENCODER_PARTS, SpeechEncoder
from speechssl.models.heads import HEADS, HeadConfig

FORMAT = "speechssl.SpeechClassifier"


@dataclass
class ClassifierOutput:
    """logits: ``(B, num_labels)``, ``(B, T, num_labels)`` (frames) or ``(B, xvector_output_dim)``
    (x-vector); embeddings: the pooled vector (x-vector: the speaker embedding) or None; frames:
    ``(B,)`` valid frames (None without lengths)."""

    logits: Tensor
    embeddings: Tensor | None
    frames: Tensor | None


class SpeechClassifier(SpeechEncoder):
    """``forward(waveforms (B, S), lengths (B,))`` -> :class:`ClassifierOutput`. labels: the class
    names (index = class), when known."""

    def __init__(self, config: ModelConfig, head: HeadConfig, labels: list[str] | None = None,
                 freeze_encoder: bool = False):
        super().__init__(config)
        if labels is not None and len(labels) != head.num_labels:
            raise ValueError(f"{len(labels)} label names for {head.num_labels} classes")
        self.head_config, self.labels, self.freeze_encoder = head, labels, freeze_encoder
        states = self.context.depth + 1
        self.layer_weights = nn.Parameter(torch.ones(states) / states) if head.use_weighted_layer_sum else None
        self.head = HEADS[head.task](self.context.output_dim, head)
        if freeze_encoder:
            for module in self._encoder_modules():
                module.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, encoder: SpeechEncoder, head: HeadConfig, config: ModelConfig | None = None,
                        **kwargs) -> SpeechClassifier:
        """A classifier whose encoder weights come from ``encoder`` (any speechssl model); the
        head and layer weights start fresh."""
        model = cls(config or encoder.config, head, **kwargs)
        shared = {k: v for k, v in encoder.state_dict().items() if k.startswith(ENCODER_PARTS)}
        missing, _ = model.load_state_dict(shared, strict=False)
        if any(k.startswith(ENCODER_PARTS) for k in missing):
            lacking = sorted(k for k in missing if k.startswith(ENCODER_PARTS))
            raise ValueError(f"the source model does not provide {lacking}")
        return model

    def _encoder_modules(self) -> list[nn.Module]:
        return [getattr(self, part.rstrip(".")) for part in ENCODER_PARTS]

    def train(self, mode: bool = True) -> SpeechClassifier:
        super().train(mode)
        if mode and self.freeze_encoder:
            for module in self._encoder_modules():
                module.eval()
        return self

    def hidden(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """What the head reads, ``(B, T, D)``, and the valid frames ``(B,)``."""
        features, padding_mask, frames = self._features(waveforms, lengths, None)
        time_mask = channel_mask = None
        if self.training and not self.freeze_encoder:
            time_mask, channel_mask = self.masker.draw(frames, features.shape[:2], features.device,
                                                       require_same_masks=False)
        x, _ = self.frontend(features, time_mask, channel_mask)
        out = self.context(x, padding_mask)
        if self.layer_weights is None:
            hidden = out.output
        else:
            states = torch.stack([out.input_state, *out.hidden_states])
            hidden = (states * self.layer_weights.softmax(0).to(states.dtype).view(-1, 1, 1, 1)).sum(0)
        return hidden, self._lengths(out.padding_mask)

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> ClassifierOutput:
        hidden, frames = self.hidden(waveforms, lengths)
        logits, embeddings = self.head(hidden, frames)
        return ClassifierOutput(logits, embeddings, frames)

    def _run_each(self, audio, sample_rate: int | None) -> tuple[list[ClassifierOutput], bool]:
        """The model's output for each input (a path, array or tensor, or a list of them; prepared as
        :meth:`CTCModel.transcribe <speechssl.models.ctc.CTCModel.transcribe>` prepares audio), one
        utterance at a time, in eval mode; whether one input was given."""
        import numpy as np

        from speechssl.asr.transcriber import prepare_input
        from speechssl.features import min_input_samples

        single = isinstance(audio, (str, os.PathLike, np.ndarray, Tensor))
        items = [audio] if single else list(audio)
        was_training, device = self.training, next(self.parameters()).device
        outputs = []
        try:
            self.eval()
            for i, item in enumerate(items):
                name = str(item) if isinstance(item, (str, os.PathLike)) else f"input {i}"
                samples, _ = prepare_input(item, sample_rate, name)
                if len(samples) < min_input_samples(self):
                    raise ValueError(f"{name}: {len(samples)} samples, fewer than the model needs")
                with torch.no_grad():
                    out = self(torch.from_numpy(samples).to(device)[None])
                outputs.append(ClassifierOutput(out.logits[0].cpu(), None if out.embeddings is None else
                                                out.embeddings[0].cpu(), None))
        finally:
            self.train(was_training)
        return outputs, single

    def predict(self, audio, sample_rate: int | None = None):
        """The class of each input (one, or a list): its name (from ``labels``, else the index) for
        sequence classification, a list of names, one per 20 ms frame, for frame classification.
        ``sample_rate``: of arrays and tensors (16 kHz when None); files are read at their own rate."""
        if self.head_config.task == "xvector":
            raise ValueError("an x-vector model embeds speakers: use embed(); its classes are the training speakers")
        outputs, single = self._run_each(audio, sample_rate)
        names = self.labels or list(range(self.head_config.num_labels))
        found = [[names[i] for i in out.logits.argmax(-1).tolist()] if out.logits.dim() == 2 else
                 names[int(out.logits.argmax())] for out in outputs]
        return found[0] if single else found

    def embed(self, audio, sample_rate: int | None = None) -> Tensor | list[Tensor]:
        """The embedding of each input (one, or a list): the x-vector, or the pooled projection of a
        sequence classifier, ``(D,)``."""
        if self.head_config.task == "frame_classification":
            raise ValueError("a frame classifier has no utterance embedding")
        outputs, single = self._run_each(audio, sample_rate)
        vectors = [out.embeddings for out in outputs]
        return vectors[0] if single else vectors

    def loss(self, output: ClassifierOutput, labels: Tensor) -> Tensor:
        """Cross-entropy (sequence labels ``(B,)``; frame labels ``(B, T)`` with -100 on frames to
        ignore, padding included) or the x-vector's additive-margin softmax (speaker ids ``(B,)``)."""
        task = self.head_config.task
        if task == "xvector":
            return self.head.loss(output.logits, labels)
        if task == "frame_classification":
            logits = output.logits
            if output.frames is not None:
                pad = torch.arange(logits.shape[1], device=logits.device) >= output.frames.to(logits.device)[:, None]
                labels = labels[:, :logits.shape[1]].masked_fill(pad, -100)
            return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return nn.functional.cross_entropy(output.logits, labels)

    def save(self, path: str | os.PathLike) -> None:
        """One standalone file with the configs, the label names and the weights (:func:`load_classifier`)."""
        torch.save({"format": FORMAT, "version": 1, "config": to_dict(self.config), "head": asdict(self.head_config),
                    "labels": self.labels, "freeze_encoder": self.freeze_encoder,
                    "state_dict": self.state_dict()}, path)


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SpeechClassifier:
    """Rebuild a model written by :meth:`SpeechClassifier.save`."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a speechssl classifier file (saved with SpeechClassifier.save)")
    model = SpeechClassifier(load_model_config(blob["config"]), HeadConfig(**blob["head"]), blob["labels"],
                             blob["freeze_encoder"])
    model.load_state_dict(blob["state_dict"])
    return model
