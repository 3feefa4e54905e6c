"""Feature extraction faults: ids that one file name would merge, runs repeated into one folder, a
held lock, utterances too short for the model, bad window arguments and missing inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data_tools.shards import ShardOptions, make_shards
from data_tools.synthetic import corpus_entries, render
from speechssl import Wav2Vec2Model, load_model, load_model_config
from speechssl.data.inputs import read_utterances
from speechssl.data.manifest import Entry
from speechssl.extract import read_features
from speechssl.features import LayerFeatures, min_input_samples
from speechssl.locking import FolderLock
from speechssl_cli import main as speechssl
from tests.conftest import REPO

# Ids that a "replace unsafe characters by _" file name merges pairwise, and two ordinary ones.
IDS = ["sub/x", "sub_x", "a b", "a_b", "plain1", "plain2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model, and a directory of one WAV per id of IDS (each its own speech, of its own
    length; a directory's ids are the files' relative paths, so ``sub/x`` is ``sub/x.wav``)."""
    root = tmp_path_factory.mktemp("faults_extract")
    entries = corpus_entries(0.01, num_speakers=2, seed=5)
    assert len(entries) >= len(IDS)
    for i, (uid, e) in enumerate(zip(IDS, entries, strict=False)):
        path = root / "wav" / f"{uid}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, render(**e.synth)[: 8000 + 1600 * i], 16000, subtype="PCM_16")
    torch.manual_seed(0)
    Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_transformer.yaml")).save(root / "model.pt")
    return root


def _main(*args: str) -> tuple[int, dict | None]:
    """The CLI in this process, without a progress bar: its exit code and JSON summary."""
    out = StringIO()
    with redirect_stdout(out):
        code = speechssl(["extract", *args, "--quiet"])
    lines = out.getvalue().strip().splitlines()
    return code, json.loads(lines[-1]) if lines else None


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "speechssl_cli", "extract", *args, "--quiet"], capture_output=True,
                          text=True, cwd=REPO, check=False, timeout=300)


def _expected(model: Path, audio_file: Path) -> np.ndarray:
    """The last layer of ``model`` on one file's audio, run alone."""
    audio, _ = sf.read(audio_file, dtype="float32")
    return LayerFeatures(load_model(model), "last")(torch.from_numpy(audio)[None]).hidden_states[0][0].numpy()


@pytest.mark.parametrize("fmt", ["npy", "shards", "safetensors"])
def test_ids_that_one_file_name_would_merge_keep_their_own_features(corpus: Path, tmp_path: Path,
                                                                      fmt: str) -> None:
    code, summary = _main(str(corpus / "model.pt"), str(corpus / "wav"), "--output", str(tmp_path / "out"),
                          "--format", fmt, "--per-file", "4")
    assert code == 0 and summary["written"] == len(IDS)
    rows = list(read_features(tmp_path / "out"))
    assert sorted(uid for uid, _, _ in rows) == sorted(IDS)
    for uid, layers, meta in rows:
        assert meta["id"] == uid
        np.testing.assert_allclose(layers[2], _expected(corpus / "model.pt", corpus / "wav" / f"{uid}.wav"),
                                   rtol=0, atol=1e-5, err_msg=uid)
    if fmt == "npy":
        assert len(list((tmp_path / "out" / "layer2").glob("*.npy"))) == len(IDS)


