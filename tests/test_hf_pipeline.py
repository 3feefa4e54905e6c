"""Hugging Face exports that work where they land: a fine-tuned-like tiny CTC model written by
``save_huggingface`` loads in ``pipeline("automatic-speech-recognition")`` and ``Wav2Vec2Processor``,
the pipeline's transcripts are our greedy ones, and ``from_huggingface`` brings the model back with
its vocabulary, bit-exact. Also the import of a Hugging Face vocabulary in another order, the
refusal of a BPE tokenizer, and the folder of a pretraining model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from speechssl import Wav2Vec2Model, load_model_config
from speechssl.asr.decoding import greedy_decode
from speechssl.asr.inference import emissions
from speechssl.asr.tokenizer import BpeTokenizer, CharTokenizer
from speechssl.data.inputs import Utterance
from speechssl.interop.huggingface import from_huggingface, save_huggingface
from speechssl.models.ctc import CTCModel
from tests.conftest import REPO

TEXTS = ["THE QUICK BROWN FOX", "JUMPS OVER THE LAZY DOG", "HELLO WORLD"]
SECONDS = [0.6, 1.3, 2.2, 3.1]  # utterances of different lengths, batched together by ours
LOGIT_STD = 3.0

KINDS = {  # config, overrides, normalize_audio
    "transformer": ("tiny_transformer", [], False),
    "transformer-large-normalized": ("tiny_transformer", ["extractor.mode=layer_norm", "extractor.conv_bias=true",
                                                          "context.layer_norm_first=true"], True),
    "conformer": ("tiny_conformer", [], False),
}


def _utterances(seed: int = 0) -> list[Utterance]:
    """Speech-like synthetic audio: segments of tones and noise bursts of varying loudness, so that
    a random model's frames differ along the utterance."""
    rng = np.random.default_rng(seed)
    utts = []
    for i, seconds in enumerate(SECONDS):
        pieces = []
        while sum(map(len, pieces)) < seconds * 16000:
            n = int(rng.integers(800, 4000))
            t = np.arange(n) / 16000
            tone = np.sin(2 * np.pi * rng.uniform(100, 3000) * t) * rng.uniform(0.05, 1.0)
            pieces.append(tone + rng.normal(0, rng.uniform(0.0, 0.5), n))
        utts.append(Utterance(f"u{i}", np.concatenate(pieces)[: int(seconds * 16000)].astype(np.float32), None))
    return utts


def _shape_head(head: torch.nn.Linear, features: torch.Tensor, blank: int, delimiter: int) -> None:
    """A fine-tuned-like head over ``features`` (B, T, D), what the head sees: logits of standard
    deviation about 3 that change along the utterance, the blank and the word delimiter favoured."""
    with torch.no_grad():
        centred = features.flatten(0, 1) - features.flatten(0, 1).mean(0)
        head.weight.normal_(0.0, LOGIT_STD / (centred.norm(dim=1).mean().item()))
        head.bias.copy_(-head.weight @ features.flatten(0, 1).mean(0))
        head.bias[blank] += LOGIT_STD * 2.0
        head.bias[delimiter] += LOGIT_STD * 1.5


def _audio(utts: list[Utterance]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([u.audio for u in utts]))[None]


def _ctc_model(kind: str) -> CTCModel:
    name, overrides, normalize = KINDS[kind]
    config = load_model_config(REPO / f"configs/model/{name}.yaml", overrides)
    tokenizer = CharTokenizer.build(TEXTS)
    model = CTCModel(config, len(tokenizer), vocab=tokenizer.vocab, tokenizer=tokenizer.to_dict(),
                     normalize_audio=normalize).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        features, _ = model.encode(_audio(_utterances()))
    _shape_head(model.lm_head, features, 0, tokenizer.index["|"])
    return model


def _ours(model: CTCModel, utts: list[Utterance]) -> list[str]:
    """Our greedy transcripts (``model.transcribe``, batched and padded)."""
    return _greedy(model, utts)[0]


def _greedy(model: CTCModel, utts: list[Utterance]) -> tuple[list[str], list[str]]:
    """Our greedy transcripts through ``model.transcribe``, and the same best paths written as
    Hugging Face's CTC tokenizer writes them: one space for each word delimiter, so two where the
    path has two delimiters with only blanks between them (we write one), the ends stripped."""
    texts = [t.text for t in model.transcribe([u.audio for u in utts], windows=None)]
    hf_style = []
    for _, log_probs, frames in emissions(model, iter(utts), torch.device("cpu"), windows=None):
        hf_style += ["".join(" " if model.vocab[i] == "|" else model.vocab[i] for i in ids).strip()
                     for ids in greedy_decode(log_probs, frames, model.blank)]
    return texts, hf_style


