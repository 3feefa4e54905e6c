"""fairseq2 parity (CPU, fp32, eval, random weights; run in the fairseq2 environment: README,
"fairseq2"): fairseq2's wav2vec 2.0 and wav2vec 2.0 ASR models converted to ours give the same
output at every layer, the same pretraining logits for the same mask and distractors, and the
same CTC logits on a padded batch; conversions round-trip bit for bit; fairseq checkpoints
written by speechssl load through fairseq2's own fairseq converter; checkpoint files go both
ways through fairseq2's ``load_custom_model``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from fairseq2.models.transformer import TransformerNormOrder
from fairseq2.models.wav2vec2 import Wav2Vec2Config, create_wav2vec2_model, get_wav2vec2_model_hub
from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrConfig, create_wav2vec2_asr_model, get_wav2vec2_asr_model_hub
from fairseq2.models.wav2vec2.asr.interop import convert_wav2vec2_asr_state_dict
from fairseq2.nn import BatchLayout

from speechssl.interop.fairseq import to_fairseq
from speechssl.interop.fairseq2 import (
    from_fairseq2,
    load_fairseq2_checkpoint,
    save_fairseq2_checkpoint,
    to_fairseq2,
    to_fairseq2_config,
)
from speechssl.models.ctc import CTCModel
from speechssl.objectives.negatives import Negatives

LENGTHS = [16000, 12800, 11000]
KINDS = ["base", "large", "conformer-relative", "conformer-conv"]
DISTRACTORS = 10


@pytest.fixture(autouse=True)
def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """fairseq2's quantizer compiles a helper on every call; eager gives the same numbers, faster."""
    monkeypatch.setattr(torch, "compile", lambda fn=None, **_: fn if fn is not None else (lambda f: f))
    torch.manual_seed(0)


def _encoder(kind: str, encoder) -> None:
    encoder.model_dim, encoder.num_encoder_layers, encoder.num_encoder_attn_heads = 64, 3, 4
    encoder.ffn_inner_dim, encoder.feature_dim = 128, 32
    encoder.feature_extractor_layer_descs = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2
    encoder.layer_drop_p = 0.0
    if kind != "conformer-relative":
        encoder.pos_conv_kernel_size, encoder.num_pos_conv_groups = 16, 4
    if kind == "large":
        encoder.norm_order, encoder.layer_norm_features = TransformerNormOrder.PRE, False
        encoder.feature_extractor_bias, encoder.feature_extractor_layer_norm_convs = True, True
    if kind.startswith("conformer"):
        encoder.use_conformer, encoder.depthwise_conv_kernel_size = True, 7
        encoder.pos_encoder_type = "relative" if kind.endswith("relative") else "conv"


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved off its initialisation (LayerNorms and BatchNorm statistics too), so a
    parameter mapped to the wrong place cannot go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _pretraining_model(kind: str):
    config = Wav2Vec2Config(final_dim=24, quantized_dim=32, num_codebooks=2, num_codebook_entries=16,
                            num_distractors=DISTRACTORS)
    _encoder(kind, config.encoder_config)
    return _perturbed(create_wav2vec2_model(config)), config


def _asr_model(kind: str):
    config = Wav2Vec2AsrConfig(target_vocab_size=11)
    _encoder(kind, config.encoder_config)
    return _perturbed(create_wav2vec2_asr_model(config)), config


def _batch() -> tuple[torch.Tensor, BatchLayout, torch.Tensor]:
    lengths = torch.tensor(LENGTHS)
    waves = torch.randn(len(LENGTHS), max(LENGTHS)) * (torch.arange(max(LENGTHS)) < lengths[:, None])
    return waves, BatchLayout(tuple(waves.shape), seq_lens=LENGTHS), lengths


def _layer_outputs(fs2_model, waves, layout) -> tuple[list[torch.Tensor], torch.Tensor]:
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for layer in fs2_model.encoder.layers]
    try:
        seqs, seqs_layout, _ = fs2_model.encoder_frontend.extract_features(waves, layout)
        seqs, _ = fs2_model.encoder_frontend.process_features(seqs, seqs_layout, None)
        final = fs2_model.encoder(seqs, seqs_layout)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, final


def _valid(x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[b, :n] for b, n in enumerate(frames.tolist())])


@pytest.mark.parametrize("kind", KINDS)
def test_every_layer_matches(kind: str) -> None:
    fs2_model, _ = _pretraining_model(kind)
    ours = from_fairseq2(fs2_model)
    waves, layout, lengths = _batch()
    with torch.no_grad():
        expected, final = _layer_outputs(fs2_model, waves, layout)
        layers, frames = ours.extract_features(waves, lengths)
        output, _ = ours.encode(waves, lengths)
    assert len(layers) == len(expected) == 3
    for got, want in zip(layers, expected, strict=True):
        assert torch.allclose(_valid(got, frames), _valid(want, frames), atol=1e-4)
    assert torch.allclose(_valid(output, frames), _valid(final, frames), atol=1e-4)


