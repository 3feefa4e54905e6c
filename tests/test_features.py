"""Feature extraction: layer selection, the weighted sum and hooks, for every context network."""

from __future__ import annotations

import pytest
import torch

from speechssl import Wav2Vec2Model, load_model_config
from speechssl.features import LayerFeatures
from tests.conftest import REPO

CONTEXTS = ["tiny_transformer", "tiny_conformer", "tiny_zipformer"]


def _model(name: str) -> Wav2Vec2Model:
    return Wav2Vec2Model(load_model_config(REPO / f"configs/model/{name}.yaml"))


@pytest.mark.parametrize("name", CONTEXTS)
def test_all_layers_are_the_context_input_then_extract_features(name: str, padded_batch) -> None:
    model = _model(name).train()  # the wrapper switches it to eval mode
    features = LayerFeatures(model, "all")
    waves, lengths = padded_batch
    out = features(waves, lengths)
    expected, frames = model.extract_features(waves, lengths)
    depth = model.context.depth
    assert out.layers == list(range(depth + 1)) and len(out.hidden_states) == depth + 1
    assert torch.equal(out.lengths, frames) and int(frames.max()) < out.hidden_states[0].shape[1] + 1
    assert out.hidden_states[0].shape[:2] == expected[0].shape[:2]
    assert out.hidden_states[0].shape[-1] == model.context.input_dim
    for got, want in zip(out.hidden_states[1:], expected, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(out.hidden_states[0][..., :8], out.hidden_states[1][..., :8])
    again = features(waves, lengths)  # eval mode: no dropout, so the same features
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, again.hidden_states, strict=True))


def test_selection_keeps_order_stops_early_and_refuses_bad_layers(tiny_model, padded_batch) -> None:
    waves, lengths = padded_batch
    everything = LayerFeatures(tiny_model, "all")(waves, lengths).hidden_states
    picked = LayerFeatures(tiny_model, [2, 0], capture=["context.layers.1"])(waves, lengths)
    assert picked.layers == [2, 0]
    assert torch.equal(picked.hidden_states[0], everything[2]) and torch.equal(picked.hidden_states[1], everything[0])
    assert torch.equal(LayerFeatures(tiny_model, "last")(waves, lengths).hidden_states[0], everything[-1])
    shallow = LayerFeatures(tiny_model, [1], capture=["context.layers.0", "context.layers.1"])(waves, lengths)
    assert set(shallow.captured) == {"context.layers.0"}  # layer 2 never ran
    for bad in ([3], [-1], []):
        with pytest.raises(ValueError, match=r"layers 0 .* to 2"):
            LayerFeatures(tiny_model, bad)
    with pytest.raises(ValueError, match="'all' or 'last'"):
        LayerFeatures(tiny_model, "first")


def test_hooks_return_intermediate_outputs_by_name(tiny_model, padded_batch) -> None:
    waves, lengths = padded_batch
    names = ["context.layers.0", "context.layers.1.feed_forward.fc1", "feature_extractor"]
    out = LayerFeatures(tiny_model, "all", capture=names)(waves, lengths)
    assert torch.equal(out.captured["context.layers.0"], out.hidden_states[1])
    fc1 = tiny_model.context.layers[1].feed_forward.fc1
    assert out.captured["context.layers.1.feed_forward.fc1"].shape[-1] == fc1.out_features
    assert out.captured["feature_extractor"].shape[-1] == tiny_model.feature_extractor.output_dim
    assert not tiny_model.context.layers[0]._forward_hooks  # removed after the call
    with pytest.raises(ValueError, match=r"no module named 'context.layer.0'.*did you mean"):
        LayerFeatures(tiny_model, capture=["context.layer.0"])


def test_weighted_sum_trains_its_weights_only_and_one_hot_gives_the_layer(tiny_model, padded_batch) -> None:
    waves, lengths = padded_batch
    features = LayerFeatures(tiny_model, "all", weighted_sum=True)
    assert [n for n, p in features.named_parameters() if p.requires_grad] == ["layer_weights"]
    out = features(waves, lengths)
    mean = torch.stack(out.hidden_states).mean(0)  # zero logits: equal weights
    torch.testing.assert_close(out.weighted, mean)
    out.weighted.square().mean().backward()
    assert features.layer_weights.grad is not None and features.layer_weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_model.parameters())
    with torch.no_grad():
        features.layer_weights.copy_(torch.tensor([-1e4, 0.0, -1e4]))
    torch.testing.assert_close(features(waves, lengths).weighted, out.hidden_states[1], rtol=0, atol=1e-6)
    features.train()
    assert features.training and not tiny_model.training


def test_weighted_sum_over_layers_of_different_widths_is_refused(padded_batch) -> None:
    model = _model("tiny_zipformer")  # stacks of 64, 96 and 64 channels
    waves, lengths = padded_batch
    with pytest.raises(ValueError, match="weighted_sum needs layers of one shape"):
        LayerFeatures(model, [1, 2], weighted_sum=True)(waves, lengths)
    same = LayerFeatures(model, [1, 3], weighted_sum=True)(waves, lengths)
    assert same.weighted.shape == same.hidden_states[0].shape


def test_per_utterance_extraction_does_not_depend_on_the_batch(tiny_model, padded_batch) -> None:
    """The group_norm extractor normalises over time: with ``extract_per_utterance`` each row is
    normalised over its own frames, so a padded row gives what it gives alone."""
    waves, lengths = padded_batch
    model = tiny_model.eval()
    with torch.no_grad():
        model.extract_per_utterance = True
        batched, frames = model.encode(waves, lengths)
        for i in range(len(lengths)):
            alone, _ = model.encode(waves[i: i + 1, : lengths[i]], lengths[i: i + 1])
            torch.testing.assert_close(batched[i, : frames[i]], alone[0], rtol=0, atol=1e-5)
        model.extract_per_utterance = False  # fairseq's behaviour: padding changes the padded rows
        padded, _ = model.encode(waves, lengths)
        assert (padded[2, : frames[2]] - batched[2, : frames[2]]).abs().max() > 1e-2
