"""Building and inspecting shards: real files in, real tar files out, read back with webdataset."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from data_tools.inspect_shards import inspect
from data_tools.shards import ShardOptions, make_shards, safe_key
from data_tools.split import split_manifest
from speechssl.data.audio import decode_audio
from speechssl.data.manifest import read_source
from tests.conftest import REPO, interrupt_shard_writing

AN4 = REPO.parent / "shared" / "data" / "an4"


def _tone(seconds: float, rate: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = 0.3 * rng.standard_normal((int(seconds * rate), channels))
    return x[:, 0] if channels == 1 else x


def _wav_corpus(root: Path, n: int = 6) -> Path:
    """``n`` WAV files of 0.5, 0.75, ... seconds in two sub-folders."""
    for i in range(n):
        path = root / f"spk{i % 2}" / f"utt.{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, _tone(0.5 + 0.25 * i, seed=i), 16000, subtype="PCM_16")
    return root


def _read_shards(directory: Path) -> dict[str, dict]:
    index = json.loads((directory / "index.json").read_text())
    urls = [str(directory / s["name"]) for s in index["shards"]]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def test_flac_round_trip_is_lossless_for_16_bit(tmp_path: Path) -> None:
    pcm = np.random.default_rng(0).integers(-32768, 32767, size=12345, dtype=np.int16)
    sf.write(tmp_path / "a.wav", pcm, 16000, subtype="PCM_16")
    make_shards(read_source(tmp_path)[0], tmp_path / "out", ShardOptions(workers=1), progress=False)
    sample = next(iter(_read_shards(tmp_path / "out").values()))
    audio, rate = decode_audio(sample["flac"])
    assert rate == 16000 and sf.info(__import__("io").BytesIO(sample["flac"])).subtype == "PCM_16"
    np.testing.assert_array_equal(np.round(audio * 32768).astype(np.int16), pcm)
    meta = json.loads(sample["json"])
    assert meta["num_samples"] == 12345 and meta["duration"] == pytest.approx(12345 / 16000)
    assert meta["id"] == "a" and meta["path"].endswith("a.wav")


def test_same_inputs_give_identical_shards_and_index(tmp_path: Path) -> None:
    entries = read_source(_wav_corpus(tmp_path / "wavs"))[0]
    make_shards(entries, tmp_path / "one", ShardOptions(max_count=2, workers=1), progress=False)
    make_shards(entries, tmp_path / "two", ShardOptions(max_count=2, workers=2), progress=False)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len([n for n in names if n.endswith(".tar")]) == 3
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_index_totals_match_the_data(tmp_path: Path) -> None:
    entries = read_source(_wav_corpus(tmp_path / "wavs"))[0]
    index = make_shards(entries, tmp_path / "out", ShardOptions(max_count=4), progress=False)
    samples = _read_shards(tmp_path / "out")
    durations = [json.loads(s["json"])["duration"] for s in samples.values()]
    assert index["totals"]["num_samples"] == len(samples) == 6
    assert index["totals"]["seconds"] == pytest.approx(sum(durations), abs=1e-3)
    assert [s["num_samples"] for s in index["shards"]] == [4, 2]
    assert sum(len(s["keys"]) for s in index["shards"]) == 6
    assert all(k in samples for s in index["shards"] for k in s["keys"])
    assert index["totals"]["speakers"] == 0  # a bare folder has no speaker labels
    assert inspect(tmp_path / "out")["problems"] == []


def test_shards_are_cut_by_size_and_duration(tmp_path: Path) -> None:
    entries = read_source(_wav_corpus(tmp_path / "wavs"))[0]  # 0.5 .. 1.75 s
    by_time = make_shards(entries, tmp_path / "t", ShardOptions(max_count=0, max_megabytes=0, max_hours=2.0 / 3600),
                          progress=False)
    assert all(s["seconds"] <= 2.0 or s["num_samples"] == 1 for s in by_time["shards"])
    assert len(by_time["shards"]) > 2
    by_size = make_shards(entries, tmp_path / "s", ShardOptions(max_count=0, max_megabytes=0.06), progress=False)
    assert all(s["bytes"] <= 60_000 or s["num_samples"] == 1 for s in by_size["shards"])
    assert len(by_size["shards"]) > 2


def _write_bad_inputs(root: Path) -> dict[str, str]:
    """Each file's expected skip reason (None: kept)."""
    root.mkdir(parents=True)
    expected = {}
    sf.write(root / "good.wav", _tone(1.0), 16000, subtype="PCM_16")
    expected["good"] = None
    (root / "garbage.wav").write_bytes(b"this is not audio at all" * 100)
    expected["garbage"] = "unreadable"
    sf.write(root / "cut.wav", _tone(1.0), 16000, subtype="PCM_16")
    data = (root / "cut.wav").read_bytes()
    (root / "cut.wav").write_bytes(data[: len(data) // 2])
    expected["cut"] = "truncated"
    sf.write(root / "cutflac.flac", _tone(1.0), 16000, subtype="PCM_16")
    data = (root / "cutflac.flac").read_bytes()
    (root / "cutflac.flac").write_bytes(data[: len(data) // 2])
    expected["cutflac"] = "corrupt"
    sf.write(root / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    expected["empty"] = "empty"
    nan = _tone(1.0).astype(np.float32)
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    expected["nan"] = "nan_or_inf"
    inf = _tone(1.0).astype(np.float32)
    inf[5] = np.inf
    sf.write(root / "inf.wav", inf, 16000, subtype="FLOAT")
    expected["inf"] = "nan_or_inf"
    sf.write(root / "short.wav", _tone(0.05), 16000, subtype="PCM_16")
    expected["short"] = "too_short"
    sf.write(root / "long.wav", _tone(3.0), 16000, subtype="PCM_16")
    expected["long"] = "too_long"
    return expected


def test_bad_inputs_are_skipped_counted_and_listed(tmp_path: Path) -> None:
    expected = _write_bad_inputs(tmp_path / "in")
    manifest = tmp_path / "list.tsv"
    rows = [f"{name}\t{name}.{'flac' if name == 'cutflac' else 'wav'}\thello" for name in expected]
    rows.append("ghost\tghost.wav\tnot there")
    expected["ghost"] = "missing_file"
    manifest.write_text("id\tpath\ttext\n" + "\n".join(rows) + "\n")
    (tmp_path / "in" / "list.tsv").write_text(manifest.read_text())
    entries, kind = read_source(tmp_path / "in" / "list.tsv")
    assert kind == "tsv" and len(entries) == len(expected)
    index = make_shards(entries, tmp_path / "out", ShardOptions(max_seconds=2.0, workers=2), progress=False)

    report = (tmp_path / "out" / "skipped.tsv").read_text().splitlines()
    listed = {line.split("\t")[0]: line.split("\t")[2] for line in report[1:]}
    assert listed == {k: v for k, v in expected.items() if v is not None}
    assert set(_read_shards(tmp_path / "out")) == {"good"}
    totals = index["totals"]
    assert totals["inputs"] == totals["num_samples"] + totals["skipped"] == len(expected)
    reasons = [v for v in expected.values() if v]
    assert index["skipped"] == {r: reasons.count(r) for r in set(reasons)}


def test_other_rates_and_channels_become_16k_mono(tmp_path: Path) -> None:
    t = np.arange(8000) / 8000
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 440 * t)], 1)
    sf.write(tmp_path / "st.wav", stereo, 8000, subtype="PCM_16")
    make_shards(read_source(tmp_path)[0], tmp_path / "out", ShardOptions(), progress=False)
    sample = next(iter(_read_shards(tmp_path / "out").values()))
    audio, rate = decode_audio(sample["flac"])
    info = sf.info(__import__("io").BytesIO(sample["flac"]))
    assert (rate, info.channels, len(audio)) == (16000, 1, 16000)
    meta = json.loads(sample["json"])
    assert meta["original_sample_rate"] == 8000 and meta["sample_rate"] == 16000
    mid = audio[4000:12000]  # the downmix is the mean of the channels: amplitude 0.3
    assert np.abs(mid).max() == pytest.approx(0.3, abs=0.01)
    spectrum = np.abs(np.fft.rfft(mid))
    assert np.fft.rfftfreq(len(mid), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=3)


def test_keys_are_safe_and_unique(tmp_path: Path) -> None:
    assert safe_key("dir/a.b.c") == "dir_a_b_c" and safe_key("_x") == "x" and "." not in safe_key("..")
    root = tmp_path / "in"
    (root / "_a.b").mkdir(parents=True)
    sf.write(root / "_a.b" / "x.y.wav", _tone(0.3), 16000)
    sf.write(root / "_a_b_x_y.wav", _tone(0.3), 16000)
    make_shards(read_source(root)[0], tmp_path / "out", ShardOptions(), progress=False)
    samples = _read_shards(tmp_path / "out")
    assert sorted(samples) == ["_a_b_x_y", "a_b_x_y"] or sorted(samples) == ["a_b_x_y", "a_b_x_y-2"]
    ids = sorted(json.loads(s["json"])["id"] for s in samples.values())
    assert ids == ["_a.b/x.y", "_a_b_x_y"]


def test_source_formats(tmp_path: Path) -> None:
    libri = tmp_path / "libri" / "19" / "198"
    libri.mkdir(parents=True)
    for u in ("19-198-0000", "19-198-0001"):
        sf.write(libri / f"{u}.flac", _tone(0.4), 16000)
    (libri / "19-198.trans.txt").write_text("19-198-0000 HELLO WORLD\n19-198-0001 GOOD BYE\n")
    entries, kind = read_source(tmp_path / "libri")
    assert kind == "librispeech" and [(e.id, e.text, e.speaker) for e in entries] == [
        ("19-198-0000", "HELLO WORLD", "19"), ("19-198-0001", "GOOD BYE", "19")]

    fairseq = tmp_path / "train.tsv"
    fairseq.write_text(f"{tmp_path / 'libri'}\n19/198/19-198-0000.flac\t6400\n19/198/19-198-0001.flac\t6400\n")
    entries, kind = read_source(fairseq)
    assert kind == "fairseq" and all(Path(e.path).is_file() for e in entries)

    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"audio_filepath": str(libri / "19-198-0000.flac"), "text": "HI", "speaker": 7,
                                 "lang": "en"}) + "\n")
    (entry,), kind = read_source(jsonl)
    assert kind == "jsonl" and entry.text == "HI" and entry.speaker == "7" and entry.extra == {"lang": "en"}

    index = make_shards(read_source(tmp_path / "libri")[0], tmp_path / "out", ShardOptions(), progress=False)
    assert index["totals"]["speakers"] == 1 and index["charset"] == " BDEGHLORWY"


