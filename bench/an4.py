"""Does pretraining pay on real speech, and how far do the shipped recipes go? AN4 end to end on one GPU.

    python bench/an4.py --an4 ../shared/data/an4 --output runs/an4 [--deadline-minutes 9.5]

1. Shards from AN4's ``train.tsv`` with 8 speakers held out as dev (and its two halves of 4
   speakers, for tuning the LM on one half and scoring the other), plus a seeded 10% of the
   labelled training utterances.
2. Pretraining with ``configs/pretrain/small_data.yaml`` on the training audio, without transcripts.
3. CTC fine-tuning from it with ``configs/finetune/small_data_ctc.yaml``, and from a random
   initialisation of the same architecture with ``configs/finetune/scratch_ctc.yaml`` (which starts
   at once, beside the pretraining), each with 10% of the labels (``--seeds`` seeds) and 100%, all
   with the same number of updates. One more pretrained run at 100% leaves speed perturbation out,
   to measure what it gives.
4. An n-gram LM (``python -m finetune build-lm``) of the training transcripts; per run, dev CER
   and WER of the best model by validation WER and of the average of the 5 best (greedy), and of
   the average with the LM: tuned on the whole dev set (``tune-lm``), and cross-tuned (tuned on one
   half of the dev speakers, scored on the other, both ways).
5. ``OUTPUT/results.md`` (the tables), ``OUTPUT/curves.png`` (dev CER per update of every run),
   ``OUTPUT/summary.json``.

Resumable: every stage that is done is skipped, and jobs resume from their checkpoints. With
``--deadline-minutes`` every job is told to stop (with a checkpoint) before that much time has
passed since the bench started, and the bench exits with status 3 when work is left: run the same
command again to go on. ``--quick`` shrinks everything to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
STARTED = time.monotonic()
MARGIN_MINUTES = 1.5  # a job's start-up, its last checkpoint and export


def run(args: list[str], log: Path) -> None:
    """Run a command to completion, its output to ``log``; stops the bench if it fails."""
    with log.open("w") as f:
        done = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, check=False, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"{' '.join(map(str, args[:5]))} ... failed ({done.returncode}); see {log}")


def subset(manifest: Path, output: Path, keep) -> int:
    """Write the rows of a TSV manifest that ``keep(index, row)`` accepts; returns how many."""
    with manifest.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    picked = [r for i, r in enumerate(rows) if keep(i, r)]
    with output.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(picked)
    return len(picked)


def make_data(an4: Path, data: Path) -> dict:
    """Shards of train, train10 (seeded 10%), dev and its halves dev_a, dev_b (by speaker)."""
    split = data / "split"
    info_path = data / "data.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    run([PY, "-m", "data_tools", "split", "--input", str(an4 / "train.tsv"), "--output", str(split),
         "--dev-speakers", "8"], data.parent / "split.log")
    with (split / "train.tsv").open() as f:
        total = sum(1 for _ in f) - 1
    picked = set(random.Random(0).sample(range(total), round(0.1 * total)))
    info = {"train": total, "train10": subset(split / "train.tsv", split / "train10.tsv", lambda i, r: i in picked)}
    with (split / "dev.tsv").open() as f:
        speakers = sorted({r["speaker"] for r in csv.DictReader(f, delimiter="\t")})
    half = set(speakers[::2])
    info["dev_a"] = subset(split / "dev.tsv", split / "dev_a.tsv", lambda i, r: r["speaker"] in half)
    info["dev_b"] = subset(split / "dev.tsv", split / "dev_b.tsv", lambda i, r: r["speaker"] not in half)
    info["dev_speakers"] = speakers
    for name in ("train", "train10", "dev", "dev_a", "dev_b"):
        run([PY, "-m", "data_tools", "make-shards", "--input", str(split / f"{name}.tsv"), "--output",
             str(data / name), "--max-count", "50", "--quiet"], data.parent / f"shards_{name}.log")
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return info


def minutes_left(deadline: float) -> float:
    return deadline - (time.monotonic() - STARTED) / 60 if deadline else float("inf")


def last_update(run_dir: Path) -> int:
    """The update of the run's newest complete checkpoint (0: none)."""
    pointer = run_dir / "checkpoints" / "LATEST"
    if not pointer.is_file():
        return 0
    return int(pointer.read_text().strip().split("_")[-1])


