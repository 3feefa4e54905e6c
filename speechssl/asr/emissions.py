"""CTC emissions on disk: run the acoustic model once (on a GPU, say), then decode, tune the LM and
score as often as needed without it (on any CPU), as fairseq's ``--dump-emissions`` allows.

    python -m finetune emissions runs/ctc/best.pt data/dev --output dev.emissions.pt
    python -m finetune tune-lm --emissions dev.emissions.pt --lm runs/lm
    python -m finetune evaluate --emissions dev.emissions.pt --lm runs/lm

A file holds, per utterance, its id, transcript and log-probabilities ``(T, V)`` in float16, with
the model's tokenizer and blank; several files (of the same model's tokens) read as one data set.
Files are read with ``weights_only=True``: loading one runs no code.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

FORMAT = "speechssl.CTCEmissions"


@dataclass
class Row:
    """What decoding and scoring need of an utterance (an :class:`Utterance` without its audio)."""

    id: str
    text: str | None


@dataclass
class Emissions:
    """Per-utterance ``log_probs[i] (T_i, V)`` of the model's tokens; ``tokenizer``: its settings
    (``Tokenizer.to_dict()``); ``skipped``: the unreadable inputs, by reason."""

    tokenizer: dict
    blank: int
    rows: list[Row] = field(default_factory=list)
    log_probs: list[Tensor] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    model: str = ""

    def add(self, batch: list, log_probs: Tensor, frames: Tensor) -> None:
        """Keep a batch of :func:`speechssl.asr.inference.emissions`: utterances, ``(B, T, V)``, ``(B,)``."""
        for utt, row, n in zip(batch, log_probs, frames.tolist(), strict=True):
            self.rows.append(Row(utt.id, utt.text))
            self.log_probs.append(row[:n].to(torch.float16).clone())

    def batches(self, max_frames: int = 30_000) -> Iterator[tuple[list[Row], Tensor, Tensor]]:
        """``(rows, log_probs (B, T, V) float32, frames (B,))`` in file order, as
        :func:`speechssl.asr.inference.emissions` yields them; a batch's padded frames stay under
        ``max_frames``. Padding frames hold log-probabilities of 0 and lie past ``frames``."""
        start = 0
        while start < len(self.rows):
            end, longest = start + 1, len(self.log_probs[start])
            while end < len(self.rows) and max(longest, len(self.log_probs[end])) * (end + 1 - start) <= max_frames:
                longest = max(longest, len(self.log_probs[end]))
                end += 1
            chunk = self.log_probs[start:end]
            frames = torch.tensor([len(x) for x in chunk])
            padded = torch.zeros(len(chunk), longest, chunk[0].shape[1])
            for i, x in enumerate(chunk):
                padded[i, : len(x)] = x.float()
            yield self.rows[start:end], padded, frames
            start = end

    def save(self, path: str | Path) -> None:
        torch.save({"format": FORMAT, "version": 1, "tokenizer": self.tokenizer, "blank": self.blank,
                    "model": self.model, "ids": [r.id for r in self.rows], "texts": [r.text for r in self.rows],
                    "log_probs": self.log_probs, "skipped": self.skipped}, path)


def load_emissions(paths: list[str | Path]) -> Emissions:
    """The utterances of one or more emissions files, in order; the files must share the tokenizer."""
    if not paths:
        raise ValueError("no emissions file given")
    out: Emissions | None = None
    for path in paths:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"{path} is not an emissions file (written by `python -m finetune emissions`)")
        if out is None:
            out = Emissions(blob["tokenizer"], blob["blank"], model=blob["model"])
        elif (blob["tokenizer"], blob["blank"]) != (out.tokenizer, out.blank):
            raise ValueError(f"{path} holds another model's tokens than {paths[0]}")
        out.rows += [Row(i, t) for i, t in zip(blob["ids"], blob["texts"], strict=True)]
        out.log_probs += blob["log_probs"]
        for reason, count in blob["skipped"].items():
            out.skipped[reason] = out.skipped.get(reason, 0) + count
    return out