def test_a_killed_job_leaves_no_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = read_source(_wav_corpus(tmp_path / "wavs"))[0]
    make_shards(entries, tmp_path / "out", ShardOptions(max_count=2), progress=False)
    assert (tmp_path / "out" / "index.json").is_file()
    interrupt_shard_writing(monkeypatch)
    with pytest.raises(KeyboardInterrupt):  # replacing the finished set
        make_shards(entries, tmp_path / "out", ShardOptions(max_count=2, workers=1), progress=False, overwrite=True)
    assert not (tmp_path / "out" / "index.json").exists()


def test_inspect_finds_missing_and_wrong_shards(tmp_path: Path) -> None:
    entries = read_source(_wav_corpus(tmp_path / "wavs"))[0]
    make_shards(entries, tmp_path / "out", ShardOptions(max_count=2), progress=False)
    summary = inspect(tmp_path / "out", tmp_path / "hist.png")
    assert summary["utterances"] == 6 and summary["problems"] == [] and (tmp_path / "hist.png").stat().st_size > 0
    (tmp_path / "out" / "shard-000001.tar").unlink()
    (tmp_path / "out" / "shard-000002.tar").write_bytes((tmp_path / "out" / "shard-000000.tar").read_bytes())
    problems = inspect(tmp_path / "out")["problems"]
    assert any("shard-000001.tar: listed in the index but missing" in p for p in problems)
    assert any(p.startswith("shard-000002.tar: holds 2 samples") and "other keys" in p for p in problems)


