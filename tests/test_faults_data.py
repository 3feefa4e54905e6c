"""Faults of the data and transcription tools found by an adversarial user, each run for real:
audio files written with soundfile, tar shards read back, the CLIs run as a user runs them."""

from __future__ import annotations

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
from data_tools.split import split_manifest
from finetune.transcribe import main as finetune_main
from speechssl.data.manifest import read_source
from speechssl.locking import FolderLock
from tests.conftest import REPO, interrupt_shard_writing

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _noise(samples: int, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(samples)).astype(np.float32)


def _wavs(root: Path, lengths: dict[str, int]) -> dict[str, Path]:
    """One 16 kHz WAV per name, of that many samples."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, samples) in enumerate(lengths.items()):
        paths[name] = root / f"{name}.wav"
        sf.write(paths[name], _noise(samples, seed=i), 16000, subtype="PCM_16")
    return paths


def _data_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools", *args], capture_output=True, text=True, cwd=REPO,
                          env=ENV, check=False, timeout=300)


def _tar_members(directory: Path) -> list[str]:
    names = []
    for tar in sorted(directory.glob("*.tar")):
        with tarfile.open(tar) as f:
            names += f.getnames()
    return names


# ---------------------------------------------------------------------------------- make-shards


def test_make_shards_keys_never_collide(tmp_path: Path) -> None:
    """Ids ``a b`` and ``a_b`` sanitise to one key; the second's ``-2`` suffix must not take the
    key of the id ``a_b-2``: every utterance is in the tar under its own key."""
    _wavs(tmp_path / "in", {"x": 4000, "y": 5000, "z": 6000})
    ids = ["a b", "a_b", "a_b-2"]
    manifest = tmp_path / "in" / "list.tsv"
    manifest.write_text("id\tpath\n" + "".join(f"{i}\t{p}.wav\n" for i, p in zip(ids, "xyz", strict=True)))
    index = make_shards(read_source(manifest)[0], tmp_path / "out", ShardOptions(workers=1), progress=False)

    members = _tar_members(tmp_path / "out")
    keys = [name.partition(".")[0] for name in members if name.endswith(".json")]
    assert len(keys) == len(set(keys)) == 3, members
    assert sorted(k for s in index["shards"] for k in s["keys"]) == sorted(keys)
    assert index["totals"]["num_samples"] == 3
    import webdataset as wds

    urls = [str(tmp_path / "out" / s["name"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    by_id = {json.loads(s["json"])["id"]: json.loads(s["json"])["num_samples"] for s in samples}
    assert by_id == {"a b": 4000, "a_b": 5000, "a_b-2": 6000}  # each id kept, with its own audio


def test_make_shards_keeps_a_finished_set_unless_overwrite(tmp_path: Path) -> None:
    _wavs(tmp_path / "in", {"u1": 8000, "u2": 9000})
    out = tmp_path / "out"
    first = _data_cli("make-shards", "--input", str(tmp_path / "in"), "--output", str(out), "--quiet")
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    again = _data_cli("make-shards", "--input", str(tmp_path / "in"), "--output", str(out), "--quiet")
    assert again.returncode == 2 and "--overwrite" in again.stderr and "index.json" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched

    replaced = _data_cli("make-shards", "--input", str(tmp_path / "in"), "--output", str(out), "--quiet",
                         "--overwrite", "--max-count", "1")
    assert replaced.returncode == 0, replaced.stderr
    index = json.loads((out / "index.json").read_text())
    assert [s["num_samples"] for s in index["shards"]] == [1, 1]

    # Shards of the prefix that no build of ours left unfinished: not ours to delete either.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-000000.tar").write_bytes(b"someone else's")
    refused = _data_cli("make-shards", "--input", str(tmp_path / "in"), "--output", str(foreign), "--quiet")
    assert refused.returncode == 2 and "shard-000000.tar" in refused.stderr, refused.stderr
    assert (foreign / "shard-000000.tar").read_bytes() == b"someone else's"


def test_a_killed_build_is_started_again_without_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """make-shards does not resume: its own leftovers (marked ``.incomplete``) are cleared."""
    _wavs(tmp_path / "in", {f"u{i}": 4000 + i for i in range(5)})
    entries = read_source(tmp_path / "in")[0]
    interrupt_shard_writing(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        make_shards(entries, tmp_path / "out", ShardOptions(max_count=1, workers=1), progress=False)
    monkeypatch.undo()
    assert (tmp_path / "out" / ".incomplete").is_file() and len(list((tmp_path / "out").glob("*.tar"))) == 3
    index = make_shards(entries, tmp_path / "out", ShardOptions(max_count=2, workers=1), progress=False)
    assert index["totals"]["num_samples"] == 5 and not (tmp_path / "out" / ".incomplete").exists()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [s["name"] for s in index["shards"]]


@pytest.mark.parametrize("prefix", ["../x", "a/b", "..", ""])
def test_make_shards_rejects_a_prefix_outside_the_output(tmp_path: Path, prefix: str) -> None:
    _wavs(tmp_path / "in", {"u1": 8000})
    (tmp_path / "x-000000.tar").write_bytes(b"keep me")  # what `--prefix ../x` would delete and replace
    done = _data_cli("make-shards", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                     "--prefix", prefix, "--quiet")
    assert done.returncode == 2 and "prefix" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert (tmp_path / "x-000000.tar").read_bytes() == b"keep me"
    assert list(tmp_path.rglob("*.tar")) == [tmp_path / "x-000000.tar"] and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="prefix"):
        ShardOptions(prefix=prefix)


def test_make_shards_refuses_a_folder_another_build_holds(tmp_path: Path) -> None:
    _wavs(tmp_path / "in", {"u1": 8000})
    out = tmp_path / "out"
    with FolderLock(out, "make-shards"):
        done = _data_cli("make-shards", "--input", str(tmp_path / "in"), "--output", str(out), "--quiet")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"pid {os.getpid()}" in done.stderr and "make-shards" in done.stderr, done.stderr
    assert not (out / "index.json").exists() and not list(out.glob("*.tar"))


# ---------------------------------------------------------------------------------- split


def test_split_never_writes_over_its_input(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    manifest = data / "train.tsv"
    manifest.write_text("id\tpath\tspeaker\n" + "".join(f"u{i}\ta{i}.wav\ts{i % 4}\n" for i in range(20)))
    text = manifest.read_text()
    done = _data_cli("split", "--input", str(manifest), "--output", str(data), "--dev-speakers", "1")
    assert done.returncode == 2 and "overwrite the input" in done.stderr and "Traceback" not in done.stderr
    assert manifest.read_text() == text and not (data / "dev.tsv").exists()
    with pytest.raises(ValueError, match="overwrite the input"):
        split_manifest(manifest, tmp_path / "data" / ".." / "data", dev_speakers=1)
    assert manifest.read_text() == text
    assert split_manifest(manifest, tmp_path / "split", dev_speakers=1)["dev"] == 5  # elsewhere: fine


# ---------------------------------------------------------------------------------- transcribe


@pytest.fixture(scope="module")
def ctc_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CTC model (tiny_transformer and a character head) saved as fine-tuning does."""
    from speechssl import load_model_config
    from speechssl.asr.tokenizer import CharTokenizer
    from speechssl.models.ctc import CTCModel

    torch.manual_seed(0)
    tokenizer = CharTokenizer.build(["THE QUICK BROWN FOX"])
    model = CTCModel(load_model_config(REPO / "configs/model/tiny_transformer.yaml"), len(tokenizer),
                     blank=tokenizer.blank, vocab=tokenizer.vocab, tokenizer=tokenizer.to_dict(), normalize_audio=True)
    path = tmp_path_factory.mktemp("ctc") / "model.pt"
    model.save(path)
    return path


