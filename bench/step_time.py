"""Time one pretraining step (forward with all losses, backward, optimizer step) on a GPU.

    python bench/step_time.py --config configs/model/base_transformer.yaml --batch-size 6 --seconds 15.6
    python bench/step_time.py --config configs/model/base_conformer.yaml context.position_embeddings=rotary
    python bench/step_time.py --config configs/model/medium_zipformer.yaml --optimizer scaled_adam

Runs warm-up steps, times ``--steps`` steps with CUDA events, reports milliseconds per step,
audio-seconds per second and peak memory, then runs one more forward+backward under
``torch.cuda.set_sync_debug_mode("error")`` to find whether the step waits on the device (the
first synchronising operation is reported). The model's update count is set past every warm-up
schedule (``--num-updates``), so the Zipformer runs all its modules, as in most of a run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from data_tools.synthetic import SAMPLE_RATE, generate_utterance
from speechssl import Wav2Vec2Model, load_model_config
from speechssl.training.scaled_adam import ScaledAdam


def make_batch(batch_size: int, seconds: float, device: torch.device,
               padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveforms on the GPU; lengths stay on the CPU, as a data loader delivers them. ``padded``:
    rows shrink linearly to 60% of ``seconds``, zero-padded."""
    samples = int(seconds * SAMPLE_RATE)
    waves = np.stack([np.resize(generate_utterance(i, seconds)[0], samples) for i in range(batch_size)])
    lengths = torch.full((batch_size,), samples, dtype=torch.long)
    if padded:
        lengths = (samples * (1.0 - 0.4 * torch.arange(batch_size) / max(batch_size - 1, 1))).long()
        waves[np.arange(samples)[None, :] >= lengths.numpy()[:, None]] = 0.0
    return torch.from_numpy(waves).to(device), lengths


def step_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, batch, precision and timing options every step benchmark takes."""
    parser.add_argument("--config", default="configs/model/base_transformer.yaml")
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=15.6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps, at least")
    parser.add_argument("--warmup-seconds", type=float, default=3.0,
                        help="warm-up lasts at least this long: a GPU fresh from idle runs at lower clocks")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")


def time_steps(step: Callable[[], None], warmup: int, steps: int, warmup_seconds: float = 3.0) -> float:
    """Milliseconds per call of ``step`` (CUDA events, mean of ``steps`` after at least ``warmup``
    calls and ``warmup_seconds``); peak memory is counted from the first timed call."""
    started, done = time.perf_counter(), 0
    while done < warmup or time.perf_counter() - started < warmup_seconds:
        step()
        done += 1
        if done >= warmup:
            torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step_arguments(parser)
    parser.add_argument("--padded", action="store_true", help="rows of different lengths")
    parser.add_argument("--optimizer", choices=["adamw", "scaled_adam"], default="adamw",
                        help="fused AdamW, or ScaledAdam (the Zipformer's)")
    parser.add_argument("--num-updates", type=int, default=100_000, help="the update count the model is told")
    parser.add_argument("overrides", nargs="*", help="dotted model config overrides, e.g. context.num_layers=6")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/step_time.py needs a CUDA GPU")

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Wav2Vec2Model(load_model_config(args.config, args.overrides)).to(device).train()
    model.set_num_updates(args.num_updates)
    if args.optimizer == "scaled_adam":
        optimizer = ScaledAdam(model.parameters(), lr=0.045)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                                      weight_decay=0.01, fused=True)
    waves, lengths = make_batch(args.batch_size, args.seconds, device, args.padded)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def forward_backward() -> torch.Tensor:
        with autocast:
            out = model(waves, lengths)
        (out.loss / out.sample_size).backward()
        return out.loss

    def step() -> None:
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ms = time_steps(step, args.warmup, args.steps, args.warmup_seconds)

    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation now raises
    try:
        forward_backward()
        sync = "none raised"
    except RuntimeError as e:
        sync = str(e).splitlines()[0][:200]
    torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    optimizer.zero_grad(set_to_none=True)

    result = {
        "config": args.config,
        "overrides": args.overrides,
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "batch": f"{args.batch_size} x {args.seconds}s",
        "dtype": args.dtype,
        "ms_per_step": round(ms, 1),
        "padded": args.padded,
        "audio_seconds_per_second": round(lengths.sum().item() / SAMPLE_RATE / (ms / 1000), 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "optimizer": args.optimizer,
        "host_sync_in_forward_backward": sync,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
