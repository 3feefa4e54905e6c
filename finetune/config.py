"""The fine-tuning job's config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechssl.config import check
from speechssl.data.loader import DataConfig
from speechssl.models.freezing import MODULES, check_schedule
from speechssl.training.config import TrainerConfig


@dataclass
class TokenizerConfig:
    """type: ``char`` (the characters of the training transcripts, ``|`` between words, blank 0) or
    ``bpe`` (SentencePiece BPE pieces after the blank: ``model``, an existing SentencePiece model
    file, or when empty one of at most ``vocab_size`` pieces trained on the training transcripts
    and written to ``output_dir/tokenizer.model``). case: ``upper``, ``lower`` or ``keep``, applied
    to transcripts and hypotheses alike."""

    type: str = "char"
    case: str = "upper"
    vocab_size: int = 256
    model: str = ""

    def __post_init__(self) -> None:
        check(self.type in ("char", "bpe"), "tokenizer.type", f"must be char or bpe, got {self.type!r}")
        check(self.case in ("upper", "lower", "keep"), "tokenizer.case", "must be upper, lower or keep")
        check(self.vocab_size >= 2, "tokenizer.vocab_size", "must be >= 2")
        check(not self.model or self.type == "bpe", "tokenizer.model", "is a SentencePiece model: set type: bpe")
        check(not self.model or Path(self.model).is_file(), "tokenizer.model", f"{self.model} does not exist")


def _labelled_data() -> DataConfig:
    # Labelled utterances are never cropped; longer ones than max_sample_size are dropped and counted.
    return DataConfig(max_tokens=3_200_000, max_sample_size=640_000, min_sample_size=0, crop=False,
                      crop_to_shortest=False)


@dataclass
class FinetuneConfig:
    """pretrained: a pretraining run folder (its ``model.pt``), a model file written by
    ``Wav2Vec2Model.save`` (also one imported from torchaudio or Hugging Face and saved), or
    ``hf:NAME_OR_PATH`` (a Hugging Face ``Wav2Vec2Model``/``Wav2Vec2ForPreTraining`` checkpoint), or
    ``scratch:MODEL_CONFIG`` (a random initialisation of that model, drawn with ``trainer.seed``).
    model: changes to the pretrained model's config for fine-tuning, as a nested mapping (the
    masking, layer drop and dropouts of fairseq's fine-tuning recipes in configs/finetune/).
    final_dropout: dropout before the CTC head (fairseq ``final_dropout``).
    freeze_updates: NeMo's freezing schedule per module (feature_extractor, frontend, context,
    lm_head): ``N`` first N updates, ``[a, b]`` updates a..b, ``-1`` the whole run.
    lr_scale: a factor on the learning rate per module (the same names), e.g. ``{context: 0.3}``
    fine-tunes the pretrained context network at 0.3 times the head's rate (discriminative
    fine-tuning: the pretrained layers move less than the fresh head)."""

    pretrained: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    final_dropout: float = 0.0
    freeze_updates: dict[str, Any] = field(default_factory=lambda: {"feature_extractor": -1})
    lr_scale: dict[str, float] = field(default_factory=dict)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=_labelled_data)
    valid_shards: list[str] = field(default_factory=list)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        check(bool(self.pretrained), "pretrained", "name the pretrained model: pretrained=PATH")
        check(0.0 <= self.final_dropout < 1.0, "final_dropout", "must be in [0, 1)")
        self.freeze_updates = check_schedule(self.freeze_updates)
        for module, scale in self.lr_scale.items():
            check(module in MODULES, f"lr_scale.{module}", f"unknown module; scalable: {', '.join(MODULES)}")
            check(scale > 0, f"lr_scale.{module}", f"must be > 0 (freeze a module with freeze_updates), got {scale}")
