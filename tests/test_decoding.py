"""Beam search with a lexicon and an n-gram LM, the LM estimate, and checkpoint averaging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.lm import build_lm
from finetune.ngram import EOS, UNK, KneserNey
from speechssl.asr.beam import BeamDecoder, DecoderSettings, LanguageModel, read_lexicon
from speechssl.asr.decoding import GreedyDecoder
from speechssl.asr.tokenizer import CharTokenizer

TEXT = ["THE CAT SAT", "THE CAT RAN", "A CAT SAT ON THE MAT", "THE DOG SAT", "THE CAT", "A DOG RAN",
        "THE CAT SAT ON A MAT", "SEE THE CAT"]


def _normalisation_error(model: KneserNey, context: tuple[str, ...]) -> float:
    return abs(sum(10 ** model.logprob(w, context) for w in [*model.words, EOS, UNK]) - 1)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_is_a_distribution_after_every_context(order: int) -> None:
    model = KneserNey.estimate(TEXT, order)
    for context in [(), ("<s>",), ("THE",), ("<s>", "THE"), ("THE", "CAT"), ("CAT", "SAT", "ON"), ("MAT", "ZEBRA"),
                    ("ZEBRA",), ("<s>", "A", "DOG")]:
        assert _normalisation_error(model, context) < 1e-9, context


def test_kneser_ney_prefers_what_it_saw_and_backs_off() -> None:
    model = KneserNey.estimate(TEXT, 3)
    after_the = [model.logprob(w, ("<s>", "THE")) for w in ("CAT", "DOG", "MAT")]
    assert after_the == sorted(after_the, reverse=True) and len(set(after_the)) == 3
    # an unseen continuation gets the lower order's probability times the back-off weight
    backoff = model.backoffs[("THE",)]
    assert model.logprob("RAN", ("THE",)) == pytest.approx(backoff + model.logprob("RAN"))
    assert model.logprob("ZEBRA") == model.logprob(UNK) < model.logprob("ON")
    with pytest.raises(ValueError, match="no words"):
        KneserNey.estimate(["", "  "], 3)


def test_arpa_file_is_read_by_kenlm_with_the_same_scores(tmp_path: Path) -> None:
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    model = KneserNey.estimate(TEXT, 3)
    model.write_arpa(tmp_path / "lm.arpa")
    words = Dictionary()
    for w in [*model.words, UNK]:
        words.add_entry(w)
    kenlm = KenLM(str(tmp_path / "lm.arpa"), words)
    state, context = kenlm.start(False), ("<s>",)
    for word in ["THE", "CAT", "SAT", "ON", "THE", "DOG", "ZEBRA"]:
        known = word if word in model.words else UNK
        state, score = kenlm.score(state, words.get_index(known))
        assert score == pytest.approx(model.logprob(known, context), abs=1e-4)  # both log10
        context = (*context, known)
    _, end = kenlm.finish(state)
    assert end == pytest.approx(model.logprob(EOS, context), abs=1e-4)


def _emissions(tokenizer, frames: list[dict[str, float]]) -> torch.Tensor:
    """(1, T, V) log-probabilities: each frame's listed tokens get their probability, the rest share 1e-4."""
    out = torch.full((1, len(frames), len(tokenizer)), 1e-4)
    for t, probs in enumerate(frames):
        for token, p in probs.items():
            out[0, t, tokenizer.vocab.index(token)] = p
    return (out / out.sum(-1, keepdim=True)).log()


@pytest.fixture
def cat_or_cab(tmp_path: Path) -> tuple[CharTokenizer, torch.Tensor, Path]:
    """Audio that sounds slightly more like "THE CAB" than "THE CAT"; the LM has only seen CAT."""
    tokenizer = CharTokenizer.build(["THE CAT CAB"])
    frames = [{"T": 0.9}, {"H": 0.9}, {"E": 0.9}, {"|": 0.9}, {"C": 0.9}, {"A": 0.9}, {"B": 0.55, "T": 0.44},
              {"<blank>": 0.9}]
    (tmp_path / "text.txt").write_text("THE CAT\nTHE CAT SAT\nSEE THE CAT\nTHE CAT\nA CAB\n")
    build_lm([str(tmp_path / "text.txt")], tmp_path / "lm", order=3)
    return tokenizer, _emissions(tokenizer, frames), tmp_path / "lm"