def test_transcribe_never_wipes_its_input_and_writes_atomically(ctc_model: Path, tmp_path: Path) -> None:
    _wavs(tmp_path, {"a": 16000, "b": 12000})
    manifest = tmp_path / "list.tsv"
    manifest.write_text("id\tpath\na\ta.wav\nb\tb.wav\n")
    text = manifest.read_text()
    done = subprocess.run([sys.executable, "-m", "finetune", "transcribe", str(ctc_model), str(manifest),
                           "--output", str(manifest)], capture_output=True, text=True, cwd=REPO, env=ENV,
                          check=False, timeout=300)
    assert done.returncode == 2 and "is the input" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert manifest.read_text() == text

    hyps = tmp_path / "hyps.tsv"
    assert finetune_main(["transcribe", str(ctc_model), str(manifest), "--output", str(hyps)]) == 0
    assert [line.split("\t")[0] for line in hyps.read_text().splitlines()] == ["a", "b"]
    # A run that fails on an input keeps the earlier output as it was, and leaves no partial file.
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    before = hyps.read_text()
    assert finetune_main(["transcribe", str(ctc_model), str(manifest), str(bad), "--output", str(hyps)]) == 2
    assert hyps.read_text() == before and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_transcribe_names_a_missing_input(ctc_model: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing.wav"
    assert finetune_main(["transcribe", str(ctc_model), str(missing)]) == 2
    assert f"input {missing} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "words"), [
    (["--window-seconds", "4", "--overlap-seconds", "4"], "must be less than --window-seconds"),
    (["--window-seconds", "0"], "--window-seconds must be a positive number"),
    (["--overlap-seconds", "-1"], "--overlap-seconds must be a positive number"),
    (["--max-seconds", "nan"], "--max-seconds must be a positive number"),
    (["--window-seconds", "inf"], "--window-seconds must be a positive number"),
    (["--overlap-seconds", "0.01"], "needs an overlap of at least"),
])
@pytest.mark.parametrize("command", ["transcribe", "evaluate", "emissions"])
def test_bad_window_settings_are_clear_errors(ctc_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              command: str, args: list[str], words: str) -> None:
    audio = _wavs(tmp_path, {"a": 16000})["a"]
    extra = ["--output", str(tmp_path / "e.pt")] if command == "emissions" else []
    assert finetune_main([command, str(ctc_model), str(audio), *extra, *args]) == 2
    assert words in capsys.readouterr().err