@dataclass
class Job:
    """A training run: its command (without the time limit), the updates it must reach, and the
    jobs it waits for."""

    name: str
    command: list[str]
    updates: int
    after: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    def done(self, out: Path) -> bool:
        return last_update(out / self.name) >= self.updates and (out / self.name / "model.pt").is_file()


def run_jobs(jobs: list[Job], out: Path, deadline: float, parallel: int) -> bool:
    """Start every job whose prerequisites are done, as many at a time as ``parallel`` allows, each
    told to stop before the deadline; True when all are done."""
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}
    while True:
        pending = [j for j in jobs if not j.done(out) and j.name not in running]
        ready = [j for j in pending if all(next(x for x in jobs if x.name == a).done(out) for a in j.after)]
        for job in ready[: max(0, parallel - len(running))]:
            left = minutes_left(deadline) - MARGIN_MINUTES
            if left < 0.5:
                break
            limit = [f"trainer.max_minutes={left:.2f}"] if deadline else []
            log = (out / f"{job.name}.log").open("a")
            running[job.name] = (subprocess.Popen([*job.command, *limit], stdout=log, stderr=subprocess.STDOUT,
                                                  cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}),
                                 time.monotonic())
            print(f"[{(time.monotonic() - STARTED) / 60:5.1f} min] started {job.name}", flush=True)
        if not running:
            return all(j.done(out) for j in jobs)
        time.sleep(2)
        for name, (proc, began) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            times[name] = round(times.get(name, 0.0) + time.monotonic() - began, 1)
            (out / "times.json").write_text(json.dumps(times, indent=1) + "\n")
            if proc.returncode != 0:
                sys.exit(f"{name} failed ({proc.returncode}); see {out / (name + '.log')}")
            print(f"[{(time.monotonic() - STARTED) / 60:5.1f} min] {name} stopped at update "
                  f"{last_update(out / name)}", flush=True)


def plan_jobs(args: argparse.Namespace, out: Path, data: Path) -> list[Job]:
    quick = args.quick
    device = (["trainer.device=cpu", "trainer.deepspeed=configs/deepspeed/zero0_fp32.json"] if quick else [])
    model = "configs/model/tiny_conformer_fbank.yaml" if quick else args.model
    pre_updates, ft_updates = (6, 8) if quick else (args.pretrain_updates, args.finetune_updates)
    every = 4 if quick else 250
    jobs = [Job("pretrain", [PY, "-m", "pretrain", "--config", "configs/pretrain/small_data.yaml", f"model={model}",
                             f"data.shards=[{data / 'train'}]", f"valid_shards=[{data / 'dev'}]",
                             f"trainer.output_dir={out / 'pretrain'}", f"trainer.max_updates={pre_updates}",
                             f"trainer.seed={args.pretrain_seed}", f"data.seed={args.pretrain_seed}",
                             f"trainer.validate_every={every * 2}", f"trainer.checkpoint_every={every * 2}",
                             "trainer.threads=1", *device], pre_updates)]
    recipes = {"pretrained": ("configs/finetune/small_data_ctc.yaml", f"pretrained={out / 'pretrain'}", ["pretrain"]),
               "random": ("configs/finetune/scratch_ctc.yaml", f"pretrained=scratch:{model}", [])}
    variants = [(init, labels, seed, True) for init in ("pretrained", "random") for labels in ("10%", "100%")
                for seed in range(1, (args.seeds if labels == "10%" else 1) + 1)]
    variants.append(("pretrained", "100%", 1, False))  # the same without speed perturbation
    for init, labels, seed, speed in variants:
        config, source, after = recipes[init]
        shards = "train10" if labels == "10%" else "train"
        name = f"{init}_{shards}_seed{seed}" + ("" if speed else "_nospeed")
        overrides = [f"data.shards=[{data / shards}]", f"valid_shards=[{data / 'dev'}]",
                     f"trainer.output_dir={out / name}", f"trainer.seed={seed}", f"data.seed={seed}",
                     f"trainer.max_updates={ft_updates}", f"trainer.validate_every={every}",
                     f"trainer.checkpoint_every={every * 2}", "trainer.threads=1",
                     f"data.num_workers={1 if shards == 'train10' else 2}", *device]
        if not speed:
            overrides.append("data.augment.speed=[]")
        if quick:
            overrides += ["freeze_updates.frontend=2", "freeze_updates.context=2"] if init == "pretrained" else []
        jobs.append(Job(name, [PY, "-m", "finetune", "--config", config, source, *overrides], ft_updates, after,
                        {"init": init, "labels": labels, "seed": seed, "speed_perturbation": speed}))
    return jobs


