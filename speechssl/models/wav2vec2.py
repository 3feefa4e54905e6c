"""The assembled wav2vec 2.0 model: extractor, frontend, context network, quantizer, objective."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from speechssl.config import to_dict
from speechssl.models.config import ModelConfig, load_model_config
from speechssl.models.encoder import SpeechEncoder
from speechssl.models.quantizer import GumbelVectorQuantizer
from speechssl.objectives.losses import contrastive_logits, contrastive_loss, diversity_loss
from speechssl.objectives.negatives import Negatives, sample_negatives

FORMAT = "speechssl.Wav2Vec2Model"


@dataclass
class PretrainOutput:
    """Everything one pretraining forward produces; all scalars are tensors (no host sync).

    loss: contrastive_loss + diversity_weight * diversity_loss * sample_size
        + feature_penalty_weight * feature_penalty * sample_size. It is a *sum* over masked frames:
        the trainer adds it up over micro-batches and ranks and divides by the global sample_size,
        as fairseq does, so every masked frame weighs the same whatever the batch it came in.
    contrastive_loss: cross-entropy summed over masked frames.
    diversity_loss: ``(G*V - prob_perplexity) / (G*V)``; feature_penalty: mean square of the
        extractor output. sample_size: number of masked frames. correct: frames whose positive
        scored highest. logits: ``(B, T, 1 + negatives)`` in the slot layout; mask: ``(B, T)``.
    """

    loss: Tensor
    contrastive_loss: Tensor
    diversity_loss: Tensor
    feature_penalty: Tensor
    sample_size: Tensor
    correct: Tensor
    prob_perplexity: Tensor
    code_perplexity: Tensor
    temperature: Tensor
    logits: Tensor
    mask: Tensor

    @property
    def accuracy(self) -> Tensor:
        return self.correct.float() / self.sample_size.clamp_min(1)


class Wav2Vec2Model(SpeechEncoder):
    """wav2vec 2.0 with a pluggable context network, built from a :class:`ModelConfig`.

    ``forward(waveforms, lengths)`` runs pretraining (masking, quantizer, losses);
    ``extract_features`` returns per-layer outputs like torchaudio's method of the same name;
    ``encode`` returns the final context output (what a CTC head reads).
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        feature_dim = self.feature_extractor.output_dim
        self.dropout_features = nn.Dropout(config.dropout_features)
        self.quantizer = GumbelVectorQuantizer(feature_dim, config.codevector_dim, config.quantizer)
        self.project_q = nn.Linear(config.codevector_dim, config.final_dim)
        self.final_proj = nn.Linear(self.context.output_dim, config.final_dim)
        self.aux = nn.Linear(self.context.output_dim, config.aux_num_out) if config.aux_num_out else None

    # ------------------------------------------------------------------ pretraining

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None, mask: Tensor | None = None,
                negatives: Negatives | None = None, check_values: bool | None = None) -> PretrainOutput:
        """Pretraining step on ``waveforms (B, S)`` with valid ``lengths (B,)``.

        ``mask (B, T)`` overrides the span masking (it must not cover padding) and ``negatives``
        (in the slot layout of :mod:`speechssl.objectives.negatives`) the negative sampling; both
        exist to reproduce another implementation's draw exactly.
        """
        cfg = self.config
        features, padding_mask, frames = self._features(waveforms, lengths, check_values)
        feature_penalty = features.float().pow(2).mean()
        batch, length, _ = features.shape
        if mask is None:
            mask = self.masker.time_mask(frames, (batch, length), features.device)
        channel_mask = self.masker.channel_mask(batch, features.device)
        x, normalized = self.frontend(features, mask, channel_mask)
        out = self.context(x, padding_mask)
        if out.output.shape[1] != length:
            raise ValueError(f"pretraining needs a context network that keeps the frame rate: "
                             f"{length} frames in, {out.output.shape[1]} out")

        # Slot layout: each row's masked frames first, in time order (see objectives.negatives).
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
        counts = mask.sum(1)
        valid = torch.arange(length, device=mask.device) < counts.unsqueeze(1)
        targets_in = self.dropout_features(normalized).gather(
            1, order.unsqueeze(-1).expand(-1, -1, normalized.shape[-1]))
        q = self.quantizer(targets_in, valid)
        targets = self.project_q(q.quantized.to(self.project_q.weight.dtype))
        predictions = self.final_proj(out.output.gather(1, order.unsqueeze(-1).expand(-1, -1, out.output.shape[-1])))

        if negatives is None:
            negatives = sample_negatives(counts, length, cfg.loss.num_negatives, cfg.loss.cross_sample_negatives)
        logits = contrastive_logits(predictions, targets, q.codes, negatives, cfg.loss.logit_temp)
        contrastive, correct = contrastive_loss(logits, valid)
        sample_size = counts.sum()
        diversity = diversity_loss(q.prob_perplexity, self.quantizer.num_groups * self.quantizer.num_vars)
        loss = (contrastive
                + cfg.loss.diversity_weight * diversity * sample_size
                + cfg.loss.feature_penalty_weight * feature_penalty * sample_size)
        return PretrainOutput(
            loss=loss, contrastive_loss=contrastive, diversity_loss=diversity,
            feature_penalty=feature_penalty, sample_size=sample_size, correct=correct,
            prob_perplexity=q.prob_perplexity, code_perplexity=q.code_perplexity,
            temperature=q.temperature, logits=logits, mask=mask,
        )

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> None:
        """One standalone file with the config and the weights; read it with :func:`load_model`."""
        torch.save({"format": FORMAT, "version": 1, "config": to_dict(self.config),
                    "state_dict": self.state_dict()}, path)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Wav2Vec2Model:
    """Rebuild a model written by :meth:`Wav2Vec2Model.save`."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a speechssl model file (saved with Wav2Vec2Model.save)")
    model = Wav2Vec2Model(load_model_config(blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model
