"""Sanity check of the pretraining objective: train on one fixed batch of generated audio.

    python -m pretrain.overfit --config configs/pretrain/overfit_tiny.yaml [dotted.key=value ...]

A healthy model drives the contrastive loss down while the codebook stays in use (prob-perplexity
well above G). Prints every loss term as it goes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from data_tools.synthetic import generate_batch
from speechssl.config import ConfigError, build, check
from speechssl.models.config import ModelConfig
from speechssl.models.wav2vec2 import PretrainOutput, Wav2Vec2Model
from speechssl.training.scaled_adam import ScaledAdam


@dataclass
class OverfitConfig:
    """model: the model section (or the path of a model YAML). steps: updates on the fixed batch.
    batch_size / seconds: the batch (lengths fall from ``seconds`` to 70% of it, so it is padded).
    optimizer: ``adamw`` (betas 0.9/0.98, eps 1e-6 as fairseq; weight_decay, gradients clipped to
    clip_norm) or ``scaled_adam`` (icefall's defaults, its own clipping), both at ``lr`` with linear
    warmup then constant. threads: torch CPU threads (0 keeps torch's default)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: str = "adamw"
    steps: int = 200
    batch_size: int = 4
    seconds: float = 2.0
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    clip_norm: float = 10.0
    seed: int = 0
    log_every: int = 20
    threads: int = 0

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.seconds > 0.1, "seconds", "must be > 0.1")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.optimizer in ("adamw", "scaled_adam"), "optimizer", "must be adamw or scaled_adam")
        check(self.log_every >= 1, "log_every", "must be >= 1")


def log_line(step: int, out: PretrainOutput) -> dict[str, float]:
    """The loss terms of one step, per masked frame, as plain floats (one host sync)."""
    n = out.sample_size.clamp_min(1)
    return {
        "step": step,
        "loss": (out.loss / n).item(),
        "contrastive": (out.contrastive_loss / n).item(),
        "diversity": out.diversity_loss.item(),
        "feature_pen": out.feature_penalty.item(),
        "accuracy": out.accuracy.item(),
        "prob_ppl": out.prob_perplexity.item(),
        "code_ppl": out.code_perplexity.item(),
        "temp": out.temperature.item(),
        "masked": int(out.sample_size),
    }


def run(config: OverfitConfig, echo: bool = True) -> list[dict[str, float]]:
    """Train ``config.steps`` updates on one batch; returns the log of every step."""
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    waves, lengths = generate_batch(config.batch_size, config.seconds, seed=config.seed)
    waves, lengths = torch.from_numpy(waves), torch.from_numpy(lengths)
    model = Wav2Vec2Model(config.model).train()
    if config.optimizer == "scaled_adam":
        optimizer = ScaledAdam(model.parameters(), lr=config.lr)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), eps=1e-6,
                                      weight_decay=config.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(config.warmup_steps, 1)))
    if echo:
        params = sum(p.numel() for p in model.parameters())
        print(f"model: {config.model.context.type}, {params / 1e6:.2f}M parameters; batch: "
              f"{config.batch_size} x {waves.shape[1] / 16000:.2f}s (lengths {lengths.tolist()})")
    history = []
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        model.set_num_updates(step - 1)
        out = model(waves, lengths)
        optimizer.zero_grad(set_to_none=True)
        (out.loss / out.sample_size.clamp_min(1)).backward()
        if config.optimizer == "adamw":
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        warmup.step()
        entry = log_line(step, out)
        if not math.isfinite(entry["loss"]):
            raise RuntimeError(f"non-finite loss at step {step}: {entry}")
        history.append(entry)
        if echo and (step == 1 or step % config.log_every == 0 or step == config.steps):
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()),
                  flush=True)
    if echo:
        first, last = history[0]["contrastive"], history[-1]["contrastive"]
        print(f"contrastive loss {first:.3f} -> {last:.3f} ({last / first:.0%} of the first step) in "
              f"{time.perf_counter() - start:.1f}s; prob-perplexity {history[-1]['prob_ppl']:.1f} "
              f"(G = {config.model.quantizer.num_groups})")
    return history


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.overfit``: ``speechssl overfit``, whose arguments are defined in
    :mod:`speechssl_cli.jobs`."""
    from speechssl_cli import parser_for

    return run_command(parser_for("overfit", "python -m pretrain.overfit").parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Build the config of the parsed arguments and run it; the exit status."""
    try:
        config = build(OverfitConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
