"""Does pretraining pay on real speech? AN4 end to end on one GPU.

    python bench/an4.py --an4 ../shared/data/an4 --output runs/an4

1. Shards from AN4's ``train.tsv`` with 8 speakers held out as dev, plus a 10% subset of the
   labelled training utterances (seeded).
2. Pretraining of a small Conformer (``configs/model/small_conformer_stable.yaml``, with the
   optimizer of ``configs/pretrain/base_one_gpu.yaml``, ZeRO stage 0 with bf16 autocast) on the
   training audio, without transcripts, for a fixed time (``--pretrain-minutes``).
3. CTC fine-tuning from it with 10% and with 100% of the labelled training utterances, and from a
   random initialisation of the same architecture with 10% and 100% and the same number of
   updates. Each initialisation gets the recipe that suits it: the pretrained model keeps its
   feature extractor frozen and trains only the CTC head for the first ``--head-updates`` (as
   fairseq's ``freeze_finetune_updates``); the random one trains everything from the start, at the
   lower LR that served it better (bench/RESULTS.md, "AN4"). The 10% runs are repeated with
   ``--seeds`` training seeds (head initialisation, masks, dropout, data order), since one run of
   each is too noisy to tell the two apart.
4. Dev CER and WER of each best model by validation WER (``python -m finetune evaluate``) and the
   last validation of each run, as a JSON summary and Markdown tables (each run; mean and range
   per initialisation and label fraction).

The fine-tuning runs share the GPU (all at once unless ``--parallel``). ``--quick`` shrinks
everything to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run(args: list[str], log: Path) -> float:
    """Run a command, its output to ``log``; the seconds it took. Stops the bench if it fails."""
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:4])} ... failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
    parser.add_argument("--pretrain-minutes", type=float, default=3.5, help="pretraining time (training only)")
    parser.add_argument("--pretrain-updates", type=int, default=4000, help="length of the LR schedule")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--pretrain-seed", type=int, default=1,
                        help="pretraining seed (model, masks, data order), also of the random initialisation")
    parser.add_argument("--finetune-updates", type=int, default=1200)
    parser.add_argument("--head-updates", type=int, default=400, help="pretrained: updates that train only the head")
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="peak LR from the pretrained model")
    parser.add_argument("--random-lr", type=float, default=5e-4, help="peak LR from random initialisation")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning runs (seeds) of each initialisation at 10%%")
    parser.add_argument("--parallel", type=int, default=0, help="fine-tuning runs at a time (0: all)")
    parser.add_argument("--workers", type=int, default=2,
                        help="loader workers of the pretraining run (each packs batches from its own shards: more "
                             "of them crop more audio away on a corpus this small)")
    parser.add_argument("--quick", action="store_true", help="a few updates of a tiny model (CPU check)")
    parser.add_argument("--overwrite", action="store_true", help="delete --output first if it holds an earlier run")
    args = parser.parse_args()
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:  # the jobs would resume the earlier run's checkpoints instead of starting afresh
            sys.exit(f"{out} holds an earlier run; pass --overwrite to delete it, or choose another --output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    times: dict[str, float] = {}
    model = "configs/model/tiny_conformer.yaml" if args.quick else "configs/model/small_conformer_stable.yaml"
    pretrain_updates, finetune_updates = (4, 4) if args.quick else (args.pretrain_updates, args.finetune_updates)
    head_updates = 2 if args.quick else args.head_updates
    minutes = 0 if args.quick else args.pretrain_minutes
    # One GPU: ZeRO stage 0 with bf16 autocast over fp32 weights. DeepSpeed's bf16 paths check every
    # gradient tensor on the host at each update, which made these short steps twice as long.
    device = (["trainer.device=cpu", "trainer.deepspeed=configs/deepspeed/zero0_fp32.json"] if args.quick
              else ["trainer.deepspeed=configs/deepspeed/zero0_autocast_bf16.json"])

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
                             f"data.shards=[{data / 'train'}]", f"valid_shards=[{data / 'dev'}]",
                             "data.min_sample_size=8000", "data.max_tokens=1400000", f"data.num_workers={args.workers}",
                             f"trainer.seed={args.pretrain_seed}", f"data.seed={args.pretrain_seed}",
                             f"trainer.output_dir={pretrained}", f"trainer.max_updates={pretrain_updates}",
                             f"trainer.max_minutes={minutes}", f"trainer.lr={args.pretrain_lr}",
                             "trainer.warmup_updates=300", "trainer.validate_every=500", "trainer.checkpoint_every=0",
                             "trainer.log_every=50", *device], out / "pretrain.log")
    random_init = out / "random_init.pt"
    subprocess.run([py, "-c", "import sys, torch; from speechssl import Wav2Vec2Model, load_model_config; "
                    "torch.manual_seed(int(sys.argv[3])); "
                    "Wav2Vec2Model(load_model_config(sys.argv[1])).save(sys.argv[2])",
                    model, str(random_init), str(args.pretrain_seed)], check=True)

    # 3. fine-tuning: pretrained and random, 10% and 100% of the labels, side by side
    common = ["configs/finetune/tiny.yaml", f"valid_shards=[{data / 'dev'}]", "model.masking.mask_prob=0.3",
              "model.masking.mask_length=10", "model.masking.channel_prob=0.05", "model.masking.channel_length=64",
              "data.normalize=true", "data.max_tokens=480000",
              f"trainer.max_updates={finetune_updates}", "trainer.validate_every=250", "trainer.checkpoint_every=0",
              "trainer.log_every=50", *device]
    recipe = {"pretrained": [f"trainer.lr={args.finetune_lr}", f"freeze_updates.frontend={head_updates}",
                             f"freeze_updates.context={head_updates}"],
              "random": [f"trainer.lr={args.random_lr}", "freeze_updates.feature_extractor=0"]}
    runs = {}
    for init, source in (("pretrained", str(pretrained)), ("random", str(random_init))):
        for labels, shards, seeds in (("10%", "train10", args.seeds), ("100%", "train", 1)):
            for seed in range(1, seeds + 1):
                name = f"{init}_{shards}" + (f"_seed{seed}" if seeds > 1 else "")
                workers = 1 if shards == "train10" else 3  # 84 short utterances need no more
                runs[name] = (init, labels, seed, [
                    py, "-m", "finetune", "--config", common[0], f"pretrained={source}",
                    f"data.shards=[{data / shards}]", f"trainer.output_dir={out / name}", f"trainer.seed={seed}",
                    f"data.num_workers={workers}",
                    *common[1:], *recipe[init]])
    names = list(runs)
    parallel = args.parallel or len(names)
    for first in range(0, len(names), parallel):
        group = names[first: first + parallel]
        start = time.perf_counter()
        procs = {n: subprocess.Popen(runs[n][3], stdout=(out / f"{n}.log").open("w"), stderr=subprocess.STDOUT)
                 for n in group}
        for n, p in procs.items():
            if p.wait() != 0:
                sys.exit(f"fine-tuning {n} failed; see {out / (n + '.log')}")
        times[f"finetune {len(group)} runs side by side"] = time.perf_counter() - start

    # 4. dev scores of the best models (by validation WER), and the last validation of each run
    start = time.perf_counter()
    evaluations = {name: subprocess.Popen([py, "-m", "finetune", "evaluate", str(out / name / "best.pt"),
                                           str(data / "dev"), "--output", str(out / name / "dev")],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                   for name in runs}  # side by side too
    results = []
    for name, (init, labels, seed, _) in runs.items():
        stdout, _ = evaluations[name].communicate()
        if evaluations[name].returncode != 0:
            sys.exit(f"python -m finetune evaluate {out / name / 'best.pt'} failed")
        scores = json.loads(stdout.strip().splitlines()[-1])
        best = json.loads((out / name / "best.json").read_text())
        last = [r for r in _metrics(out / name) if r["split"] == "valid"][-1]
        results.append({"run": name, "init": init, "labels": labels, "seed": seed, "cer": scores["cer"],
                        "wer": scores["wer"], "utterances": scores["utterances"], "best_update": best["update"],
                        "last_update": last["update"], "last_cer": last["cer"], "last_wer": last["wer"]})
    times["evaluate"] = time.perf_counter() - start
    logged = _metrics(pretrained)
    valid = [r for r in logged if r["split"] == "valid"]
    summary = {"labelled_10_percent": labelled10, "times_s": {k: round(v, 1) for k, v in times.items()},
               "pretraining": {"updates": logged[-1]["update"],
                               **{k: valid[-1][k] for k in ("accuracy", "contrastive", "code_perplexity") if valid}},
               "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("| run | dev CER | dev WER | best update | last validation CER / WER |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['cer']:.1%} | {r['wer']:.1%} | {r['best_update']} | "
              f"{r['last_cer']:.1%} / {r['last_wer']:.1%} |")
    print("\n| initialisation | labels | runs | dev CER, mean (min-max) | dev WER, mean (min-max) |")
    print("|---|---|---|---|---|")
    for init in ("pretrained", "random"):
        for labels in ("10%", "100%"):
            group = [r for r in results if r["init"] == init and r["labels"] == labels]
            cells = [f"{statistics.mean(r[k] for r in group):.1%} ({min(r[k] for r in group):.1%}-"
                     f"{max(r[k] for r in group):.1%})" for k in ("cer", "wer")]
            print(f"| {init} | {labels} | {len(group)} | {cells[0]} | {cells[1]} |")
    print(json.dumps({"pretraining": summary["pretraining"], "times_s": summary["times_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
