"""What starting an epoch's loader workers costs the training loop, in a process of a given size.

    python bench/epoch_start.py --shards data/synth/train --resident-gib 0 8 --workers 4 --start default forkserver

The training loop starts the next epoch's workers itself (``AudioLoader`` does it a few batches
before the epoch ends), so the time that start takes on the main thread is time the GPU waits.
For each size, allocates that much resident memory (as a training process holds: CUDA runtime,
pinned buffers, the model on the host), then times, for ``--epochs`` epochs, the start of the
workers (the main thread's share) and the wait for their first batch. Forking copies the page
tables of the whole process, so with forked workers (``default`` on Linux) the start grows with
the process; with workers from a fork server it does not. ``--start`` takes the values of
``data.worker_start``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from speechssl.data import DataConfig, make_loader


def measure(shards: str, workers: int, start: str, epochs: int) -> list[dict]:
    config = DataConfig(shards=[shards], num_workers=workers, worker_start=start, max_tokens=192_000,
                        max_sample_size=48_000, min_sample_size=16_000)
    loader = make_loader(config, train=True, rank=0, world_size=1)
    rows = []
    for epoch in range(epochs):
        started = time.perf_counter()
        batches = loader._start(epoch, 0)
        running = time.perf_counter()
        next(batches)
        rows.append({"epoch": epoch, "start_ms": round(1000 * (running - started), 1),
                     "first_batch_ms": round(1000 * (time.perf_counter() - running), 1)})
        del batches  # its workers shut down
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="a shard directory (data_tools make-shards or synth)")
    parser.add_argument("--resident-gib", type=float, nargs="+", default=[0.0, 8.0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4, help="the first also starts the fork server")
    parser.add_argument("--start", nargs="+", choices=["default", "forkserver"], default=["default", "forkserver"],
                        help="data.worker_start values to time")
    args = parser.parse_args()
    for gib in args.resident_gib:
        resident = torch.ones(int(gib * 2**28))  # float32: touched, so resident
        for start in args.start:
            rows = measure(args.shards, args.workers, start, args.epochs)
            print(json.dumps({"resident_gib": gib, "workers": args.workers, "worker_start": start, "epochs": rows,
                              "python": platform.python_version(), "torch": torch.__version__}), flush=True)
        del resident


if __name__ == "__main__":
    main()
