"""Hugging Face parity (CPU, fp32, eval, random weights): models imported from ``transformers``
give the same hidden states, pretraining outputs and CTC logits; exports round-trip exactly.

Covers ``Wav2Vec2*`` (BASE and LARGE layouts) and ``Wav2Vec2Conformer*`` (relative, rotary and no
position embeddings) through :mod:`speechssl.interop.huggingface`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from speechssl import Wav2Vec2Model, load_model_config
from speechssl.interop.huggingface import from_huggingface, to_huggingface
from speechssl.models.ctc import CTCModel
from speechssl.objectives.negatives import Negatives
from tests.conftest import REPO, randomize_batch_norm_statistics

GROUPS, VARS, CODE_DIM, PROJ_DIM, NEGATIVES = 2, 16, 32, 24, 12
KINDS = ["transformer-base", "transformer-large", "conformer-relative", "conformer-rotary", "conformer-none"]
LENGTHS = torch.tensor([24000, 20000, 17000])
# transformers 5 records hidden_states[i] as layer i's output. transformers 4 (the fairseq2
# environment has 4.57) appends, as its last entry, the encoder's output after its final LayerNorm
# where there is one (the pre-LN Transformer, the Conformer), so that entry is compared with our
# final output there.
HF_NORMS_LAST_HIDDEN_STATE = int(transformers.__version__.split(".")[0]) < 5


def _normed_last(model: Wav2Vec2Model) -> bool:
    """Whether this Hugging Face version's last hidden state is our final output, not our last layer's."""
    return HF_NORMS_LAST_HIDDEN_STATE and model.config.context.layer_norm_first


def _compare_layers(layers: list, expected: tuple, final: torch.Tensor, normed_last: bool, valid: torch.Tensor,
                    start: int = 1) -> None:
    """Our per-layer outputs ``layers`` against Hugging Face's ``hidden_states[start:]``."""
    for i, (got, want) in enumerate(zip(layers, expected[start:], strict=True)):
        if normed_last and i == len(layers) - 1:
            got = final
        torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-4, msg=f"layer {i + start}")


def _hf_config(kind: str, **extra) -> object:
    common = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_codevector_groups=GROUPS,
        num_codevectors_per_group=VARS, codevector_dim=CODE_DIM, proj_codevector_dim=PROJ_DIM,
        num_negatives=NEGATIVES, contrastive_logits_temperature=0.1, diversity_loss_weight=0.1,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        feat_quantizer_dropout=0.0, layerdrop=0.0, final_dropout=0.0, vocab_size=11)
    if kind.startswith("transformer"):
        large = kind.endswith("large")
        return transformers.Wav2Vec2Config(**common, conv_bias=large, feat_extract_norm="layer" if large else "group",
                                           do_stable_layer_norm=large, **extra)
    position = kind.split("-")[1]
    return transformers.Wav2Vec2ConformerConfig(
        **common, hidden_act="swish", conv_depthwise_kernel_size=7, conformer_conv_dropout=0.0,
        position_embeddings_type=None if position == "none" else position, **extra)