def test_a_duplicate_id_is_skipped_counted_and_the_first_kept(corpus: Path, tmp_path: Path, capfd) -> None:
    """``dup.flac`` and ``dup.wav`` in one directory are both id ``dup``: the first (sorted:
    the flac) is extracted, the second skipped as ``duplicate_id`` and named on stderr."""
    (tmp_path / "in").mkdir()
    first, second = sf.read(corpus / "wav" / "plain1.wav")[0], sf.read(corpus / "wav" / "plain2.wav")[0]
    sf.write(tmp_path / "in" / "dup.flac", first, 16000, subtype="PCM_16")
    sf.write(tmp_path / "in" / "dup.wav", second, 16000, subtype="PCM_16")
    code, summary = _main(str(corpus / "model.pt"), str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert code == 0 and summary["written"] == 1 and summary["skipped"] == {"duplicate_id": 1}
    assert "skipped dup: duplicate_id" in capfd.readouterr().err
    [(uid, layers, _)] = list(read_features(tmp_path / "out"))
    assert uid == "dup"
    np.testing.assert_allclose(layers[2], _expected(corpus / "model.pt", tmp_path / "in" / "dup.flac"),
                               rtol=0, atol=1e-5)


def _index_ids(folder: Path) -> list[str]:
    return [line.split("\t")[0] for line in (folder / "index.tsv").read_bytes().decode().split("\n")[1:-1]]


def test_the_same_command_twice_lists_every_id_once_and_other_settings_need_overwrite(
        corpus: Path, tmp_path: Path) -> None:
    """Again with the same settings: a resume with nothing left to do. Other inputs (or any other
    setting): refused, naming the difference, unless --overwrite, which starts the folder afresh."""
    out = tmp_path / "out"
    args = [str(corpus / "model.pt"), str(corpus / "wav"), "--output", str(out)]
    assert _main(*args)[1]["written"] == len(IDS)
    code, summary = _main(*args)
    assert code == 0 and summary["already written"] == len(IDS) and "written" not in summary
    assert sorted(_index_ids(out)) == sorted(IDS)
    assert sorted(uid for uid, _, _ in read_features(out)) == sorted(IDS)

    other = tmp_path / "other"
    other.mkdir()
    (other / "solo.wav").write_bytes((corpus / "wav" / "plain1.wav").read_bytes())
    refused = _cli(str(corpus / "model.pt"), str(other), "--output", str(out))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "other settings (inputs:" in refused.stderr and "--overwrite" in refused.stderr
    assert sorted(_index_ids(out)) == sorted(IDS)

    code, summary = _main(str(corpus / "model.pt"), str(other), "--output", str(out), "--overwrite")
    assert code == 0 and summary["written"] == 1 and "already written" not in summary
    assert [uid for uid, _, _ in read_features(out)] == ["solo"]
    assert len(list((out / "layer2").glob("*.npy"))) == 1  # the earlier extraction's files are gone


def test_ids_and_metadata_with_tabs_or_line_separators_do_not_break_the_index(corpus: Path,
                                                                             tmp_path: Path) -> None:
    """An id holding a tab cannot be a row of index.tsv: it is skipped as ``bad_id`` (before, its
    row was misread, so every run extracted and listed it again). A transcript holding U+2028 or
    U+0085 (kept by JSON without ascii escapes) stays one row."""
    wav = corpus / "wav"
    rows = [{"id": "tab\there", "path": str(wav / "plain1.wav")},
            {"id": "odd text", "path": str(wav / "plain2.wav"), "text": "one\u2028two\x85three"},
            {"id": "plain", "path": str(wav / "a_b.wav")}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [str(corpus / "model.pt"), str(manifest), "--output", str(tmp_path / "out")]
    for _ in range(2):
        code, summary = _main(*args)
        assert code == 0 and summary["skipped"] == {"bad_id": 1}
    assert sorted(_index_ids(tmp_path / "out")) == ["odd text", "plain"]
    got = {uid: meta for uid, _, meta in read_features(tmp_path / "out")}
    assert sorted(got) == ["odd text", "plain"] and got["odd text"]["text"] == "one\u2028two\x85three"


@pytest.mark.parametrize("fmt", ["shards", "safetensors"])
def test_resuming_after_a_feature_file_was_deleted_overwrites_no_other_file(corpus: Path, tmp_path: Path,
                                                                             fmt: str) -> None:
    """Files 0, 1, 2 of 2 utterances each, file 1 deleted by hand: the resume writes those two
    into a new file 3, not over file 2 (which numbering by the count of files did)."""
    out = tmp_path / "out"
    args = [str(corpus / "model.pt"), str(corpus / "wav"), "--output", str(out), "--format", fmt, "--per-file", "2"]
    _main(*args)
    files = sorted(out.glob("features-*"))
    assert len(files) == 3
    files[1].unlink()
    code, summary = _main(*args)
    assert code == 0 and summary["written"] == 2 and summary["already written"] == 4
    assert sorted(uid for uid, _, _ in read_features(out)) == sorted(IDS)


def test_a_folder_locked_by_another_job_is_refused(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with FolderLock(out, "extract"):
        done = _cli(str(corpus / "model.pt"), str(corpus / "wav"), "--output", str(out))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and f"error: {out} is in use by pid" in done.stderr
    assert not (out / "extract.json").exists() and not (out / "index.tsv").exists()


def test_utterances_shorter_than_the_receptive_field_are_skipped_in_shards(corpus: Path, tmp_path: Path,
                                                                          capfd) -> None:
    """A 200-sample utterance among normal ones (shards built without a minimum duration): the
    others are extracted, it is counted and named as ``too_short``, and the run succeeds."""
    wav = corpus / "wav"
    short = tmp_path / "short.wav"
    sf.write(short, sf.read(wav / "plain1.wav", dtype="float32")[0][:200], 16000, subtype="PCM_16")
    entries = [Entry(id="p1", path=str(wav / "plain1.wav")), Entry(id="short", path=str(short)),
               Entry(id="p2", path=str(wav / "plain2.wav"))]
    make_shards(entries, tmp_path / "shards", ShardOptions(min_seconds=0, workers=1), progress=False)
    code, summary = _main(str(corpus / "model.pt"), str(tmp_path / "shards"), "--output", str(tmp_path / "out"),
                          "--workers", "0")
    assert code == 0 and summary["written"] == 2 and summary["skipped"] == {"too_short": 1}
    assert "skipped short: too_short: 200 samples, fewer than the 400 needed" in capfd.readouterr().err
    assert sorted(uid for uid, _, _ in read_features(tmp_path / "out")) == ["p1", "p2"]


def test_read_utterances_skips_short_files_by_min_samples(corpus: Path, tmp_path: Path, capfd) -> None:
    """Files too: 500 samples pass the reader's own minimum (30 ms) but not a filterbank model's
    560; the limit is what :func:`min_input_samples` says for each extractor."""
    fbank = Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_conformer_fbank.yaml"))
    conv = load_model(corpus / "model.pt")
    assert (min_input_samples(fbank), min_input_samples(conv)) == (560, 400)
    (tmp_path / "in").mkdir()
    audio = sf.read(corpus / "wav" / "plain1.wav", dtype="float32")[0]
    sf.write(tmp_path / "in" / "long.wav", audio, 16000, subtype="PCM_16")
    sf.write(tmp_path / "in" / "short.wav", audio[:500], 16000, subtype="PCM_16")
    skipped: Counter = Counter()
    ids = [u.id for u in read_utterances([str(tmp_path / "in")], skipped, min_samples=min_input_samples(fbank))]
    assert ids == ["long"] and skipped == {"too_short": 1}
    assert "skipped short: too_short: 500 samples" in capfd.readouterr().err
    assert len(list(read_utterances([str(tmp_path / "in")], Counter()))) == 2  # default: no minimum


@pytest.mark.parametrize(("flags", "words"), [
    (["--window-seconds", "4", "--overlap-seconds", "4"], "--overlap-seconds must be at least 0 and less than"),
    (["--window-seconds", "2", "--overlap-seconds", "5"], "--overlap-seconds must be at least 0 and less than"),
    (["--window-seconds", "0"], "--window-seconds must be a positive number of seconds, got 0.0"),
    (["--window-seconds", "-3"], "--window-seconds must be a positive number of seconds, got -3.0"),
    (["--window-seconds", "nan"], "--window-seconds must be a positive number of seconds, got nan"),
    (["--window-seconds", "inf"], "--window-seconds must be a positive number of seconds, got inf"),
    (["--overlap-seconds", "-1"], "--overlap-seconds must be at least 0"),
    (["--overlap-seconds", "0.01"], "this model needs 0.05 s <= overlap < window"),
    (["--max-seconds", "nan"], "--max-seconds must be a positive number of seconds"),
    (["--batch-seconds", "0"], "--batch-seconds must be a positive number of seconds"),
])
def test_bad_window_arguments_are_clear_errors(corpus: Path, tmp_path: Path, flags: list[str], words: str,
                                               capfd) -> None:
    """In this process (an exception would fail the test); the console script is checked below."""
    code, _ = _main(str(corpus / "model.pt"), str(corpus / "wav"), "--output", str(tmp_path / "out"), *flags)
    err = capfd.readouterr().err
    assert code == 2 and err.startswith("error: --") and words in err, err
    assert not (tmp_path / "out").exists()


def test_a_bad_window_or_a_missing_input_is_a_clear_error_of_the_command(corpus: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no such folder"
    for inputs, flags, words in (([], ["--window-seconds", "nan"], "--window-seconds must be a positive number"),
                                 ([str(missing)], [], f"error: input {missing} does not exist")):
        done = _cli(str(corpus / "model.pt"), str(corpus / "wav"), *inputs, "--output", str(tmp_path / "out"), *flags)
        assert done.returncode == 2 and words in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "out").exists()