def cli(args: list[str], log: Path) -> dict:
    """``python -m finetune ARGS``: the JSON of its last line."""
    with log.open("a") as f:
        done = subprocess.run([PY, "-m", "finetune", *args], stdout=subprocess.PIPE, stderr=f, text=True,
                              check=False, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"python -m finetune {' '.join(args[:3])} ... failed; see {log}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def score_run(run_dir: Path, data: Path, lm: Path, device: str) -> dict:
    """Greedy dev scores of best.pt and averaged.pt; the averaged model with the LM tuned on dev,
    and cross-tuned on the dev halves. Cached in RUN/scores.json."""
    cached = run_dir / "scores.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    log = run_dir / "scoring.log"
    dev = str(data / "dev")
    common = ["--device", device]
    scores = {"best": cli(["evaluate", str(run_dir / "best.pt"), dev, *common], log)}
    model = run_dir / "averaged.pt"
    scores["averaged"] = cli(["evaluate", str(model), dev, *common, "--output", str(run_dir / "dev_greedy")], log)
    tuned_lm = run_dir / "lm"
    shutil.copytree(lm, tuned_lm, dirs_exist_ok=True)
    scores["lm_tuning"] = cli(["tune-lm", str(model), dev, "--lm", str(tuned_lm), *common], log)
    scores["lm"] = cli(["evaluate", str(model), dev, "--lm", str(tuned_lm), *common, "--output",
                        str(run_dir / "dev_lm")], log)
    errors = {"char_errors": 0, "chars": 0, "word_errors": 0, "words": 0}
    for tune_on, score_on in (("dev_a", "dev_b"), ("dev_b", "dev_a")):
        fold = run_dir / f"lm_{tune_on}"
        shutil.copytree(lm, fold, dirs_exist_ok=True)
        cli(["tune-lm", str(model), str(data / tune_on), "--lm", str(fold), *common], log)
        result = cli(["evaluate", str(model), str(data / score_on), "--lm", str(fold), *common], log)
        for key in errors:
            errors[key] += result[key]
    scores["lm_cross"] = {"cer": errors["char_errors"] / errors["chars"],
                          "wer": errors["word_errors"] / errors["words"], **errors}
    cached.write_text(json.dumps(scores, indent=1) + "\n")
    return scores


def curves(jobs: list[Job], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, labels in zip(axes, ("10%", "100%"), strict=True):
        for job in jobs:
            if job.facts.get("labels") != labels:
                continue
            valid = [json.loads(line) for line in (out / job.name / "metrics.jsonl").read_text().splitlines()]
            valid = [r for r in valid if r["split"] == "valid"]
            style = "-" if job.facts["init"] == "pretrained" else "--"
            ax.plot([r["update"] for r in valid], [r["cer"] for r in valid], style, label=job.name)
        ax.set(title=f"{labels} of the labels", xlabel="update", ylabel="dev CER (greedy)", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


def flat(curve: list[float], window: int = 4, tolerance: float = 0.03) -> bool:
    """Whether a dev CER curve has stopped falling: the best of its last ``window`` validations is
    within ``tolerance`` (relative) of the best of the ``window`` before. With validations every
    250 updates, the last 1,000 updates gained less than 3% of the CER."""
    if len(curve) < 2 * window:
        return False
    return min(curve[-window:]) >= (1 - tolerance) * min(curve[-2 * window: -window])


def report(jobs: list[Job], out: Path, info: dict, scores: dict[str, dict]) -> str:
    times = json.loads((out / "times.json").read_text())
    pre = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in pre if r["split"] == "valid"]
    lines = [f"Data: {info['train']} training utterances ({info['train10']} in the 10% subset), dev "
             f"{info['dev_a'] + info['dev_b']} utterances of 8 held-out speakers (halves of {info['dev_a']} and "
             f"{info['dev_b']}).",
             f"Pretraining: {pre[-1]['update']} updates in {times.get('pretrain', 0) / 60:.1f} min; last validation: "
             f"accuracy {valid[-1]['accuracy']:.3f}, code perplexity {valid[-1]['code_perplexity']:.0f}." if valid
             else "", "",
             "| run | updates | best update | dev CER best.pt | dev CER averaged | + LM (tuned on dev) | + LM "
             "(cross-tuned) | dev WER averaged | + LM (cross-tuned) | last 3 validations (CER) | flat | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for job in jobs[1:]:
        s = scores[job.name]
        metrics = [json.loads(line) for line in (out / job.name / "metrics.jsonl").read_text().splitlines()]
        curve = [r["cer"] for r in metrics if r["split"] == "valid"]
        last = curve[-3:]
        best = json.loads((out / job.name / "best.json").read_text())
        lines.append(f"| {job.name} | {job.updates} | {best['update']} | {s['best']['cer']:.1%} | "
                     f"{s['averaged']['cer']:.1%} | {s['lm']['cer']:.1%} | {s['lm_cross']['cer']:.1%} | "
                     f"{s['averaged']['wer']:.1%} | {s['lm_cross']['wer']:.1%} | "
                     f"{' / '.join(f'{c:.1%}' for c in last)} | {'yes' if flat(curve) else 'no'} | "
                     f"{times.get(job.name, 0) / 60:.1f} |")
    lines += ["", "| initialisation | labels | runs | dev CER best.pt, mean (min-max) | averaged | averaged + LM "
                  "(cross-tuned) |", "|---|---|---|---|---|---|"]
    for init in ("pretrained", "random"):
        for labels in ("10%", "100%"):
            group = [scores[j.name] for j in jobs[1:] if j.facts["init"] == init and j.facts["labels"] == labels
                     and j.facts["speed_perturbation"]]
            cells = []
            for pick in (lambda s: s["best"]["cer"], lambda s: s["averaged"]["cer"], lambda s: s["lm_cross"]["cer"]):
                values = [pick(s) for s in group]
                cells.append(f"{statistics.mean(values):.1%} ({min(values):.1%}-{max(values):.1%})")
            lines.append(f"| {init} | {labels} | {len(group)} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--an4", default="../shared/data/an4", help="folder with train.tsv and audio/")
    parser.add_argument("--output", default="runs/an4")
    parser.add_argument("--model", default="configs/model/small_conformer_fbank.yaml",
                        help="the model of every run (the small-data recipes' own)")
    parser.add_argument("--pretrain-updates", type=int, default=4000)
    parser.add_argument("--finetune-updates", type=int, default=4000)
    parser.add_argument("--pretrain-seed", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds of each initialisation at 10%%")
    parser.add_argument("--parallel", type=int, default=16, help="training jobs at a time")
    parser.add_argument("--deadline-minutes", type=float, default=0.0,
                        help="stop every job (with a checkpoint) before this much time has passed; 0: no limit")
    parser.add_argument("--quick", action="store_true", help="a few updates of a tiny model (CPU check)")
    args = parser.parse_args()
    an4 = Path(args.an4).resolve()
    if not (an4 / "train.tsv").is_file():
        sys.exit(f"{an4}/train.tsv not found: pass --an4 (the AN4 folder with train.tsv and audio/)")
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("deadline_minutes", "parallel")}
    saved = out / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        sys.exit(f"{out} holds a run with other settings ({saved}); choose another --output")
    saved.write_text(json.dumps(settings, indent=1) + "\n")
    data = out / "data"
    data.mkdir(exist_ok=True)
    info = make_data(an4, data)
    jobs = plan_jobs(args, out, data)
    if not run_jobs(jobs, out, args.deadline_minutes, args.parallel):
        print("deadline reached: run the same command again to go on", flush=True)
        return 3
    lm = out / "lm"
    if not (lm / "lm.json").is_file():
        cli(["build-lm", str(data / "train"), "--output", str(lm), "--order", "4"], out / "lm.log")
    device = "cpu" if args.quick else "auto"
    pending = {j.name: subprocess.Popen([PY, __file__, "--score", str(out / j.name), str(data), str(lm), device],
                                        cwd=REPO) for j in jobs[1:] if not (out / j.name / "scores.json").is_file()}
    for name, proc in pending.items():
        if proc.wait() != 0:
            sys.exit(f"scoring {name} failed; see {out / name / 'scoring.log'}")
    scores = {j.name: json.loads((out / j.name / "scores.json").read_text()) for j in jobs[1:]}
    curves(jobs, out)
    table = report(jobs, out, info, scores)
    (out / "results.md").write_text(table)
    (out / "summary.json").write_text(json.dumps({"data": info, "times_s": json.loads(
        (out / "times.json").read_text()), "scores": scores}, indent=1) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--score":  # one run's scoring, in its own process
        score_run(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
        sys.exit(0)
    sys.exit(main())