def test_the_lm_changes_the_best_path(cat_or_cab) -> None:

    tokenizer, emissions, lm_dir = cat_or_cab
    frames = torch.tensor([emissions.shape[1]])
    assert GreedyDecoder(tokenizer, 0)(emissions, frames) == ["THE CAB"]
    assert BeamDecoder(tokenizer)(emissions, frames) == ["THE CAB"]  # no LM: the acoustics decide
    lm = LanguageModel.load(lm_dir)
    assert BeamDecoder(tokenizer, lm, DecoderSettings(lm_weight=0.0))(emissions, frames) == ["THE CAB"]
    assert BeamDecoder(tokenizer, lm, DecoderSettings(lm_weight=1.0))(emissions, frames) == ["THE CAT"]


def test_lexicon_of_the_lm_folder_spells_words_in_characters(cat_or_cab) -> None:
    _, _, lm_dir = cat_or_cab
    lexicon = read_lexicon(lm_dir / "lexicon.txt")
    assert lexicon["CAT"] == ["C", "A", "T", "|"] and lexicon["SEE"] == ["S", "E", "E", "|"]
    assert set(lexicon) == {"THE", "CAT", "SAT", "SEE", "A", "CAB"}


def test_words_the_model_cannot_spell_are_left_out(cat_or_cab, caplog: pytest.LogCaptureFixture) -> None:
    tokenizer, emissions, lm_dir = cat_or_cab  # the model's characters lack S: SAT and SEE
    decoder = BeamDecoder(tokenizer, LanguageModel.load(lm_dir), DecoderSettings(lm_weight=1.0))
    assert "2 lexicon word(s)" in caplog.text and "SAT" in caplog.text
    assert decoder(emissions, torch.tensor([emissions.shape[1]])) == ["THE CAT"]


def test_beam_without_lm_decodes_repeated_letters_and_lengths() -> None:
    tokenizer = CharTokenizer.build(["HELLO"])
    frames = [{"H": 0.9}, {"E": 0.9}, {"L": 0.9}, {"<blank>": 0.9}, {"L": 0.9}, {"O": 0.9}, {"|": 0.9},
              {"H": 0.9}, {"E": 0.9}]
    emissions = _emissions(tokenizer, frames).repeat(2, 1, 1)
    assert BeamDecoder(tokenizer)(emissions, torch.tensor([9, 6])) == ["HELLO HE", "HELLO"]


def test_lm_folder_and_arpa_file_load(cat_or_cab, tmp_path: Path) -> None:
    tokenizer, emissions, lm_dir = cat_or_cab
    from_arpa = LanguageModel.load(lm_dir / "lm.arpa")  # words from the ARPA, spelled by the tokenizer
    assert set(from_arpa.lexicon) == {"THE", "CAT", "SAT", "SEE", "A", "CAB"} and from_arpa.settings is None
    assert BeamDecoder(tokenizer, from_arpa, DecoderSettings(lm_weight=1.0))(
        emissions, torch.tensor([emissions.shape[1]])) == ["THE CAT"]
    with pytest.raises(FileNotFoundError, match="no ARPA"):
        LanguageModel.load(tmp_path / "nothing")


def test_average_of_model_files(tmp_path: Path) -> None:
    from speechssl import load_model_config
    from speechssl.models.ctc import CTCModel, load_ctc_model
    from speechssl.training.averaging import average_files
    from tests.conftest import REPO

    config = load_model_config(REPO / "configs/model/tiny_conformer.yaml")  # BatchNorm: an integer buffer too
    models = [CTCModel(config, 5) for _ in range(3)]
    for i, m in enumerate(models):
        for buffer in m.buffers():
            if not buffer.is_floating_point():
                buffer.fill_(10 * (i + 1))
        m.save(tmp_path / f"m{i}.pt")
    average_files([tmp_path / f"m{i}.pt" for i in range(3)], tmp_path / "avg.pt")
    averaged = load_ctc_model(tmp_path / "avg.pt").state_dict()
    for key, value in averaged.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, sum(m.state_dict()[key] for m in models) / 3)
        else:
            assert (value == 30).all()  # the last file's counter
    other = CTCModel(config, 6)
    other.save(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="shape"):
        average_files([tmp_path / "m0.pt", tmp_path / "other.pt"], tmp_path / "bad.pt")


@pytest.mark.parametrize("by", ["best", "last"])
def test_validated_models_keep_the_best_or_the_last(tmp_path: Path, by: str) -> None:
    from speechssl.training.averaging import ValidatedModels

    kept = ValidatedModels(tmp_path / "v", 2, by)
    for update, wer in [(100, 0.5), (200, 0.3), (300, 0.4), (400, 0.6)]:
        kept.add(update, wer, lambda path, u=update: path.write_text(str(u)))
    expected = [200, 300] if by == "best" else [300, 400]
    assert [p.read_text() for p in kept.paths()] == [str(u) for u in expected]
    assert sorted(p.name for p in (tmp_path / "v").glob("*.pt")) == [f"update_{u:08d}.pt" for u in expected]
    again = ValidatedModels(tmp_path / "v", 2, by)  # as a resumed run reads it
    again.forget_after(350)
    assert [e["update"] for e in again.entries] == [u for u in expected if u <= 350]
    assert sorted(p.name for p in (tmp_path / "v").glob("*.pt")) == [p.name for p in again.paths()]


