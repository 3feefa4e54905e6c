"""CPU real-time factor of PyTorch eager against ONNX Runtime, for an encoder and a CTC model.

    python bench/onnx_rtf.py                                   # BASE Transformer, 10 s, batch 1
    python bench/onnx_rtf.py --config configs/model/base_conformer.yaml --seconds 20 --threads 4

For the model of ``--config`` (random weights: the arithmetic is the same as a trained model's)
it exports the encoder (``--layers``, default the last) and a CTC model of the same encoder
(``--vocab`` tokens) with :func:`speechssl.interop.onnx.export_onnx`, then times each on one
synthetic utterance of ``--seconds`` (batch ``--batch-size``): PyTorch eager under
``torch.inference_mode`` and ONNX Runtime's CPU provider, both with ``--threads`` intra-op
threads (default: every core). RTF = compute seconds / audio seconds (below 1 is faster than real
time), the median of ``--runs`` runs after ``--warmup``. It also reports the largest difference
between the two on the valid frames, the export time and the file size, and prints the command,
machine, date and versions, then one JSON line per model and a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_tools.synthetic import SAMPLE_RATE, generate_utterance
from speechssl import Wav2Vec2Model, load_model_config
from speechssl.features import LayerFeatures
from speechssl.interop.onnx import OnnxModel, export_onnx
from speechssl.models.ctc import CTCModel


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_seconds(call, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, model: torch.nn.Module, pytorch_call, layers, waves: torch.Tensor, lengths: torch.Tensor,
          folder: Path, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    path = export_onnx(model, folder / f"{name}.onnx", layers=layers)
    export_s = time.perf_counter() - start
    onnx_model = OnnxModel(path, threads=args.threads)
    feed = (waves.numpy(), lengths.numpy())
    with torch.inference_mode():
        expected = pytorch_call(waves, lengths)
        got = onnx_model(*feed, normalize=False)
        names = [n for n in onnx_model.output_names if n != "frame_lengths"]
        frames = expected[-1].numpy()
        valid = np.arange(expected[0].shape[1])[None, :] < frames[:, None]
        diff = max(float(np.abs(got[n] - e.numpy())[valid].max()) for n, e in zip(names, expected[:-1], strict=True))
        eager = median_seconds(lambda: pytorch_call(waves, lengths), args.warmup, args.runs)
    ort_s = median_seconds(lambda: onnx_model(*feed, normalize=False), args.warmup, args.runs)
    audio = float(lengths.sum()) / SAMPLE_RATE
    return {"model": name, "config": args.config, "outputs": names, "audio_seconds": audio,
            "batch_size": int(waves.shape[0]), "threads": args.threads,
            "pytorch_seconds": round(eager, 4), "onnxruntime_seconds": round(ort_s, 4),
            "pytorch_rtf": round(eager / audio, 4), "onnxruntime_rtf": round(ort_s / audio, 4),
            "speedup": round(eager / ort_s, 3), "max_abs_diff": diff, "frames": frames.tolist(),
            "export_seconds": round(export_s, 1), "file_mib": round(path.stat().st_size / 2**20, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/model/base_transformer.yaml")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layers", default="last", help="'last', 'all' or comma-separated indices")
    parser.add_argument("--vocab", type=int, default=32, help="CTC vocabulary size (letters, as LibriSpeech's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = args.layers if args.layers in ("last", "all") else [int(i) for i in args.layers.split(",")]

    samples = int(args.seconds * SAMPLE_RATE)
    rows = [np.resize(generate_utterance(i, args.seconds)[0], samples) for i in range(args.batch_size)]
    waves = torch.from_numpy(np.stack(rows)).float()
    lengths = torch.full((args.batch_size,), samples, dtype=torch.long)

    config = load_model_config(args.config)
    encoder = Wav2Vec2Model(config).eval()
    features = LayerFeatures(encoder, layers)

    def encoder_call(w, n):
        out = features(w, n)
        return (*out.hidden_states, out.lengths)

    vocab = ["<blank>", "<unk>", "|", *(f"t{i}" for i in range(args.vocab - 3))]
    ctc = CTCModel.from_pretrained(encoder, len(vocab), vocab=vocab,
                                   tokenizer={"type": "char", "vocab": vocab, "case": "upper"}).eval()

    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores visible, {platform.platform()}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    import onnx
    import onnxruntime
    import onnxscript

    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, onnx {onnx.__version__}, "
          f"onnxscript {onnxscript.__version__}, onnxruntime {onnxruntime.__version__}, numpy {np.__version__}")
    print(f"model: {args.config} ({sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M parameters with the "
          f"pretraining parts), {args.seconds:g} s x batch {args.batch_size}, {args.threads} threads, "
          f"median of {args.runs} runs after {args.warmup} warm-up")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(bench("encoder", encoder, encoder_call, layers, waves, lengths, Path(tmp), args))
        print(json.dumps(results[-1]), flush=True)
        results.append(bench("ctc", ctc, lambda w, n: ctc(w, n), None, waves, lengths, Path(tmp), args))
        print(json.dumps(results[-1]), flush=True)
    print("\n| model | PyTorch eager s (RTF) | ONNX Runtime s (RTF) | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['pytorch_seconds']:.3f} ({r['pytorch_rtf']:.4f}) | {r['onnxruntime_seconds']:.3f} "
              f"({r['onnxruntime_rtf']:.4f}) | {r['speedup']:.2f}x | {r['max_abs_diff']:.2e} |")


if __name__ == "__main__":
    main()
