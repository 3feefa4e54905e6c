"""Numerical parity with torchaudio's wav2vec 2.0 (random weights copied across), and the CTC head
exported as torchaudio's ``aux`` with its labels."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torchaudio

from speechssl import Wav2Vec2Model, load_model_config
from speechssl.asr.decoding import GreedyDecoder
from speechssl.asr.tokenizer import BpeTokenizer, CharTokenizer, tokenizer_from_dict
from speechssl.interop.torchaudio import from_torchaudio, to_torchaudio, wav2vec2_model
from speechssl.models.ctc import CTCModel
from tests.conftest import REPO

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


def _ctc_model(context: str = "transformer") -> CTCModel:
    config = load_model_config(REPO / f"configs/model/tiny_{context}.yaml")
    tokenizer = CharTokenizer.build(["THE QUICK BROWN FOX", "HELLO WORLD"])
    model = CTCModel(config, len(tokenizer), vocab=tokenizer.vocab, tokenizer=tokenizer.to_dict(),
                     final_dropout=0.1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_a_ctc_model_exports_its_head_as_aux_with_its_labels() -> None:
    model = _ctc_model()
    ta = to_torchaudio(model).eval()
    assert ta.aux.out_features == model.vocab_size and torch.equal(ta.aux.weight, model.lm_head.weight)
    assert ta.labels == tuple(model.vocab) and ta.labels[model.blank] == "<blank>"
    waves, lengths = _batch()
    with torch.no_grad():
        emissions, frames = ta(waves, lengths)
        logits, our_frames = model(waves, lengths)
    assert torch.equal(frames, our_frames)
    valid = torch.arange(logits.shape[1]) < frames[:, None]
    assert emissions.shape == logits.shape and (emissions - logits)[valid].abs().max().item() <= 1e-5
    assert logits[valid].std() > 0.1  # the head is there, not a zero output

    back = from_torchaudio(ta, ta.labels)
    assert isinstance(back, CTCModel) and back.blank == 0
    assert back.vocab == model.vocab and back.tokenizer == model.tokenizer
    fresh = "frontend.masker.mask_emb"  # torchaudio has no mask embedding
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items() if k != fresh)
    assert isinstance(from_torchaudio(ta), Wav2Vec2Model)  # without labels the head stays aux
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but torchaudio's users still script
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(to_torchaudio(model).eval())  # the attribute does not stop scripting
    assert scripted.labels == ta.labels
    with torch.no_grad():
        torch.testing.assert_close(scripted(waves, lengths)[0], emissions, rtol=0, atol=1e-5)


def test_a_bpe_ctc_model_goes_to_torchaudio_and_back_with_its_tokenizer() -> None:
    words = ["one", "two", "three", "seven", "eleven", "twenty", "enter", "yes", "no", "rubout"]
    bpe = BpeTokenizer.train([" ".join(words[i:] + words[:i]) for i in range(10)], vocab_size=40)
    config = load_model_config(REPO / "configs/model/tiny_transformer.yaml")
    model = CTCModel(config, len(bpe), vocab=bpe.vocab, tokenizer=bpe.to_dict()).eval()
    ta = to_torchaudio(model)
    assert ta.labels == tuple(bpe.vocab) and ta.aux.out_features == len(bpe)
    back = from_torchaudio(ta, ta.labels, tokenizer=model.tokenizer)
    assert back.tokenizer == model.tokenizer and back.vocab == model.vocab and back.blank == 0
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)


def test_torchaudio_bundle_style_labels_import_as_our_character_vocabulary() -> None:
    """Labels as torchaudio's ASR bundles have them (blank ``-`` first, ``|`` between words, no
    ``<unk>``): our greedy transcripts are those of torchaudio's tutorial greedy decoder."""
    labels = ("-", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ")
    ta = _torchaudio_model("base-small", aux=len(labels))
    with torch.no_grad():
        ta.aux.bias.zero_()
        ta.aux.bias[0] += 1.0
        ta.aux.bias[1] += 0.5
    ours = from_torchaudio(ta, labels).eval()
    assert ours.vocab[:3] == ["<blank>", "<unk>", "|"] and ours.vocab[3:] == list(labels[2:])
    assert ours.vocab_size == len(labels) + 1 and ours.lm_head.bias[1] == -1e4  # the added, never predicted <unk>
    waves, lengths = _batch()
    with torch.no_grad():
        emissions, frames = ta(waves, lengths)
        logits, _ = ours(waves, lengths)
    tutorial = []
    for row, n in zip(emissions.argmax(-1), frames.tolist(), strict=True):
        ids = [int(i) for i in torch.unique_consecutive(row[:n]) if i != 0]
        tutorial.append(" ".join("".join(labels[i] for i in ids).replace("|", " ").strip().split()))
    decode = GreedyDecoder(tokenizer_from_dict(ours.tokenizer), ours.blank)
    texts = decode(logits.log_softmax(-1), frames)
    assert texts == tutorial and all(len(t.split()) >= 2 for t in texts), texts


def test_what_torchaudio_cannot_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="no 'conformer' context network"):
        to_torchaudio(_ctc_model("conformer"))
    with pytest.raises(ValueError, match="no aux head"):
        from_torchaudio(_torchaudio_model("base-small"), ["<blank>", "<unk>", "|"])
    with pytest.raises(ValueError, match="3 labels for an aux head of 5"):
        from_torchaudio(_torchaudio_model("base-small", aux=5), ["<blank>", "<unk>", "|"])
