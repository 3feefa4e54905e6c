"""Corpus manifests in, shards out: fairseq labels, NeMo segments and lhotse cuts, on real audio files
sharded with make-shards and read back with webdataset, checked sample for sample against the source."""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from data_tools.cli import main as data_cli
from data_tools.shards import ShardOptions, make_shards
from speechssl.data.audio import decode_audio, prepare
from speechssl.data.inputs import read_utterances
from speechssl.data.manifest import read_source

OPTIONS = ShardOptions(workers=1, min_seconds=0.0)


def _write_pcm(path: Path, seconds: float, rate: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A 16-bit WAV of noise; returns its samples as soundfile reads them, float32 ``(S,)`` or ``(S, C)``."""
    shape = (round(seconds * rate), channels) if channels > 1 else (round(seconds * rate),)
    pcm = np.random.default_rng(seed).integers(-10000, 10000, size=shape, dtype=np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, pcm, rate, subtype="PCM_16")
    return sf.read(path, dtype="float32")[0]


def _shard(source: Path, output: Path) -> tuple[dict, dict[str, tuple[np.ndarray, dict]]]:
    """Shard ``source`` as make-shards reads it; the index and each sample's audio and JSON by id."""
    index = make_shards(read_source(source)[0], output, OPTIONS, progress=False)
    return index, _read_back(output)


def _read_back(output: Path) -> dict[str, tuple[np.ndarray, dict]]:
    index = json.loads((output / "index.json").read_text())
    urls = [str(output / s["name"]) for s in index["shards"]]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        audio, rate = decode_audio(sample["flac"])
        assert rate == 16000
        assert meta["id"] not in samples, meta["id"]
        samples[meta["id"]] = (audio, meta)
    return samples


def _skipped(output: Path) -> dict[str, str]:
    with (output / "skipped.tsv").open(newline="") as f:
        return {row["id"]: row["reason"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}


# fairseq


def test_fairseq_manifest_labels_arrive_in_shards(tmp_path: Path) -> None:
    audio = {name: _write_pcm(tmp_path / "corpus" / "spk" / f"{name}.wav", 0.5 + i / 4, seed=i)
             for i, name in enumerate(("a", "b"))}
    manifest = tmp_path / "manifests" / "train.tsv"
    manifest.parent.mkdir()
    # The root is relative to the manifest's folder.
    manifest.write_text("../corpus\nspk/a.wav\t8000\nspk/b.wav\t12000\n")
    manifest.with_suffix(".wrd").write_text("HELLO WORLD\nIT'S ME\n")
    manifest.with_suffix(".ltr").write_text("H E L L O | W O R L D |\nI T ' S | M E |\n")
    index, samples = _shard(manifest, tmp_path / "out")
    assert read_source(manifest)[1] == "fairseq"
    assert {k: m["text"] for k, (_, m) in samples.items()} == {"spk/a": "HELLO WORLD", "spk/b": "IT'S ME"}
    assert samples["spk/a"][1]["ltr"] == "H E L L O | W O R L D |"
    assert index["charset"] == " 'DEHILMORSTW"
    for name, expected in audio.items():
        np.testing.assert_array_equal(samples[f"spk/{name}"][0], expected)
        assert "segment" not in samples[f"spk/{name}"][1]

    # Letters alone give the text, words rebuilt; an absolute root works as well.
    manifest.with_suffix(".wrd").unlink()
    manifest.write_text(f"{tmp_path / 'corpus'}\nspk/a.wav\t8000\nspk/b.wav\t12000\n")
    entries, _ = read_source(manifest)
    assert [(e.text, e.extra) for e in entries] == [("HELLO WORLD", {}), ("IT'S ME", {})]
    assert all(Path(e.path).is_file() for e in entries)


def test_a_fairseq_label_file_of_another_length_is_an_error(tmp_path: Path) -> None:
    _write_pcm(tmp_path / "a.wav", 0.5)
    manifest = tmp_path / "dev.tsv"
    manifest.write_text(f"{tmp_path}\na.wav\t8000\na.wav\t8000\n")
    manifest.with_suffix(".ltr").write_text("A |\n")
    with pytest.raises(ValueError, match=r"dev\.ltr has 1 lines but .*dev\.tsv lists 2 audio files"):
        read_source(manifest)


# NeMo


def test_nemo_segments_are_cut_exactly_and_past_the_end_skipped(tmp_path: Path, capsys) -> None:
    long = _write_pcm(tmp_path / "audio" / "long.wav", 4.0)  # 64000 samples
    short = _write_pcm(tmp_path / "audio" / "short.wav", 1.0, seed=1)  # 16000 samples
    rows = [
        {"audio_filepath": "audio/long.wav", "offset": 0.5, "duration": 1.0, "text": "ONE"},
        {"audio_filepath": "audio/long.wav", "offset": 1.25, "duration": 0.75, "text": "TWO", "speaker": "s1"},
        {"audio_filepath": "audio/long.wav", "offset": 0.29, "duration": 0.01, "id": "own-id"},  # 4639.99.. -> 4640
        {"audio_filepath": "audio/long.wav", "offset": 3.5, "duration": 1.0, "text": "PAST"},
        {"audio_filepath": "audio/long.wav", "offset": 4.5, "duration": 0.1, "text": "AFTER"},
        {"audio_filepath": "audio/long.wav", "text": "ALL", "lang": "en"},  # no times: the whole file
        {"audio_filepath": "audio/short.wav", "duration": 0.5, "id": "half"},  # from 0, as NeMo reads it
        {"audio_filepath": "audio/short.wav", "duration": 1 + 1 / 16000, "id": "rounded"},  # one sample over: the end
        {"audio_filepath": "audio/short.wav", "duration": 1 + 2 / 16000, "id": "over"},
    ]
    manifest = tmp_path / "train_manifest.json"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data_cli(["make-shards", "--input", str(manifest), "--output", str(tmp_path / "out"), "--workers", "1",
                     "--min-seconds", "0", "--quiet"]) == 0
    assert "jsonl, 9 inputs" in capsys.readouterr().out
    samples = _read_back(tmp_path / "out")
    expected = {"audio/long@0.5": long[8000:24000], "audio/long@1.25": long[20000:32000], "own-id": long[4640:4800],
                "audio/long": long, "half": short[:8000], "rounded": short}
    assert sorted(samples) == sorted(expected)
    for uid, slice_ in expected.items():
        np.testing.assert_array_equal(samples[uid][0], slice_)
    meta = samples["audio/long@1.25"][1]
    assert (meta["text"], meta["speaker"], meta["num_samples"], meta["duration"]) == ("TWO", "s1", 12000, 0.75)
    assert meta["segment"] == {"offset": 1.25, "duration": 0.75, "channel": None, "start": 20000, "frames": 12000}
    assert meta["path"] == str(tmp_path / "audio" / "long.wav")
    assert samples["audio/long"][1]["lang"] == "en" and "segment" not in samples["audio/long"][1]
    assert _skipped(tmp_path / "out") == {"audio/long@3.5": "segment_past_end", "audio/long@4.5": "segment_past_end",
                                          "over": "segment_past_end"}
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["skipped"] == {"segment_past_end": 3} and index["charset"] == "AELNOTW"  # ONE TWO ALL

    # The model-input reader cuts the same segments.
    utterances = {u.id: u.audio for u in read_utterances([str(manifest)], Counter())}
    np.testing.assert_array_equal(utterances["audio/long@0.5"], long[8000:24000])


def test_a_nemo_segment_is_cut_at_the_file_rate_before_resampling(tmp_path: Path) -> None:
    source = _write_pcm(tmp_path / "a.wav", 2.0, rate=22050)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio_filepath": "a.wav", "offset": 0.3, "duration": 0.7}) + "\n")
    _index, samples = _shard(tmp_path / "m.jsonl", tmp_path / "out")
    (audio, meta), = samples.values()
    exact = source[6615:6615 + 15435]  # 0.3 s and 0.7 s at 22050 Hz
    resampled = prepare(exact, 22050, 16000, 0.0, 600.0)
    assert len(audio) == len(resampled) == meta["num_samples"] == 11200
    np.testing.assert_allclose(audio, resampled, atol=1.01 / 32768)  # 16-bit storage
    assert meta["segment"]["start"] == 6615 and meta["segment"]["frames"] == 15435
    assert meta["original_sample_rate"] == 22050


def test_only_the_segment_is_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_pcm(tmp_path / "long.wav", 30.0)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio_filepath": "long.wav", "offset": 20.0, "duration": 0.5}))
    asked = []
    read = sf.SoundFile.read

    def counting(self, frames=-1, *args, **kwargs):
        asked.append(frames)
        return read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", counting)
    index = make_shards(read_source(tmp_path / "m.jsonl")[0], tmp_path / "out", OPTIONS, progress=False)
    assert asked == [8000] and index["shards"][0]["lengths"] == [8000]


@pytest.mark.parametrize("row", [{"offset": -0.5, "duration": 1.0}, {"offset": 0.5, "duration": -1.0},
                                 {"offset": "soon"}, {"duration": float("nan")}])
def test_bad_nemo_times_are_errors_naming_the_row(tmp_path: Path, row: dict) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "a.wav"}) + "\n" + json.dumps({"audio_filepath": "a.wav", **row}))
    with pytest.raises(ValueError, match=r"m\.jsonl: row 2, (offset|duration)"):
        read_source(manifest)


