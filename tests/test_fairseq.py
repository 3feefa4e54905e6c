"""fairseq checkpoints without fairseq (:mod:`speechssl.interop.fairseq`): the key layout and config
of fairseq's files, the round trip, safe loading of pickled configs, the CTC dictionary, and
``speechssl.load``. The check against an independent reading of the layout (fairseq2's own
fairseq converter) runs in the fairseq2 environment (tests/fairseq2/)."""

from __future__ import annotations

import argparse
import enum
import pickle
from pathlib import Path

import numpy as np
import omegaconf
import pytest
import torch

import speechssl
from speechssl import Wav2Vec2Model, load_model_config
from speechssl.asr.tokenizer import CharTokenizer
from speechssl.interop.fairseq import from_fairseq, read_dictionary, save_fairseq, to_fairseq
from speechssl.interop.untrusted import Opaque, load_untrusted
from speechssl.models.ctc import CTCModel
from tests.conftest import REPO, randomize_batch_norm_statistics

LENGTHS = torch.tensor([16000, 12000])


def _model(name: str, **context) -> Wav2Vec2Model:
    config = load_model_config(REPO / f"configs/model/{name}.yaml")
    for key, value in context.items():
        setattr(config.context, key, value)
    model = Wav2Vec2Model(config).eval()
    with torch.no_grad():  # perturb every weight, LayerNorms included, so a misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    randomize_batch_norm_statistics(model)
    return model


def _waves() -> torch.Tensor:
    return torch.randn(2, 16000) * (torch.arange(16000) < LENGTHS[:, None])


MODELS = {
    "base": lambda: _model("tiny_transformer"),
    "large": lambda: _model("tiny_transformer", layer_norm_first=True),
    "conformer-relative": lambda: _model("tiny_conformer", mask_padding_in_conv=False),
    "conformer-rotary": lambda: _model("tiny_conformer", position_embeddings="rotary", mask_padding_in_conv=False),
    "conformer-first": lambda: _model("tiny_conformer", layer_norm_first=False, mask_padding_in_conv=False),
}


