"""Time the pretraining job's own update on a GPU, and where its host time goes.

    python bench/update_time.py --config configs/pretrain/base_one_gpu.yaml \
        model=configs/model/small_conformer_stable.yaml data.shards=[data/an4/train] valid_shards=[] \
        trainer.deepspeed=configs/deepspeed/zero0_autocast_bf16.json

Builds the job as ``python -m pretrain`` does (config, loader, DeepSpeed engine), preloads
``--batches`` batches from the shards, then:

- times ``--updates`` trainer updates (after ``--warmup``): the task's prepare, forward with all
  losses, backward through the engine, the non-finite check, clipping and the optimizer step, as in
  a run but without waiting for the loader;
- measures the host time of each phase (prepare, forward, backward, ``engine.step``), synchronising
  the GPU before each update only, so a phase's time is what it takes to launch its work (or to
  wait, where it synchronises).

Unlike ``bench/step_time.py`` (the bare model and a fused AdamW) this includes DeepSpeed and the
trainer, so it shows what a DeepSpeed config costs per update.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain/base_one_gpu.yaml")
    parser.add_argument("--batches", type=int, default=12, help="batches preloaded and cycled")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("overrides", nargs="*", help="dotted job config overrides, as for python -m pretrain")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/update_time.py needs a CUDA GPU")

    import deepspeed

    from pretrain.__main__ import load_config
    from pretrain.task import PretrainTask
    from speechssl.training.job import make_loaders
    from speechssl.training.trainer import Trainer

    config = load_config(args.config, args.overrides)
    loader, _ = make_loaders(config.data, [], 0, 1)
    task = PretrainTask(config.model, config.trainer.max_updates, loader.stream.shardset.sample_rate)
    trainer = Trainer(task, config.trainer, loader)
    trainer.output.mkdir(parents=True, exist_ok=True)
    trainer._build_engine()
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == args.batches:
            break
    audio = [float(b.lengths.sum()) / loader.stream.shardset.sample_rate for b in batches]

    def updates(n: int) -> float:
        """Audio-seconds of ``n`` updates."""
        for i in range(n):
            trainer._train_update([batches[i % len(batches)]], {})
        return sum(audio[i % len(batches)] for i in range(n))

    updates(args.warmup)
    torch.cuda.synchronize()
    start = time.perf_counter()
    seconds = updates(args.updates)
    torch.cuda.synchronize()
    per_update = (time.perf_counter() - start) / args.updates

    engine, phases = trainer.engine, dict.fromkeys(("prepare", "forward", "backward", "engine_step"), 0.0)
    for i in range(args.updates):
        batch = batches[i % len(batches)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prepared = task.prepare(engine.module, batch, trainer.device, trainer.dtype)
        t1 = time.perf_counter()
        trainer._new_graph_step()
        out = task.forward(engine, prepared)
        t2 = time.perf_counter()
        engine.backward(out.loss / prepared["sample_size"])
        t3 = time.perf_counter()
        engine.step()
        t4 = time.perf_counter()
        for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[key] += value / args.updates
    torch.cuda.synchronize()

    print(json.dumps({
        "config": args.config,
        "overrides": args.overrides,
        "precision": trainer.precision,
        "zero_stage": trainer.stage,
        "parameters_millions": round(sum(p.numel() for p in engine.module.parameters()) / 1e6, 1),
        "batch_audio_seconds_mean": round(sum(audio) / len(audio), 1),
        "ms_per_update": round(per_update * 1000, 1),
        "updates_per_second": round(1 / per_update, 2),
        "audio_seconds_per_second": round(seconds / args.updates / per_update),
        "host_ms_by_phase": {k: round(v * 1000, 1) for k, v in phases.items()},
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