# lhotse


def test_lhotse_cuts_match_lhotse_own_audio(tmp_path: Path) -> None:
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    _write_pcm(tmp_path / "mono.wav", 3.0, seed=1)
    _write_pcm(tmp_path / "stereo.wav", 2.0, channels=2, seed=2)
    _write_pcm(tmp_path / "slow.wav", 2.0, rate=8000, seed=3)
    recordings = RecordingSet.from_recordings(Recording.from_file(tmp_path / f"{name}.wav", recording_id=name)
                                              for name in ("mono", "stereo", "slow"))
    supervisions = SupervisionSet.from_segments([
        SupervisionSegment("m2", "mono", 1.2, 0.5, channel=0, text="WORLD", speaker="ann", language="English"),
        SupervisionSegment("m1", "mono", 0.6, 0.5, channel=0, text="HELLO", speaker="ann", language="English"),
        SupervisionSegment("s1", "stereo", 0.2, 1.0, channel=1, text="RIGHT", speaker="bob"),
        SupervisionSegment("l1", "slow", 0.1, 1.0, channel=0, text="SLOW"),
    ])
    full = {c.recording_id: c for c in CutSet.from_manifests(recordings=recordings, supervisions=supervisions)}
    cuts = CutSet.from_cuts([
        full["mono"].truncate(offset=0.5, duration=1.5, preserve_id=True),
        full["stereo"].with_channels(1).truncate(offset=0.15, duration=1.1),
        full["slow"].truncate(offset=0.25, duration=1.3, preserve_id=True),
    ])
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    index, samples = _shard(tmp_path / "cuts.jsonl.gz", tmp_path / "out")
    assert read_source(tmp_path / "cuts.jsonl.gz")[1] == "lhotse" and index["totals"]["skipped"] == 0
    by_recording = {m["recording_id"]: (a, m) for a, m in samples.values()}
    for cut in cuts:
        audio, meta = by_recording[cut.recording_id]
        theirs = cut.load_audio()[0]  # (channels, samples): one channel
        assert meta["id"] == cut.id
        if cut.sampling_rate == 16000:
            np.testing.assert_array_equal(audio, theirs)
        else:
            resampled = prepare(theirs, cut.sampling_rate, 16000, 0.0, 600.0)
            assert len(audio) == len(resampled) == round(cut.duration * 16000)
            np.testing.assert_allclose(audio, resampled, atol=1.01 / 32768)
    mono, stereo = by_recording["mono"][1], by_recording["stereo"][1]
    assert (mono["text"], mono["speaker"]) == ("HELLO WORLD", "ann")  # in start order
    assert [s["id"] for s in mono["supervisions"]] == ["m1", "m2"]
    assert mono["supervisions"][0]["start"] == pytest.approx(0.1)  # relative to the cut
    assert (stereo["text"], stereo["speaker"], stereo["segment"]["channel"]) == ("RIGHT", "bob", 1)
    assert index["totals"]["speakers"] == 2 and index["charset"] == " DEGHILORSTW"


