"""Pretraining step throughput, ours and a reference implementation's side by side on one GPU and batch.

    python bench/throughput.py --config configs/model/base_transformer.yaml --compare-hf
    python bench/throughput.py --config configs/model/base_conformer.yaml --compare-hf \
        --compile context.layers context.position_embeddings=rotary
    python bench/throughput.py --config configs/model/medium_zipformer.yaml --context-only --compare-reference

A full training step: forward with all losses, backward, fused AdamW step, in bf16 autocast
(``--dtype``), on ``--batch-size`` generated utterances of ``--seconds`` (unpadded). Reports
milliseconds per step (CUDA events, mean of ``--steps`` after ``--warmup`` steps and at least
``--warmup-seconds``), audio-seconds per second, model TFLOP/s (the forward and backward of one
step counted with
``torch.utils.flop_counter.FlopCounterMode`` in eager mode and with the positional convolution
counted as a direct convolution, divided by the step time) and peak memory.

``--compare-hf`` exports our randomly initialised model to ``transformers``
(``Wav2Vec2ForPreTraining`` or ``Wav2Vec2ConformerForPreTraining``, same weights, SDPA attention)
and times its step in the same process on the same batch, with its masks and negatives drawn
once beforehand (its ``_compute_mask_indices`` and ``_sample_negative_indices``, outside the
timing); ours draws its masks and negatives on the GPU inside every step. Prints the ratio.

``--context-only`` times the context network alone: forward and backward of the mean of its
output on random features at the extractor's frame rate (in the autocast dtype and needing a
gradient, as the frontend gives them), and a fused AdamW step of its parameters. The reference
is then Hugging Face's encoder (``--compare-hf``) or, for a Zipformer, the reference package's
encoder (``--compare-reference``; PyPI ``zipformer`` 0.1.3, icefall's Zipformer2, the same sizes,
time-major input as it expects, its schedules past warm-up).

``--profile DIR`` runs 3 more steps of each model under ``torch.profiler`` after the timing and
writes ``DIR/NAME.txt`` (the operators by self CPU time and by self device time, and how many CUDA
graphs were launched) and ``DIR/NAME.trace.json.gz`` (a trace for Perfetto or chrome://tracing),
NAME being ``ours``, ``reference`` or ``huggingface``: give each run a DIR of its own.

``--compile MODULE`` (repeatable) compiles parts of our model as ``trainer.compile`` does
(``--compile model``: the whole model), in ``--compile-mode`` (``reduce-overhead``: CUDA graphs, a
new step marked before each).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from step_time import make_batch, step_arguments, time_steps  # the same audio and timing as bench/step_time.py

from speechssl import Wav2Vec2Model, load_model_config
from speechssl.training.compilation import compile_submodules


@contextlib.contextmanager
def direct_convolutions(model: nn.Module) -> Iterator[None]:
    """The positional convolution as ``nn.Conv1d`` (what FlopCounterMode counts), not through the FFT."""
    modules = [m for m in model.modules() if hasattr(m, "use_fft")]
    saved = [m.use_fft for m in modules]
    for m in modules:
        m.use_fft = False
    try:
        yield
    finally:
        for m, value in zip(modules, saved, strict=True):
            m.use_fft = value


def count_flops(step: Callable[[], None], params: list[nn.Parameter]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    for p in params:
        p.grad = None
    return counter.get_total_flops()


def profile(step: Callable[[], None], directory: Path, name: str, steps: int = 3) -> None:
    """``steps`` calls of ``step`` under ``torch.profiler``: operator tables and a trace in ``directory``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    directory.mkdir(parents=True, exist_ok=True)
    torch.cuda.synchronize()
    with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    graph_launches = sum(e.count for e in events if e.key == "cudaGraphLaunch")
    tables = [f"{steps} steps; cudaGraphLaunch calls: {graph_launches}",
              "by self CPU time:", events.table(sort_by="self_cpu_time_total", row_limit=40),
              "by self device time:", events.table(sort_by="self_device_time_total", row_limit=40)]
    (directory / f"{name}.txt").write_text("\n".join(tables))
    prof.export_chrome_trace(str(directory / f"{name}.trace.json.gz"))


