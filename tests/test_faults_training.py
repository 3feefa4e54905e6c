"""Fault injection into the training jobs: checkpoints carrying code, changed configs on resume, two
jobs in one run folder, damaged shards, settings that train nothing, torn log files, utterances too
short for the model. Each test is a defect an adversarial user found; the jobs really run (DeepSpeed
with gloo on the CPU, webdataset shards)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data_tools.shards import ShardOptions, make_shards
from data_tools.synthetic import corpus_entries
from pretrain.__main__ import load_config
from speechssl.config import ConfigError
from speechssl.data.manifest import Entry
from speechssl.locking import FolderLock
from speechssl.training.metrics_log import read_metrics, rewrite_metrics
from tests.conftest import REPO

PRETRAIN = str(REPO / "configs/pretrain/tiny.yaml")
FINETUNE = str(REPO / "configs/finetune/tiny.yaml")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and dev/ (labelled), unlabelled/ (dev without transcripts) and short_dev/ (dev with two
    utterances of 200 samples, fewer than the waveform extractor's receptive field of 400)."""
    root = tmp_path_factory.mktemp("faults")
    entries = corpus_entries(0.03, num_speakers=5, seed=3)
    dev = [e for e in entries if e.speaker == "spk004"]
    make_shards([e for e in entries if e.speaker != "spk004"], root / "train", ShardOptions(max_count=6, workers=2),
                progress=False)
    make_shards(dev, root / "dev", ShardOptions(workers=2), progress=False)
    make_shards([dataclasses.replace(e, text=None) for e in dev], root / "unlabelled", ShardOptions(workers=2),
                progress=False)
    rng = np.random.default_rng(0)
    short = []
    for i in range(2):
        path = root / f"short{i}.wav"
        sf.write(path, (0.1 * rng.standard_normal(200)).astype(np.float32), 16000)
        short.append(Entry(f"short{i}", str(path), text="A"))
    make_shards([dev[0], *short, *dev[1:]], root / "short_dev", ShardOptions(min_seconds=0.005, workers=2),
                progress=False)
    return root


def _args(shards: Path, out: Path, train: str = "train", dev: str = "dev", **trainer) -> list[str]:
    settings = {"log_every": 1, "validate_every": 2, "checkpoint_every": 2, "max_valid_batches": 2, "threads": 1,
                "max_updates": 4, "device": "cpu", **trainer}
    return [f"data.shards=[{shards / train}]", f"valid_shards=[{shards / dev}]", "data.num_workers=0",
            "data.max_tokens=64000", f"trainer.output_dir={out}",
            *(f"trainer.{k}={v}" for k, v in settings.items())]


def _pretrain(args: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "pretrain"]
    return subprocess.run([*head, "--config", PRETRAIN, *args], capture_output=True, text=True, cwd=REPO, env=ENV,
                          check=False, timeout=900)


def _clear_error(done: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2, one message naming the problem, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for word in words:
        assert word in done.stderr, (word, done.stderr[-3000:])


def _records(out: Path, split: str) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == split]