def _file(path: Path, *channels: int) -> dict:
    return {"type": "file", "channels": list(channels or (0,)), "source": str(path)}


def _cut(cut_id: str, start: float = 0.0, duration: float = 1.0, sources: list[dict] | None = None,
         recording: dict | None = None, **changes) -> dict:
    """A MonoCut dict as lhotse writes it, of a 16 kHz recording of 2 s (``sources``: its files,
    ``recording``: changes to it, ``changes``: to the cut)."""
    return {"id": cut_id, "start": start, "duration": duration, "channel": 0, "supervisions": [],
            "recording": {"id": f"rec-{cut_id}", "sources": sources, "sampling_rate": 16000, "num_samples": 32000,
                          "duration": 2.0, **(recording or {})},
            "type": "MonoCut", **changes}


def test_lhotse_cuts_lhotse_cannot_slice_as_files_are_skipped_by_name(tmp_path: Path) -> None:
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    first, second = _write_pcm(a, 2.0), _write_pcm(b, 2.0, seed=1)
    supervisions = [{"id": "x", "recording_id": "rec-ok", "start": 0.2, "duration": 0.2, "channel": 0, "text": "B",
                     "speaker": "one"},
                    {"id": "y", "recording_id": "rec-ok", "start": 0.0, "duration": 0.2, "channel": 0, "text": "A",
                     "speaker": "two"}]
    features_only = _cut("features", features={"type": "fbank", "storage_path": "f"})
    features_only.pop("recording")
    rows = [
        _cut("ok", 0.25, 0.5, [_file(a)], supervisions=supervisions),
        _cut("right", 0.5, 0.25, [_file(a, 0), _file(b, 1)], channel=1),  # one file per channel
        _cut("multi", sources=[_file(a, 0, 1)], channel=[0, 1], type="MultiCut"),
        {"id": "pad", "duration": 1.0, "feat_value": -23.0, "num_frames": 100, "num_features": 80,
         "frame_shift": 0.01, "sampling_rate": 16000, "type": "PaddingCut"},
        _cut("remote", sources=[{"type": "url", "channels": [0], "source": "https://example.com/a.wav"}]),
        features_only,
        _cut("faster", sources=[_file(a)], recording={"transforms": [{"name": "Speed", "kwargs": {"factor": 1.1}}]}),
        _cut("late", 1.5, 1.0, [_file(a)]),
    ]
    manifest = tmp_path / "cuts.jsonl"  # plain JSON lines, told apart by their content
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index, samples = _shard(manifest, tmp_path / "out")
    assert read_source(manifest)[1] == "lhotse"
    assert sorted(samples) == ["ok", "right"]
    audio, meta = samples["ok"]
    np.testing.assert_array_equal(audio, first[4000:12000])
    assert (meta["text"], meta["speaker"]) == ("A B", None)  # in start order; the speakers differ
    np.testing.assert_array_equal(samples["right"][0], second[8000:12000])
    assert samples["right"][1]["path"] == str(b)
    assert _skipped(tmp_path / "out") == {"multi": "unsupported_cut", "pad": "unsupported_cut",
                                          "remote": "unsupported_cut", "features": "unsupported_cut",
                                          "faster": "unsupported_cut", "late": "segment_past_end"}
    assert index["skipped"] == {"segment_past_end": 1, "unsupported_cut": 5}
    report = (tmp_path / "out" / "skipped.tsv").read_text()
    for detail in ("cut remote: a 'url' audio source", "cut faster: recording transforms (Speed)",
                   "cut multi: a MultiCut", "cut features: no recording (features only)"):
        assert detail in report


def test_gzipped_nemo_rows_are_not_taken_for_cuts(tmp_path: Path) -> None:
    _write_pcm(tmp_path / "a.wav", 1.0)
    with gzip.open(tmp_path / "m.jsonl.gz", "wt") as f:
        f.write(json.dumps({"audio_filepath": "a.wav", "duration": 1.0, "text": "HI"}) + "\n")
    (entry,), kind = read_source(tmp_path / "m.jsonl.gz")
    assert kind == "jsonl" and entry.text == "HI" and entry.duration == 1.0