def test_a_long_recording_runs_in_windows_with_the_single_pass_frames(ctc_model: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """40 s in windows of 8 s: the frames of one pass, log-probabilities close to it, reported."""
    from data_tools.synthetic import corpus_entries, render
    from speechssl.asr.emissions import load_emissions
    from speechssl.models.ctc import load_ctc_model

    speech = np.concatenate([render(**e.synth) for e in corpus_entries(0.005, num_speakers=1, seed=2)])
    path = tmp_path / "long.wav"
    sf.write(path, np.resize(speech, 40 * 16000 + 777), 16000, subtype="FLOAT")
    common = ["emissions", str(ctc_model), str(path), "--window-seconds", "8", "--overlap-seconds", "2"]
    assert finetune_main([*common, "--output", str(tmp_path / "one.pt"), "--max-seconds", "100"]) == 0
    assert "windowed" not in capsys.readouterr().err
    assert finetune_main([*common, "--output", str(tmp_path / "win.pt"), "--max-seconds", "20"]) == 0
    assert "windowed 1 recording(s) longer than 20 s" in capsys.readouterr().err
    (one,), (win,) = load_emissions([tmp_path / "one.pt"]).log_probs, load_emissions([tmp_path / "win.pt"]).log_probs
    frames = load_ctc_model(ctc_model).feature_extractor.output_lengths(torch.tensor([40 * 16000 + 777]))
    assert one.shape == win.shape and one.shape[0] == int(frames[0])
    difference = (one.float() - win.float()).abs()
    assert float(difference.max()) < 0.05, float(difference.max())  # only attention beyond a window is lost
    assert float(difference[100:-100].mean()) < 5e-3
    # The transcript of the windowed pass is what the tool prints.
    assert finetune_main(["transcribe", str(ctc_model), str(path), "--max-seconds", "20",
                          "--window-seconds", "8", "--overlap-seconds", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("long\t") and "windowed 1 recording(s)" in out.err


def test_utterances_too_short_for_the_model_are_skipped_and_counted(ctc_model: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A 200-sample utterance in shards (the extractor's receptive field is 400 samples)."""
    _wavs(tmp_path / "in", {"short": 200, "fine": 16000, "also_fine": 8000})
    make_shards(read_source(tmp_path / "in")[0], tmp_path / "shards", ShardOptions(min_seconds=0, workers=1),
                progress=False)
    assert finetune_main(["transcribe", str(ctc_model), str(tmp_path / "shards"), "--output",
                          str(tmp_path / "hyps.tsv")]) == 0
    assert sorted(line.split("\t")[0] for line in (tmp_path / "hyps.tsv").read_text().splitlines()) == [
        "also_fine", "fine"]
    assert "'too_short': 1" in capsys.readouterr().err
