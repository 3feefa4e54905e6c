"""CTC fine-tuning: the tokenizer, the freezing schedules and the shipped configs."""

from __future__ import annotations

import pytest
import torch

from finetune.config import FinetuneConfig
from finetune.task import _flatten
from speechssl.asr.tokenizer import BpeTokenizer, CharTokenizer, tokenizer_from_dict
from speechssl.config import ConfigError, build, to_dict
from speechssl.models.config import load_model_config
from speechssl.models.ctc import CTCModel
from speechssl.models.freezing import check_schedule, frozen_modules, is_frozen
from speechssl.training.config import deepspeed_config
from tests.conftest import REPO


def test_tokenizer_round_trips_and_counts_unknown_characters() -> None:
    tokenizer = CharTokenizer.build(["hello world", "  the  END "])
    assert tokenizer.vocab[:3] == ["<blank>", "<unk>", "|"] and tokenizer.blank == 0
    assert tokenizer.vocab[3:] == sorted(set("HELLOWORLDTHEEND"))
    ids = tokenizer.encode("  Hello   the world ")
    assert ids.count(2) == 2 and 0 not in ids  # two word boundaries, never the blank
    assert tokenizer.decode(ids) == "HELLO THE WORLD"
    assert tokenizer.decode(tokenizer.encode("HELLO Q")) == "HELLO <unk>"
    assert tokenizer.unknown == {"Q": 1}
    again = CharTokenizer.from_dict(tokenizer.to_dict())
    assert again.vocab == tokenizer.vocab and again.encode("the end") == tokenizer.encode("THE END")
    lower = CharTokenizer.build(["Hello"], case="lower")
    assert lower.decode(lower.encode("HELLO")) == "hello"
    with pytest.raises(ValueError, match="no characters"):
        CharTokenizer.build(["", "  "])


@pytest.mark.parametrize("spec,frozen_at", [
    (-1, {0, 1, 2, 3, 4, 5, 6, 10**6}),
    (3, {0, 1, 2}),
    ([2, 4], {2, 3, 4}),
    ([5, -1], {5, 6, 10**6}),
])
def test_freeze_schedule_forms(spec, frozen_at: set[int]) -> None:
    for update in [0, 1, 2, 3, 4, 5, 6, 10**6]:
        assert is_frozen(spec, update) == (update in frozen_at), (spec, update)



def test_bpe_tokenizer_round_trips_and_travels_in_its_dict() -> None:
    words = ["one", "two", "three", "seven", "eleven", "twenty", "enter", "yes", "no", "rubout"]
    texts = [" ".join(words[(i * 7 + k) % len(words)] for k in range(i % 5 + 1)) for i in range(200)]
    tokenizer = BpeTokenizer.train(texts, vocab_size=48)
    assert tokenizer.blank == 0 and tokenizer.vocab[:2] == ["<blank>", "<unk>"] and len(tokenizer) <= 49
    assert any(len(piece.lstrip("▁")) > 2 for piece in tokenizer.vocab)  # merges, not only characters
    ids = tokenizer.encode("  Seven   twenty ONE ")
    assert ids and 0 not in ids and max(ids) < len(tokenizer)
    assert len(ids) < len("SEVEN TWENTY ONE")  # subwords
    assert tokenizer.decode(ids) == "SEVEN TWENTY ONE"
    assert tokenizer.decode(tokenizer.encode("yes q")) == "YES <unk>"
    assert tokenizer.unknown == {"Q": 1}
    again = tokenizer_from_dict(tokenizer.to_dict())
    assert isinstance(again, BpeTokenizer) and again.vocab == tokenizer.vocab
    assert again.encode("seven twenty one") == ids
    lower = BpeTokenizer.train(texts, vocab_size=48, case="lower")
    assert lower.decode(lower.encode("Seven Twenty")) == "seven twenty"
    with pytest.raises(ValueError, match="no text"):
        BpeTokenizer.train(["  ", ""], vocab_size=48)
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        tokenizer_from_dict({"type": "wordpiece"})

