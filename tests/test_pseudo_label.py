"""Pseudo-labelling: the confidence of a CTC path, the selection, and the command end to end (a
manifest that make-shards reads and fine-tuning can train on)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from finetune.pseudo_label import confidence, select
from speechssl.asr.tokenizer import CharTokenizer
from speechssl_cli import main as speechssl_main
from tests.conftest import REPO


def _log_probs(tokenizer: CharTokenizer, frames: list[dict[str, float]]) -> torch.Tensor:
    """(T, V) log-probabilities: each frame's listed tokens get their probability, the rest share what is left."""
    out = torch.full((len(frames), len(tokenizer)), 0.0)
    for t, probs in enumerate(frames):
        rest = (1 - sum(probs.values())) / (len(tokenizer) - len(probs))
        out[t] = rest
        for token, p in probs.items():
            out[t, tokenizer.vocab.index(token)] = p
    return out.log()


def test_confidence_is_the_mean_posterior_of_the_emitted_tokens() -> None:
    tokenizer = CharTokenizer.build(["AB"])
    blank = tokenizer.blank
    # A A (its best frame 0.9) blank B (0.7) blank blank: tokens A and B -> (0.9 + 0.7) / 2; the
    # blanks' 0.99 do not count. The second row is the first's first 3 frames (padding after).
    first = _log_probs(tokenizer, [{"A": 0.6}, {"A": 0.9}, {"<blank>": 0.99}, {"B": 0.7}, {"<blank>": 0.99},
                                   {"<blank>": 0.99}])
    silent = _log_probs(tokenizer, [{"<blank>": 0.8}] * 6)
    # A, blank, A: two emissions of A, each its own run
    twice = _log_probs(tokenizer, [{"A": 0.5}, {"<blank>": 0.9}, {"A": 0.8}, {"<blank>": 0.9}] + [{"<blank>": 0.9}] * 2)
    got = confidence(torch.stack([first, first, silent, twice]), torch.tensor([6, 3, 6, 4]), blank)
    assert got == pytest.approx([0.8, 0.9, 0.0, 0.65], abs=1e-6)


