"""Loader throughput: audio-seconds per second delivered by the training loader.

    python bench/loader_throughput.py --an4 ../shared/data/an4 --synth-hours 0.5 --workers 1 2

Builds shards (AN4 from its train.tsv; the synthetic corpus with ``data_tools synth``'s generator)
into a temporary folder, then times full training epochs (decode, crop, batch by max_tokens) with
each worker count. The first epoch warms the page cache and is not counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from data_tools.shards import ShardOptions, make_shards
from data_tools.synthetic import corpus_entries
from speechssl.data import DataConfig, make_loader
from speechssl.data.manifest import read_source


def measure(shards: Path, workers: int, epochs: int) -> dict:
    config = DataConfig(shards=[str(shards)], max_tokens=1_400_000, max_sample_size=250_000, min_sample_size=0,
                        crop_to_shortest=False, num_workers=workers, shuffle_buffer=1000)
    loader = make_loader(config, train=True)
    for _ in loader:  # warm-up epoch
        pass
    seconds, batches = 0.0, 0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            seconds += batch.lengths.sum().item() / 16000
            batches += 1
    wall = time.perf_counter() - start
    return {"workers": workers, "audio_seconds_per_second": round(seconds / wall, 1),
            "batches_per_second": round(batches / wall, 2), "audio_seconds": round(seconds, 1),
            "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--an4", type=Path, help="AN4 folder (with train.tsv); skipped when absent")
    parser.add_argument("--synth-hours", type=float, default=0.5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        corpora = {}
        if args.an4 is not None and (args.an4 / "train.tsv").is_file():
            corpora["an4"] = (read_source(args.an4 / "train.tsv")[0], ShardOptions(max_count=200))
        corpora["synthetic"] = (corpus_entries(args.synth_hours), ShardOptions(max_count=200))
        for name, (entries, options) in corpora.items():
            index = make_shards(entries, Path(tmp) / name, options, progress=False)
            for workers in args.workers:
                row = {"corpus": name, "hours": index["totals"]["hours"], **measure(Path(tmp) / name, workers,
                                                                                   args.epochs)}
                print(json.dumps(row), flush=True)
                results.append(row)
    print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                      "cpus": len(__import__("os").sched_getaffinity(0))}))


if __name__ == "__main__":
    main()
