from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from speechssl import ModelConfig, Wav2Vec2Model, load_model, load_model_config
from speechssl.models.context import registered_contexts
from speechssl.models.feature_extractor import FeatureExtractor

REPO = Path(__file__).resolve().parent.parent


def test_receptive_field_and_exact_output_lengths(tiny_config: ModelConfig) -> None:
    extractor = FeatureExtractor(tiny_config.extractor)
    assert extractor.receptive_field == 400
    lengths = torch.tensor([400, 401, 719, 720, 16000, 16319, 16320, 23456])
    for n, expected in zip(lengths.tolist(), extractor.output_lengths(lengths).tolist(), strict=True):
        assert extractor(torch.randn(1, n)).shape[1] == expected
    assert extractor.output_lengths(torch.tensor([16000])).item() == 49  # 50 Hz


def test_layer_norm_extractor_and_conv_bias(tiny_config: ModelConfig) -> None:
    cfg = copy.deepcopy(tiny_config.extractor)
    cfg.mode, cfg.conv_bias = "layer_norm", True
    extractor = FeatureExtractor(cfg)
    assert all(isinstance(b.norm, torch.nn.LayerNorm) for b in extractor.blocks)
    assert all(b.conv.bias is not None for b in extractor.blocks)
    assert extractor(torch.randn(2, 4000)).shape == (2, 12, 64)


def test_pretraining_forward_outputs(tiny_model: Wav2Vec2Model, padded_batch) -> None:
    waves, lengths = padded_batch
    out = tiny_model(waves, lengths)
    frames = tiny_model.feature_extractor.output_lengths(lengths)
    counts = out.mask.sum(1)
    assert torch.all(counts == counts[0]) and out.sample_size == counts.sum()
    assert not out.mask[torch.arange(out.mask.shape[1]) >= frames[:, None]].any()  # padding never masked
    cfg = tiny_model.config.loss
    expected = (out.contrastive_loss + cfg.diversity_weight * out.diversity_loss * out.sample_size
                + cfg.feature_penalty_weight * out.feature_penalty * out.sample_size)
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.dtype == torch.float32 and out.logits.shape[-1] == 1 + cfg.num_negatives
    assert 0 <= out.accuracy <= 1 and out.temperature == 2.0
    assert torch.isfinite(out.loss)


