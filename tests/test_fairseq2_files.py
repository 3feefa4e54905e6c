"""fairseq2 checkpoint files where fairseq2 is not installed (:mod:`speechssl.interop.fairseq2`):
the key mapping, configs read from the weights or the YAML beside them, ``speechssl.load``, and
what is refused. Parity with fairseq2's own modules runs in the fairseq2 environment
(tests_fairseq2/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import speechssl
from speechssl import Wav2Vec2Model, load_model_config
from speechssl.interop.fairseq2 import (
    config_from_fairseq2,
    export_state,
    fairseq2_config,
    infer_config,
    load_fairseq2_checkpoint,
    save_fairseq2_checkpoint,
)
from speechssl.models.ctc import CTCModel
from tests.conftest import REPO, randomize_batch_norm_statistics

LENGTHS = torch.tensor([16000, 11000])


def _model(name: str, **context) -> Wav2Vec2Model:
    config = load_model_config(REPO / f"configs/model/{name}.yaml")
    config.dropout_features = config.dropout_input  # fairseq2 has one dropout for both
    for key, value in context.items():
        setattr(config.context, key, value)
    model = Wav2Vec2Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    randomize_batch_norm_statistics(model)
    return model


MODELS = {
    "post-norm transformer": lambda: _model("tiny_transformer"),
    "pre-norm transformer": lambda: _model("tiny_transformer", layer_norm_first=True),
    "conformer": lambda: _model("tiny_conformer", layer_norm_first=False),
}


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_state_dict_has_fairseq2s_names() -> None:
    model = MODELS["conformer"]()
    state = export_state(model.state_dict(), model.config, asr=False)
    expected = {"encoder_frontend.feature_extractor.layers.0.group_norm.weight",
                "encoder_frontend.post_extract_layer_norm.weight", "encoder_frontend.model_dim_proj.weight",
                "encoder_frontend.layer_norm.weight", "encoder.layers.1.ffn1_layer_norm.weight",
                "encoder.layers.1.ffn1.inner_proj.weight", "encoder.layers.1.self_attn.q_proj.weight",
                "encoder.layers.1.self_attn.output_proj.bias", "encoder.layers.1.self_attn.sdpa.u_bias",
                "encoder.layers.1.self_attn.sdpa.r_proj.weight", "encoder.layers.1.conv_layer_norm.weight",
                "encoder.layers.1.conv.pointwise_conv1.weight", "encoder.layers.1.conv.batch_norm.running_var",
                "encoder.layers.1.layer_norm.weight", "masker.temporal_mask_embed", "quantizer.entries",
                "quantizer.entry_proj.weight", "quantizer.num_updates", "final_proj.weight", "final_target_proj.weight"}
    assert expected <= set(state)
    assert state["encoder.layers.1.conv.pointwise_conv1.weight"].dim() == 3  # a Conv1d in fairseq2


@pytest.mark.parametrize("kind", list(MODELS))
def test_checkpoint_files_round_trip_with_or_without_their_config(kind: str, tmp_path: Path) -> None:
    model = MODELS[kind]()
    path = save_fairseq2_checkpoint(model, tmp_path / "model.pt")
    saved = yaml.safe_load(path.with_suffix(".yaml").read_text())
    assert saved["family"] == "wav2vec2" and saved["config"] == fairseq2_config(model)
    assert _same(load_fairseq2_checkpoint(path), model)
    assert config_from_fairseq2(saved["config"]).context == model.config.context

    bare = tmp_path / "bare.pt"  # fairseq2's own files carry no config: it is read from the weights
    torch.save(torch.load(path, weights_only=True)["model"], bare)
    if kind == "conformer":  # its attention heads are in the weights' shapes
        back = speechssl.load(bare)  # told apart by content
    else:
        assert load_fairseq2_checkpoint(bare).config.context.num_heads == 96 // 64  # fairseq2's BASE/LARGE ratio
        back = load_fairseq2_checkpoint(bare, config={"encoder_config": {"num_encoder_attn_heads": 4}})
    assert _same(back, model)
    waves = torch.randn(2, 16000) * (torch.arange(16000) < LENGTHS[:, None])
    with torch.no_grad():
        assert torch.equal(back.encode(waves, LENGTHS)[0], model.encode(waves, LENGTHS)[0])


def test_asr_checkpoints_become_ctc_models(tmp_path: Path) -> None:
    from speechssl.asr.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.build(["A CAT"])
    ctc = CTCModel.from_pretrained(MODELS["post-norm transformer"](), len(tokenizer), vocab=tokenizer.vocab,
                                   tokenizer=tokenizer.to_dict()).eval()
    path = save_fairseq2_checkpoint(ctc, tmp_path / "asr.pt")
    state = torch.load(path, weights_only=True)["model"]
    assert state["final_proj.weight"].shape[0] == len(tokenizer) and not any("quantizer" in k for k in state)
    assert infer_config(state)["target_vocab_size"] == len(tokenizer)
    back = speechssl.load(f"fairseq2:{path}")
    assert isinstance(back, CTCModel) and back.vocab == ctc.vocab and back.tokenizer == ctc.tokenizer
    waves = torch.randn(2, 16000) * (torch.arange(16000) < LENGTHS[:, None])
    with torch.no_grad():
        assert torch.equal(back(waves, LENGTHS)[0], ctc(waves, LENGTHS)[0])


def test_what_fairseq2_or_speechssl_cannot_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="rotary"):
        config_from_fairseq2({"encoder_config": {"pos_encoder_type": "rotary"}})
    with pytest.raises(ValueError, match="use_fbank"):
        config_from_fairseq2({"encoder_config": {"use_fbank": True}})
    with pytest.raises(ValueError, match="unknown fairseq2 encoder_config fields"):
        config_from_fairseq2({"encoder_config": {"model_dims": 10}})
    with pytest.raises(ValueError, match="after the last block"):
        fairseq2_config(_model("tiny_conformer"))  # Hugging Face's layout: its LayerNorm at the end
    model = MODELS["post-norm transformer"]()
    state = export_state(model.state_dict(), model.config, asr=False)
    state["encoder_frontend.feature_extractor.layers.1.conv.weight"] = torch.zeros(32, 32, 5)
    with pytest.raises(ValueError, match="strides"):
        infer_config(state)
