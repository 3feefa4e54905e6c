"""Does pretraining pay on real speech? AN4 end to end on one GPU.

    python bench/an4.py --an4 ../shared/data/an4 --output runs/an4

1. Shards from AN4's ``train.tsv`` with 8 speakers held out as dev, plus a 10% subset of the
   labelled training utterances (seeded).
2. Pretraining of a small model (the stable BASE layout of ``configs/pretrain/base_one_gpu.yaml``
   cut to 6 layers of 512) on the training audio, without transcripts.
3. CTC fine-tuning from it with 10% and with 100% of the labelled training utterances, and from a
   random initialisation of the same architecture with 10% and 100% and the same budget (there the
   feature extractor trains too, since a random one is no use frozen).
4. Dev CER and WER of each best model (``python -m finetune evaluate``), as a JSON summary and a
   Markdown table.

The four fine-tuning runs share the GPU (``--parallel`` at a time). ``--quick`` shrinks
everything to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

SMALL = ["model.context.num_layers=6", "model.context.embed_dim=512", "model.context.num_heads=8",
         "model.context.ffn_dim=2048"]


def run(args: list[str], log: Path) -> float:
    """Run a command, its output to ``log``; the seconds it took. Stops the bench if it fails."""
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:4])} ... failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def subset(manifest: Path, fraction: float, seed: int, output: Path) -> int:
    with manifest.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    picked = sorted(random.Random(seed).sample(range(len(rows)), max(1, round(fraction * len(rows)))))
    with output.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows[i] for i in picked)
    return len(picked)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--an4", default="../shared/data/an4", help="folder with train.tsv and audio/")
    parser.add_argument("--output", default="runs/an4")
    parser.add_argument("--pretrain-updates", type=int, default=2400)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-updates", type=int, default=1500)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--parallel", type=int, default=4, help="fine-tuning runs at a time")
    parser.add_argument("--workers", type=int, default=12, help="loader workers of the pretraining run")
    parser.add_argument("--quick", action="store_true", help="a few updates of a tiny model (CPU check)")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    times: dict[str, float] = {}
    small = [] if args.quick else SMALL
    model = "configs/model/tiny_transformer.yaml" if args.quick else "configs/model/base_transformer_stable.yaml"
    pretrain_updates, finetune_updates = (4, 4) if args.quick else (args.pretrain_updates, args.finetune_updates)
    device = ["trainer.device=cpu", "trainer.deepspeed=configs/deepspeed/zero1_fp32.json"] if args.quick else []

    # 1. shards
    start = time.perf_counter()
    data = out / "data"
    run([py, "-m", "data_tools", "split", "--input", str(Path(args.an4) / "train.tsv"), "--output",
         str(data / "split"), "--dev-speakers", "8"], out / "split.log")
    labelled10 = subset(data / "split" / "train.tsv", 0.1, 0, data / "split" / "train10.tsv")
    for name in ("train", "train10", "dev"):
        run([py, "-m", "data_tools", "make-shards", "--input", str(data / "split" / f"{name}.tsv"), "--output",
             str(data / name), "--max-count", "50"], out / f"shards_{name}.log")
    times["shards"] = time.perf_counter() - start

    # 2. pretraining (no transcripts used)
    pretrained = out / "pretrain"
    times["pretrain"] = run([py, "-m", "pretrain", "--config", "configs/pretrain/base_one_gpu.yaml", f"model={model}",
                             *small, f"data.shards=[{data / 'train'}]", f"valid_shards=[{data / 'dev'}]",
                             "data.min_sample_size=8000", "data.max_tokens=700000", f"data.num_workers={args.workers}",
                             f"trainer.output_dir={pretrained}", f"trainer.max_updates={pretrain_updates}",
                             f"trainer.lr={args.pretrain_lr}", "trainer.warmup_updates=300",
                             "trainer.validate_every=400", "trainer.checkpoint_every=0",
                             "trainer.log_every=50", *device], out / "pretrain.log")
    random_init = out / "random_init.pt"
    subprocess.run([py, "-c", "import sys; from speechssl import Wav2Vec2Model, load_model_config; "
                    "Wav2Vec2Model(load_model_config(sys.argv[1], [o.removeprefix('model.') for o in sys.argv[3:]]))"
                    ".save(sys.argv[2])", model, str(random_init), *small], check=True)

    # 3. fine-tuning: pretrained and random, 10% and 100% of the labels, side by side
    common = ["configs/finetune/tiny.yaml", f"valid_shards=[{data / 'dev'}]", "model.masking.mask_prob=0.3",
              "model.masking.mask_length=10", "model.masking.channel_prob=0.05", "model.masking.channel_length=64",
              "data.normalize=true", "data.max_tokens=480000", "data.num_workers=3",
              f"trainer.max_updates={finetune_updates}", f"trainer.lr={args.finetune_lr}",
              "trainer.validate_every=250", "trainer.checkpoint_every=0", "trainer.log_every=50", *device]
    runs = {}
    for init, source in (("pretrained", str(pretrained)), ("random", str(random_init))):
        for labels, shards in (("10%", "train10"), ("100%", "train")):
            name = f"{init}_{shards}"
            extra = ["freeze_updates.feature_extractor=0"] if init == "random" else []
            runs[name] = (init, labels, [py, "-m", "finetune", "--config", common[0], f"pretrained={source}",
                                         f"data.shards=[{data / shards}]", f"trainer.output_dir={out / name}",
                                         *common[1:], *extra])
    names = list(runs)
    for first in range(0, len(names), args.parallel):
        group = names[first: first + args.parallel]
        start = time.perf_counter()
        procs = {n: subprocess.Popen(runs[n][2], stdout=(out / f"{n}.log").open("w"), stderr=subprocess.STDOUT)
                 for n in group}
        for n, p in procs.items():
            if p.wait() != 0:
                sys.exit(f"fine-tuning {n} failed; see {out / (n + '.log')}")
        times[f"finetune {', '.join(group)} (side by side)"] = time.perf_counter() - start

    # 4. dev scores of the best models
    results = []
    for name, (init, labels, _) in runs.items():
        scored = subprocess.run([py, "-m", "finetune", "evaluate", str(out / name / "best.pt"), str(data / "dev"),
                                 "--output", str(out / name / "dev")], capture_output=True, text=True, check=True)
        scores = json.loads(scored.stdout.strip().splitlines()[-1])
        best = json.loads((out / name / "best.json").read_text())
        results.append({"init": init, "labels": labels, "cer": scores["cer"], "wer": scores["wer"],
                        "utterances": scores["utterances"], "best_update": best["update"]})
    summary = {"labelled_10_percent": labelled10, "times_s": {k: round(v, 1) for k, v in times.items()},
               "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("| initialisation | labelled training utterances | dev CER | dev WER | best update |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['init']} | {r['labels']} | {r['cer']:.1%} | {r['wer']:.1%} | {r['best_update']} |")
    print(json.dumps(summary["times_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
