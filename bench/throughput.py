"""Pretraining step throughput, ours and Hugging Face's side by side on the same GPU and batch.

    python bench/throughput.py --config configs/model/base_transformer.yaml --compare-hf
    python bench/throughput.py --config configs/model/base_conformer.yaml --compare-hf \
        context.position_embeddings=rotary
    python bench/throughput.py --config configs/model/medium_zipformer.yaml

A full training step: forward with all losses, backward, fused AdamW step, in bf16 autocast
(``--dtype``), on ``--batch-size`` generated utterances of ``--seconds`` (unpadded). Reports
milliseconds per step (CUDA events, mean of ``--steps`` after ``--warmup``), audio-seconds per
second, model TFLOP/s (the forward and backward of one step counted with
``torch.utils.flop_counter.FlopCounterMode``, divided by the step time) and peak memory.

``--compare-hf`` exports our randomly initialised model to ``transformers``
(``Wav2Vec2ForPreTraining`` or ``Wav2Vec2ConformerForPreTraining``, same weights, SDPA attention)
and times its step in the same process on the same batch, with its masks and negatives drawn
once beforehand (its ``_compute_mask_indices`` and ``_sample_negative_indices``, outside the
timing); ours draws its masks and negatives on the GPU inside every step. Prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from step_time import make_batch, step_arguments, time_steps  # the same audio and timing as bench/step_time.py

from speechssl import Wav2Vec2Model, load_model_config


def measure(step: Callable[[], torch.Tensor], params, warmup: int, steps: int, audio_seconds: float) -> dict:
    """Time ``step`` (forward and backward, returns nothing needed) plus a fused AdamW update."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, fused=True)

    def full() -> None:
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ms = time_steps(full, warmup, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    return {"ms_per_step": round(ms, 1), "audio_seconds_per_second": round(audio_seconds / (ms / 1000), 1),
            "tflops_per_second": round(flops / (ms / 1000) / 1e12, 1), "tflop_per_step": round(flops / 1e12, 2),
            "peak_memory_gib": round(peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step_arguments(parser)
    parser.add_argument("--compare-hf", action="store_true", help="time Hugging Face's model on the same batch")
    parser.add_argument("overrides", nargs="*", help="dotted model config overrides")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/throughput.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Wav2Vec2Model(load_model_config(args.config, args.overrides))
    waves, lengths = make_batch(args.batch_size, args.seconds, device, padded=False)
    audio_seconds = float(lengths.sum()) / 16000
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    hf = None
    if args.compare_hf:
        from speechssl.interop.huggingface import to_huggingface

        hf = to_huggingface(model, kind="pretraining")  # before ours trains: the same weights
        hf.config._attn_implementation = "sdpa"
    model = model.to(device).train()
    model.set_num_updates(100_000)

    def ours() -> None:
        with autocast:
            out = model(waves, lengths)
        (out.loss / out.sample_size).backward()

    results = {"ours": measure(ours, model.parameters(), args.warmup, args.steps, audio_seconds)}
    model.cpu()  # its GPU memory back before Hugging Face's model runs
    torch.cuda.empty_cache()
    if hf is not None:
        import numpy as np
        from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

        hf = hf.to(device).train()
        frames = int(hf._get_feat_extract_output_lengths(torch.tensor(waves.shape[1])))
        mask = _compute_mask_indices((args.batch_size, frames), hf.config.mask_time_prob, hf.config.mask_time_length,
                                     min_masks=2)
        negatives = _sample_negative_indices((args.batch_size, frames), hf.config.num_negatives, mask)
        mask = torch.from_numpy(mask).to(device)
        negatives = torch.from_numpy(negatives.astype(np.int64)).to(device)

        def theirs() -> None:
            with autocast:
                out = hf(waves, mask_time_indices=mask, sampled_negative_indices=negatives)
            out.loss.backward()

        results["huggingface"] = measure(theirs, hf.parameters(), args.warmup, args.steps, audio_seconds)
        results["speedup"] = round(results["huggingface"]["ms_per_step"] / results["ours"]["ms_per_step"], 2)
    versions = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
                **({"transformers": __import__("transformers").__version__} if hf is not None else {})}
    batch = f"{args.batch_size} x {args.seconds}s"
    print(json.dumps({"config": args.config, "overrides": args.overrides, "batch": batch, "dtype": args.dtype,
                      **results, **versions}))

if __name__ == "__main__":
    main()