def test_export_writes_fairseqs_key_layout_and_config() -> None:
    """The names and shapes fairseq's Wav2Vec2Model has (wav2vec_small.pt's layout)."""
    model = MODELS["base"]()
    checkpoint = to_fairseq(model)
    state = checkpoint["model"]
    expected = {"feature_extractor.conv_layers.0.0.weight", "feature_extractor.conv_layers.0.2.weight",
                "feature_extractor.conv_layers.0.2.bias", "feature_extractor.conv_layers.6.0.weight",
                "layer_norm.weight", "post_extract_proj.weight", "mask_emb", "encoder.pos_conv.0.weight_g",
                "encoder.pos_conv.0.weight_v", "encoder.pos_conv.0.bias", "encoder.layer_norm.weight",
                "encoder.layers.1.self_attn.q_proj.weight", "encoder.layers.1.self_attn.k_proj.bias",
                "encoder.layers.1.self_attn.out_proj.weight", "encoder.layers.1.self_attn_layer_norm.weight",
                "encoder.layers.1.fc1.weight", "encoder.layers.1.fc2.bias", "encoder.layers.1.final_layer_norm.bias",
                "quantizer.vars", "quantizer.weight_proj.weight", "quantizer.weight_proj.bias", "project_q.weight",
                "final_proj.weight"}
    assert expected <= set(state)
    assert not any(k.startswith(("frontend.", "context.")) for k in state)
    q = model.config.quantizer
    assert state["quantizer.vars"].shape == (1, q.num_groups * q.num_vars, model.config.codevector_dim // q.num_groups)
    assert state["encoder.pos_conv.0.weight_g"].shape == (1, 1, model.config.context.pos_conv_kernel)
    cfg = checkpoint["cfg"]["model"]
    assert cfg["_name"] == "wav2vec2" and cfg["extractor_mode"] == "default" and cfg["quantize_targets"]
    assert cfg["encoder_embed_dim"] == 96 and cfg["encoder_layers"] == 2 and cfg["conv_pos"] == 32
    assert eval(cfg["conv_feature_layers"]) == [tuple(c) for c in model.config.extractor.conv_layers]


@pytest.mark.parametrize("kind", list(MODELS))
def test_round_trip_is_bit_exact_and_gives_the_same_outputs(kind: str, tmp_path: Path) -> None:
    model = MODELS[kind]()
    back = from_fairseq(save_fairseq(model, tmp_path / "checkpoint.pt"))
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    waves = _waves()
    with torch.no_grad():
        assert torch.equal(model.encode(waves, LENGTHS)[0], back.encode(waves, LENGTHS)[0])
    assert back.config.context == model.config.context and back.config.quantizer == model.config.quantizer


def test_older_args_checkpoints_and_pickled_configs_load_without_running_code(tmp_path: Path) -> None:
    """``args`` as an argparse.Namespace (wav2vec_small.pt) and ``cfg`` as omegaconf DictConfigs, with
    numpy scalars and enum members beside them: the architecture is read; nothing from the file runs."""
    model = MODELS["large"]()
    checkpoint = to_fairseq(model)
    flat = dict(checkpoint["cfg"]["model"], arch="wav2vec2", loss_weights=[0.2, 5.0], normalize=False)
    flat.pop("_name")
    keep = tmp_path / "keep"
    keep.mkdir()
    old = {"args": argparse.Namespace(**flat), "cfg": None, "model": checkpoint["model"],
           "extra_state": {"best": np.float64(1.5), "stage": Stage.TRAIN, "hook": _Evil(keep)}}
    torch.save(old, tmp_path / "old.pt")
    loaded = load_untrusted(tmp_path / "old.pt")
    assert isinstance(loaded["extra_state"]["hook"], Opaque) and keep.is_dir()
    assert loaded["extra_state"]["stage"] == "train" or isinstance(loaded["extra_state"]["stage"], Opaque)
    imported = from_fairseq(tmp_path / "old.pt")
    assert keep.is_dir()
    assert imported.config.context == model.config.context
    assert (imported.config.loss.diversity_weight, imported.config.loss.feature_penalty_weight) == (0.2, 5.0)
    waves = _waves()
    with torch.no_grad():
        assert torch.equal(imported.encode(waves, LENGTHS)[0], model.encode(waves, LENGTHS)[0])

    hydra = dict(checkpoint, cfg=omegaconf.OmegaConf.create(checkpoint["cfg"]))
    torch.save(hydra, tmp_path / "hydra.pt")
    assert from_fairseq(tmp_path / "hydra.pt").config.context == model.config.context


class Stage(enum.Enum):
    TRAIN = "train"


class _Evil:
    """An object whose unpickling would delete a folder."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __reduce__(self):
        import shutil

        return (shutil.rmtree, (str(self.folder),))


class _Touch:
    """An object whose unpickling would create a file, through a method looked up by getattr."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_calls_a_blocked_module_or_what_it_built_is_refused(tmp_path: Path) -> None:
    torch.save({"model": {}, "args": _System()}, tmp_path / "bad.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_untrusted(tmp_path / "bad.pt")
    torch.save({"model": {}, "args": _Touch(tmp_path / "ran")}, tmp_path / "touch.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_untrusted(tmp_path / "touch.pt")
    assert not (tmp_path / "ran").exists()


class _System:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def _ctc_model() -> CTCModel:
    tokenizer = CharTokenizer.build(["THE CAT SAT", "A DOG"])
    model = CTCModel.from_pretrained(MODELS["base"](), len(tokenizer), blank=0, vocab=tokenizer.vocab,
                                     tokenizer=tokenizer.to_dict(), normalize_audio=True).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_()
        model.lm_head.bias.normal_()
    return model


def test_a_fine_tuned_ctc_model_goes_out_and_back_with_its_dictionary(tmp_path: Path) -> None:
    model = _ctc_model()
    path = save_fairseq(model, tmp_path / "ft" / "checkpoint_best.pt")
    symbols = read_dictionary(path.with_name("dict.ltr.txt"))
    assert symbols[:5] == ["<s>", "<pad>", "</s>", "<unk>", "|"] and set(symbols[5:]) == set(model.vocab[3:])
    checkpoint = load_untrusted(path)
    assert checkpoint["cfg"]["model"]["_name"] == "wav2vec_ctc"
    assert checkpoint["model"]["w2v_encoder.proj.weight"].shape[0] == len(symbols)
    assert "w2v_encoder.w2v_model.mask_emb" in checkpoint["model"]
    assert not any("quantizer" in k for k in checkpoint["model"])

    back = speechssl.load(path)  # found by content; dict.ltr.txt read from beside it
    assert isinstance(back, CTCModel) and back.normalize_audio
    waves = _waves()
    with torch.no_grad():
        ours, _ = model(waves, LENGTHS)
        theirs, _ = back(waves, LENGTHS)
    # the same classes in the same order, after fairseq's <pad> and </s>, which are never predicted
    kept = [back.vocab.index(t) for t in model.vocab]
    assert torch.allclose(ours.log_softmax(-1), theirs.log_softmax(-1)[..., kept], atol=1e-5)
    assert theirs.log_softmax(-1)[..., [back.vocab.index("<pad>"), back.vocab.index("</s>")]].max() < -1e3
    audio = [w[:n] for w, n in zip(waves.numpy(), LENGTHS.tolist(), strict=True)]
    assert [t.text for t in model.transcribe(audio, sample_rate=16000)] == \
        [t.text for t in back.transcribe(audio, sample_rate=16000)]


def test_named_source_and_what_is_refused(tmp_path: Path) -> None:
    model = MODELS["base"]()
    save_fairseq(model, tmp_path / "w.pt")
    assert isinstance(speechssl.load(f"fairseq:{tmp_path / 'w.pt'}"), Wav2Vec2Model)
    with pytest.raises(FileNotFoundError):
        speechssl.load(f"fairseq:{tmp_path / 'missing.pt'}")
    checkpoint = to_fairseq(model)
    checkpoint["cfg"]["model"]["quantize_input"] = True
    torch.save(checkpoint, tmp_path / "qi.pt")
    with pytest.raises(ValueError, match="quantize_input"):
        from_fairseq(tmp_path / "qi.pt")
    checkpoint = to_fairseq(model)
    checkpoint["model"]["encoder.layers.0.extra.weight"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.extra\.weight"):
        from_fairseq(tmp_path / "extra.pt")
    fine_tuned = to_fairseq(_ctc_model())
    fine_tuned["cfg"]["model"]["w2v_args"] = None
    torch.save(fine_tuned, tmp_path / "no_args.pt")
    with pytest.raises(ValueError, match="w2v_args"):
        from_fairseq(tmp_path / "no_args.pt")
    (tmp_path / "dict.ltr.txt").write_text("| 5\nA 3\n")
    torch.save(to_fairseq(_ctc_model()), tmp_path / "ctc.pt")
    with pytest.raises(ValueError, match="symbols"):
        from_fairseq(tmp_path / "ctc.pt")


def test_older_fine_tuned_checkpoints_that_kept_the_pretraining_parts_load(tmp_path: Path) -> None:
    ctc = _ctc_model()
    checkpoint = to_fairseq(ctc)
    pretraining = to_fairseq(MODELS["base"]())["model"]
    checkpoint["model"].update({"w2v_encoder.w2v_model." + k: v for k, v in pretraining.items()
                                if k.startswith(("quantizer.", "project_q.", "final_proj."))})
    torch.save(checkpoint, tmp_path / "old_ft.pt")
    back = from_fairseq(tmp_path / "old_ft.pt")
    waves = _waves()
    with torch.no_grad():
        assert torch.equal(back(waves, LENGTHS)[0], ctc(waves, LENGTHS)[0])
