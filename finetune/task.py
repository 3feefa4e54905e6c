"""CTC fine-tuning as a trainer task."""

from __future__ import annotations

import logging
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import FinetuneConfig
from speechssl.asr.decoding import error_counts, greedy_decode
from speechssl.asr.tokenizer import Tokenizer
from speechssl.config import to_dict
from speechssl.data.loader import AudioBatch
from speechssl.device import to_device
from speechssl.models.config import load_model_config
from speechssl.models.ctc import CTCModel
from speechssl.models.encoder import SpeechEncoder
from speechssl.models.freezing import is_frozen
from speechssl.training.task import StepOutput, Task

log = logging.getLogger("speechssl.finetune")


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"masking": {"mask_prob": 0.5}}`` -> ``["masking.mask_prob=0.5"]``."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


class FinetuneTask(Task):
    """The loss of an update is the CTC loss summed over its utterances divided by their number
    (fairseq's ``sentence_avg``). Utterances with more targets than frames cannot be aligned: their
    loss is zeroed (``zero_infinity``) and they are counted as ``unalignable``. Validation decodes
    greedily and reports WER and CER; the best model by validation WER is kept as ``best.pt``."""

    stat_keys = ("unalignable", "tokens", "word_errors", "words", "char_errors", "chars")
    progress_keys = ("loss", "cer", "wer")
    best_metric = "wer"

    def __init__(self, config: FinetuneConfig, encoder: SpeechEncoder, tokenizer: Tokenizer,
                 sample_rate: int = 16000):
        self.config, self.encoder, self.tokenizer, self.sample_rate = config, encoder, tokenizer, sample_rate
        self.model_config = load_model_config(to_dict(encoder.config), _flatten(config.model))
        self.warned_unalignable = False

    def build_model(self) -> nn.Module:
        return CTCModel.from_pretrained(self.encoder, len(self.tokenizer), config=self.model_config,
                                        blank=self.tokenizer.blank, final_dropout=self.config.final_dropout,
                                        vocab=self.tokenizer.vocab, tokenizer=self.tokenizer.to_dict(),
                                        freeze_updates=self.config.freeze_updates,
                                        normalize_audio=self.config.data.normalize)

    # ------------------------------------------------------------------ the optimizer's view

    def param_group(self, name: str) -> str:
        """One group per top-level module (``feature_extractor``, ``frontend``, ``context``, ``lm_head``)."""
        return name.split(".")[0]

    def lr_factor(self, group: str, update: int) -> float:
        """0 while the module is frozen, else its ``lr_scale``."""
        spec = self.config.freeze_updates.get(group)
        return 0.0 if spec is not None and is_frozen(spec, update) else self.config.lr_scale.get(group, 1.0)

    # ------------------------------------------------------------------ steps

    def prepare(self, model: CTCModel, batch: AudioBatch, device: torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
        texts = []
        for sample in batch.metadata["samples"]:
            text = sample.get("text")
            if text is None:
                raise ValueError(f"sample {sample['__key__']} in {sample['__shard__']} has no transcript: "
                                 "fine-tuning needs shards built from a manifest with a text column")
            texts.append(text)
        ids = [self.tokenizer.encode(t) for t in texts]
        target_lengths = torch.tensor([len(i) for i in ids], dtype=torch.long)
        # CTC needs a frame per token plus one between repeated tokens.
        needed = torch.tensor([len(i) + sum(a == b for a, b in pairwise(i)) for i in ids])
        return {
            "waveforms": to_device(batch.waveforms, device, dtype),
            "lengths": batch.lengths,
            "targets": to_device(torch.tensor([t for i in ids for t in i], dtype=torch.long), device),
            "target_lengths": to_device(target_lengths, device),
            "needed_frames": to_device(needed, device),
            "references": [self.tokenizer.decode(i) for i in ids],
            "sample_size": torch.full((), float(len(texts)), device=device),
            "audio_seconds": float(batch.lengths.sum()) / self.sample_rate,
        }

    def forward(self, engine: nn.Module, p: dict[str, Any]) -> StepOutput:
        module = engine.module if hasattr(engine, "module") else engine
        module.extract_per_utterance = not module.training  # validation scores as `evaluate` would
        logits, frames = engine(p["waveforms"], p["lengths"])
        log_probs = logits.float().log_softmax(-1)
        loss = F.ctc_loss(log_probs.transpose(0, 1), p["targets"], frames, p["target_lengths"],
                          blank=self.tokenizer.blank, reduction="sum", zero_infinity=True)
        stats = {"unalignable": (frames < p["needed_frames"]).sum().float(),
                 "tokens": p["target_lengths"].sum().float()}
        if not module.training:
            hypotheses = [self.tokenizer.decode(ids) for ids in greedy_decode(logits, frames, self.tokenizer.blank)]
            counts = error_counts(p["references"], hypotheses)
            stats.update({k: torch.tensor(float(v), device=loss.device) for k, v in counts.items()})
        return StepOutput(loss, p["sample_size"], stats)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["sample_size"], 1.0)
        out = {"loss": sums["loss"] / n, "utterances": sums["sample_size"], "unalignable": sums["unalignable"],
               "tokens_per_utterance": sums["tokens"] / n}
        if sums.get("words", 0) > 0:
            out["wer"] = sums["word_errors"] / sums["words"]
        if sums.get("chars", 0) > 0:
            out["cer"] = sums["char_errors"] / sums["chars"]
        return out

    def check_health(self, update: int, metrics: dict[str, float]) -> None:
        if metrics.get("unalignable", 0) > 0 and not self.warned_unalignable:
            log.warning("update %d: %d utterance(s) have more CTC targets than frames; their loss is zeroed and "
                        "they are counted as 'unalignable' (check the transcripts, or the model's frame rate)",
                        update, int(metrics["unalignable"]))
            self.warned_unalignable = True
        if self.tokenizer.unknown:
            log.warning("characters outside the vocabulary were mapped to <unk>: %s", dict(self.tokenizer.unknown))
            self.tokenizer.unknown.clear()

    def export(self, model: nn.Module, path: Path) -> None:
        """A standalone fp32 CTC model file with its tokenizer (:func:`speechssl.models.ctc.load_ctc_model`)."""
        clean = self.build_model()
        clean.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        clean.save(path)