class _WritesAFile:
    """Unpickling this runs ``open(path, "w")``: what a hostile checkpoint would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- 1. a checkpoint runs code on resume

@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank0.pt", "mp_rank_00_model_states.pt",
                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_checkpoint_carrying_code_is_refused_on_resume(shards: Path, tmp_path: Path, target: str) -> None:
    out = tmp_path / "run"
    assert _pretrain(_args(shards, out, stop_at=2)).returncode == 0
    path = out / "checkpoints" / "update_00000002" / target
    state = torch.load(path, weights_only=False)
    marker = tmp_path / "code_ran"
    state["payload"] = _WritesAFile(marker)
    torch.save(state, path)
    done = _pretrain(_args(shards, out))
    _clear_error(done, "refusing to load", target)
    assert not marker.exists()


# -- 3. training drops data without counting it

def _damage(shards: Path, tmp_path: Path) -> Path:
    """A copy of the training shards: in the first tar, one sample's audio renamed to .wav and
    one extra sample the index does not list; the second tar cut short; one length in the index
    that is not the audio's."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(shards / "train", damaged)
    index = json.loads((damaged / "index.json").read_text())
    first, second = (damaged / index["shards"][i]["name"] for i in (0, 1))
    members = []
    with tarfile.open(first) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    renamed = index["shards"][0]["keys"][0]
    with tarfile.open(first, "w") as tar:
        for m, data in members:
            if m.name == f"{renamed}.flac":
                m.name = f"{renamed}.wav"
            tar.addfile(m, io.BytesIO(data))
        for m, data in members[:2]:  # another sample under a key the index does not know
            m.name = "unlisted" + m.name[m.name.index("."):]
            tar.addfile(m, io.BytesIO(data))
    size = second.stat().st_size
    with second.open("r+b") as f:
        f.truncate(size // 2)
    index["shards"][2]["lengths"][0] -= 160  # the index now says less than the tar holds
    (damaged / "index.json").write_text(json.dumps(index))
    return damaged


@pytest.mark.slow
def test_skipped_samples_are_counted_per_epoch_and_reported(shards: Path, tmp_path: Path) -> None:
    _damage(shards, shards)
    listed = sum(len(s["keys"]) for s in json.loads((shards / "train" / "index.json").read_text())["shards"])
    out = tmp_path / "run"
    done = _pretrain([*_args(shards, out, train="damaged", max_updates=80, validate_every=0, checkpoint_every=0,
                             log_every=5), "data.min_sample_size=0", "data.crop_to_shortest=false"])
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = _records(out, "data")
    assert epochs, "no per-epoch data record"
    first = epochs[0]
    reasons = first["skipped_by_reason"]
    assert reasons.get("incomplete sample (flac or json missing)") == 1
    assert reasons.get("missing from the shard", 0) >= 1
    assert reasons.get("index mismatch") == 1
    assert first["unlisted"] == 1
    assert first["skipped"] == sum(reasons.values())
    assert first["samples"] + first["skipped"] + first["dropped_short"] + first["dropped_long"] == listed
    assert "could not be read and were skipped" in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])["data"]  # finished epochs and the one under way
    assert summary["skipped"] >= sum(e["skipped"] for e in epochs)
    assert summary["samples"] >= sum(e["samples"] for e in epochs)
    assert summary["skipped_by_reason"]["index mismatch"] >= len(epochs)
    assert _records(out, "train")[-1]["skipped_samples"] >= first["skipped"]


# -- 4. resume silently accepts a changed config

@pytest.mark.slow
def test_resume_refuses_a_changed_config_and_records_safe_changes(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _pretrain(_args(shards, out, stop_at=2)).returncode == 0
    saved = (out / "config.yaml").read_text()
    assert "lr:" in saved and "mask_prob" in saved
    for change, key in (("trainer.lr=0.01", "trainer.lr"), ("model.masking.mask_prob=0.3", "model.masking.mask_prob"),
                        ("data.max_tokens=48000", "data.max_tokens"),
                        ("model=configs/model/tiny_conformer.yaml", "model.context.type"),
                        ("trainer.deepspeed=configs/deepspeed/zero0_fp32.json", "trainer.deepspeed")):
        done = _pretrain([*_args(shards, out), change])
        _clear_error(done, key, "another config")
    assert (out / "config.yaml").read_text() == saved  # a refused resume leaves the record alone
    done = _pretrain(_args(shards, out, max_updates=6, log_every=2))
    assert done.returncode == 0, done.stderr[-3000:]
    changes = [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"update": 2, "changed": {"trainer.log_every": [1, 2], "trainer.max_updates": [4, 6],
                                                 "trainer.stop_at": [2, 0]}}]
    assert json.loads(done.stdout.strip().splitlines()[-1])["update"] == 6


# -- 5. no lock on a run folder