def test_bpe_model_decodes_with_a_character_lexicon(cat_or_cab) -> None:
    """A build-lm folder made for characters: its words are re-spelled in the BPE model's pieces."""
    from speechssl.asr.tokenizer import BpeTokenizer

    _, _, lm_dir = cat_or_cab
    tokenizer = BpeTokenizer.train(TEXT * 3 + ["THE CAB"], vocab_size=40)
    ids = tokenizer.encode("THE CAT SAT")
    assert len(ids) < len("THECATSAT")  # pieces longer than a character
    frames = []
    for i in ids:
        frames += [{tokenizer.vocab[i]: 0.9}, {"<blank>": 0.9}]
    emissions = _emissions(tokenizer, frames)
    decoded = BeamDecoder(tokenizer, LanguageModel.load(lm_dir), DecoderSettings(lm_weight=1.0))(
        emissions, torch.tensor([len(frames)]))
    assert decoded == ["THE CAT SAT"]


def test_blank_penalty_brings_back_a_letter_the_blank_outweighed() -> None:
    """A frame where the blank narrowly beats "B": deleted at no penalty, decoded once the blank
    pays more than the margin, by the greedy and the beam decoder alike."""

    tokenizer = CharTokenizer.build(["AB"])
    frames = [{"A": 0.9}, {"<blank>": 0.55, "B": 0.44}, {"<blank>": 0.9}]
    emissions, lengths = _emissions(tokenizer, frames), torch.tensor([3])
    blank = tokenizer.blank
    assert GreedyDecoder(tokenizer, blank)(emissions, lengths) == ["A"]
    assert GreedyDecoder(tokenizer, blank, blank_penalty=0.5)(emissions, lengths) == ["AB"]
    assert BeamDecoder(tokenizer, settings=DecoderSettings(beam=1))(emissions, lengths) == ["A"]
    assert BeamDecoder(tokenizer, settings=DecoderSettings(beam=1, blank_penalty=0.5))(emissions, lengths) == ["AB"]
    untouched = emissions.clone()
    GreedyDecoder(tokenizer, blank, blank_penalty=0.5)(emissions, lengths)
    assert torch.equal(emissions, untouched)  # the caller's emissions are not changed


def test_emissions_files_round_trip_and_read_as_one_set(tmp_path: Path) -> None:
    from speechssl.asr.emissions import Emissions, Row, load_emissions

    tokenizer = CharTokenizer.build(["AB C"])
    torch.manual_seed(0)
    first, second = (Emissions(tokenizer.to_dict(), tokenizer.blank, model="m.pt") for _ in range(2))
    lengths = [7, 3, 12, 5]
    rows = [Row(f"u{i}", f"TEXT {i}" if i != 2 else None) for i in range(4)]
    batch = torch.randn(4, 12, len(tokenizer)).log_softmax(-1)
    first.add(rows[:2], batch[:2], torch.tensor(lengths[:2]))
    second.add(rows[2:], batch[2:], torch.tensor(lengths[2:]))
    second.skipped = {"unreadable": 1}
    first.save(tmp_path / "a.pt")
    second.save(tmp_path / "b.pt")
    both = load_emissions([tmp_path / "a.pt", tmp_path / "b.pt"])
    assert [r.id for r in both.rows] == ["u0", "u1", "u2", "u3"] and both.rows[2].text is None
    assert both.skipped == {"unreadable": 1} and both.tokenizer == tokenizer.to_dict()
    seen = []
    for chunk, log_probs, frames in both.batches(max_frames=24):  # at most 24 padded frames per batch
        assert log_probs.shape[0] * log_probs.shape[1] <= 24 or len(chunk) == 1
        for row, x, n in zip(chunk, log_probs, frames.tolist(), strict=True):
            i = int(row.id[1:])
            assert n == lengths[i] and torch.allclose(x[:n], batch[i, :n], atol=2e-2)  # float16 on disk
            seen.append(i)
    assert seen == [0, 1, 2, 3]
    other = Emissions(CharTokenizer.build(["XYZ"]).to_dict(), 0)
    other.save(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="another model's tokens"):
        load_emissions([tmp_path / "a.pt", tmp_path / "c.pt"])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not an emissions file"):
        load_emissions([tmp_path / "model.pt"])
