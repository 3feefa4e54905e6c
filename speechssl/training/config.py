"""Trainer settings and the DeepSpeed config they run with, checked against each other."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from speechssl.config import REPO_CONFIG_DIR, ConfigError, check
from speechssl.device import DEVICE_CHOICES


@dataclass
class ScaledAdamConfig:
    """ScaledAdam's own settings (icefall's defaults); its betas are ``trainer.adam_betas`` and its
    learning rate ``trainer.lr``. See :mod:`speechssl.training.scaled_adam`."""

    clipping_scale: Optional[float] = 2.0  # noqa: UP045  (OmegaConf needs typing.Optional)
    scalar_lr_scale: float = 0.1
    eps: float = 1e-8
    param_min_rms: float = 1e-5
    param_max_rms: float = 3.0
    scalar_max: float = 10.0
    size_update_period: int = 4
    clipping_update_period: int = 100


@dataclass
class TrainerConfig:
    """output_dir: the run folder (checkpoints/, metrics.jsonl, tensorboard/, model.pt, report.png).
    deepspeed: DeepSpeed JSON (ZeRO stage, precision, gradient clipping); the optimizer and LR
    schedule come from this section, never from the JSON.
    max_updates / update_freq: optimizer updates, and micro-batches accumulated per update
    (fairseq ``max_update`` / ``update_freq``).
    optimizer: ``adamw`` (adam_betas, adam_eps, weight_decay; no decay on biases and norms) or
    ``scaled_adam`` (icefall's, for the Zipformer: adam_betas and the ``scaled_adam`` section; it
    needs ZeRO stage 0 and fp32 weights, so bf16 through ``torch_autocast``, e.g.
    configs/deepspeed/scaled_adam_bf16.json).
    lr, warmup_updates, lr_schedule (``polynomial``: linear warmup then linear decay to end_lr, fairseq
    ``polynomial_decay``; ``constant``: warmup then flat; ``tri_stage``: fairseq's, with
    tri_stage_ratios and init/final scales; ``eden``: icefall's Eden, ``lr`` times
    ``((u^2 + B^2) / B^2)^-0.25 ((h^2 + H^2) / H^2)^-0.25`` after ``u`` updates and ``h`` hours of
    audio (estimated from data.max_tokens), B = eden_lr_batches, H = eden_lr_hours, with a linear
    warmup from eden_warmup_start over warmup_updates).
    validate_every / checkpoint_every / log_every: in updates (0 = never; a checkpoint is always
    written at the end). keep_checkpoints: the last k are kept. resume: ``auto`` (latest in
    output_dir/checkpoints, if any), ``none``, or a checkpoint folder. device: ``auto`` (the local
    GPU if there is one), ``cpu`` or ``cuda``. threads: CPU threads per process (0: torch's choice).
    stop_at: end this run (with a checkpoint) at that update without changing the schedule, e.g.
    to fit a time limit; ``resume: auto`` goes on from there (0: run to max_updates).
    max_minutes: end this run at the first update after that many minutes of training (counted
    from the first update, start-up excluded), with a checkpoint and the exported model as at
    max_updates; the LR schedule still follows max_updates (0: no limit).
    record_samples: every rank appends the keys of the utterances of each update to
    ``samples.rank{r}.jsonl`` (to audit data order and sharding).
    compile: parts of the model to run through ``torch.compile``, by dotted name: ``[model]`` the
    whole model as one graph (layer drop then runs every layer and discards the dropped ones'
    outputs: see ``ContextNetwork._layer_or_skip``), ``[context.layers]`` each Transformer,
    Conformer or Zipformer layer (a ``ModuleList`` compiles each of its modules),
    ``feature_extractor`` the convolutional encoder. A new batch shape compiles again, and
    torch.compile gives up (runs eagerly) after 8 recompilations of a function: compile with crops
    of one length (``data.min_sample_size`` = ``data.max_sample_size``). Zipformer layers share
    one function, compiled once per stack width and frame rate (5 graphs for the medium model),
    so a second batch shape or validation batches can reach that limit.
    average_models: keep the models of this many validations and write their average to
    ``averaged.pt`` at the end (0: off; ESPnet's ``nbest`` averaging, icefall's ``--avg``);
    average_by: ``best`` (the best by the task's validation metric: WER for CTC, the loss for
    pretraining) or ``last`` (the last validations). See :mod:`speechssl.training.averaging`.
    compile_mode: ``torch.compile``'s mode: null (its default), ``reduce-overhead`` (replays CUDA
    graphs: the host no longer launches each kernel; one graph is recorded per batch shape, so it
    pays where batch shapes repeat, such as crops of a fixed length), ``max-autotune`` or
    ``max-autotune-no-cudagraphs``.
    """

    output_dir: str = "runs/pretrain"
    deepspeed: str = "configs/deepspeed/zero1_bf16.json"
    max_updates: int = 400_000
    update_freq: int = 1
    optimizer: str = "adamw"
    scaled_adam: ScaledAdamConfig = field(default_factory=ScaledAdamConfig)
    lr: float = 5e-4
    warmup_updates: int = 32_000
    lr_schedule: str = "polynomial"
    end_lr: float = 0.0
    tri_stage_ratios: list[float] = field(default_factory=lambda: [0.1, 0.4, 0.5])
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.05
    eden_lr_batches: float = 7500.0
    eden_lr_hours: float = 50_000.0
    eden_warmup_start: float = 0.1
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    adam_eps: float = 1e-6
    weight_decay: float = 0.01
    validate_every: int = 10_000
    max_valid_batches: int = 0
    checkpoint_every: int = 25_000
    keep_checkpoints: int = 3
    log_every: int = 200
    resume: str = "auto"
    seed: int = 1
    device: str = "auto"
    threads: int = 0
    stop_at: int = 0
    max_minutes: float = 0.0
    record_samples: bool = False
    compile: list[str] = field(default_factory=list)
    compile_mode: str | None = None
    average_models: int = 0
    average_by: str = "best"

    def __post_init__(self) -> None:
        check(self.max_updates >= 1, "trainer.max_updates", "must be >= 1")
        check(self.update_freq >= 1, "trainer.update_freq", "must be >= 1")
        check(self.lr > 0, "trainer.lr", "must be > 0")
        check(self.warmup_updates >= 0, "trainer.warmup_updates", "must be >= 0")
        check(0 <= self.end_lr <= self.lr, "trainer.end_lr", f"must be in [0, trainer.lr], got {self.end_lr}")
        check(self.init_lr_scale >= 0 and self.final_lr_scale >= 0, "trainer.init_lr_scale",
              "init_lr_scale and final_lr_scale must be >= 0")
        check(self.adam_eps > 0, "trainer.adam_eps", "must be > 0")
        check(self.weight_decay >= 0, "trainer.weight_decay", "must be >= 0")
        check(self.optimizer in ("adamw", "scaled_adam"), "trainer.optimizer",
              f"must be adamw or scaled_adam, got {self.optimizer!r}")
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        check(self.compile_mode in (None, *modes), "trainer.compile_mode",
              f"must be null or one of {', '.join(modes)}, got {self.compile_mode!r}")
        check(self.lr_schedule in ("polynomial", "constant", "tri_stage", "eden"), "trainer.lr_schedule",
              f"must be polynomial, constant, tri_stage or eden, got {self.lr_schedule!r}")
        check(self.eden_lr_batches > 0 and self.eden_lr_hours > 0, "trainer.eden_lr_batches",
              "eden_lr_batches and eden_lr_hours must be > 0")
        check(0 <= self.eden_warmup_start <= 1, "trainer.eden_warmup_start", "must be in [0, 1]")
        check(len(self.tri_stage_ratios) == 3 and abs(sum(self.tri_stage_ratios) - 1) < 1e-6,
              "trainer.tri_stage_ratios", "three fractions (warmup, hold, decay) adding up to 1")
        check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "trainer.adam_betas",
              "two values in [0, 1)")
        for name in ("validate_every", "checkpoint_every", "log_every", "max_valid_batches"):
            check(getattr(self, name) >= 0, f"trainer.{name}", "must be >= 0")
        check(self.keep_checkpoints >= 1, "trainer.keep_checkpoints", "must be >= 1")
        check(self.device in DEVICE_CHOICES, "trainer.device", "must be auto, cpu or cuda")
        check(self.resume in ("auto", "none") or Path(self.resume).is_dir(), "trainer.resume",
              f"must be auto, none or a checkpoint folder; {self.resume!r} is none of these")
        check(self.stop_at >= 0, "trainer.stop_at", "must be >= 0")
        check(self.max_minutes >= 0, "trainer.max_minutes", "must be >= 0")
        check(self.average_models >= 0, "trainer.average_models", "must be >= 0")
        check(self.average_by in ("best", "last"), "trainer.average_by",
              f"must be best or last, got {self.average_by!r}")
        check(not self.average_models or self.validate_every > 0, "trainer.average_models",
              "averages validated models: set trainer.validate_every (and validation shards)")


def _find(path: str) -> Path:
    for candidate in (Path(path), REPO_CONFIG_DIR.parent / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"trainer.deepspeed: {path} not found")


def deepspeed_config(trainer: TrainerConfig, on_gpu: bool) -> dict:
    """Read the DeepSpeed JSON and fill in what the job owns, refusing contradictions.

    The job owns the optimizer and scheduler (client objects, so both are checkpointed), the
    accumulation (``gradient_accumulation_steps`` = ``trainer.update_freq``) and the batch size
    (batches are variable: DeepSpeed counts one "sample" per micro-batch). Unless the file sets
    ``timers``, DeepSpeed's throughput timer is off (the trainer logs throughput itself).
    """
    path = _find(trainer.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"trainer.deepspeed: {path} is not valid JSON: {e}") from None
    where = f"trainer.deepspeed ({path})"
    for key in ("optimizer", "scheduler"):
        check(key not in ds, where, f"has an {key!r} section; the optimizer and LR schedule are set in "
                                    "the trainer section of the job config")
    gas = ds.get("gradient_accumulation_steps", trainer.update_freq)
    check(gas == trainer.update_freq, where,
          f"gradient_accumulation_steps={gas} contradicts trainer.update_freq={trainer.update_freq}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        check(key not in ds, where, f"sets {key}; batches are sized by data.max_tokens, not by DeepSpeed")
    check("gradient_clipping" in ds, where, "must set gradient_clipping explicitly (0 disables it)")
    fp16 = ds.get("fp16", {}).get("enabled", False)
    bf16 = ds.get("bf16", {}).get("enabled", False)
    check(not (fp16 and bf16), where, "enables both fp16 and bf16")
    check(on_gpu or not fp16, where, "enables fp16, which needs a GPU; use a *_fp32.json config on the CPU")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    check(stage in (0, 1, 2), where, f"ZeRO stage {stage} is not supported (0, 1 or 2)")
    if ds.get("torch_autocast", {}).get("enabled", False):
        check(not (fp16 or bf16), where, "enables torch_autocast together with fp16 or bf16")
        check(ds["torch_autocast"].get("dtype", "bfloat16") in ("bfloat16", "torch.bfloat16"), where,
              "torch_autocast is supported with dtype bfloat16 only")
    if trainer.optimizer == "scaled_adam":
        check(stage == 0 and not (fp16 or bf16), where,
              "trainer.optimizer scaled_adam needs each parameter tensor whole and in fp32: ZeRO stage 0 without "
              "fp16/bf16 (DeepSpeed flattens the parameters for those); use torch_autocast for bf16, e.g. "
              "configs/deepspeed/scaled_adam_bf16.json")
    ds = dict(ds)
    ds["gradient_accumulation_steps"] = trainer.update_freq
    ds["train_micro_batch_size_per_gpu"] = 1
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs
    ds.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer synchronises the device at every forward and step by default:
    # the host could not queue the next update while the GPU runs this one.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    return ds


def precision(ds: dict) -> str:
    """``fp16``, ``bf16`` (weights in bf16), ``bf16-autocast`` (fp32 weights, bf16 compute) or ``fp32``."""
    if ds.get("fp16", {}).get("enabled", False):
        return "fp16"
    if ds.get("bf16", {}).get("enabled", False):
        return "bf16"
    if ds.get("torch_autocast", {}).get("enabled", False):
        return "bf16-autocast"
    return "fp32"