def test_freeze_schedule_checks() -> None:
    schedule = check_schedule({"feature_extractor": -1, "context": 2})
    assert frozen_modules(schedule, 0) == {"feature_extractor", "context"}
    assert frozen_modules(schedule, 2) == {"feature_extractor"}
    for bad, words in [({"encoder": 2}, "freeze_updates.encoder: unknown module"),
                       ({"context": -2}, "must be -1"), ({"context": [5, 2]}, "0 <= a <= b"),
                       ({"context": [1, 2, 3]}, "must be -1, N or \\[a, b\\]")]:
        with pytest.raises(ConfigError, match=words):
            check_schedule(bad)


@pytest.mark.parametrize(("name", "model"), [("tiny", "tiny_transformer"), ("base_10h", "base_transformer")])
def test_shipped_finetune_configs_load_and_apply_to_their_model(name: str, model: str) -> None:
    config = build(FinetuneConfig, str(REPO / f"configs/finetune/{name}.yaml"), [])
    deepspeed_config(config.trainer, on_gpu=True)  # the optimizer and the DeepSpeed JSON agree
    pretrained = load_model_config(str(REPO / f"configs/model/{model}.yaml"))
    tuned = load_model_config(to_dict(pretrained), _flatten(config.model))
    masks = config.model["masking"]
    assert (tuned.masking.mask_prob, tuned.masking.channel_prob) == (masks["mask_prob"], masks["channel_prob"])
    if name == "base_10h":  # fairseq's base_10h.yaml and Wav2Vec2AsrConfig
        assert (tuned.context.dropout, tuned.context.attention_dropout, tuned.context.activation_dropout,
                tuned.context.layer_drop, tuned.dropout_input) == (0.0, 0.0, 0.1, 0.05, 0.0)
        assert tuned.extractor == pretrained.extractor and tuned.context.num_layers == 12
        assert config.freeze_updates == {"feature_extractor": -1, "frontend": 10000, "context": 10000}
        assert (config.trainer.lr, config.trainer.max_updates, config.trainer.update_freq) == (5e-5, 20000, 4)


def test_a_frozen_module_runs_in_eval_mode_and_keeps_its_batch_norm_statistics() -> None:
    """NeMo's freeze(): a frozen Conformer context has no dropout and its BatchNorm statistics
    stay as they were, also through train(); it trains normally once unfrozen."""
    torch.manual_seed(0)
    config = load_model_config(str(REPO / "configs/model/tiny_conformer.yaml"))
    model = CTCModel(config, vocab_size=5, freeze_updates={"feature_extractor": -1, "context": 2}).train()
    stats = model.context.layers[0].conv_module.batch_norm.running_mean
    waveforms = torch.randn(2, 16000)
    for update, frozen in ((0, True), (1, True), (2, False)):
        model.set_num_updates(update)
        model.eval().train()  # as the trainer does around a validation
        assert model.context.training is not frozen and model.frontend.training and model.lm_head.training
        assert not model.feature_extractor.training
        before = stats.clone()
        model(waveforms)
        assert torch.equal(stats, before) == frozen, update
    model.eval()
    assert not any(m.training for m in model.modules())


def test_lr_scale_sets_each_module_s_rate_and_a_frozen_module_stays_at_zero() -> None:
    from finetune.task import FinetuneTask
    from speechssl import Wav2Vec2Model

    config = build(FinetuneConfig, str(REPO / "configs/finetune/tiny.yaml"),
                   ["lr_scale={context: 0.3, frontend: 0.5}", "freeze_updates={feature_extractor: -1, context: 10}"])
    encoder = Wav2Vec2Model(load_model_config(str(REPO / "configs/model/tiny_transformer.yaml")))
    task = FinetuneTask(config, encoder, CharTokenizer.build(["AB"]))
    assert [task.lr_factor(m, 20) for m in ("feature_extractor", "frontend", "context", "lm_head")] == \
        [0.0, 0.5, 0.3, 1.0]
    assert task.lr_factor("context", 9) == 0.0 and task.lr_factor("context", 10) == 0.3
    for bad, words in [("lr_scale={encoder: 0.5}", "lr_scale.encoder: unknown module"),
                       ("lr_scale={context: 0}", "lr_scale.context: must be > 0")]:
        with pytest.raises(ConfigError, match=words):
            build(FinetuneConfig, str(REPO / "configs/finetune/tiny.yaml"), [bad])