def test_selection_drops_empty_then_unconfident_then_the_least_confident_and_says_why() -> None:
    rows = [{"id": str(i), "text": text, "confidence": c}
            for i, (text, c) in enumerate([("A", 0.9), ("", 0.0), ("B", 0.2), ("C", 0.6), ("D", 0.8), ("E", 0.7)])]
    kept, rejected = select(rows, min_confidence=0.5, keep_fraction=0.5)  # 4 candidates: the 2 best stay
    assert [r["id"] for r in kept] == ["0", "4"]
    assert {r["id"]: r["reason"] for r in rejected} == {"1": "empty", "2": "low_confidence", "3": "least_confident",
                                                        "5": "least_confident"}
    kept, rejected = select(rows, 0.0, 1.0)
    assert len(kept) == 5 and [r["reason"] for r in rejected] == ["empty"]
    with pytest.raises(ValueError, match="keep-fraction"):
        select(rows, 0.0, 0.0)
    with pytest.raises(ValueError, match="min-confidence"):
        select(rows, 1.5, 1.0)


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    """A random tiny CTC model with a character head, sharpened so that its paths emit letters."""
    from speechssl import load_model_config
    from speechssl.models.ctc import CTCModel

    torch.manual_seed(0)
    tokenizer = CharTokenizer.build(["THE QUICK BROWN FOX"])
    model = CTCModel(load_model_config(REPO / "configs/model/tiny_transformer.yaml"), len(tokenizer),
                     blank=tokenizer.blank, vocab=tokenizer.vocab, tokenizer=tokenizer.to_dict(), normalize_audio=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save(tmp_path / "teacher.pt")
    return tmp_path / "teacher.pt"


def _read_tsv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_pseudo_label_writes_a_manifest_of_the_confident_that_make_shards_reads(
        teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from data_tools.shards import ShardOptions, make_shards
    from finetune.transcribe import load_model, read_inputs
    from speechssl.asr.inference import emissions
    from speechssl.data.inputs import read_utterances
    from speechssl.data.manifest import read_source

    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    lines = ["id\tpath\tspeaker\ttext\tsession"]
    for i, seconds in enumerate([0.6, 1.0, 1.4, 0.8, 1.2, 0.9]):
        sf.write(audio / f"u{i}.wav", 0.1 * rng.standard_normal(int(16000 * seconds)), 16000, subtype="PCM_16")
        lines.append(f"u{i}\taudio/u{i}.wav\tspk{i % 2}\tTRUE TEXT\ts{i}")
    lines.append("broken\taudio/missing.wav\tspk0\tX\ts9")
    (tmp_path / "unlabelled.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "pl" / "pseudo.tsv"
    assert speechssl_main(["pseudo-label", str(teacher), str(tmp_path / "unlabelled.tsv"), "--output", str(out),
                           "--keep-fraction", "0.5", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    # What the teacher says of each utterance, computed here with the library's own calls.
    model, device = load_model(str(teacher), "cpu")
    tokenizer = CharTokenizer.from_dict(model.tokenizer)
    expected = {}
    for batch, log_probs, frames in emissions(model, read_inputs([str(tmp_path / "unlabelled.tsv")], Counter(), model),
                                              device):
        for utt, score, ids in zip(batch, confidence(log_probs, frames, model.blank),
                                   [log_probs[i, :n].argmax(-1) for i, n in enumerate(frames.tolist())], strict=True):
            text = tokenizer.decode([int(t) for t in torch.unique_consecutive(ids) if t != model.blank])
            expected[utt.id] = (text, round(score, 4))
    assert len(expected) == 6
    speaking = sorted((uid for uid, (text, _) in expected.items() if text.strip()), key=lambda u: -expected[u][1])
    assert len(speaking) >= 4, "the sharpened teacher should emit letters for most of the noise"
    chosen = speaking[: round(0.5 * len(speaking))]

    kept = _read_tsv(out)
    assert [r["id"] for r in kept] == [u for u in expected if u in chosen]  # input order
    for row in kept:
        assert row["text"] == expected[row["id"]][0] and float(row["confidence"]) == expected[row["id"]][1]
        assert Path(row["path"]) == (audio / f"{row['id']}.wav").resolve()
        assert row["speaker"] == f"spk{int(row['id'][1]) % 2}" and row["session"] == f"s{row['id'][1]}"
    rejected = _read_tsv(tmp_path / "pl" / "pseudo.rejected.tsv")
    assert sorted(r["id"] for r in rejected) == sorted(set(expected) - set(chosen))
    assert {r["reason"] for r in rejected} <= {"least_confident", "empty"}
    assert summary["kept"] == len(chosen) and sum(summary["rejected"].values()) == len(rejected)
    assert summary["skipped"] == {"missing_file": 1}  # counted, with the reason on stderr

    # The manifest shards as any other: its transcripts are the hypotheses, its confidence travels along.
    entries, _ = read_source(out)
    index = make_shards(entries, tmp_path / "shards", ShardOptions(workers=1, max_count=2))
    assert index["totals"]["num_samples"] == len(chosen) and index["totals"]["skipped"] == 0
    shard_rows = {u.id: u for u in read_utterances([str(tmp_path / "shards")], Counter())}
    assert {uid: u.text for uid, u in shard_rows.items()} == {u: expected[u][0] for u in chosen}
    assert all(float(u.meta["confidence"]) == expected[uid][1] for uid, u in shard_rows.items())

    # Shards as the input: the audio paths they recorded are read again.
    again = tmp_path / "again.tsv"
    assert speechssl_main(["pseudo-label", str(teacher), str(tmp_path / "shards"), "--output", str(again),
                           "--device", "cpu"]) == 0
    assert {r["id"]: r["text"] for r in _read_tsv(again)} == {u: expected[u][0] for u in chosen}


def test_pseudo_label_refuses_bad_options_before_running(teacher: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.tsv").write_text("id\tpath\n")
    assert speechssl_main(["pseudo-label", str(teacher), str(tmp_path / "a.tsv"), "--output",
                           str(tmp_path / "out.txt")]) == 2
    assert "must be a .tsv" in capsys.readouterr().err
    assert speechssl_main(["pseudo-label", str(teacher), str(tmp_path / "a.tsv"), "--output",
                           str(tmp_path / "out.tsv"), "--keep-fraction", "2"]) == 2
    assert "--keep-fraction" in capsys.readouterr().err
    assert not (tmp_path / "out.tsv").exists()