def test_split_holds_out_speakers_deterministically(tmp_path: Path) -> None:
    manifest = tmp_path / "all.tsv"
    rows = [f"u{i}\ta{i}.wav\tspk{i % 7}\tTEXT {i}" for i in range(70)]
    manifest.write_text("id\tpath\tspeaker\ttext\n" + "\n".join(rows) + "\n")
    first = split_manifest(manifest, tmp_path / "a", dev_speakers=2, seed=3)
    second = split_manifest(manifest, tmp_path / "b", dev_speakers=2, seed=3)
    assert first == second and first["dev"] == 20 and first["train"] == 50
    assert (tmp_path / "a" / "dev.tsv").read_text() == (tmp_path / "b" / "dev.tsv").read_text()
    train = read_source(tmp_path / "a" / "train.tsv")[0]
    dev = read_source(tmp_path / "a" / "dev.tsv")[0]
    assert all(e.path == str((tmp_path / Path(e.path).name).resolve()) for e in train + dev)  # absolute now
    assert {e.speaker for e in dev} == set(first["dev_speakers"]) and not {e.speaker for e in train} & {
        e.speaker for e in dev}
    by_fraction = split_manifest(manifest, tmp_path / "c", dev_fraction=0.3)
    assert by_fraction["dev_speakers"] and by_fraction["train"] + by_fraction["dev"] == 70


