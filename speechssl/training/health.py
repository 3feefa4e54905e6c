"""Warnings for the failures users hit most in wav2vec 2.0 pretraining, each with a suggestion."""

from __future__ import annotations

import logging
from collections import deque

log = logging.getLogger("speechssl.health")


class HealthMonitor:
    """Watches the logged training metrics; each problem is reported once.

    * codebook collapse: prob-perplexity below ``collapse_factor * G`` (it falls toward G when every
      group keeps picking the same few entries);
    * flat code logits: argmax code-perplexity below ``flat_ratio`` of the prob-perplexity. The
      softmax is near uniform (the diversity term is content) but the argmax keeps few entries: the
      logits barely differ, so the Gumbel-sampled training targets follow the noise;
    * too easy: contrastive accuracy above ``easy_accuracy`` before ``easy_fraction`` of training;
    * no learning: after ``plateau_updates``, the contrastive loss still within ``plateau_tol`` of
      its value in the first logged updates.
    """

    def __init__(self, num_groups: int, max_updates: int, collapse_factor: float = 2.0, easy_accuracy: float = 0.95,
                 easy_fraction: float = 0.1, plateau_updates: int | None = None, plateau_tol: float = 0.02,
                 flat_ratio: float = 0.25):
        self.num_groups, self.max_updates = num_groups, max_updates
        self.collapse_factor, self.easy_accuracy, self.easy_fraction = collapse_factor, easy_accuracy, easy_fraction
        # A quarter of the run, at least 50 and at most 1000 updates, before "no learning" is judged.
        self.plateau_updates = plateau_updates or min(1000, max(50, max_updates // 4))
        self.plateau_tol, self.flat_ratio = plateau_tol, flat_ratio
        self.initial: deque[float] = deque(maxlen=5)
        self.reported: set[str] = set()
        self.warnings: list[str] = []

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self.reported:
            self.reported.add(kind)
            self.warnings.append(message)
            log.warning(message)

    def check(self, update: int, metrics: dict[str, float]) -> None:
        ppl, acc, loss = metrics.get("prob_perplexity"), metrics.get("accuracy"), metrics.get("contrastive")
        if ppl is not None and ppl < self.collapse_factor * self.num_groups:
            self._warn("collapse", f"update {update}: codebook collapse: prob_perplexity {ppl:.2f} is near G="
                       f"{self.num_groups} (the codebooks use almost one entry each). Raise "
                       "model.loss.diversity_weight, lower the learning rate or lengthen warmup.")
        codes = metrics.get("code_perplexity")
        if ppl is not None and codes is not None and codes < self.flat_ratio * ppl:
            self._warn("flat", f"update {update}: the quantizer's logits are nearly flat: prob_perplexity "
                       f"{ppl:.1f} but the argmax uses only {codes:.1f} entries, so the Gumbel-sampled targets "
                       "follow noise. A large model.loss.feature_penalty_weight shrinks the extractor output "
                       "until this happens; lower it (fairseq's LARGE recipe uses 0) or the learning rate.")
        if acc is not None and acc > self.easy_accuracy and update < self.easy_fraction * self.max_updates:
            self._warn("easy", f"update {update}: contrastive accuracy {acc:.3f} is near 1 early: the task is "
                       "too easy. Check that masking is on (model.masking.mask_prob), that negatives come from "
                       "the same utterance, and that the codebook is not collapsing.")
        if loss is not None:
            if len(self.initial) < self.initial.maxlen:
                self.initial.append(loss)
            elif update >= self.plateau_updates:
                start = sum(self.initial) / len(self.initial)
                if abs(loss - start) <= self.plateau_tol * abs(start):
                    self._warn("plateau", f"update {update}: the contrastive loss {loss:.3f} has not moved from "
                               f"its initial {start:.3f}. Check the learning rate and warmup, the input "
                               "normalisation (data.normalize) and that the audio is not silence. Deep post-LN models "
                               "(fairseq's BASE layout) can sit at chance for thousands of updates on few GPUs; "
                               "the pre-LN layout of configs/model/base_transformer_stable.yaml leaves it sooner.")
