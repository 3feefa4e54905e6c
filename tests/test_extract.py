"""Feature extraction to disk: formats, inputs, resume, long recordings, the console entry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data_tools.shards import ShardOptions, make_shards
from data_tools.synthetic import corpus_entries, render
from speechssl import Wav2Vec2Model, load_model, load_model_config
from speechssl.data.manifest import Entry
from speechssl.extract import read_features
from speechssl.features import LayerFeatures
from speechssl_cli import main as speechssl
from tests.conftest import REPO


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 14 utterances as WAV files (in a directory) and as shards built from them."""
    root = tmp_path_factory.mktemp("extract")
    entries = corpus_entries(0.02, num_speakers=3, seed=2)[:14]
    (root / "wav").mkdir()
    files = []
    for e in entries:
        path = root / "wav" / f"{e.id}.wav"
        sf.write(path, render(**e.synth), 16000, subtype="PCM_16")
        files.append(Entry(id=e.id, path=str(path), text=e.text, speaker=e.speaker))
    make_shards(files, root / "shards", ShardOptions(max_count=5, workers=1), progress=False)
    torch.manual_seed(0)
    Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_transformer.yaml")).save(root / "model.pt")
    return root


def _run(*args: str) -> dict:
    """The CLI in this process; its JSON summary."""
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        assert speechssl(["extract", *args, "--quiet"]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def _features(folder: Path) -> dict[str, dict[int, np.ndarray]]:
    rows = list(read_features(folder))
    ids = [uid for uid, _, _ in rows]
    assert len(ids) == len(set(ids)), "an utterance was written twice"
    return {uid: layers for uid, layers, _ in rows}


@pytest.mark.parametrize("fmt", ["npy", "shards", "safetensors"])
def test_every_format_round_trips_the_models_features(corpus: Path, tmp_path: Path, fmt: str) -> None:
    summary = _run(str(corpus / "model.pt"), str(corpus / "shards"), "--output", str(tmp_path / fmt),
                   "--format", fmt, "--layers", "0,2", "--per-file", "4", "--batch-seconds", "5")
    assert summary["written"] == 14 and summary["layers"] == [0, 2]
    rows = list(read_features(tmp_path / fmt))
    assert len(rows) == 14
    features = LayerFeatures(load_model(corpus / "model.pt"), [0, 2])
    for uid, layers, meta in rows[:5]:
        assert meta["id"] == uid and meta["speaker"] and meta["text"]
        audio, _ = sf.read(corpus / "wav" / f"{uid}.wav", dtype="float32")
        expected = features(torch.from_numpy(audio)[None]).hidden_states  # alone: no batching
        assert sorted(layers) == [0, 2]
        for k, want in zip([0, 2], expected, strict=True):
            assert layers[k].dtype == np.float32 and layers[k].shape == tuple(want.shape[1:])
            np.testing.assert_allclose(layers[k], want[0].numpy(), rtol=0, atol=1e-5)


def test_shards_and_a_directory_of_the_same_audio_give_the_same_features(corpus: Path, tmp_path: Path) -> None:
    model = str(corpus / "model.pt")
    _run(model, str(corpus / "shards"), "--output", str(tmp_path / "a"), "--layers", "all")
    _run(model, str(corpus / "wav"), "--output", str(tmp_path / "b"), "--layers", "all", "--batch-seconds", "3")
    a, b = _features(tmp_path / "a"), _features(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 14
    for uid in a:
        for k in a[uid]:
            np.testing.assert_allclose(a[uid][k], b[uid][k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["npy", "shards", "safetensors"])
def test_a_killed_extraction_resumes_without_duplicates(corpus: Path, tmp_path: Path, fmt: str) -> None:
    """What a kill leaves: complete files of the first utterances, a half-written file (npy: an
    index line without its newline; tar and safetensors: a ``.partial`` file). Starting again
    writes exactly the rest, and the result equals an uninterrupted run."""
    args = [str(corpus / "model.pt"), str(corpus / "shards"), "--format", fmt, "--per-file", "4", "--layers", "1"]
    _run(*args, "--output", str(tmp_path / "whole"))
    cut = tmp_path / "cut"
    _run(*args, "--output", str(cut))
    if fmt == "npy":
        lines = (cut / "index.tsv").read_text().splitlines(keepends=True)
        (cut / "index.tsv").write_text("".join(lines[:7]) + lines[7].rstrip("\n"))  # 6 complete, 1 torn
        kept = 6
    else:
        files = sorted(cut.glob("features-*"))
        files[-1].rename(files[-1].with_name(files[-1].name + ".partial"))
        files[-2].unlink()
        kept = 4 * (len(files) - 2)
    summary = _run(*args, "--output", str(cut))
    assert summary["already written"] == kept and summary["written"] == 14 - kept
    whole, resumed = _features(tmp_path / "whole"), _features(cut)
    assert sorted(whole) == sorted(resumed)
    assert all(np.array_equal(whole[u][1], resumed[u][1]) for u in whole)
    assert not list(cut.glob("*.partial"))


@pytest.mark.parametrize("name", ["tiny_transformer", "tiny_conformer", "tiny_zipformer"])
def test_a_long_recording_in_windows_matches_one_pass(name: str) -> None:
    """60 s in windows of 10 s overlapping by 2 s: the same frames as one pass. The group_norm
    extractor is normalised with the whole recording's statistics, so layer 0 matches to rounding;
    deeper layers lose only the attention context beyond a window (the tolerances the README
    documents for these models)."""
    torch.manual_seed(0)
    features = LayerFeatures(Wav2Vec2Model(load_model_config(REPO / f"configs/model/{name}.yaml")), "all")
    audio = torch.from_numpy(render(**corpus_entries(0.02, num_speakers=1, seed=3)[0].synth))
    audio = audio.repeat(60 * 16000 // len(audio) + 1)[: 60 * 16000 + 777]
    whole = features(audio[None]).hidden_states
    windows = features.windowed(audio, 10 * 16000, 2 * 16000, batch_windows=3)
    plan = features.window_plan(len(audio), 160000, 32000)
    assert len(plan) == 8 and plan[-1][1] == len(audio)  # starts every 8 s; the last reaches the end
    assert [p[2] for p in plan[1:]] == [p[3] for p in plan[:-1]] and plan[0][2] == 0  # kept frames tile
    assert plan[-1][3] == windows.lengths.item() == whole[0].shape[1]
    for k, (a, b) in enumerate(zip(whole, windows.hidden_states, strict=True)):
        relative = float((a - b).norm() / a.norm())
        assert relative < (1e-5 if k == 0 else 5e-3), (k, relative)


def test_window_settings_are_checked() -> None:
    features = LayerFeatures(Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_transformer.yaml")))
    for window, overlap in ((160000, 500), (160001, 32000), (32000, 32000)):
        with pytest.raises(ValueError, match="multiples of 320 samples"):
            features.window_plan(10**6, window, overlap)


def test_console_entry_and_clear_errors(corpus: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "speechssl_cli", "extract", str(corpus / "model.pt"),
                           str(corpus / "wav"), "--output", str(tmp_path / "x"), "--quiet", "--layers", "last"],
                          capture_output=True, text=True, cwd=REPO, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["written"] == 14
    assert len(list((tmp_path / "x" / "layer2").glob("*.npy"))) == 14
    for args, words in (([str(tmp_path / "nothing"), str(corpus / "wav")], "does not exist"),
                        ([str(corpus / "model.pt"), str(corpus / "wav"), "--layers", "7"], "layers [7]"),
                        ([str(corpus / "model.pt"), str(corpus / "wav"), "--layers", "1"],
                         "other settings (layers: [2] there, [1] now)")):
        bad = subprocess.run([sys.executable, "-m", "speechssl_cli", "extract", *args, "--output", str(tmp_path / "x")],
                             capture_output=True, text=True, cwd=REPO, check=False, timeout=300)
        assert bad.returncode == 2 and words in bad.stderr, bad.stderr[-2000:]
