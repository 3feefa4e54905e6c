"""Numerical parity with torchaudio's wav2vec 2.0 (random weights copied across)."""

from __future__ import annotations

import inspect

import pytest
import torch
import torchaudio

from speechssl.interop.torchaudio import from_torchaudio, to_torchaudio, wav2vec2_model

SMALL_CONV = [(32, 10, 5), (32, 3, 2), (32, 3, 2), (32, 3, 2), (32, 3, 2), (32, 2, 2), (32, 2, 2)]

# extractor_mode, conv config, conv bias, embed, layers, heads, ffn, pos kernel, pos groups, layer_norm_first
LAYOUTS = {
    "base-small": ("group_norm", SMALL_CONV, False, 64, 2, 4, 128, 16, 4, False),
    "large-small": ("layer_norm", SMALL_CONV, True, 64, 3, 4, 128, 17, 4, True),
    "base-default": ("group_norm", None, False, 768, 12, 12, 3072, 128, 16, False),
    "large-default": ("layer_norm", None, True, 1024, 24, 16, 4096, 128, 16, True),
}


def _torchaudio_model(layout: str, aux: int | None = None) -> torch.nn.Module:
    mode, conv, bias, dim, layers, heads, ffn, kernel, groups, pre_ln = LAYOUTS[layout]
    model = torchaudio.models.wav2vec2_model(
        extractor_mode=mode, extractor_conv_layer_config=conv, extractor_conv_bias=bias,
        encoder_embed_dim=dim, encoder_projection_dropout=0.1, encoder_pos_conv_kernel=kernel,
        encoder_pos_conv_groups=groups, encoder_num_layers=layers, encoder_num_heads=heads,
        encoder_attention_dropout=0.1, encoder_ff_interm_features=ffn, encoder_ff_interm_dropout=0.1,
        encoder_dropout=0.1, encoder_layer_norm_first=pre_ln, encoder_layer_drop=0.05, aux_num_out=aux)
    with torch.no_grad():  # make LayerNorm/GroupNorm affine and biases non-trivial
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([20000, 15111, 9000])
    waves = torch.randn(3, 20000)
    waves[torch.arange(20000) >= lengths[:, None]] = 0.0
    return waves, lengths


def _max_diff_valid(a: list[torch.Tensor], b: list[torch.Tensor], lengths: torch.Tensor) -> float:
    valid = torch.arange(a[0].shape[1]) < lengths[:, None]
    return max((x - y)[valid].abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_extract_features_match_torchaudio(layout: str) -> None:
    ta = _torchaudio_model(layout)
    ours = from_torchaudio(ta).eval()
    waves, lengths = _batch()
    with torch.no_grad():
        expected, expected_lengths = ta.extract_features(waves, lengths)
        got, got_lengths = ours.extract_features(waves, lengths)
    assert torch.equal(expected_lengths, got_lengths)
    assert len(got) == len(expected) == LAYOUTS[layout][4]
    assert _max_diff_valid(expected, got, expected_lengths) <= 1e-4

    # The comparison is sharp: a small change to one weight of the last layer is visible.
    with torch.no_grad():
        bias = ours.context.layers[-1].feed_forward.fc2.bias
        bias.add_(1e-2 * torch.randn_like(bias))
        moved, _ = ours.extract_features(waves, lengths)
    assert _max_diff_valid(expected[-1:], moved[-1:], expected_lengths) > 1e-3


@pytest.mark.parametrize("layout", ["base-small", "large-small"])
def test_final_output_and_aux_head_match_torchaudio(layout: str) -> None:
    ta = _torchaudio_model(layout, aux=29)
    ours = from_torchaudio(ta).eval()
    waves, lengths = _batch()
    with torch.no_grad():
        expected, expected_lengths = ta(waves, lengths)
        hidden, got_lengths = ours.encode(waves, lengths)
        got = ours.aux(hidden)
    assert torch.equal(expected_lengths, got_lengths)
    valid = torch.arange(got.shape[1]) < got_lengths[:, None]
    assert (expected - got)[valid].abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", ["base-small", "large-small", "base-default"])
def test_to_torchaudio_round_trips(layout: str) -> None:
    ta = _torchaudio_model(layout, aux=7)
    back = to_torchaudio(from_torchaudio(ta))
    expected, got = ta.state_dict(), back.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    waves, lengths = _batch()
    with torch.no_grad():
        assert torch.equal(ta(waves, lengths)[0], back.eval()(waves, lengths)[0])


def test_config_read_from_torchaudio() -> None:
    cfg = from_torchaudio(_torchaudio_model("large-small")).config
    assert cfg.extractor.mode == "layer_norm" and cfg.extractor.conv_bias
    assert cfg.extractor.conv_layers == [list(c) for c in SMALL_CONV]
    ctx = cfg.context
    assert (ctx.embed_dim, ctx.num_layers, ctx.num_heads, ctx.ffn_dim) == (64, 3, 4, 128)
    assert (ctx.pos_conv_kernel, ctx.pos_conv_groups, ctx.layer_norm_first) == (17, 4, True)
    assert (ctx.dropout, ctx.attention_dropout, ctx.activation_dropout, ctx.layer_drop) == (0.1, 0.1, 0.1, 0.05)
    assert cfg.dropout_input == 0.1


def test_wav2vec2_model_takes_torchaudios_arguments() -> None:
    ours = inspect.signature(wav2vec2_model).parameters
    theirs = inspect.signature(torchaudio.models.wav2vec2_model).parameters
    assert list(ours) == list(theirs)
    args = dict(zip(theirs, LAYOUTS["large-small"][:3], strict=False))
    args.update(encoder_embed_dim=64, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16,
                encoder_pos_conv_groups=4, encoder_num_layers=2, encoder_num_heads=4,
                encoder_attention_dropout=0.0, encoder_ff_interm_features=96, encoder_ff_interm_dropout=0.0,
                encoder_dropout=0.0, encoder_layer_norm_first=True, encoder_layer_drop=0.0, aux_num_out=5)
    model = wav2vec2_model(**args)
    reference = torchaudio.models.wav2vec2_model(**args)
    ours_ta = to_torchaudio(model)  # same architecture: the weights load with no key missing
    assert {k: v.shape for k, v in ours_ta.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("layout", ["base-small", "large-small"])
def test_layer_features_of_an_imported_model_match_torchaudio(layout: str) -> None:
    """speechssl.features on a model imported from torchaudio: layers 1..L are torchaudio's own
    ``extract_features``, with its lengths."""
    from speechssl.features import LayerFeatures

    ta = _torchaudio_model(layout)
    waves, lengths = _batch()
    out = LayerFeatures(from_torchaudio(ta), "all")(waves, lengths)
    with torch.no_grad():
        expected, expected_lengths = ta.extract_features(waves, lengths)
    assert torch.equal(out.lengths, expected_lengths) and len(out.hidden_states) == len(expected) + 1
    assert _max_diff_valid(expected, out.hidden_states[1:], expected_lengths) <= 1e-4