def test_a_locked_run_folder_refuses_a_second_job(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with FolderLock(out, "a test"):
        done = _pretrain(_args(shards, out))
    _clear_error(done, "in use by pid", str(os.getpid()))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert _pretrain(_args(shards, out, max_updates=1)).returncode == 0  # released: the folder is free again


# -- 8. runs that train nothing still succeed

@pytest.mark.parametrize("override", ["trainer.lr=.inf", "trainer.lr=.nan", "trainer.end_lr=-0.01",
                                      "model.feature_grad_mult=.inf", "model.quantizer.temp_start=-.inf",
                                      "trainer.adam_betas=[0.9,.nan]"])
def test_non_finite_or_negative_settings_are_config_errors(shards: Path, tmp_path: Path, override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(PRETRAIN, [*_args(shards, tmp_path / "run"), override])


NAN_LOSS = """
import sys
from pretrain.task import PretrainTask
forward = PretrainTask.forward
def nan_forward(self, engine, prepared):
    out = forward(self, engine, prepared)
    out.loss = out.loss * float("nan")
    return out
PretrainTask.forward = nan_forward
from pretrain.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_run_whose_first_updates_are_all_skipped_stops_with_an_error(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _pretrain(_args(shards, out, max_updates=50, validate_every=0, checkpoint_every=0,
                           deepspeed="configs/deepspeed/zero0_fp32.json"), script=NAN_LOSS)
    _clear_error(done, "every one of the first 20 updates was skipped")
    assert not (out / "model.pt").exists()


# -- 9. metrics.jsonl can block resume

@pytest.mark.slow
def test_a_torn_metrics_line_does_not_block_resume(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _pretrain(_args(shards, out, stop_at=2)).returncode == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"update": 3, "split": "tr')  # a write cut short by a crash
    done = _pretrain(_args(shards, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not whole records" in done.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert sorted(r["update"] for r in _records(out, "train")) == [1, 2, 3, 4]


def test_the_metrics_rewrite_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.jsonl"
    records = [{"update": u, "split": "train", "loss": 1.0 / u} for u in range(1, 31)]
    rewrite_metrics(path, records)
    before = path.read_bytes()
    calls = {"n": 0}
    dumps = json.dumps

    def dying(obj, *args, **kwargs):  # the process is killed after 3 lines of the rewrite
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return dumps(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", dying)
    with pytest.raises(KeyboardInterrupt):
        rewrite_metrics(path, records[:10])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert read_metrics(path) == records


# -- 10. utterances shorter than the extractor's receptive field

@pytest.mark.slow
def test_utterances_too_short_for_the_model_are_dropped_and_counted(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _pretrain(_args(shards, out, dev="short_dev", max_updates=2, validate_every=1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_records(out, "valid")) == 2 and (out / "model.pt").is_file()


# -- 12. tracebacks instead of clear errors

def test_clear_errors_for_bad_indexes_and_settings(shards: Path, tmp_path: Path) -> None:
    import shutil

    broken = shards.parent / "no_shards_list"
    if not broken.exists():
        shutil.copytree(shards / "dev", broken)
        index = json.loads((broken / "index.json").read_text())
        del index["shards"]
        (broken / "index.json").write_text(json.dumps(index))
    for override, key in ((f"data.shards=[{broken}]", "shards"), ("trainer.resume=Auto", "trainer.resume"),
                          ("data.seed=-1", "data.seed")):
        with pytest.raises(ConfigError, match=key):
            load_config(PRETRAIN, [*_args(shards, tmp_path / "run"), override])
    done = _pretrain([*_args(shards, tmp_path / "run"), "trainer.resume=Auto"])
    _clear_error(done, "trainer.resume")


def test_fine_tuning_on_shards_without_transcripts_is_a_config_error(shards: Path, tmp_path: Path) -> None:
    from finetune.__main__ import load_config as load_finetune_config

    with pytest.raises(ConfigError, match="hold no transcripts"):
        load_finetune_config(FINETUNE, [*_args(shards, tmp_path / "run", train="unlabelled"), "pretrained=unused",
                                        "data.max_tokens=320000"])
