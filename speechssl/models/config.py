"""The model's configuration: the schemas of the feature extractor, quantizer and losses, and
:class:`ModelConfig`, which gathers them with the masking (:mod:`speechssl.models.masker`) and the
context network, whose schema ``context.type`` picks from the registry
(:mod:`speechssl.models.context`). Defaults are fairseq's wav2vec 2.0 BASE values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from speechssl.config import ConfigError, build, check
from speechssl.models.context import context_config_class
from speechssl.models.masker import MaskingConfig


def _default_conv_layers() -> list[list[int]]:
    return [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


@dataclass
class FeatureExtractorConfig:
    """What turns waveforms into frames: the convolutional waveform encoder or log-mel filterbanks.

    type: ``conv`` (wav2vec 2.0's learned waveform encoder, the fields below up to ``conv_bias``)
        or ``fbank`` (Kaldi log-mel filterbanks, 25 ms every 10 ms, ``stack`` frames side by side;
        w2v-BERT and fairseq2's ``Wav2Vec2FbankFeatureExtractor``): nothing to learn below the
        context network, which serves small corpora (bench/RESULTS.md, "AN4").
    mode: ``group_norm`` (one GroupNorm after the first conv, BASE) or ``layer_norm`` (LayerNorm after
        every conv, LARGE). torchaudio ``extractor_mode``, fairseq ``extractor_mode`` ("default" is
        ``group_norm``), Hugging Face ``feat_extract_norm`` ("group" / "layer").
    conv_layers: ``[[channels, kernel, stride], ...]``. torchaudio ``extractor_conv_layer_config``,
        fairseq ``conv_feature_layers``.
    conv_bias: bias in every conv. torchaudio ``extractor_conv_bias``, fairseq ``conv_bias``.
    num_mel_bins: ``fbank`` only: mel bins per 10 ms frame (fairseq2 ``num_fbank_channels``).
    stack: ``fbank`` only: consecutive frames concatenated into one (fairseq2 ``stride``): 2 gives
        50 Hz frames of ``2 * num_mel_bins`` values.
    standardize: ``fbank`` only: each mel bin to zero mean and unit variance over the utterance.
    """

    type: str = "conv"
    mode: str = "group_norm"
    conv_layers: list[list[int]] = field(default_factory=_default_conv_layers)
    conv_bias: bool = False
    num_mel_bins: int = 80
    stack: int = 2
    standardize: bool = True

    def __post_init__(self) -> None:
        check(self.type in ("conv", "fbank"), "model.extractor.type", f"must be 'conv' or 'fbank', got {self.type!r}")
        check(self.num_mel_bins > 0, "model.extractor.num_mel_bins", "must be > 0")
        check(self.stack > 0, "model.extractor.stack", "must be > 0")
        check(self.mode in ("group_norm", "layer_norm"), "model.extractor.mode",
              f"must be 'group_norm' or 'layer_norm', got {self.mode!r}")
        check(len(self.conv_layers) > 0, "model.extractor.conv_layers", "needs at least one layer")
        for i, layer in enumerate(self.conv_layers):
            check(len(layer) == 3 and all(v > 0 for v in layer), f"model.extractor.conv_layers[{i}]",
                  f"must be [channels, kernel, stride] of positive integers, got {list(layer)}")


@dataclass
class QuantizerConfig:
    """Gumbel product quantizer of the targets.

    num_groups: G, fairseq ``latent_groups``, HF ``num_codevector_groups``.
    num_vars: V entries per group, fairseq ``latent_vars``, HF ``num_codevectors_per_group``.
    codevector_dim: size of a full (concatenated) codevector; 0 means ``final_dim``. fairseq
        ``latent_dim``, HF ``codevector_dim``.
    weight_proj_depth / weight_proj_factor: MLP producing the code logits, fairseq
        ``quantizer_depth`` / ``quantizer_factor``.
    temp_start / temp_end / temp_decay: Gumbel temperature ``max(start * decay**updates, end)``,
        fairseq ``latent_temp``.
    """

    num_groups: int = 2
    num_vars: int = 320
    codevector_dim: int = 0
    weight_proj_depth: int = 1
    weight_proj_factor: int = 3
    temp_start: float = 2.0
    temp_end: float = 0.5
    temp_decay: float = 0.999995

    def __post_init__(self) -> None:
        check(self.num_groups >= 1, "model.quantizer.num_groups", "must be >= 1")
        check(self.num_vars >= 2, "model.quantizer.num_vars", "must be >= 2")
        check(self.codevector_dim >= 0, "model.quantizer.codevector_dim", "must be >= 0 (0 = final_dim)")
        check(self.weight_proj_depth >= 1, "model.quantizer.weight_proj_depth", "must be >= 1")
        check(self.weight_proj_factor >= 1, "model.quantizer.weight_proj_factor", "must be >= 1")
        check(math.isfinite(self.temp_start), "model.quantizer.temp_start", "must be finite")
        check(0 < self.temp_end <= self.temp_start, "model.quantizer.temp_end",
              "must satisfy 0 < temp_end <= temp_start")
        check(0 < self.temp_decay <= 1, "model.quantizer.temp_decay", "must be in (0, 1]")


@dataclass
class LossConfig:
    """Contrastive and auxiliary losses.

    num_negatives: distractors per masked frame from the same utterance (fairseq ``num_negatives``).
    cross_sample_negatives: distractors from any utterance of the batch.
    logit_temp: cosine similarities are divided by it (fairseq ``logit_temp``).
    diversity_weight / feature_penalty_weight: fairseq ``loss_weights`` ``[0.1, 10]``.
    """

    num_negatives: int = 100
    cross_sample_negatives: int = 0
    logit_temp: float = 0.1
    diversity_weight: float = 0.1
    feature_penalty_weight: float = 10.0

    def __post_init__(self) -> None:
        check(self.num_negatives >= 0, "model.loss.num_negatives", "must be >= 0")
        check(self.cross_sample_negatives >= 0, "model.loss.cross_sample_negatives", "must be >= 0")
        check(self.num_negatives + self.cross_sample_negatives > 0, "model.loss.num_negatives",
              "num_negatives + cross_sample_negatives must be > 0")
        check(self.logit_temp > 0, "model.loss.logit_temp", "must be > 0")


@dataclass
class ModelConfig:
    """The whole wav2vec 2.0 model.

    context: the context network; ``context.type`` picks its schema (``transformer``, ...).
    feature_grad_mult: scales the extractor's gradients; 0 runs it without gradients (fairseq name).
    dropout_input: dropout after the projection to the context width (fairseq ``dropout_input``,
        torchaudio ``encoder_projection_dropout``, HF ``feat_proj_dropout``).
    dropout_features: dropout on the unmasked features fed to the quantizer (fairseq name).
    final_dim: width of the space where predictions and targets are compared (fairseq ``final_dim``,
        HF ``proj_codevector_dim``).
    aux_num_out: optional linear head on the context output (torchaudio ``aux_num_out``).
    """

    extractor: FeatureExtractorConfig = field(default_factory=FeatureExtractorConfig)
    context: Any = field(default_factory=lambda: {"type": "transformer"},
                         metadata={"schema_by_type": context_config_class})
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    feature_grad_mult: float = 1.0
    dropout_input: float = 0.0
    dropout_features: float = 0.0
    final_dim: int = 256
    aux_num_out: Optional[int] = None  # noqa: UP045  (OmegaConf needs typing.Optional on Python 3.10)

    def __post_init__(self) -> None:
        if isinstance(self.context, str):  # ModelConfig(context="transformer")
            self.context = {"type": self.context}
        if isinstance(self.context, dict):  # built in Python as ModelConfig(context={"type": ...})
            try:
                self.context = context_config_class(self.context.get("type", "transformer"))(**self.context)
            except KeyError as e:
                raise ConfigError(f"model.context.type: {e.args[0]}") from None
            except TypeError as e:
                raise ConfigError(f"model.context: {e}") from None
        check(self.feature_grad_mult >= 0, "model.feature_grad_mult", "must be >= 0")
        check(0 <= self.dropout_input < 1, "model.dropout_input", "must be in [0, 1)")
        check(0 <= self.dropout_features < 1, "model.dropout_features", "must be in [0, 1)")
        check(self.final_dim > 0, "model.final_dim", "must be > 0")
        check(self.aux_num_out is None or self.aux_num_out > 0, "model.aux_num_out", "must be > 0")
        check(self.codevector_dim % self.quantizer.num_groups == 0, "model.quantizer.codevector_dim",
              f"{self.codevector_dim} is not divisible by num_groups={self.quantizer.num_groups}")

    @property
    def codevector_dim(self) -> int:
        return self.quantizer.codevector_dim or self.final_dim


def load_model_config(source: dict | str | os.PathLike, overrides: Sequence[str] = ()) -> ModelConfig:
    """A :class:`ModelConfig` from a mapping (e.g. a saved model's) or a YAML file of the model section.

    Overrides are relative to the model section: ``context.num_layers=4``.
    """

    @dataclass
    class _Wrapper:
        model: ModelConfig = field(default_factory=ModelConfig)

    raw = {"model": os.fspath(source) if isinstance(source, os.PathLike) else source}
    return build(_Wrapper, raw, [f"model.{o}" for o in overrides]).model