def _same(hf: list[str], model: CTCModel, utts: list[Utterance]) -> None:
    """The pipeline's transcripts are ours, word for word; their spaces are those of our best paths
    as Hugging Face writes them."""
    ours, hf_style = _greedy(model, utts)
    assert [" ".join(t.split()) for t in hf] == ours
    assert hf == hf_style


def _non_trivial(texts: list[str]) -> None:
    """The model says something: several words and several different characters."""
    assert all(len(t.split()) >= 2 for t in texts), texts
    assert len(set("".join(texts)) - {" "}) >= 5, texts


@pytest.mark.parametrize("kind", list(KINDS))
def test_pipeline_gives_our_transcripts_and_the_folder_comes_back(kind: str, tmp_path) -> None:
    model = _ctc_model(kind)
    folder = save_huggingface(model, tmp_path / "hf")
    assert {p.name for p in folder.iterdir()} >= {
        "config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "tokenizer_config.json",
        "special_tokens_map.json"}
    vocab = json.loads((folder / "vocab.json").read_text())
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == ["<pad>", *model.vocab[1:]]
    assert json.loads((folder / "special_tokens_map.json").read_text()) == {"pad_token": "<pad>", "unk_token": "<unk>"}

    processor = transformers.Wav2Vec2Processor.from_pretrained(folder)
    tok, fe = processor.tokenizer, processor.feature_extractor
    assert isinstance(tok, transformers.Wav2Vec2CTCTokenizer)
    assert (tok.pad_token_id, tok.unk_token_id, tok.word_delimiter_token_id) == (0, 1, 2)
    assert fe.sampling_rate == 16000 and fe.do_normalize == model.normalize_audio
    assert fe.return_attention_mask == (model.config.extractor.mode == "layer_norm")

    utts = _utterances()
    ours = _ours(model, utts)
    _non_trivial(ours)
    pipe = transformers.pipeline("automatic-speech-recognition", model=str(folder), device="cpu")
    _same([pipe(u.audio)["text"] for u in utts], model, utts)
    # word times: the pipeline's (return_timestamps="word") are ours, to its rounding of 10 ms
    for utt, transcript in zip(utts, model.transcribe([u.audio for u in utts], return_timestamps="word"), strict=True):
        chunks = pipe(utt.audio, return_timestamps="word")["chunks"]
        assert [c["text"] for c in chunks] == [w.text for w in transcript.words]
        assert [tuple(c["timestamp"]) for c in chunks] == [(round(w.start, 2), round(w.end, 2))
                                                           for w in transcript.words]

    back = from_huggingface(str(folder))
    assert isinstance(back, CTCModel) and back.blank == 0 and back.normalize_audio == model.normalize_audio
    assert back.tokenizer == model.tokenizer and back.vocab == model.vocab
    expected = model.state_dict()
    assert back.state_dict().keys() == expected.keys()
    for key, value in back.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert _ours(back, utts) == ours


def _foreign_vocab(unk: bool = True) -> dict[str, int]:
    """The layout of facebook/wav2vec2-base-960h's vocabulary: <pad>, <s>, </s>, <unk>, |, letters."""
    tokens = ["<pad>", "<s>", "</s>", *(["<unk>"] if unk else []), "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]
    return {t: i for i, t in enumerate(tokens)}


@pytest.mark.parametrize("variant", ["base-960h", "do_lower_case", "no-unk"])
def test_a_huggingface_vocabulary_in_another_order_gives_the_pipelines_transcripts(variant: str, tmp_path) -> None:
    vocab = _foreign_vocab(unk=variant != "no-unk")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tok = transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), do_lower_case=variant == "do_lower_case")
    fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False)
    processor = transformers.Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok)
    config = transformers.Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=len(vocab), pad_token_id=0,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)
    hf = transformers.Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():
        _shape_head(hf.lm_head, hf.wav2vec2(_audio(_utterances(seed=1))).last_hidden_state, 0, vocab["|"])

    ours = from_huggingface(hf, tokenizer=processor)
    assert isinstance(ours, CTCModel) and ours.blank == 0 and ours.normalize_audio
    assert ours.vocab[:3] == ["<blank>", "<unk>", "|"] and ours.vocab[3:5] == ["<s>", "</s>"]
    assert ours.vocab_size == config.vocab_size + (variant == "no-unk")
    assert ours.tokenizer["case"] == ("lower" if variant == "do_lower_case" else "upper")
    assert ours.vocab[5] == ("e" if variant == "do_lower_case" else "E")
    if variant == "no-unk":  # the added class is never predicted
        assert ours.lm_head.bias[1] == -1e4 and not ours.lm_head.weight[1].any()

    utts = _utterances(seed=1)
    texts = _ours(ours, utts)
    _non_trivial(texts)
    pipe = transformers.pipeline("automatic-speech-recognition", model=hf, tokenizer=tok, feature_extractor=fe,
                                 device="cpu")
    _same([pipe(u.audio)["text"] for u in utts], ours, utts)