def test_synth_cli_writes_train_and_held_out_dev(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "data_tools", "synth", "--output", str(tmp_path / "syn"),
                          "--hours", "0.01", "--speakers", "6", "--dev-speakers", "2", "--quiet", "--workers", "2"],
                         capture_output=True, text=True, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr
    train = json.loads((tmp_path / "syn" / "train" / "index.json").read_text())
    dev = json.loads((tmp_path / "syn" / "dev" / "index.json").read_text())
    assert train["totals"]["speakers"] == 4 and dev["totals"]["speakers"] == 2
    hours = train["totals"]["hours"] + dev["totals"]["hours"]
    assert 0.008 < hours < 0.014
    samples = _read_shards(tmp_path / "syn" / "dev")
    texts = {json.loads(s["json"])["text"] for s in samples.values()}
    assert all(t and set(t) <= set(train["charset"]) | set(dev["charset"]) for t in texts)


def test_synth_cli_utterance_durations(tmp_path: Path) -> None:
    def synth(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "data_tools", "synth", "--output", str(tmp_path / "syn"),
                               "--hours", "0.02", "--speakers", "3", "--dev-speakers", "0", "--quiet", *extra],
                              capture_output=True, text=True, cwd=REPO, check=False)

    out = synth("--utterance-seconds", "16", "18")
    assert out.returncode == 0, out.stderr
    durations = [json.loads(s["json"])["duration"] for s in _read_shards(tmp_path / "syn" / "train").values()]
    # Text is drawn for the target duration; speaking rates and phone lengths vary around it.
    assert len(durations) >= 3 and min(durations) > 11 and max(durations) < 24
    bad = synth("--utterance-seconds", "5", "2")
    assert bad.returncode == 2 and "--utterance-seconds" in bad.stderr


def test_make_shards_cli_reports_missing_input(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "data_tools", "make-shards", "--input", str(tmp_path / "nope"),
                          "--output", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, check=False)
    assert out.returncode == 2 and "does not exist" in out.stderr


@pytest.mark.skipif(not (AN4 / "train.tsv").is_file(), reason=f"AN4 not found at {AN4}")
def test_an4_shards(tmp_path: Path) -> None:
    entries, _kind = read_source(AN4 / "train.tsv")
    index = make_shards(entries, tmp_path / "an4", ShardOptions(max_count=300, workers=2), progress=False)
    totals = index["totals"]
    assert totals["num_samples"] == 948 and totals["skipped"] == 0 and totals["speakers"] == 74
    assert math.isclose(totals["seconds"] / 60, 42.4, abs_tol=0.05)
    assert set(index["charset"]) <= set(" ABCDEFGHIJKLMNOPQRSTUVWXYZ")
