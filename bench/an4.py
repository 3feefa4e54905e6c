"""Does pretraining pay on real speech, and how far do the shipped recipes go? AN4 end to end on one GPU.

    python bench/an4.py --an4 ../shared/data/an4 --output runs/an4 [--deadline-minutes 9.5]

1. Shards from AN4's ``train.tsv`` with 8 speakers held out as dev (and its two halves of 4
   speakers, for tuning the LM on one half and scoring the other), plus a seeded 10% of the
   labelled training utterances.
2. Pretraining with ``configs/pretrain/small_data.yaml`` on the training audio, without transcripts.
3. CTC fine-tuning from it with ``configs/finetune/small_data_ctc.yaml``, and from a random
   initialisation of the same architecture with ``configs/finetune/scratch_ctc.yaml`` (which starts
   at once, beside the pretraining), each with 10% of the labels (``--seeds`` seeds) and 100%; the
   runs of one label fraction have the same number of updates. ``--variant`` adds runs with
   changed settings to measure one change at a time (by default: the pretrained run at 100% without
   speed perturbation).
   ``--self-train NAME DECODER KEEP`` adds self-training at 10%: each pretrained 10% run's
   averaged model (the teacher) labels the other 90% of the training audio (``speechssl
   pseudo-label``, greedy or with an LM of the 10% subset's transcripts only, ``lm10``, its
   weights tuned on dev; the ``KEEP`` fraction most confident kept), and a student is fine-tuned
   from the pretrained model on the 10% and those pseudo-labels, with the updates of the 100% runs.
4. The emissions of each run's best model by validation WER (``best.pt``) and of the average of its
   5 best (``averaged.pt``) on the dev halves (``python -m finetune emissions``).
5. Scoring from the emissions alone (no model, no GPU): an n-gram LM (``python -m finetune
   build-lm``) of the training transcripts; per run, dev CER and WER of both models greedy, and
   of the average with the LM, its weights (LM weight, word score, blank penalty) tuned on the
   whole dev set, and cross-tuned (tuned on one half of the dev speakers, scored on the other, both
   ways), also without the blank penalty.
6. ``OUTPUT/results.md`` (the tables), ``OUTPUT/curves.png`` (dev CER per update of every run),
   ``OUTPUT/summary.json``.

``--stage train`` stops after step 4 and ``--stage score`` does steps 5 and 6 only, so the GPU
trains and the scoring runs on any machine that has the run folders' emissions and logs.
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


def split_data(an4: Path, data: Path) -> dict:
    """Manifests of train, train10 (seeded 10%), dev and its halves dev_a, dev_b (by speaker)."""
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
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return info


def train90(data: Path, info: dict) -> None:
    """``split/train90.tsv``: the training utterances outside the 10% subset, the audio that
    self-training labels (its count in ``info``)."""
    with (data / "split" / "train10.tsv").open() as f:
        labelled = {r["path"] for r in csv.DictReader(f, delimiter="\t")}
    info["train90"] = subset(data / "split" / "train.tsv", data / "split" / "train90.tsv",
                             lambda i, r: r["path"] not in labelled)


def make_shards(data: Path) -> None:
    """Shards of every manifest of :func:`split_data`, built side by side."""
    names = [n for n in ("train", "train10", "dev", "dev_a", "dev_b") if not (data / n / "index.json").is_file()]
    procs = {n: subprocess.Popen([PY, "-m", "data_tools", "make-shards", "--input", str(data / "split" / f"{n}.tsv"),
                                  "--output", str(data / n), "--max-count", "50", "--quiet"], cwd=REPO,
                                 stdout=(data.parent / f"shards_{n}.log").open("w"), stderr=subprocess.STDOUT)
             for n in names}
    for name, proc in procs.items():
        if proc.wait() != 0:
            sys.exit(f"make-shards of {name} failed; see {data.parent / f'shards_{name}.log'}")


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
    output: Path | None = None  # a job that is not a training run: done when this file exists

    def done(self, out: Path) -> bool:
        if self.output is not None:
            return self.output.is_file()
        return last_update(out / self.name) >= self.updates and (out / self.name / "model.pt").is_file()

    @property
    def trains(self) -> bool:
        """A fine-tuning run (scored from its emissions)."""
        return "labels" in self.facts


def trained(jobs: list[Job]) -> list[Job]:
    """The fine-tuning runs among the jobs (not the pretraining, nor pseudo-labelling)."""
    return [j for j in jobs if j.trains]


def has_emissions(run_dir: Path) -> bool:
    return all(emissions_path(run_dir, m, h).is_file() for m, h in EMISSIONS)


def run_jobs(jobs: list[Job], out: Path, data: Path, deadline: float, parallel: int, device: str) -> bool:
    """Start every job whose prerequisites are done, as many at a time as ``parallel`` allows, each
    told to stop before the deadline; each fine-tuning run's emissions as soon as it is done. True
    when every job is done and has its emissions."""
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    scoring: dict[str, subprocess.Popen] = {}
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while True:
        pending = [j for j in jobs if not j.done(out) and j.name not in running]
        # a prerequisite is ready once its process has exited, not when its model file appears
        ready = [j for j in pending
                 if all(a not in running and next(x for x in jobs if x.name == a).done(out) for a in j.after)]
        for job in ready[: max(0, parallel - len(running))]:
            left = minutes_left(deadline) - MARGIN_MINUTES
            if left < 0.5:
                break
            limit = [f"trainer.max_minutes={left:.2f}"] if deadline and job.output is None else []
            log = (out / f"{job.name}.log").open("a")
            running[job.name] = (subprocess.Popen([*job.command, *limit], stdout=log, stderr=subprocess.STDOUT,
                                                  cwd=REPO, env=env), time.monotonic())
            print(f"[{(time.monotonic() - STARTED) / 60:5.1f} min] started {job.name}", flush=True)
        for job in trained(jobs):
            if job.name not in scoring and job.done(out) and not has_emissions(out / job.name) \
                    and minutes_left(deadline) > 1.0:
                scoring[job.name] = subprocess.Popen([PY, __file__, "--emissions", str(out / job.name), str(data),
                                                      device], cwd=REPO, env=env,
                                                     stdout=(out / job.name / "emissions.log").open("w"),
                                                     stderr=subprocess.STDOUT)
        for name, proc in list(scoring.items()):
            if proc.poll() is not None and proc.returncode != 0:
                sys.exit(f"emissions of {name} failed; see {out / name / 'emissions.log'}")
        if not running and all(proc.poll() is not None for proc in scoring.values()):
            return all(j.done(out) for j in jobs) and all(has_emissions(out / j.name) for j in jobs if j.trains)
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


@dataclass
class Variant:
    """Runs with changed settings beside the recipes': ``NAME INIT LABELS SEEDS [OVERRIDE ...]``,
    e.g. ``nospeed pretrained 100% 1 data.augment.speed=[]``."""

    name: str
    init: str
    labels: str
    seeds: int
    overrides: list[str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        parts = text.split()
        if len(parts) < 4 or parts[1] not in ("pretrained", "random") or parts[2] not in ("10%", "100%") \
                or not parts[3].isdigit():
            raise argparse.ArgumentTypeError(f"--variant {text!r}: want 'NAME pretrained|random 10%|100% SEEDS "
                                             "[dotted.key=value ...]'")
        return cls(parts[0], parts[1], parts[2], int(parts[3]), parts[4:])


@dataclass
class SelfTrain:
    """Self-training at 10%: ``NAME greedy|lm10 KEEP``, e.g. ``pl greedy 1.0`` (see the module's
    step 3)."""

    name: str
    decoder: str
    keep: float

    @classmethod
    def parse(cls, text: str) -> SelfTrain:
        parts = text.split()
        try:
            parsed = cls(parts[0], parts[1], float(parts[2]))
            if len(parts) != 3 or parsed.decoder not in ("greedy", "lm10") or not 0 < parsed.keep <= 1:
                raise ValueError
        except (IndexError, ValueError):
            raise argparse.ArgumentTypeError(f"--self-train {text!r}: want 'NAME greedy|lm10 KEEP' with KEEP in "
                                             "(0, 1]") from None
        return parsed


def pseudo_label(teacher: Path, data: Path, output: Path, decoder: str, keep: float, device: str) -> None:
    """The teacher's averaged model labels ``train90`` (greedy, or with the LM of the 10% subset's
    transcripts tuned on dev); the manifest, its quality against the true transcripts
    (``quality.json``) and its shards in ``output``, ``index.json`` last."""
    from finetune.transcribe import score
    from speechssl.asr.tokenizer import tokenizer_from_dict
    from speechssl.data.manifest import read_source
    from speechssl.models.ctc import load_ctc_model

    output.mkdir(parents=True, exist_ok=True)
    model = teacher / "averaged.pt"
    options = ["--device", device, "--keep-fraction", str(keep)]
    if decoder == "lm10":
        lm = output / "lm10"
        cli(["build-lm", str(data / "split" / "train10.tsv"), "--output", str(lm), "--order", "4"], output / "lm.log")
        cli(["tune-lm", str(model), str(data / "dev"), "--lm", str(lm), "--device", device, "--blank-penalties",
             "0,1,2"], output / "lm.log")
        options += ["--decoder", "beam", "--lm", str(lm)]
    manifest = output / "pseudo.tsv"
    run([PY, "-m", "speechssl_cli", "pseudo-label", str(model), str(data / "split" / "train90.tsv"), "--output",
         str(manifest), *options], output / "pseudo_label.log")
    tokenizer = tokenizer_from_dict(load_ctc_model(model).tokenizer)
    truth = {e.id: e.text for e in read_source(data / "split" / "train90.tsv")[0]}
    with manifest.open() as f:
        kept = {r["id"]: r["text"] for r in csv.DictReader(f, delimiter="\t")}
    scores, _ = score(tokenizer, [(i, truth[i], text) for i, text in kept.items()])
    quality = {"kept": len(kept), "of": len(truth), **scores}
    (output / "quality.json").write_text(json.dumps(quality, indent=1) + "\n")
    run([PY, "-m", "data_tools", "make-shards", "--input", str(manifest), "--output", str(output / "shards"),
         "--max-count", "50", "--quiet", "--overwrite"], output / "shards.log")
    (output / "done.json").write_text(json.dumps(quality) + "\n")


def _temp_decay(model: str, updates: int) -> float:
    """The Gumbel temperature decay that anneals within the pretraining (fairseq's 69% point)."""
    from pretrain.task import matched_temp_decay
    from speechssl import load_model_config

    quantizer = load_model_config(Path(model)).quantizer
    return matched_temp_decay(quantizer.temp_start, quantizer.temp_end, updates)


def plan_jobs(args: argparse.Namespace, out: Path, data: Path) -> list[Job]:
    quick = args.quick
    device = (["trainer.device=cpu", "trainer.deepspeed=configs/deepspeed/zero0_fp32.json"] if quick else [])
    model = "configs/model/tiny_conformer_fbank.yaml" if quick else args.model
    pre_updates = 6 if quick else args.pretrain_updates
    updates = {"100%": 8 if quick else args.finetune_updates,
               "10%": 8 if quick else (args.finetune_updates_10 or args.finetune_updates)}
    every = 4 if quick else 250
    jobs = [Job("pretrain", [PY, "-m", "pretrain", "--config", "configs/pretrain/small_data.yaml", f"model={model}",
                             f"data.shards=[{data / 'train'}]", f"valid_shards=[{data / 'dev'}]",
                             f"trainer.output_dir={out / 'pretrain'}", f"trainer.max_updates={pre_updates}",
                             f"trainer.seed={args.pretrain_seed}", f"data.seed={args.pretrain_seed}",
                             f"trainer.validate_every={every * 2}", f"trainer.checkpoint_every={every * 2}",
                             "trainer.threads=1", f"model.quantizer.temp_decay={_temp_decay(model, pre_updates):.6g}",
                             *device, *args.pretrain_override], pre_updates)]
    recipes = {"pretrained": ("configs/finetune/small_data_ctc.yaml", f"pretrained={out / 'pretrain'}", ["pretrain"]),
               "random": ("configs/finetune/scratch_ctc.yaml", f"pretrained=scratch:{model}", [])}
    def finetuning(name: str, init: str, shards: list[Path], seed: int, labels: str, max_updates: int, workers: int,
                   overrides: list[str], after: list[str], facts: dict) -> Job:
        config, source, _ = recipes[init]
        command = [f"data.shards=[{','.join(map(str, shards))}]", f"valid_shards=[{data / 'dev'}]",
                   f"trainer.output_dir={out / name}", f"trainer.seed={seed}", f"data.seed={seed}",
                   f"trainer.max_updates={max_updates}", f"trainer.validate_every={every}",
                   f"trainer.checkpoint_every={every * 2}", "trainer.threads=1", f"data.num_workers={workers}",
                   *device, *overrides]
        if quick and init == "pretrained":
            command += ["freeze_updates.frontend=2", "freeze_updates.context=2"]
        return Job(name, [PY, "-m", "finetune", "--config", config, source, *command], max_updates, after,
                   {"init": init, "labels": labels, "seed": seed, **facts})

    runs = [Variant("", init, labels, args.seeds if labels == "10%" else 1, [])
            for init in args.inits for labels in ("10%", "100%")] + [v for v in args.variant if v.init in args.inits]
    for variant in runs:
        shards = "train10" if variant.labels == "10%" else "train"
        for seed in range(1, variant.seeds + 1):
            name = f"{variant.init}_{shards}_seed{seed}" + (f"_{variant.name}" if variant.name else "")
            jobs.append(finetuning(name, variant.init, [data / shards], seed, variant.labels,
                                   updates[variant.labels], 1 if shards == "train10" else 2, variant.overrides,
                                   recipes[variant.init][2],
                                   {"variant": variant.name, "overrides": variant.overrides}))
    for st in args.self_train if "pretrained" in args.inits else []:
        for seed in range(1, args.seeds + 1):
            teacher, labels = f"pretrained_train10_seed{seed}", out / f"pseudo_{st.name}_seed{seed}"
            jobs.append(Job(labels.name, [PY, __file__, "--pseudo-label", str(out / teacher), str(data), str(labels),
                                          st.decoder, str(st.keep), "cpu" if quick else "auto"], 0, [teacher],
                            output=labels / "done.json"))
            jobs.append(finetuning(f"student_{st.name}_seed{seed}", "pretrained", [data / "train10", labels / "shards"],
                                   seed, "10%", updates["100%"], 2, [], ["pretrain", labels.name],
                                   {"variant": f"self-train {st.name}",
                                    "overrides": [f"teacher: {teacher}, pseudo-labels {st.decoder}, "
                                                  f"keep {st.keep:g}"]}))
    return jobs


EMISSIONS = [(model, half) for model in ("best", "averaged") for half in ("dev_a", "dev_b")]


def emissions_path(run_dir: Path, model: str, half: str) -> Path:
    return run_dir / "emissions" / f"{model}_{half}.pt"


def save_emissions(run_dir: Path, data: Path, device: str) -> None:
    """The dev halves' emissions of the run's best.pt and averaged.pt (one process per run)."""
    from collections import Counter

    from finetune.transcribe import load_model
    from speechssl.asr.emissions import Emissions
    from speechssl.asr.inference import emissions
    from speechssl.data.inputs import read_utterances

    for model_name in ("best", "averaged"):
        model, chosen = load_model(str(run_dir / f"{model_name}.pt"), device)
        for half in ("dev_a", "dev_b"):
            skipped: Counter = Counter()
            saved = Emissions(model.tokenizer, model.blank, model=str(run_dir / f"{model_name}.pt"))
            for batch, log_probs, frames in emissions(model, read_utterances([str(data / half)], skipped), chosen):
                saved.add(batch, log_probs, frames)
            saved.skipped = dict(skipped)
            path = emissions_path(run_dir, model_name, half)
            path.parent.mkdir(exist_ok=True)
            saved.save(path.with_suffix(".partial"))
            path.with_suffix(".partial").replace(path)


def cli(args: list[str], log: Path) -> dict:
    """``python -m finetune ARGS``: the JSON of its last line."""
    with log.open("a") as f:
        done = subprocess.run([PY, "-m", "finetune", *args], stdout=subprocess.PIPE, stderr=f, text=True,
                              check=False, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"python -m finetune {' '.join(args[:3])} ... failed; see {log}")
    return json.loads(done.stdout.strip().splitlines()[-1])


BLANK_PENALTIES = "0,1,2,3,4"
QUICK_GRID = ["--lm-weights", "0,1", "--word-scores", "0", "--beam", "5"]  # --quick: a check of the script


def score_run(run_dir: Path, lm: Path, quick: bool) -> dict:
    """From the run's emissions: greedy dev scores of best.pt and averaged.pt; the averaged model
    with the LM tuned on dev, and cross-tuned on the dev halves, with and without the blank penalty
    in the grid. Cached in RUN/scores.json."""
    cached = run_dir / "scores.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    log = run_dir / "scoring.log"
    grid = QUICK_GRID if quick else []

    def files(model: str, *halves: str) -> list[str]:
        return [str(emissions_path(run_dir, model, h)) for h in (halves or ("dev_a", "dev_b"))]

    scores = {"best": cli(["evaluate", "--emissions", *files("best")], log),
              "averaged": cli(["evaluate", "--emissions", *files("averaged"), "--output", str(run_dir / "dev_greedy")],
                              log)}
    tuned_lm = run_dir / "lm"
    shutil.copytree(lm, tuned_lm, dirs_exist_ok=True)
    scores["lm_tuning"] = cli(["tune-lm", "--emissions", *files("averaged"), "--lm", str(tuned_lm),
                               "--blank-penalties", BLANK_PENALTIES, *grid], log)
    scores["lm"] = cli(["evaluate", "--emissions", *files("averaged"), "--lm", str(tuned_lm), "--output",
                        str(run_dir / "dev_lm")], log)
    for key, penalties in (("lm_cross", BLANK_PENALTIES), ("lm_cross_no_penalty", "0")):
        errors = {"char_errors": 0, "chars": 0, "word_errors": 0, "words": 0}
        for tune_on, score_on in (("dev_a", "dev_b"), ("dev_b", "dev_a")):
            fold = run_dir / f"{key}_{tune_on}"
            shutil.copytree(lm, fold, dirs_exist_ok=True)
            cli(["tune-lm", "--emissions", *files("averaged", tune_on), "--lm", str(fold), "--blank-penalties",
                 penalties, *grid], log)
            result = cli(["evaluate", "--emissions", *files("averaged", score_on), "--lm", str(fold)], log)
            for k in errors:
                errors[k] += result[k]
        scores[key] = {"cer": errors["char_errors"] / errors["chars"],
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
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}
    pre = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in pre if r["split"] == "valid"]
    lines = [f"Data: {info['train']} training utterances ({info['train10']} in the 10% subset), dev "
             f"{info['dev_a'] + info['dev_b']} utterances of 8 held-out speakers (halves of {info['dev_a']} and "
             f"{info['dev_b']}).",
             f"Pretraining: {pre[-1]['update']} updates in {times.get('pretrain', 0) / 60:.1f} min; last validation: "
             f"accuracy {valid[-1]['accuracy']:.3f}, code perplexity {valid[-1]['code_perplexity']:.0f}." if valid
             else "", "",
             "| run | updates | best update | dev CER best.pt | dev CER averaged | + LM (tuned on dev) | + LM "
             "(cross-tuned) | + LM, no blank penalty (cross-tuned) | dev WER averaged | + LM (cross-tuned) | "
             "last 3 validations (CER) | flat | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for job in trained(jobs):
        s = scores[job.name]
        metrics = [json.loads(line) for line in (out / job.name / "metrics.jsonl").read_text().splitlines()]
        curve = [r["cer"] for r in metrics if r["split"] == "valid"]
        last = curve[-3:]
        best = json.loads((out / job.name / "best.json").read_text())
        lines.append(f"| {job.name} | {job.updates} | {best['update']} | {s['best']['cer']:.1%} | "
                     f"{s['averaged']['cer']:.1%} | {s['lm']['cer']:.1%} | {s['lm_cross']['cer']:.1%} | "
                     f"{s['lm_cross_no_penalty']['cer']:.1%} | {s['averaged']['wer']:.1%} | "
                     f"{s['lm_cross']['wer']:.1%} | {' / '.join(f'{c:.1%}' for c in last)} | "
                     f"{'yes' if flat(curve) else 'no'} | {times.get(job.name, 0) / 60:.1f} |")
    lines += ["", "| initialisation | labels | variant | runs | dev CER best.pt, mean (min-max) | averaged | "
                  "averaged + LM (cross-tuned) |", "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for job in trained(jobs):
        groups.setdefault((job.facts["init"], job.facts["labels"], job.facts["variant"]), []).append(scores[job.name])
    for (init, labels, variant), group in groups.items():
        cells = []
        for pick in (lambda s: s["best"]["cer"], lambda s: s["averaged"]["cer"], lambda s: s["lm_cross"]["cer"]):
            values = [pick(s) for s in group]
            cells.append(f"{statistics.mean(values):.1%} ({min(values):.1%}-{max(values):.1%})")
        lines.append(f"| {init} | {labels} | {variant or 'recipe'} | {len(group)} | {' | '.join(cells)} |")
    variants = {job.facts["variant"]: job.facts["overrides"] for job in trained(jobs) if job.facts["variant"]}
    if variants:
        lines += ["", "Variants: " + "; ".join(f"{name}: `{' '.join(o)}`" for name, o in variants.items()) + "."]
    labelled = [job for job in jobs if job.output is not None]
    if labelled:
        lines += ["", "| pseudo-labels | kept | CER against the true transcripts | WER |", "|---|---|---|---|"]
        for job in labelled:
            q = json.loads((job.output.parent / "quality.json").read_text())
            lines.append(f"| {job.name} | {q['kept']} of {q['of']} | {q['cer']:.1%} | {q['wer']:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--an4", default="../shared/data/an4", help="folder with train.tsv and audio/")
    parser.add_argument("--output", default="runs/an4")
    parser.add_argument("--model", default="configs/model/small_conformer_fbank.yaml",
                        help="the model of every run (the small-data recipes' own)")
    parser.add_argument("--pretrain-updates", type=int, default=8000)
    parser.add_argument("--finetune-updates", type=int, default=4000)
    parser.add_argument("--finetune-updates-10", type=int, default=3000,
                        help="fine-tuning updates of the runs at 10%% of the labels (0: --finetune-updates)")
    parser.add_argument("--pretrain-seed", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds of each initialisation at 10%%")
    parser.add_argument("--variant", type=Variant.parse, action="append", default=None,
                        help="'NAME pretrained|random 10%%|100%% SEEDS [dotted.key=value ...]': runs with changed "
                             "settings (repeatable; default: 'nospeed pretrained 100%% 1 data.augment.speed=[]')")
    parser.add_argument("--self-train", type=SelfTrain.parse, action="append", default=[],
                        help="'NAME greedy|lm10 KEEP': self-training at 10%% from each pretrained 10%% run "
                             "(repeatable; e.g. 'pl greedy 1.0')")
    parser.add_argument("--pretrain-override", action="append", default=[],
                        help="dotted.key=value for the pretraining job (repeatable)")
    parser.add_argument("--inits", type=lambda t: t.split(","), default=["pretrained", "random"],
                        help="the initialisations to fine-tune from (default pretrained,random)")
    parser.add_argument("--stage", choices=("all", "train", "score"), default="all",
                        help="train: shards, training and emissions; score: LM, scores and tables from them")
    parser.add_argument("--parallel", type=int, default=16, help="training jobs at a time")
    parser.add_argument("--deadline-minutes", type=float, default=0.0,
                        help="stop every job (with a checkpoint) before this much time has passed; 0: no limit")
    parser.add_argument("--quick", action="store_true", help="a few updates of a tiny model (CPU check)")
    args = parser.parse_args()
    if not set(args.inits) <= {"pretrained", "random"}:
        sys.exit(f"--inits: pretrained and/or random, got {','.join(args.inits)}")
    if args.variant is None:
        args.variant = [Variant.parse("nospeed pretrained 100% 1 data.augment.speed=[]")]
    an4 = Path(args.an4).resolve()
    if not (an4 / "train.tsv").is_file():
        sys.exit(f"{an4}/train.tsv not found: pass --an4 (the AN4 folder with train.tsv and audio/)")
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # what decides the results (not where the data and runs are, nor how they are scheduled)
    ignored = ("deadline_minutes", "parallel", "stage", "an4", "output")
    settings = {k: v for k, v in vars(args).items() if k not in ignored}
    settings["variant"] = [vars(v) for v in args.variant]
    settings["self_train"] = [vars(v) for v in args.self_train]
    if not args.self_train:  # a run folder of the settings before self-training existed
        del settings["self_train"]
    saved = out / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        sys.exit(f"{out} holds a run with other settings ({saved}); choose another --output")
    saved.write_text(json.dumps(settings, indent=1) + "\n")
    data = out / "data"
    data.mkdir(exist_ok=True)
    info = split_data(an4, data)
    train90(data, info)
    jobs = plan_jobs(args, out, data)
    if args.stage in ("all", "train"):
        make_shards(data)
        if not run_jobs(jobs, out, data, args.deadline_minutes, args.parallel, "cpu" if args.quick else "auto"):
            print("deadline reached: run the same command again to go on", flush=True)
            return 3
        if args.stage == "train":
            return 0
    missing = [j.name for j in trained(jobs) if not has_emissions(out / j.name)]
    if missing:
        sys.exit(f"no emissions for {', '.join(missing)}: run --stage train first")
    lm = out / "lm"
    if not (lm / "lm.json").is_file():
        cli(["build-lm", str(data / "split" / "train.tsv"), "--output", str(lm), "--order", "4"], out / "lm.log")
    pending = {j.name: subprocess.Popen([PY, __file__, "--score", str(out / j.name), str(lm), str(args.quick)],
                                        cwd=REPO)
               for j in trained(jobs) if not (out / j.name / "scores.json").is_file()}
    for name, proc in pending.items():
        if proc.wait() != 0:
            sys.exit(f"scoring {name} failed; see {out / name / 'scoring.log'}")
    scores = {j.name: json.loads((out / j.name / "scores.json").read_text()) for j in trained(jobs)}
    curves(jobs, out)
    table = report(jobs, out, info, scores)
    (out / "results.md").write_text(table)
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}
    (out / "summary.json").write_text(json.dumps({"data": info, "times_s": times, "scores": scores}, indent=1) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--score":  # one run's scoring, in its own process
        score_run(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "True")
        sys.exit(0)
    if len(sys.argv) == 8 and sys.argv[1] == "--pseudo-label":  # one teacher's pseudo-labels, in its own process
        pseudo_label(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5], float(sys.argv[6]),
                     sys.argv[7])
        sys.exit(0)
    if len(sys.argv) == 5 and sys.argv[1] == "--emissions":  # one run's emissions, in its own process
        save_emissions(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
        sys.exit(0)
    sys.exit(main())