def _hf_model(kind: str, head: str = "ForPreTraining") -> torch.nn.Module:
    """A random model whose every weight (LayerNorms and BatchNorm statistics too) is perturbed, so
    that a parameter mapped to the wrong place cannot go unnoticed."""
    base = "Wav2Vec2" if kind.startswith("transformer") else "Wav2Vec2Conformer"
    model = getattr(transformers, base + head)(_hf_config(kind)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    randomize_batch_norm_statistics(model)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    waves = torch.randn(3, 24000) * (torch.arange(24000) < LENGTHS[:, None])
    return waves, (torch.arange(24000) < LENGTHS[:, None]).long()


@pytest.mark.parametrize("kind", KINDS)
def test_hidden_states_match(kind: str) -> None:
    hf = _hf_model(kind, "Model")
    ours = from_huggingface(hf)
    waves, attention = _batch()
    with torch.no_grad():
        expected = hf(waves, attention_mask=attention, output_hidden_states=True)
        layers, frames = ours.extract_features(waves, LENGTHS)
        output, _ = ours.encode(waves, LENGTHS)
    valid = torch.arange(output.shape[1]) < frames[:, None]
    assert valid.sum() < valid.numel()  # the batch is padded
    # hidden_states[0] is the context input; hidden_states[i] the output of layer i. In the post-LN
    # Transformer HF's last entry is also its final output.
    assert len(expected.hidden_states) == len(layers) + 1
    _compare_layers(layers, expected.hidden_states, output, _normed_last(ours), valid)
    torch.testing.assert_close(output[valid], expected.last_hidden_state[valid], rtol=0, atol=1e-4)
    # The comparison is sharp: a small change to one weight shows.
    with torch.no_grad():
        ours.context.layers[-1].final_layer_norm.weight.add_(1e-2)
        moved = ours.encode(waves, LENGTHS)[0] if _normed_last(ours) else ours.extract_features(waves, LENGTHS)[0][-1]
    assert (moved - expected.hidden_states[-1])[valid].abs().max() > 1e-3


def _fixed_mask_and_negatives(batch: int, length: int, frames: torch.Tensor):
    """HF's own mask (trimmed to equal counts per row, as ``require_same_masks``) and negatives."""
    np.random.seed(0)
    attention = torch.arange(length) < frames[:, None]
    mask = _compute_mask_indices((batch, length), 0.65, 10, attention_mask=attention, min_masks=2)
    keep = mask.sum(1).min()
    for b in range(batch):
        mask[b, np.flatnonzero(mask[b])[keep:]] = False
    return mask, _sample_negative_indices((batch, length), NEGATIVES, mask)


def _to_slots(mask: np.ndarray, hf_negatives: np.ndarray) -> Negatives:
    """HF's negatives index frames of the flattened batch; ours index each row's masked frames."""
    batch, length, _ = hf_negatives.shape
    local = torch.zeros(batch, length, NEGATIVES, dtype=torch.long)
    for b in range(batch):
        positions = np.flatnonzero(mask[b])
        slot_of = {t: j for j, t in enumerate(positions)}
        for j, t in enumerate(positions):
            local[b, j] = torch.tensor([slot_of[i - b * length] for i in hf_negatives[b, t]])
    empty = torch.zeros(batch, length, 0, dtype=torch.long)
    return Negatives(local, torch.ones_like(local, dtype=torch.bool), empty, empty.bool())


@pytest.mark.parametrize("kind", KINDS)
def test_pretraining_objective_matches(kind: str) -> None:
    hf = _hf_model(kind)
    ours = from_huggingface(hf)
    assert isinstance(ours, Wav2Vec2Model) and not ours.training
    waves, attention = _batch()
    frames = ours.feature_extractor.output_lengths(LENGTHS)
    batch, length = 3, int(frames.max())
    mask_np, hf_negatives = _fixed_mask_and_negatives(batch, length, frames)
    mask = torch.from_numpy(mask_np)

    with torch.no_grad():
        expected = hf(waves, attention_mask=attention, mask_time_indices=mask,
                      sampled_negative_indices=torch.from_numpy(hf_negatives))
        got = ours(waves, LENGTHS, mask=mask, negatives=_to_slots(mask_np, hf_negatives))

    assert got.sample_size.item() == mask.sum().item()
    torch.testing.assert_close(got.contrastive_loss, expected.contrastive_loss, rtol=1e-5, atol=1e-3)
    # In eval HF reports the perplexity of the argmax codes: our code_perplexity.
    torch.testing.assert_close(got.code_perplexity, expected.codevector_perplexity, rtol=1e-5, atol=1e-4)
    num_entries = GROUPS * VARS
    torch.testing.assert_close((num_entries - got.code_perplexity) / num_entries * got.sample_size.float(),
                               expected.diversity_loss, rtol=1e-5, atol=1e-4)

    # Every logit, rebuilt from HF's projected states exactly as HF scores them.
    predictions, targets = expected.projected_states, expected.projected_quantized_states
    flat_targets = targets.reshape(batch * length, -1)
    for b in range(batch):
        for j, t in enumerate(np.flatnonzero(mask_np[b])):
            candidates = torch.cat([targets[b, t][None], flat_targets[hf_negatives[b, t]]])
            reference = torch.cosine_similarity(predictions[b, t][None], candidates, dim=-1) / 0.1
            same = (flat_targets[hf_negatives[b, t]] == targets[b, t]).all(-1)
            reference[1:][same] = float("-inf")
            torch.testing.assert_close(got.logits[b, j], reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_ctc_logits_match(kind: str) -> None:
    hf = _hf_model(kind, "ForCTC")
    ours = from_huggingface(hf)
    assert isinstance(ours, CTCModel) and ours.vocab_size == 11 and ours.blank == hf.config.pad_token_id
    waves, attention = _batch()
    with torch.no_grad():
        expected = hf(waves, attention_mask=attention).logits
        logits, frames = ours(waves, LENGTHS)
    valid = torch.arange(logits.shape[1]) < frames[:, None]
    torch.testing.assert_close(logits[valid], expected[valid], rtol=0, atol=1e-4)


@pytest.mark.parametrize("head", ["Model", "ForPreTraining", "ForCTC"])
@pytest.mark.parametrize("kind", KINDS)
def test_import_export_round_trip(kind: str, head: str) -> None:
    hf = _hf_model(kind, head)
    back = to_huggingface(from_huggingface(hf), kind="model" if head == "Model" else None)
    assert type(back) is type(hf)
    assert _same_architecture(back.config, hf.config, ctc=head == "ForCTC")
    expected, got = hf.state_dict(), back.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        if "pos_conv_embed" in key and "Conformer" in type(hf).__name__:
            continue  # Hugging Face's Conformer holds this convolution but never runs it
        assert torch.equal(got[key], value), key


def _same_architecture(a, b, ctc: bool) -> bool:
    keys = ("mask_time_prob", "mask_time_length", "num_negatives", "contrastive_logits_temperature",
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim", "conv_kernel",
            "conv_stride", "conv_bias", "feat_extract_norm", "do_stable_layer_norm", "hidden_act",
            "num_codevector_groups", "num_codevectors_per_group", "codevector_dim", "proj_codevector_dim",
            "position_embeddings_type", "conv_depthwise_kernel_size")
    keys += ("vocab_size", "pad_token_id", "final_dropout") if ctc else ()

    def value(config, key):
        v = getattr(config, key, None)
        return list(v) if isinstance(v, tuple) else v

    return all(value(a, k) == value(b, k) for k in keys)


@pytest.mark.parametrize("config", ["tiny_transformer", "tiny_conformer"])
def test_exported_model_gives_our_hidden_states(config: str) -> None:
    model_config = load_model_config(REPO / f"configs/model/{config}.yaml")
    if model_config.context.type == "conformer":
        model_config.context.mask_padding_in_conv = False  # Hugging Face leaks padding into the conv
    ours = Wav2Vec2Model(model_config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = to_huggingface(ours, kind="model")
    waves, attention = _batch()
    with torch.no_grad():
        expected = hf(waves, attention_mask=attention, output_hidden_states=True)
        layers, frames = ours.extract_features(waves, LENGTHS)
        final, _ = ours.encode(waves, LENGTHS)
    valid = torch.arange(layers[0].shape[1]) < frames[:, None]
    _compare_layers(layers, expected.hidden_states, final, _normed_last(ours), valid)
    from speechssl.features import LayerFeatures  # and layer 0, the encoder input, as users read it

    every = LayerFeatures(ours, "all")(waves, LENGTHS).hidden_states
    assert len(every) == len(expected.hidden_states)
    torch.testing.assert_close(expected.hidden_states[0][valid], every[0][valid], rtol=0, atol=1e-4)


def test_export_refuses_what_huggingface_cannot_hold() -> None:
    config = load_model_config(REPO / "configs/model/tiny_conformer.yaml", ["context.att_context_size=[4,4]"])
    with pytest.raises(ValueError, match="full attention only"):
        to_huggingface(Wav2Vec2Model(config))
    config = load_model_config(REPO / "configs/model/tiny_conformer.yaml",
                               ["context.position_embeddings=none", "context.pos_conv_kernel=16"])
    with pytest.raises(ValueError, match="convolutional positional embedding"):
        to_huggingface(Wav2Vec2Model(config))
    config = load_model_config(REPO / "configs/model/tiny_transformer.yaml", ["quantizer.weight_proj_depth=2"])
    with pytest.raises(ValueError, match="weight_proj_depth"):
        to_huggingface(Wav2Vec2Model(config))
    with pytest.raises(ValueError, match="cannot export"):
        to_huggingface(Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_transformer.yaml")), kind="ctc")


def test_import_from_a_saved_folder(tmp_path) -> None:
    hf = _hf_model("conformer-rotary", "ForCTC")
    hf.save_pretrained(tmp_path / "saved")
    loaded = from_huggingface(str(tmp_path / "saved"))
    direct = from_huggingface(hf)
    assert isinstance(loaded, CTCModel)
    for key, value in direct.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_finetune_pretrained_hf_prefix_reads_a_saved_folder(tmp_path) -> None:
    """``pretrained=hf:NAME_OR_PATH`` loads through transformers' AutoModel (a hub name needs the
    network, a saved folder does not): the encoder arrives whole; the pretraining heads, which
    AutoModel leaves out and fine-tuning drops, are the only difference."""
    from finetune.__main__ import load_pretrained

    hf = _hf_model("transformer-base")
    hf.save_pretrained(tmp_path / "saved")
    encoder = load_pretrained(f"hf:{tmp_path / 'saved'}").state_dict()
    direct = from_huggingface(hf).state_dict()
    assert encoder.keys() == direct.keys()
    heads = ("quantizer.", "project_q.", "final_proj.")
    kept = [k for k in encoder if not k.startswith(heads)]
    assert len(kept) > 40 and all(torch.equal(encoder[k], direct[k]) for k in kept)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_features_are_hugging_faces_hidden_states(kind: str) -> None:
    """speechssl.features counts layers as Hugging Face's ``hidden_states``: layer 0 is the
    encoder input, layer i the output of layer i."""
    from speechssl.features import LayerFeatures

    hf = _hf_model(kind, "Model")
    ours = from_huggingface(hf)
    waves, attention = _batch()
    out = LayerFeatures(ours, "all")(waves, LENGTHS)
    with torch.no_grad():
        expected = hf(waves, attention_mask=attention, output_hidden_states=True).hidden_states
        final, _ = ours.encode(waves, LENGTHS)
    valid = torch.arange(out.hidden_states[0].shape[1]) < out.lengths[:, None]
    assert len(out.hidden_states) == len(expected)
    _compare_layers(out.hidden_states, expected, final, _normed_last(ours), valid, start=0)