def test_every_parameter_gets_a_gradient(tiny_model: Wav2Vec2Model, padded_batch) -> None:
    tiny_model.train()
    tiny_model(*padded_batch).loss.backward()
    missing = [n for n, p in tiny_model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def _extractor_grads(config: ModelConfig, mult: float, state: dict, batch) -> list[torch.Tensor | None]:
    cfg = copy.deepcopy(config)
    cfg.feature_grad_mult = mult
    cfg.context.dropout = cfg.context.attention_dropout = cfg.dropout_input = cfg.dropout_features = 0.0
    model = Wav2Vec2Model(cfg)
    model.load_state_dict(state)
    torch.manual_seed(1)  # same mask, negatives and Gumbel noise in both runs
    model(*batch).loss.backward()
    return [p.grad for p in model.feature_extractor.parameters()]


def test_feature_grad_mult_scales_extractor_gradients(tiny_config: ModelConfig, padded_batch) -> None:
    state = Wav2Vec2Model(tiny_config).state_dict()
    full = _extractor_grads(tiny_config, 1.0, state, padded_batch)
    tenth = _extractor_grads(tiny_config, 0.1, state, padded_batch)
    for g1, g01 in zip(full, tenth, strict=True):
        torch.testing.assert_close(g01, 0.1 * g1, rtol=1e-3, atol=1e-5 * g1.abs().max().item())
    assert all(g is None for g in _extractor_grads(tiny_config, 0.0, state, padded_batch))


def test_extract_features_and_encode(tiny_model: Wav2Vec2Model, padded_batch) -> None:
    tiny_model.eval()
    waves, lengths = padded_batch
    layers, out_lengths = tiny_model.extract_features(waves, lengths)
    assert len(layers) == 2 and layers[0].shape == (3, 49, 96)
    assert out_lengths.tolist() == tiny_model.feature_extractor.output_lengths(lengths).tolist()
    first, _ = tiny_model.extract_features(waves, lengths, num_layers=1)
    assert len(first) == 1 and torch.equal(first[0], layers[0])
    final, _ = tiny_model.encode(waves, lengths)
    torch.testing.assert_close(final, layers[-1])  # post-LN: no LayerNorm after the last layer
    no_lengths, none = tiny_model.extract_features(waves)
    assert none is None and no_lengths[0].shape == (3, 49, 96)
    with pytest.raises(ValueError, match="num_layers"):
        tiny_model.extract_features(waves, lengths, num_layers=3)


def test_save_and_load_round_trip(tiny_model: Wav2Vec2Model, padded_batch, tmp_path: Path) -> None:
    tiny_model.eval()
    path = tmp_path / "model.pt"
    tiny_model.save(path)
    loaded = load_model(path).eval()
    assert loaded.config == tiny_model.config
    a, _ = tiny_model.extract_features(*padded_batch)
    b, _ = loaded.extract_features(*padded_batch)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a speechssl model"):
        load_model(tmp_path / "other.pt")


@pytest.mark.parametrize(
    ("waves", "lengths", "message"),
    [
        (torch.zeros(0, 16000), None, "empty batch"),
        (torch.zeros(2, 0), None, "empty batch"),
        (torch.zeros(16000), None, r"shape \(batch, samples\)"),
        (torch.zeros(1, 1, 16000), None, r"shape \(batch, samples\)"),
        (torch.zeros(2, 16000, dtype=torch.int16), None, "floating point"),
        (torch.zeros(2, 399), None, "receptive field"),
        (torch.zeros(2, 16000), torch.tensor([16000, 399]), "waveform 1 has 399 samples"),
        (torch.zeros(2, 16000), torch.tensor([16000, 16001]), "exceeds"),
        (torch.zeros(2, 16000), torch.tensor([16000.0, 8000.0]), "integers"),
        (torch.zeros(2, 16000), torch.tensor([16000]), "lengths must have shape"),
        (torch.zeros(2, 16000).index_fill_(1, torch.tensor([5]), float("nan")), None, "NaN or Inf"),
        (torch.zeros(2, 16000).index_fill_(1, torch.tensor([5]), float("inf")), None, "NaN or Inf"),
    ],
)
def test_bad_inputs_raise_value_errors(tiny_model: Wav2Vec2Model, waves, lengths, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_model(waves, lengths)
    with pytest.raises(ValueError, match=message):
        tiny_model.extract_features(waves, lengths)


def test_set_num_updates_drives_the_temperature(tiny_model: Wav2Vec2Model) -> None:
    q = tiny_model.config.quantizer
    tiny_model.set_num_updates(100)
    assert tiny_model.quantizer.temperature == pytest.approx(q.temp_start * q.temp_decay**100)
    tiny_model.set_num_updates(10**7)
    assert tiny_model.quantizer.temperature == q.temp_end


def test_shortest_input_gives_a_finite_loss(tiny_model: Wav2Vec2Model) -> None:
    out = tiny_model(torch.randn(2, 400), torch.tensor([400, 400]))  # one frame per row
    assert torch.isfinite(out.loss)
    out = tiny_model(torch.randn(2, 800), torch.tensor([800, 400]))
    assert torch.isfinite(out.loss) and not out.mask[1, 1:].any()


@pytest.mark.parametrize("context", registered_contexts())
def test_every_registered_context_network_pretrains_saves_and_loads(context: str, padded_batch, tmp_path: Path
                                                                    ) -> None:
    """Each network of the registry, from its tiny config: a finite loss with gradients for its
    parameters, per-layer features of the padded length, and a saved model that gives the same."""
    config_file = REPO / "configs" / "model" / f"tiny_{context}.yaml"
    assert config_file.is_file(), f"a registered context network needs {config_file.relative_to(REPO)}"
    torch.manual_seed(0)
    model = Wav2Vec2Model(load_model_config(config_file))
    assert model.config.context.type == context
    waves, lengths = padded_batch
    out = model(waves, lengths)
    assert torch.isfinite(out.loss) and out.sample_size > 0
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.context.parameters())
    model.eval()
    states, frames = model.extract_features(waves, lengths)
    assert len(states) == model.context.depth
    assert torch.equal(frames, model.feature_extractor.output_lengths(lengths))
    model.save(tmp_path / "model.pt")
    again, _ = load_model(tmp_path / "model.pt").eval().extract_features(waves, lengths)
    assert all(torch.equal(a, b) for a, b in zip(states, again, strict=True))
