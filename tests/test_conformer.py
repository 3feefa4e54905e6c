"""The Conformer context network: local attention, switching attention, padding, configs, learning.
(Parity with Hugging Face's Wav2Vec2-Conformer is in test_huggingface_parity.py.)"""

from __future__ import annotations

import copy

import pytest
import torch

from pretrain.overfit import OverfitConfig, run
from speechssl import ConfigError, Wav2Vec2Model, load_model, load_model_config
from speechssl.config import build
from speechssl.models.context.conformer import (
    ConformerConfig,
    ConformerContext,
    ConvolutionModule,
    relative_reach,
    relative_shift,
)
from tests.conftest import REPO

TINY = REPO / "configs/model/tiny_conformer.yaml"


def _context(position: str, **kwargs) -> ConformerContext:
    config = ConformerConfig(embed_dim=32, num_layers=2, num_heads=4, ffn_dim=64, depthwise_conv_kernel=3,
                             position_embeddings=position, dropout=0.0, attention_dropout=0.0,
                             activation_dropout=0.0, conv_dropout=0.0, **kwargs)
    return ConformerContext(config).eval()


@pytest.mark.parametrize("position", ["relative", "rotary", "none"])
def test_local_attention_sees_only_its_window(position: str) -> None:
    left, right, layers, reach = 3, 2, 2, 1  # reach: the depthwise kernel's half-width
    context = _context(position, att_context_size=[left, right])
    x = torch.randn(1, 40, 32)
    t = 20
    with torch.no_grad():
        base = context(x).output[0, t]
        outside = x.clone()
        outside[0, : t - layers * (left + reach)] += torch.randn(32)  # beyond what two blocks reach
        outside[0, t + layers * (right + reach) + 1:] += torch.randn(32)
        inside = x.clone()
        inside[0, t - left] += torch.randn(32)
        far_left = x.clone()
        far_left[0, 0] += torch.randn(32)
        torch.testing.assert_close(context(outside).output[0, t], base, rtol=0, atol=0)
        assert (context(inside).output[0, t] - base).abs().max() > 1e-3
        # With full attention the same far change does reach frame t.
        context.change_attention([-1, -1])
        full_base = context(x).output[0, t]
        assert (context(far_left).output[0, t] - full_base).abs().max() > 1e-6


@pytest.mark.parametrize("position", ["relative", "rotary"])
def test_unlimited_window_is_full_attention(position: str) -> None:
    full = _context(position)
    wide = _context(position, att_context_size=[100, 100])
    wide.load_state_dict(full.state_dict())
    x = torch.randn(2, 30, 32)
    padding = torch.arange(30) >= torch.tensor([30, 21])[:, None]
    with torch.no_grad():
        torch.testing.assert_close(wide(x, padding).output, full(x, padding).output, rtol=0, atol=1e-6)
        wide.change_attention([-1, -1])
        torch.testing.assert_close(wide(x, padding).output, full(x, padding).output, rtol=0, atol=0)


def test_local_attention_with_padding_stays_finite() -> None:
    context = _context("relative", att_context_size=[2, 0])
    padding = torch.arange(30) >= torch.tensor([30, 5])[:, None]  # padded queries far from any valid key
    with torch.no_grad():
        out = context(torch.randn(2, 30, 32), padding)
    assert torch.isfinite(out.output).all()


def test_change_attention_is_saved_with_the_model(tmp_path) -> None:
    model = Wav2Vec2Model(load_model_config(TINY))
    model.change_attention([8, 4])
    assert model.config.context.att_context_size == [8, 4]
    model.save(tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.config.context.att_context_size == [8, 4]
    with pytest.raises(ConfigError, match="att_context_size"):
        model.change_attention([-2, 0])
    transformer = Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_transformer.yaml"))
    with pytest.raises(ValueError, match="no switchable attention"):
        transformer.change_attention([8, 4])


@pytest.mark.parametrize("length", [1, 5, 9, 16])
def test_relative_shift_indexes_relative_positions(length: int) -> None:
    reach = relative_reach(length)
    assert reach >= length - 1 and reach % 8 == 0
    positions = torch.arange(reach, -reach - 1, -1).float()  # column k holds position R-k
    rows = length + (-length % 8)
    scores = positions.expand(2, 3, rows, -1)
    shifted = relative_shift(scores, length)
    expected = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # i - j
    assert torch.equal(shifted, expected.float().expand(2, 3, -1, -1))
    assert all(stride % 8 == 0 for stride in shifted.stride()[:-1]) and shifted.storage_offset() % 8 == 0


@pytest.mark.parametrize("mask_padding", [True, False])
def test_padding_and_the_convolution_module(mask_padding: bool) -> None:
    """With ``mask_padding_in_conv`` an utterance gives the same output alone and in a padded batch;
    without it (fairseq and Hugging Face) padding leaks into its last frames."""
    context = _context("relative", mask_padding_in_conv=mask_padding)
    x = torch.randn(2, 30, 32)
    padding = torch.arange(30) >= torch.tensor([30, 21])[:, None]
    with torch.no_grad():
        batched = context(x, padding).output[1, :21]
        alone = context(x[1:, :21]).output[0]
    difference = (batched - alone).abs().max()
    if mask_padding:
        assert difference < 1e-5
    else:
        assert difference > 1e-3


@pytest.mark.parametrize("override, message", [
    ("context.depthwise_conv_kernel=30", "must be odd"),
    ("context.position_embeddings=absolute", "must be one of"),
    ("context.activation=relu", "must be one of"),
    ("context.att_context_size=[3]", "att_context_size"),
    ("context.num_heads=5", "must divide embed_dim"),
])
def test_config_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_model_config(TINY, [override])
    assert "model.context." in str(error.value)


def test_tiny_conformer_learns() -> None:
    """The foundation's learning test, with the tiny Conformer as context network."""
    config = build(OverfitConfig, REPO / "configs/pretrain/overfit_tiny.yaml", ["steps=200", f"model={TINY}"])
    assert config.model.context.type == "conformer"
    history = run(config, echo=False)
    first = history[0]["contrastive"]
    last = sum(h["contrastive"] for h in history[-10:]) / 10
    assert last <= 0.5 * first, (first, last)
    assert min(h["prob_ppl"] for h in history[-10:]) > 2 * config.model.quantizer.num_groups


def test_batch_norm_runs_with_bf16_weights_and_fp32_statistics() -> None:
    """DeepSpeed's bf16 engine casts parameters, not buffers: the convolution module's BatchNorm
    must accept bf16 inputs and weights with fp32 running statistics, and keep the statistics fp32."""
    torch.manual_seed(0)
    reference = ConvolutionModule(ConformerConfig(embed_dim=16, num_heads=2, ffn_dim=32, depthwise_conv_kernel=5,
                                                  conv_dropout=0.0))
    half = copy.deepcopy(reference)
    for p in half.parameters():
        p.data = p.data.bfloat16()
    x = torch.randn(2, 12, 16)
    for train in (True, False):
        reference.train(train), half.train(train)
        out = half(x.bfloat16(), None)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference(x, None), atol=0.05, rtol=0.05)
    bn = half.batch_norm
    assert bn.running_mean.dtype == torch.float32 and int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, reference.batch_norm.running_mean, atol=1e-2, rtol=0)