def _fixed_mask(frames: torch.Tensor, length: int) -> torch.Tensor:
    """The same number of masked frames in each row (fairseq2 needs that), inside the valid frames."""
    mask = torch.zeros(len(frames), length, dtype=torch.bool)
    for b, n in enumerate(frames.tolist()):
        mask[b, torch.randperm(int(frames.min()))[:12].sort().values + (n - int(frames.min()))] = True
    return mask


@pytest.mark.parametrize("kind", KINDS)
def test_pretraining_logits_match_for_the_same_mask_and_distractors(kind: str) -> None:
    fs2_model, _ = _pretraining_model(kind)
    ours = from_fairseq2(fs2_model)
    waves, layout, lengths = _batch()
    with torch.no_grad():
        _, frames = ours.extract_features(waves, lengths)
    length = int(frames.max())
    mask = _fixed_mask(frames, length)
    fs2_model.masker.mask_factory = lambda **_: mask
    masked = int(mask[0].sum())
    torch.manual_seed(7)  # fairseq2's distractor draw, reproduced: the only random numbers in eval
    draw = torch.randint(0, masked - 1, (len(LENGTHS), masked * DISTRACTORS))
    slots = torch.arange(masked).repeat_interleave(DISTRACTORS)
    draw[draw >= slots] += 1
    local = torch.zeros(len(LENGTHS), length, DISTRACTORS, dtype=torch.long)
    local[:, :masked] = draw.view(len(LENGTHS), masked, DISTRACTORS)
    negatives = Negatives(local, torch.arange(length)[None, :, None] < masked,
                          torch.zeros(len(LENGTHS), length, 0, dtype=torch.long),
                          torch.zeros(len(LENGTHS), length, 0, dtype=torch.bool))
    with torch.no_grad():
        torch.manual_seed(7)
        loss, expected = fs2_model(waves, layout)
        got = ours(waves, lengths, mask=mask, negatives=negatives)
    want, have = expected.logits, got.logits[:, :masked]
    assert have.shape == want.shape
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(have))
    assert torch.allclose(have[finite], want[finite], atol=1e-4)
    assert torch.allclose(got.contrastive_loss, loss.contrastive, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_ctc_logits_match(kind: str) -> None:
    fs2_model, _ = _asr_model(kind)
    ours = from_fairseq2(fs2_model)
    assert isinstance(ours, CTCModel) and ours.vocab_size == 11
    waves, layout, lengths = _batch()
    with torch.no_grad():
        expected, expected_layout = fs2_model(waves, layout)
        logits, frames = ours(waves, lengths)
    assert frames.tolist() == expected_layout.seq_lens
    assert torch.allclose(_valid(logits, frames), _valid(expected, frames), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("asr", [False, True])
def test_conversion_round_trips_bit_for_bit(kind: str, asr: bool) -> None:
    fs2_model, config = _asr_model(kind) if asr else _pretraining_model(kind)
    ours = from_fairseq2(fs2_model)
    back = to_fairseq2(ours)
    want, got = fs2_model.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want if k != "quantizer.num_updates")
    assert to_fairseq2_config(ours) == config
    again = from_fairseq2(back)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("kind", ["base", "large"])
def test_our_fairseq_checkpoints_load_through_fairseq2s_fairseq_converter(kind: str) -> None:
    """The stronger check of the fairseq layout: fairseq2's converter of fairseq's fine-tuned
    checkpoints reads the file :func:`to_fairseq` writes, and the model it fills gives our logits."""
    fs2_model, config = _asr_model(kind)
    ours = from_fairseq2(fs2_model)
    checkpoint = to_fairseq(ours)
    state = convert_wav2vec2_asr_state_dict(copy.deepcopy(checkpoint), config)
    other = create_wav2vec2_asr_model(config).eval()
    other.load_state_dict(state, strict=True)
    waves, layout, lengths = _batch()
    with torch.no_grad():
        expected, _ = other(waves, layout)
        logits, frames = ours(waves, lengths)
    assert torch.allclose(_valid(logits, frames), _valid(expected, frames), atol=1e-4)


@pytest.mark.parametrize("kind", ["base", "conformer-relative"])
def test_checkpoint_files_go_both_ways_through_load_custom_model(kind: str, tmp_path: Path) -> None:
    fs2_model, config = _pretraining_model(kind)
    ours = from_fairseq2(fs2_model)
    save_fairseq2_checkpoint(ours, tmp_path / "ours.pt")
    loaded = get_wav2vec2_model_hub().load_custom_model(tmp_path / "ours.pt", to_fairseq2_config(ours),
                                                        device=torch.device("cpu"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in fs2_model.state_dict().items()
               if k != "quantizer.num_updates")
    torch.save({"model": fs2_model.state_dict()}, tmp_path / "theirs.pt")  # no config beside it: read from weights
    back = load_fairseq2_checkpoint(tmp_path / "theirs.pt", config=None if kind == "base" else config)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())

    asr_model, asr_config = _asr_model(kind)
    save_fairseq2_checkpoint(from_fairseq2(asr_model), tmp_path / "asr.pt")
    loaded = get_wav2vec2_asr_model_hub().load_custom_model(tmp_path / "asr.pt", asr_config,
                                                            device=torch.device("cpu"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in asr_model.state_dict().items())