def test_the_folder_of_a_conformer_round_trips_through_the_model_and_a_processor(tmp_path) -> None:
    """``from_huggingface`` of a loaded model plus its processor, as well as of the folder."""
    model = _ctc_model("conformer")
    folder = save_huggingface(model, tmp_path / "hf")
    hf = transformers.Wav2Vec2ConformerForCTC.from_pretrained(folder)
    back = from_huggingface(hf, tokenizer=transformers.Wav2Vec2Processor.from_pretrained(folder))
    assert back.tokenizer == model.tokenizer and back.blank == model.blank
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    named = from_huggingface(hf, tokenizer=str(folder))  # the tokenizer's folder
    assert named.tokenizer == model.tokenizer and named.vocab == model.vocab
    bare = from_huggingface(hf)  # no tokenizer: the model alone, as before
    assert bare.tokenizer is None and bare.blank == hf.config.pad_token_id == 0
    alone = from_huggingface(str(folder), tokenizer=False)
    assert alone.tokenizer is None and alone.vocab is None


def test_the_feature_extractor_says_whether_the_import_normalises(tmp_path) -> None:
    model = _ctc_model("transformer-large-normalized")
    folder = save_huggingface(model, tmp_path / "hf")
    assert from_huggingface(str(folder), tokenizer=False).normalize_audio
    assert not from_huggingface(str(folder), normalize_audio=False).normalize_audio
    save_huggingface(model, tmp_path / "plain", normalize_audio=False)
    assert not from_huggingface(str(tmp_path / "plain")).normalize_audio


def test_a_bpe_model_or_one_without_a_tokenizer_is_refused_with_the_reason(tmp_path) -> None:
    config = load_model_config(REPO / "configs/model/tiny_transformer.yaml")
    words = ["one", "two", "three", "seven", "eleven", "twenty", "enter", "yes", "no", "rubout"]
    bpe = BpeTokenizer.train([" ".join(words[i:] + words[:i]) for i in range(10)], vocab_size=40)
    model = CTCModel(config, len(bpe), vocab=bpe.vocab, tokenizer=bpe.to_dict()).eval()
    with pytest.raises(ValueError, match=r"SentencePiece \(BPE\).*Wav2Vec2CTCTokenizer.*tokenizer=False"):
        save_huggingface(model, tmp_path / "bpe")
    assert not (tmp_path / "bpe").exists()  # refused before anything was written
    folder = save_huggingface(model, tmp_path / "bpe", tokenizer=False)
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    with pytest.raises(ValueError, match="has no tokenizer"):
        save_huggingface(CTCModel(config, 5), tmp_path / "none")


def test_a_pretraining_model_folder_has_config_weights_and_feature_extractor(tmp_path) -> None:
    model = Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_transformer.yaml")).eval()
    folder = save_huggingface(model, tmp_path / "pre", normalize_audio=True)
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    fe = transformers.AutoFeatureExtractor.from_pretrained(folder)
    assert isinstance(fe, transformers.Wav2Vec2FeatureExtractor) and fe.do_normalize and not fe.return_attention_mask
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Wav2Vec2ForPreTraining"]
    back = from_huggingface(str(folder))
    assert isinstance(back, Wav2Vec2Model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    base = save_huggingface(model, tmp_path / "base", kind="model")
    assert json.loads((base / "config.json").read_text())["architectures"] == ["Wav2Vec2Model"]
