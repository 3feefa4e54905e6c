"""The pretraining objective equals Hugging Face's ``Wav2Vec2ForPreTraining`` given the same weights,
mask and negatives (eval mode, fp32): logits, contrastive loss, codevector perplexity."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchaudio.models.wav2vec2.utils import import_huggingface_model
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from speechssl import Wav2Vec2Model
from speechssl.config import LossConfig, QuantizerConfig
from speechssl.interop.torchaudio import from_torchaudio
from speechssl.objectives.negatives import Negatives

GROUPS, VARS, CODE_DIM, PROJ_DIM, NEGATIVES = 2, 16, 32, 24, 12


def _hf_model(stable_layer_norm: bool) -> Wav2Vec2ForPreTraining:
    config = Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        conv_dim=(32,) * 7, conv_bias=stable_layer_norm, feat_extract_norm="layer" if stable_layer_norm else "group",
        do_stable_layer_norm=stable_layer_norm, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        num_codevector_groups=GROUPS, num_codevectors_per_group=VARS, codevector_dim=CODE_DIM,
        proj_codevector_dim=PROJ_DIM, num_negatives=NEGATIVES, contrastive_logits_temperature=0.1,
        diversity_loss_weight=0.1, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, feat_quantizer_dropout=0.0, layerdrop=0.0,
    )
    return Wav2Vec2ForPreTraining(config).eval()


def _ours_from(hf: Wav2Vec2ForPreTraining) -> Wav2Vec2Model:
    encoder = from_torchaudio(import_huggingface_model(hf.wav2vec2))
    config = dataclasses.replace(
        encoder.config, final_dim=PROJ_DIM, dropout_features=0.0,
        quantizer=QuantizerConfig(num_groups=GROUPS, num_vars=VARS, codevector_dim=CODE_DIM),
        loss=LossConfig(num_negatives=NEGATIVES, logit_temp=0.1, feature_penalty_weight=0.0))
    model = Wav2Vec2Model(config)
    state = {k: v for k, v in encoder.state_dict().items()
             if not k.startswith(("quantizer.", "project_q.", "final_proj.", "frontend.mask_emb"))}
    state.update({
        "frontend.mask_emb": hf.wav2vec2.masked_spec_embed,
        "final_proj.weight": hf.project_hid.weight, "final_proj.bias": hf.project_hid.bias,
        "project_q.weight": hf.project_q.weight, "project_q.bias": hf.project_q.bias,
        "quantizer.weight_proj.0.weight": hf.quantizer.weight_proj.weight,
        "quantizer.weight_proj.0.bias": hf.quantizer.weight_proj.bias,
        "quantizer.codevectors": hf.quantizer.codevectors.view(GROUPS, VARS, -1),
    })
    model.load_state_dict(state)
    return model.eval()


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


@pytest.mark.parametrize("stable_layer_norm", [False, True], ids=["base-layout", "large-layout"])
def test_pretraining_objective_matches_huggingface(stable_layer_norm: bool) -> None:
    hf = _hf_model(stable_layer_norm)
    ours = _ours_from(hf)
    lengths = torch.tensor([24000, 20000, 17000])
    waves = torch.randn(3, 24000) * (torch.arange(24000) < lengths[:, None])
    frames = ours.feature_extractor.output_lengths(lengths)
    batch, length = 3, int(frames.max())
    mask_np, hf_negatives = _fixed_mask_and_negatives(batch, length, frames)
    mask = torch.from_numpy(mask_np)

    with torch.no_grad():
        expected = hf(waves, attention_mask=(torch.arange(24000) < lengths[:, None]).long(),
                      mask_time_indices=mask, sampled_negative_indices=torch.from_numpy(hf_negatives))
        got = ours(waves, lengths, mask=mask, negatives=_to_slots(mask_np, hf_negatives))

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
