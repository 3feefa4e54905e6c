"""Downstream heads on the encoder's hidden states, with Hugging Face's knobs and arithmetic.

- :class:`SequenceClassificationHead`: projection, mean over the valid frames, classifier
  (``Wav2Vec2ForSequenceClassification``);
- :class:`FrameClassificationHead`: a classifier on every frame (``...ForAudioFrameClassification``);
- :class:`XVectorHead`: projection, TDNN layers, statistics pooling (mean and standard deviation
  over the valid frames), the embedding layer and a classifier, trained with an additive-margin
  softmax (``...ForXVector`` and its ``AMSoftmaxLoss``).

Each takes ``hidden (B, T, D)`` and the valid frames ``frames (B,)`` (None: all valid).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.config import check

TASKS = ("sequence_classification", "frame_classification", "xvector")


@dataclass
class HeadConfig:
    """Names in brackets: Hugging Face's ``Wav2Vec2Config``.

    task: ``sequence_classification``, ``frame_classification`` or ``xvector``.
    num_labels [same]; use_weighted_layer_sum [same]: a learned softmax-weighted sum of every
    hidden state (the context input and each layer's output) instead of the last output.
    classifier_proj_size [same]: the projection before pooling (sequence classification).
    tdnn_dim, tdnn_kernel, tdnn_dilation [same]: the x-vector TDNN layers; xvector_output_dim
    [same]: the embedding size. am_scale / am_margin: the additive-margin softmax (Hugging Face's
    ``AMSoftmaxLoss`` defaults 30 and 0.4).
    hf_tdnn_lengths: pool over the frame counts Hugging Face computes, which leave out the
    dilation (so a padded utterance's statistics take a few frames computed from padding);
    models imported from Hugging Face set it to reproduce their embeddings exactly.
    """

    task: str = "sequence_classification"
    num_labels: int = 2
    use_weighted_layer_sum: bool = False
    classifier_proj_size: int = 256
    tdnn_dim: list[int] = field(default_factory=lambda: [512, 512, 512, 512, 1500])
    tdnn_kernel: list[int] = field(default_factory=lambda: [5, 3, 3, 1, 1])
    tdnn_dilation: list[int] = field(default_factory=lambda: [1, 2, 3, 1, 1])
    xvector_output_dim: int = 512
    am_scale: float = 30.0
    am_margin: float = 0.4
    hf_tdnn_lengths: bool = False

    def __post_init__(self) -> None:
        check(self.task in TASKS, "head.task", f"must be one of {list(TASKS)}, got {self.task!r}")
        check(self.num_labels >= 1, "head.num_labels", "must be >= 1")
        check(self.classifier_proj_size >= 1, "head.classifier_proj_size", "must be >= 1")
        check(len(self.tdnn_dim) == len(self.tdnn_kernel) == len(self.tdnn_dilation) >= 1, "head.tdnn_dim",
              "tdnn_dim, tdnn_kernel and tdnn_dilation need the same number (>= 1) of layers")
        check(self.xvector_output_dim >= 1, "head.xvector_output_dim", "must be >= 1")


def valid_frames(frames: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """bool ``(B, T)``: True on each utterance's valid frames."""
    if frames is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return torch.arange(length, device=device) < frames.to(device).unsqueeze(1)


class SequenceClassificationHead(nn.Module):
    """``hidden (B, T, D)`` -> ``logits (B, num_labels)`` (and the pooled ``(B, P)``)."""

    def __init__(self, dim: int, config: HeadConfig):
        super().__init__()
        self.projector = nn.Linear(dim, config.classifier_proj_size)
        self.classifier = nn.Linear(config.classifier_proj_size, config.num_labels)

    def forward(self, hidden: Tensor, frames: Tensor | None) -> tuple[Tensor, Tensor]:
        x = self.projector(hidden)
        valid = valid_frames(frames, *x.shape[:2], x.device).unsqueeze(-1)
        pooled = (x * valid).sum(1) / valid.sum(1).clamp_min(1)
        return self.classifier(pooled), pooled


class FrameClassificationHead(nn.Module):
    """``hidden (B, T, D)`` -> ``logits (B, T, num_labels)``."""

    def __init__(self, dim: int, config: HeadConfig):
        super().__init__()
        self.classifier = nn.Linear(dim, config.num_labels)

    def forward(self, hidden: Tensor, frames: Tensor | None) -> tuple[Tensor, None]:
        return self.classifier(hidden), None


class TDNNLayer(nn.Module):
    """A dilated convolution over time as one Linear over the stacked context (Hugging Face's
    layout of the weights), then ReLU: ``(B, T, C) -> (B, T - dilation * (kernel - 1), C')``."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, dilation: int):
        super().__init__()
        self.in_dim, self.out_dim, self.kernel_size, self.dilation = in_dim, out_dim, kernel, dilation
        self.kernel = nn.Linear(in_dim * kernel, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.kernel.weight.view(self.out_dim, self.kernel_size, self.in_dim).transpose(1, 2)
        return F.relu(F.conv1d(x.transpose(1, 2), weight, self.kernel.bias, dilation=self.dilation).transpose(1, 2))


class XVectorHead(nn.Module):
    """``hidden (B, T, D)`` -> ``(logits (B, xvector_output_dim), embeddings (B, xvector_output_dim))``;
    :meth:`loss` is the additive-margin softmax over ``num_labels`` speakers."""

    def __init__(self, dim: int, config: HeadConfig):
        super().__init__()
        self.config = config
        self.projector = nn.Linear(dim, config.tdnn_dim[0])
        dims = [config.tdnn_dim[0], *config.tdnn_dim]
        self.tdnn = nn.ModuleList(TDNNLayer(dims[i], dims[i + 1], k, d) for i, (k, d) in
                                  enumerate(zip(config.tdnn_kernel, config.tdnn_dilation, strict=True)))
        self.feature_extractor = nn.Linear(config.tdnn_dim[-1] * 2, config.xvector_output_dim)
        self.classifier = nn.Linear(config.xvector_output_dim, config.xvector_output_dim)
        self.objective_weight = nn.Parameter(torch.randn(config.xvector_output_dim, config.num_labels))

    def tdnn_frames(self, frames: Tensor) -> Tensor:
        """Valid frames after the TDNN layers (Hugging Face's count, without the dilation, with
        ``hf_tdnn_lengths``)."""
        for layer in self.tdnn:
            reach = layer.kernel_size - 1 if self.config.hf_tdnn_lengths else layer.dilation * (layer.kernel_size - 1)
            frames = frames - reach
        return frames

    def forward(self, hidden: Tensor, frames: Tensor | None) -> tuple[Tensor, Tensor]:
        x = self.projector(hidden)
        for layer in self.tdnn:
            x = layer(x)
        if x.shape[1] < 2:
            raise ValueError(f"the x-vector TDNN leaves {x.shape[1]} frame(s): the utterances are too short")
        counts = torch.full((x.shape[0],), x.shape[1], device=x.device) if frames is None else \
            self.tdnn_frames(frames.to(x.device)).clamp(2, x.shape[1])
        valid = valid_frames(counts, *x.shape[:2], x.device).unsqueeze(-1)
        n = counts.view(-1, 1).to(x.dtype)
        mean = (x * valid).sum(1) / n
        # unbiased, as torch.std; the floor keeps the gradient finite where a ReLU channel is all zero
        std = (((x - mean.unsqueeze(1)) * valid).square().sum(1) / (n - 1)).clamp_min(1e-10).sqrt()
        embeddings = self.feature_extractor(torch.cat([mean, std], dim=-1))
        return self.classifier(embeddings), embeddings

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Additive-margin softmax: ``scale * (cos - margin)`` for the true speaker, ``scale * cos``
        for the others, then cross-entropy."""
        cos = F.normalize(logits, dim=1) @ F.normalize(self.objective_weight, dim=0)
        target = F.one_hot(labels.flatten(), self.config.num_labels).bool()
        return F.cross_entropy(self.config.am_scale * torch.where(target, cos - self.config.am_margin, cos),
                               labels.flatten())


HEADS = {"sequence_classification": SequenceClassificationHead, "frame_classification": FrameClassificationHead,
         "xvector": XVectorHead}