def measure(step: Callable[[], None], params: list[nn.Parameter], flops: float, args: argparse.Namespace,
            audio_seconds: float, name: str, cuda_graphs: bool = False) -> dict:
    """Time ``step`` (forward and backward) plus a fused AdamW update of ``params``; profile it
    with ``--profile``."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, fused=True)

    def full() -> None:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    full()  # the first step pays for compilation, if any
    torch.cuda.synchronize()
    first_step = time.perf_counter() - started
    print(f"first step (compilation included): {first_step:.1f} s", file=sys.stderr, flush=True)
    ms = time_steps(full, args.warmup, args.steps, args.warmup_seconds)
    peak = torch.cuda.max_memory_allocated() / 2**30
    if args.profile is not None:
        profile(full, args.profile, name)
    return {"ms_per_step": round(ms, 1), "audio_seconds_per_second": round(audio_seconds / (ms / 1000), 1),
            "tflops_per_second": round(flops / (ms / 1000) / 1e12, 1), "tflop_per_step": round(flops / 1e12, 2),
            "peak_memory_gib": round(peak, 2),
            "first_step_seconds": round(first_step, 1)}


def reference_zipformer(context: nn.Module) -> nn.Module:
    """The reference package's encoder with our Zipformer's sizes, past every warm-up schedule."""
    from tests.zipformer_reference import reference_encoder

    ref = reference_encoder(context.config)
    for m in ref.modules():
        if hasattr(m, "batch_count"):
            m.batch_count = 100_000.0
    return ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step_arguments(parser)
    parser.add_argument("--compare-hf", action="store_true", help="time Hugging Face's model on the same batch")
    parser.add_argument("--compare-reference", action="store_true",
                        help="with --context-only and a Zipformer: time the reference package's encoder")
    parser.add_argument("--context-only", action="store_true", help="time the context network alone")
    parser.add_argument("--compile", action="append", default=[], metavar="MODULE",
                        help="a submodule of ours to torch.compile, as trainer.compile (e.g. context.layers); "
                             "repeat for more; 'model' is the whole model")
    parser.add_argument("--compile-mode", default=None, help="torch.compile's mode (default: its default)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="after timing, profile 3 steps of each model into DIR")
    parser.add_argument("overrides", nargs="*", help="dotted model config overrides")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/throughput.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Wav2Vec2Model(load_model_config(args.config, args.overrides))
    waves, lengths = make_batch(args.batch_size, args.seconds, device, padded=False)
    audio_seconds = float(lengths.sum()) / 16000
    frames = int(model.feature_extractor.output_lengths(torch.tensor(waves.shape[1])))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    hf = None
    if args.compare_hf:
        from speechssl.interop.huggingface import to_huggingface

        hf = to_huggingface(model, kind="pretraining")  # before ours trains: the same weights
        hf.config._attn_implementation = "sdpa"
    model = model.to(device).train()
    model.set_num_updates(100_000)
    # The context network's input as the frontend gives it: in the autocast dtype, needing a gradient.
    features = torch.randn(args.batch_size, frames, model.context.input_dim, device=device,
                           dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32, requires_grad=True)

    if args.context_only:
        ours_module = model.context

        def ours() -> None:
            with autocast:
                out = model.context(features)
            out.output.float().mean().backward()
    else:
        ours_module = model

        def ours() -> None:
            with autocast:
                out = model(waves, lengths)
            (out.loss / out.sample_size).backward()

    params = list(ours_module.parameters())
    with direct_convolutions(model):
        flops = count_flops(ours, params)
    compiled = compile_submodules(model, args.compile, args.compile_mode)
    cuda_graphs = bool(compiled) and args.compile_mode == "reduce-overhead"
    results = {"ours": measure(ours, params, flops, args, audio_seconds, "ours", cuda_graphs)}
    model.cpu()  # its GPU memory back before the reference runs
    torch.cuda.empty_cache()

    reference = None
    if args.compare_reference:
        if not (args.context_only and model.config.context.type == "zipformer"):
            sys.exit("--compare-reference needs --context-only and a Zipformer config")
        reference = reference_zipformer(model.context).to(device).train()
        time_major = features.detach().transpose(0, 1).contiguous().requires_grad_()
        feature_lengths = torch.full((args.batch_size,), frames, device=device)

        def theirs() -> None:
            with autocast:
                out, _ = reference(time_major, feature_lengths)
            out.float().mean().backward()
    elif hf is not None:
        hf = hf.to(device).train()
        reference = hf
        if args.context_only:
            encoder = hf.wav2vec2.encoder
            reference = encoder

            def theirs() -> None:
                with autocast:
                    out = encoder(features)
                out.last_hidden_state.float().mean().backward()
        else:
            import numpy as np
            from transformers.models.wav2vec2.modeling_wav2vec2 import (
                _compute_mask_indices,
                _sample_negative_indices,
            )

            mask = _compute_mask_indices((args.batch_size, frames), hf.config.mask_time_prob,
                                         hf.config.mask_time_length, min_masks=2)
            negatives = _sample_negative_indices((args.batch_size, frames), hf.config.num_negatives, mask)
            mask = torch.from_numpy(mask).to(device)
            negatives = torch.from_numpy(negatives.astype(np.int64)).to(device)

            def theirs() -> None:
                with autocast:
                    out = hf(waves, mask_time_indices=mask, sampled_negative_indices=negatives)
                out.loss.backward()
    if reference is not None:
        params = list(reference.parameters())
        name = "reference" if args.compare_reference else "huggingface"
        results[name] = measure(theirs, params, count_flops(theirs, params), args, audio_seconds, name)
        results["speedup"] = round(results[name]["ms_per_step"] / results["ours"]["ms_per_step"], 2)
    versions = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
                **({"transformers": __import__("transformers").__version__} if hf is not None else {})}
    batch = f"{args.batch_size} x {args.seconds}s"
    print(json.dumps({"config": args.config, "overrides": args.overrides, "batch": batch, "dtype": args.dtype,
                      "context_only": args.context_only, "compiled": compiled, "compile_mode": args.compile_mode,
                      **results, **versions}))


if __name__ == "__main__":
    main()
