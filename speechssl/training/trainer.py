"""The DeepSpeed trainer shared by pretraining and fine-tuning.

A *task* says what a batch means (the pretraining objective, CTC, ...); the trainer does the rest:
``deepspeed.initialize`` with the client AdamW and LR schedule, gradient accumulation over a
variable number of micro-batches with fairseq's normalisation (the summed loss divided by the
number of target frames over all micro-batches and ranks), the update-count hook
(``set_num_updates``), validation, skipped updates on non-finite gradients, checkpoints and exact
resume, logs (progress bar, TensorBoard, ``metrics.jsonl``) and the final export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from speechssl.data.loader import AudioBatch, AudioLoader
from speechssl.device import pick_device
from speechssl.training import checkpoint
from speechssl.training.averaging import ValidatedModels, average_files
from speechssl.training.compilation import compile_submodules
from speechssl.training.config import TrainerConfig, deepspeed_config, precision
from speechssl.training.distributed import all_gather_objects, all_reduce_sum, barrier, init_distributed
from speechssl.training.metrics_log import read_metrics, rewrite_metrics
from speechssl.training.scaled_adam import ScaledAdam
from speechssl.training.schedule import lr_lambda
from speechssl.training.task import Task

log = logging.getLogger("speechssl.train")


class TrainingStopped(RuntimeError):
    """The run cannot train (every update so far skipped): stopped with a reason and a hint."""


SKIPPED_CHECK_UPDATES = 20  # a run whose first this many updates were all skipped stops with an error


def _zero_loss(model: nn.Module) -> Tensor:
    """A loss whose gradients are all zero but that reaches every parameter, so an empty batch still
    takes part in the gradient reduction of every rank."""
    return sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)


class Trainer:
    def __init__(self, task: Task, config: TrainerConfig, train_loader: AudioLoader,
                 valid_loader: AudioLoader | None = None):
        self.task, self.cfg = task, config
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.device = pick_device(config.device)
        self.rank, self.world_size = init_distributed(self.device)
        self.output = Path(config.output_dir)
        self.ckpt_root = self.output / "checkpoints"
        self.ds_config = deepspeed_config(config, on_gpu=self.device.type == "cuda")
        self.precision = precision(self.ds_config)
        # The inputs' dtype: with autocast the weights stay fp32 and so do the inputs.
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        self.stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        # At stage 0 with fp32 weights (fp32 or autocast) the trainer clips, with the one fused norm
        # it also skips non-finite updates by; DeepSpeed's clipping there takes a norm per tensor.
        self.clip_norm = 0.0
        if self.stage == 0 and self.precision in ("fp32", "bf16-autocast"):
            self.clip_norm = float(self.ds_config.get("gradient_clipping", 0.0))
            self.ds_config = {**self.ds_config, "gradient_clipping": 0.0}
        self.update = 0
        self.skipped = 0
        # Samples the loader could not give (corrupt, missing, index mismatch) or dropped (too short
        # or too long), summed over ranks and finished epochs: the run's data record.
        self.data_totals: Counter[str] = Counter()
        self.skipped_samples = 0  # over ranks, as of the last log line (shown in the progress bar)
        self._warned_data: set[str] = set()
        self._skipped_pending: Tensor | None = None  # skipped on the device, not yet added to `skipped`
        self.writer = None
        self._grad_norm: Tensor | None = None  # of the last update, where the trainer measures it
        self.validated = (ValidatedModels(self.output / "validated", config.average_models, config.average_by)
                          if config.average_models and self.rank == 0 else None)

    # ------------------------------------------------------------------ set-up

    def _build_engine(self) -> None:
        import deepspeed

        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        torch.manual_seed(self.cfg.seed)
        model = self.task.build_model()
        if self.cfg.compile:
            compiled = compile_submodules(model, self.cfg.compile, self.cfg.compile_mode)
            log.info("torch.compile: %s", ", ".join(compiled))
        # An upper bound, as icefall's estimate from its batch duration: batches are padded.
        hours_per_update = self.train_loader.seconds_per_batch * self.cfg.update_freq * self.world_size / 3600
        optimizer, scheduler = self._optimizer_and_schedule(model, hours_per_update)
        self._params = list(model.parameters())  # those with a gradient take part in an update
        # Fused AdamW skips an update on the device when told that its gradients are not finite:
        # the trainer then need not wait for the backward to end to decide (see _finish_update).
        self._skip_on_device = (isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))
                                and self.stage == 0 and self.precision in ("fp32", "bf16-autocast"))
        self._adamw = optimizer
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        checkpoint.use_safe_loading(self.engine)
        # One rank has nothing to average, yet DeepSpeed's stage-0 all-reduce would copy every
        # gradient into a flat buffer and back (about 1.3 ms per BASE update in one H100 profile).
        # Its one other effect, zero gradients for parameters that got none, _finish_update gives.
        # (A DeepSpeed file that sets how gradients are communicated keeps it, rounding and all.)
        sets_communication = {"communication_data_type", "gradient_predivide_factor"} & self.ds_config.keys()
        self._local_gradients = (self.world_size == 1 and self.stage == 0 and not sets_communication
                                 and self.precision in ("fp32", "bf16-autocast"))
        if self._local_gradients:
            self.engine.enable_backward_allreduce = False

    def _param_groups(self, model: nn.Module) -> tuple[list[dict], list[str]]:
        """Optimizer groups (non-empty, so DeepSpeed keeps them all and in order) and their task
        keys. AdamW: no weight decay on biases, norms and embeddings."""
        adamw = self.cfg.optimizer == "adamw"
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                decay = adamw and not (p.ndim < 2 or name.endswith(".bias"))
                groups.setdefault((self.task.param_group(name), decay), []).append(p)
        params = [{"params": ps, **({"weight_decay": self.cfg.weight_decay if decay else 0.0} if adamw else {})}
                  for (_, decay), ps in groups.items()]
        return params, [key for key, _ in groups]

    def _optimizer_and_schedule(self, model: nn.Module, hours_per_update: float):
        c = self.cfg
        groups, keys = self._param_groups(model)
        if c.optimizer == "scaled_adam":
            optimizer = ScaledAdam(groups, lr=c.lr, betas=tuple(c.adam_betas), **dataclasses.asdict(c.scaled_adam))
        else:
            optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.adam_betas), eps=c.adam_eps,
                                          fused=self.device.type == "cuda")  # one kernel for all tensors
        schedule = lr_lambda(c, hours_per_update)
        lambdas = [lambda step, key=key: schedule(step) * self.task.lr_factor(key, step) for key in keys]
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    def _resume(self) -> None:
        folder = checkpoint.resume_point(self.cfg.resume, self.ckpt_root)
        if folder is None:
            return
        self.update, state = checkpoint.load(self.engine, folder, self.rank)
        if state is None:
            log.warning("%s has no state for rank %d (another world size?): data order and RNG restart",
                        folder, self.rank)
        else:
            self.train_loader.load_state_dict(state["loader"])
            checkpoint.set_rng_state(state["rng"])
            self.skipped = state.get("skipped", 0)
            self.data_totals = Counter(state.get("data_totals", {}))
            self.skipped_samples = state.get("skipped_samples", 0)
        self._truncate_metrics()
        if self.validated is not None:
            self.validated.forget_after(self.update)
        if self.rank == 0:
            log.info("resumed from %s at update %d", folder, self.update)

    def _truncate_metrics(self) -> None:
        """Drop log lines a crashed run wrote after the checkpoint we resume from."""
        path = self.output / "metrics.jsonl"
        if self.rank == 0 and path.is_file():
            rewrite_metrics(path, [r for r in read_metrics(path) if r["update"] <= self.update])

    # ------------------------------------------------------------------ the loop

    def _micro_batches(self):
        """Groups of ``update_freq`` micro-batches, endlessly over epochs (all ranks agree on the
        grouping: every rank yields the same number of batches per epoch)."""
        while True:
            group: list[AudioBatch] = []
            epoch = self.train_loader.epoch
            for batch in self.train_loader:
                group.append(batch)
                if len(group) == self.cfg.update_freq:
                    yield group
                    group = []
            self._log_epoch(epoch)
            if group:
                yield group

    def _log_epoch(self, epoch: int) -> None:
        """One ``data`` record per epoch in metrics.jsonl (collective: every rank ends an epoch at the
        same batch): the samples trained on, skipped (by reason) and dropped, over all ranks (from the
        resume point in a resumed epoch); a warning when more than 1% of the epoch was lost."""
        record, reasons = self._epoch_counts()
        self.data_totals.update(record)
        self.data_totals.update({f"skipped.{k}": v for k, v in reasons.items()})
        self.train_loader.stats, self.train_loader.skip_reasons = {}, Counter()  # counted: not again at the end
        if self.rank != 0:
            return
        with (self.output / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"update": self.update, "split": "data", "epoch": epoch, **record,
                                "skipped_by_reason": dict(reasons)}) + "\n")
        samples, corrupt, unlisted = record["samples"], record["skipped"], record["unlisted"]
        seen = samples + corrupt + record["dropped_short"] + record["dropped_long"]
        if corrupt > 0.01 * seen and "skipped" not in self._warned_data:
            self._warned_data.add("skipped")
            log.warning("epoch %d: %d of %d samples (%.1f%%) could not be read and were skipped (%s): check the "
                        "shards (python -m data_tools inspect)", epoch, corrupt, seen, 100 * corrupt / seen,
                        ", ".join(f"{n} {k}" for k, n in reasons.most_common()))
        dropped = record["dropped_short"] + record["dropped_long"]
        if dropped > 0.01 * seen and "dropped" not in self._warned_data:
            self._warned_data.add("dropped")
            log.warning("epoch %d: %d of %d samples (%.1f%%) were dropped by length (%d too short for "
                        "data.min_sample_size or the model, %d over data.max_sample_size)", epoch, dropped, seen,
                        100 * dropped / seen, record["dropped_short"], record["dropped_long"])
        if unlisted and "unlisted" not in self._warned_data:
            self._warned_data.add("unlisted")
            log.warning("epoch %d: the shards hold %d samples their index.json does not list; they were not read",
                        epoch, unlisted)

    def _record(self, group: list[AudioBatch]) -> None:
        keys = [m["__key__"] for batch in group for m in batch.metadata["samples"]]
        with (self.output / f"samples.rank{self.rank}.jsonl").open("a") as f:
            f.write(json.dumps({"update": self.update + 1, "keys": keys}) + "\n")

    def _train_update(self, group: list[AudioBatch], sums: dict[str, Tensor]) -> None:
        if self.cfg.record_samples:
            self._record(group)
        sums["skipped_samples"] = sums.get("skipped_samples", 0.0) + sum(len(b.metadata["skipped"]) for b in group)
        engine, model = self.engine, self.engine.module
        model.set_num_updates(self.update)  # the hook: any module that follows the update count
        prepared = [self.task.prepare(model, b, self.device, self.dtype) if len(b.lengths) else None for b in group]
        total = torch.stack([p["sample_size"].float() if p else torch.zeros((), device=self.device)
                             for p in prepared]).sum()
        if self.world_size > 1:
            torch.distributed.all_reduce(total)  # the global number of targets of this update
        scale = self.world_size * engine.gradient_accumulation_steps() / total.clamp_min(1.0)
        for i, p in enumerate(prepared):
            engine.set_gradient_accumulation_boundary(i == len(prepared) - 1)
            if p is None:
                engine.backward(_zero_loss(engine))
                continue
            self._new_graph_step()
            out = self.task.forward(engine, p)
            engine.backward(out.loss * scale)
            for key, value in {"loss": out.loss, "sample_size": out.sample_size, **out.stats}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            sums["audio_seconds"] = sums.get("audio_seconds", 0.0) + p["audio_seconds"]
        if self.stage == 0 and self.precision != "fp16":
            self._finish_update()
        else:  # DeepSpeed's ZeRO and fp16 paths skip non-finite updates themselves
            before = engine.skipped_steps
            engine.step()
            self.skipped += engine.skipped_steps - before
        self.update += 1

    def _new_graph_step(self) -> None:
        """Before each forward under ``compile_mode: reduce-overhead``: the CUDA graphs may reuse
        the memory of earlier outputs (the trainer reads a micro-batch's outputs only until its
        backward has run, so nothing it still needs is overwritten)."""
        if self.cfg.compile and self.cfg.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def _finish_update(self) -> None:
        """Stage 0, fp32 weights or bf16: skip the update if a gradient is not finite, else clip
        and step. One fused norm of all gradients decides both (kept to be logged: DeepSpeed reports
        none at stage 0). With fused AdamW the decision stays on the device, so the host goes on to
        the next batch while the GPU finishes (the LR schedule then also advances on a skipped
        update); otherwise it reads the norm (a host sync)."""
        engine = self.engine
        if self._local_gradients:  # as DeepSpeed's all-reduce does, so that one rank trains as many do
            for p in self._params:
                if p.requires_grad and p.grad is None and p.numel():
                    p.grad = torch.zeros_like(p)
        trained = [p for p in self._params if p.grad is not None]
        self._grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trained]) if trained else None
        if self._grad_norm is None:
            engine.step()
            return
        if not self._skip_on_device and not bool(torch.isfinite(self._grad_norm)):
            engine.zero_grad()
            self.skipped += 1
            return
        if self.clip_norm > 0:  # DeepSpeed's factor: max / (norm + 1e-6), <= 1
            torch.nn.utils.clip_grads_with_norm_(trained, self.clip_norm, self._grad_norm)
        if not self._skip_on_device:
            engine.step()
            return
        found_inf = (~torch.isfinite(self._grad_norm)).float()
        self._adamw.found_inf = found_inf  # read by fused AdamW's step, as torch.amp.GradScaler does
        try:
            engine.step()
        finally:
            del self._adamw.found_inf
        self._skipped_pending = found_inf if self._skipped_pending is None else self._skipped_pending + found_inf

    def _skipped_updates(self) -> int:
        """Updates skipped so far, those decided on the device included (a host sync)."""
        if self._skipped_pending is not None:
            self.skipped += int(self._skipped_pending.item())
            self._skipped_pending = None
        return self.skipped

    def _out_of_time(self, started: float) -> bool:
        """Whether ``trainer.max_minutes`` has passed; rank 0's clock decides for every rank."""
        if not self.cfg.max_minutes:
            return False
        late = float(self.rank == 0 and time.perf_counter() - started >= 60 * self.cfg.max_minutes)
        if self.world_size > 1:
            late = all_reduce_sum([late], self.device)[0]
        return late > 0

    def _reduce(self, sums: dict[str, Any]) -> dict[str, float]:
        """Sum the stats over ranks (collective: every rank calls it with the same keys)."""
        keys = ["loss", "sample_size", "audio_seconds", "skipped_samples", *self.task.stat_keys]
        values = [float(sums.get(k, 0.0)) for k in keys]
        return dict(zip(keys, all_reduce_sum(values, self.device), strict=True))

    def validate(self) -> dict[str, float] | None:
        if self.valid_loader is None:
            return None
        engine = self.engine
        engine.eval()
        sums: dict[str, Any] = {}
        with torch.no_grad(), self._rng_fork():
            torch.manual_seed(self.cfg.seed + 7919)  # the same masks at every validation
            self.valid_loader.set_epoch(0)  # from the first batch, also after a partial pass
            for i, batch in enumerate(self.valid_loader):
                if self.cfg.max_valid_batches and i >= self.cfg.max_valid_batches:
                    break
                if not len(batch.lengths):
                    continue
                p = self.task.prepare(engine.module, batch, self.device, self.dtype)
                self._new_graph_step()
                out = self.task.forward(engine, p)
                for key, value in {"loss": out.loss, "sample_size": out.sample_size, **out.stats}.items():
                    sums[key] = sums.get(key, 0.0) + value.float()
        engine.train()
        reduced = self._reduce(sums)
        return self.task.metrics(reduced) if reduced["sample_size"] > 0 else None

    def _log(self, split: str, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        record = {"update": self.update, "split": split, **{k: round(v, 6) for k, v in metrics.items()}}
        with (self.output / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"{split}/{key}", value, self.update)
            self.writer.flush()

    def _keep_best(self, metrics: dict[str, float]) -> None:
        """Export the model to ``best.pt`` when the task's ``best_metric`` reaches a new low;
        ``best.json`` says at which update and with what value (and survives a resume)."""
        name = self.task.best_metric
        if name is None or self.rank != 0 or name not in metrics:
            return
        record = self.output / "best.json"
        best = json.loads(record.read_text())[name] if record.is_file() else math.inf
        if metrics[name] < best:
            self._export(self.output / "best.pt")
            record.write_text(json.dumps({"update": self.update, name: metrics[name]}) + "\n")

    def _keep_for_average(self, metrics: dict[str, float]) -> None:
        """Export the model into the set of validated models to average, if it makes the set."""
        if self.validated is None:
            return
        metric = metrics.get(self.task.best_metric or "loss", metrics["loss"])
        self.validated.add(self.update, metric, self._export)

    def _export(self, path: Path) -> None:
        """The task's model file, without touching the RNG that training goes on with (a task may
        build a fresh model to export, which draws initial weights)."""
        with self._rng_fork():
            self.task.export(self.engine.module, path)

    def _rng_fork(self):
        """A context after which the RNG states (CPU, and this rank's GPU) are as before it."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _save(self) -> Path:
        state = {"loader": self.train_loader.state_dict(), "rng": checkpoint.rng_state(),
                 "skipped": self._skipped_updates(), "data_totals": dict(self.data_totals),
                 "skipped_samples": self.skipped_samples}
        return checkpoint.save(self.engine, self.ckpt_root, self.update, self.rank, state, self.cfg.keep_checkpoints)

    def fit(self) -> dict[str, Any]:
        """Train to ``max_updates`` (or resume and finish); returns paths and the last metrics."""
        self.output.mkdir(parents=True, exist_ok=True)
        self._build_engine()
        self._resume()
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output / "tensorboard"))
            (self.output / "world.json").write_text(json.dumps({"world_size": self.world_size,
                                                                 "precision": self.precision,
                                                                 "zero_stage": self.stage}) + "\n")
        cfg = self.cfg
        bar = tqdm(total=cfg.max_updates, initial=self.update, disable=self.rank != 0, unit="upd",
                   dynamic_ncols=True)
        sums: dict[str, Any] = {}
        last_train: dict[str, float] = {}
        last_valid: dict[str, float] | None = None
        ckpt: Path | None = None
        tick = time.perf_counter()
        groups = self._micro_batches()
        end = min(cfg.max_updates, cfg.stop_at) if cfg.stop_at else cfg.max_updates
        started, out_of_time = time.perf_counter(), False
        waited = 0.0  # seconds the loop was blocked on the loader since the last log line
        first_update, first_skipped = self.update, self._skipped_updates()
        check_at = first_update + min(SKIPPED_CHECK_UPDATES, end - first_update)
        while self.update < end:
            asked = time.perf_counter()
            group = next(groups)
            waited += time.perf_counter() - asked
            self._train_update(group, sums)
            if self.update == check_at and self._skipped_updates() - first_skipped == self.update - first_update:
                raise TrainingStopped(
                    f"every one of the first {self.update - first_update} updates was skipped because its "
                    "gradients were not finite: this run would train nothing. Check trainer.lr and the LR schedule, "
                    "model.feature_grad_mult and the input audio (NaN samples are rejected by make-shards; a "
                    "silent or constant input can give a zero-variance normalisation)")
            out_of_time = self._out_of_time(started)
            done = self.update >= end or out_of_time
            if cfg.log_every and (self.update % cfg.log_every == 0 or done):
                reduced = self._reduce(sums)
                elapsed = time.perf_counter() - tick
                metrics = self.task.metrics(reduced)
                self.skipped_samples += int(reduced["skipped_samples"])
                grad_norm = self.engine.get_global_grad_norm()
                if grad_norm is None and self._grad_norm is not None:
                    grad_norm = float(self._grad_norm)
                metrics.update(lr=max(self.engine.get_lr()),  # the largest: frozen groups have 0
                               skipped_updates=float(self._skipped_updates()),
                               skipped_samples=float(self.skipped_samples),
                               audio_seconds_per_second=reduced.get("audio_seconds", 0.0) / max(elapsed, 1e-9),
                               loader_wait=waited / max(elapsed, 1e-9),
                               **({"grad_norm": float(grad_norm)} if grad_norm is not None
                                  and math.isfinite(float(grad_norm)) else {}))
                if self.device.type == "cuda":
                    metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                self._log("train", metrics)
                if self.rank == 0:
                    self.task.check_health(self.update, metrics)
                    shown = (*self.task.progress_keys, "lr", "audio_seconds_per_second")
                    bar.set_postfix({k: f"{metrics[k]:.3g}" for k in shown if k in metrics}
                                    | ({"skipped": self.skipped_samples} if self.skipped_samples else {}),
                                    refresh=False)
                last_train, sums, tick, waited = metrics, {}, time.perf_counter(), 0.0
            if cfg.validate_every and (self.update % cfg.validate_every == 0 or done):
                bar.set_description("validating", refresh=True)
                last_valid = self.validate()
                bar.set_description(None, refresh=False)
                if last_valid is not None:
                    self._log("valid", last_valid)
                    if self.rank == 0:
                        bar.write(f"update {self.update} validation: {self._shown(last_valid)}")
                    self._keep_best(last_valid)
                    self._keep_for_average(last_valid)
            if (cfg.checkpoint_every and self.update % cfg.checkpoint_every == 0) or done:
                ckpt = self._save()
            bar.update(1)
            if out_of_time:
                log.info("trainer.max_minutes (%g) reached at update %d; stopping", cfg.max_minutes, self.update)
                break
        bar.close()
        model_path = self.output / "model.pt"
        if self.rank == 0 and (self.update >= cfg.max_updates or out_of_time):
            self.task.export(self.engine.module, model_path)
            if self.validated is not None and self.validated.entries:
                average_files(self.validated.paths(), self.output / "averaged.pt")
                log.info("averaged.pt: the average of %d validated models (%s)", len(self.validated.entries),
                         ", ".join(p.name for p in self.validated.paths()))
            if self.writer is not None:
                self.writer.close()
        if self.rank == 0:
            self._write_report()
        barrier()
        data = self._data_summary()
        if self.rank == 0 and (data["skipped"] or data["dropped_short"] or data["dropped_long"]):
            reasons = ", ".join(f"{n} {k}" for k, n in data["skipped_by_reason"].items()) or "none"
            log.info("data: %d samples trained on, %d skipped (%s), %d dropped as too short, %d as too long",
                     data["samples"], data["skipped"], reasons, data["dropped_short"], data["dropped_long"])
        if self.rank == 0:
            self._print_outputs(last_valid)
        return {"output_dir": str(self.output), "checkpoint": str(ckpt or checkpoint.latest(self.ckpt_root)),
                "model": str(model_path), "update": self.update, "train": last_train, "valid": last_valid,
                "skipped_updates": self._skipped_updates(), "world_size": self.world_size, "data": data}

    def _write_report(self) -> None:
        """``report.png`` of the metrics so far; a plot that fails never fails the run."""
        from speechssl.training.report import render

        try:
            render(self.output)
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("report.png not written: %s", e)

    def _shown(self, metrics: dict[str, float]) -> str:
        """The task's progress keys of ``metrics``, as the console shows them: ``loss 61.3, cer 0.52``."""
        return ", ".join(f"{k} {metrics[k]:.4g}" for k in self.task.progress_keys if k in metrics)

    def _print_outputs(self, last_valid: dict[str, float] | None) -> None:
        """The closing summary: where the run stopped, its last validation, and every output it wrote."""
        described = [("model.pt", "the model at the last update"),
                     ("best.pt", f"the best model by validation {self.task.best_metric} (best.json: when)"),
                     ("averaged.pt", "the average of the best validated models"),
                     ("checkpoints", "DeepSpeed checkpoints (resume with the same command)"),
                     ("config.yaml", "the resolved config"), ("metrics.jsonl", "every logged metric"),
                     ("report.png", "the curves"), ("tensorboard", "TensorBoard logs")]
        lines = [f"stopped at update {self.update} of {self.cfg.max_updates}; outputs in {self.output}:"]
        lines += [f"  {name:<14} {what}" for name, what in described if (self.output / name).exists()]
        if last_valid:
            lines.insert(1, f"  last validation: {self._shown(last_valid)}")
        print("\n".join(lines), flush=True)

    def _epoch_counts(self) -> tuple[dict[str, int], Counter[str]]:
        """The current epoch's data record over all ranks (collective) and its skip reasons. The
        samples and skips are each rank's own, summed; the length drops are the plan's, already
        over all ranks."""
        stats = self.train_loader.stats or dict.fromkeys(("samples", "corrupt", "unlisted", "dropped_short",
                                                          "dropped_long"), 0)
        samples, corrupt, unlisted = all_reduce_sum([stats["samples"], stats["corrupt"], stats["unlisted"]],
                                                    self.device)
        reasons: Counter[str] = Counter()
        for part in all_gather_objects(dict(self.train_loader.skip_reasons)):
            reasons.update(part)
        return {"samples": int(samples), "skipped": int(corrupt), "dropped_short": stats["dropped_short"],
                "dropped_long": stats["dropped_long"], "unlisted": int(unlisted)}, reasons

    def _data_summary(self) -> dict:
        """The finished epochs' data record plus the current epoch's so far (collective)."""
        current, reasons = self._epoch_counts()
        if not (current["samples"] or current["skipped"]):  # no epoch under way: its plan's drops do not count
            current = dict.fromkeys(current, 0)
        reasons.update({k[len("skipped."):]: v for k, v in self.data_totals.items() if k.startswith("skipped.")})
        return {**{k: self.data_totals[k] + v for k, v in current.items()}, "skipped_by_reason": dict(reasons)}


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
