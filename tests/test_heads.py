"""Downstream heads (:mod:`speechssl.models.heads`, :class:`SpeechClassifier`): Hugging Face parity of
the sequence-classification, frame-classification and x-vector classes (Wav2Vec2 and
Wav2Vec2-Conformer, CPU, fp32, padded batch), the round trip, saving, and training on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import speechssl
from speechssl import Wav2Vec2Model, load_model_config
from speechssl.interop.huggingface_heads import from_huggingface_head, to_huggingface_head
from speechssl.models.classifier import ClassifierOutput, SpeechClassifier, load_classifier
from speechssl.models.heads import HeadConfig
from tests.conftest import REPO, randomize_batch_norm_statistics
from tests.test_huggingface_parity import HF_NORMS_LAST_HIDDEN_STATE, LENGTHS, _batch, _hf_config

SUFFIXES = ["ForSequenceClassification", "ForAudioFrameClassification", "ForXVector"]
HEAD = dict(num_labels=5, classifier_proj_size=16, tdnn_dim=(32, 32, 32, 32, 48), xvector_output_dim=24)


def _with_normed_last_state(model: SpeechClassifier, waves: torch.Tensor, lengths: torch.Tensor) -> ClassifierOutput:
    """Our head over the weighted sum that transformers 4 takes: its last hidden state is the
    encoder's output after the final LayerNorm (tests/test_huggingface_parity.py)."""
    features, padding_mask, _ = model._features(waves, lengths, None)
    x, _ = model.frontend(features)
    out = model.context(x, padding_mask)
    states = torch.stack([out.input_state, *out.hidden_states[:-1], out.output])
    hidden = (states * model.layer_weights.softmax(0).view(-1, 1, 1, 1)).sum(0)
    frames = model._lengths(out.padding_mask)
    return ClassifierOutput(*model.head(hidden, frames), frames)


def _hf_head(kind: str, suffix: str, weighted: bool) -> torch.nn.Module:
    base = "Wav2Vec2" if kind.startswith("transformer") else "Wav2Vec2Conformer"
    config = _hf_config(kind, use_weighted_layer_sum=weighted, **HEAD)
    model = getattr(transformers, base + suffix)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    randomize_batch_norm_statistics(model)
    return model


@pytest.mark.parametrize("kind", ["transformer-base", "conformer-relative"])
@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("weighted", [False, True])
def test_logits_and_embeddings_match_hugging_face(kind: str, suffix: str, weighted: bool) -> None:
    hf = _hf_head(kind, suffix, weighted)
    ours = from_huggingface_head(hf)
    waves, attention = _batch()
    with torch.no_grad():
        expected = hf(waves, attention_mask=attention)
        got = ours(waves, LENGTHS)
        if weighted and HF_NORMS_LAST_HIDDEN_STATE and ours.config.context.layer_norm_first:
            got = _with_normed_last_state(ours, waves, LENGTHS)
    if suffix == "ForAudioFrameClassification":
        valid = torch.arange(got.logits.shape[1]) < got.frames[:, None]
        assert valid.sum() < valid.numel()  # the batch is padded
        torch.testing.assert_close(got.logits[valid], expected.logits[valid], rtol=0, atol=1e-4)
    else:
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-4)
    if suffix == "ForXVector":
        torch.testing.assert_close(got.embeddings, expected.embeddings, rtol=0, atol=1e-4)
        labels = torch.tensor([0, 3, 4])
        torch.testing.assert_close(ours.loss(got, labels), hf(waves, attention_mask=attention, labels=labels).loss,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["transformer-base", "conformer-rotary"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_import_then_export_is_bit_exact(kind: str, suffix: str) -> None:
    hf = _hf_head(kind, suffix, weighted=True)
    hf.config.id2label = {i: f"spk{i}" for i in range(5)}
    back = to_huggingface_head(from_huggingface_head(hf))
    assert type(back) is type(hf)
    ours, theirs = hf.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    unused = "pos_conv_embed" if kind.startswith("conformer") else None  # held by HF's Conformer, never run
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if unused is None or unused not in k)
    assert back.config.id2label[3] == "spk3" and list(back.config.tdnn_dim) == list(hf.config.tdnn_dim)


def test_speechssl_load_reads_a_saved_hugging_face_head(tmp_path: Path) -> None:
    hf = _hf_head("transformer-base", "ForSequenceClassification", weighted=False)
    hf.config.id2label = {i: name for i, name in enumerate("abcde")}
    hf.save_pretrained(tmp_path / "hf")
    model = speechssl.load(f"hf:{tmp_path / 'hf'}")
    assert isinstance(model, SpeechClassifier) and model.labels == list("abcde")
    waves, attention = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(waves, LENGTHS).logits, hf(waves, attention_mask=attention).logits,
                                   rtol=0, atol=1e-4)


def _tiny(task: str, **head) -> SpeechClassifier:
    encoder = Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_transformer.yaml"))
    config = HeadConfig(task=task, num_labels=3, classifier_proj_size=16, tdnn_dim=[16, 16, 16], tdnn_kernel=[3, 3, 1],
                        tdnn_dilation=[1, 2, 1], xvector_output_dim=12, **head)
    return SpeechClassifier.from_pretrained(encoder, config)


@pytest.mark.parametrize("task", ["sequence_classification", "frame_classification", "xvector"])
@pytest.mark.parametrize("freeze", [False, True])
def test_each_head_learns_on_the_cpu(task: str, freeze: bool, tmp_path: Path) -> None:
    """A few steps on three distinguishable classes (tones of three pitches) bring the loss down;
    a frozen encoder (a probe) stays exactly as it was."""
    torch.manual_seed(0)
    model = _tiny(task, use_weighted_layer_sum=freeze)
    model.freeze_encoder = freeze
    if freeze:
        model = SpeechClassifier.from_pretrained(model, model.head_config, freeze_encoder=True)
    lengths = torch.tensor([8000, 6400, 7200, 8000, 5600, 6400])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    t = torch.arange(8000) / 16000
    waves = torch.stack([torch.sin(2 * torch.pi * (200 + 300 * int(c)) * t) for c in labels]) * 0.3
    waves = waves * (torch.arange(8000) < lengths[:, None])
    frame_labels = labels[:, None].expand(-1, 30).clone()
    target = frame_labels if task == "frame_classification" else labels
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("context.")}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(25):
        loss = model.loss(model(waves, lengths), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    moved = any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert moved != freeze
    model.save(tmp_path / "clf.pt")
    back = load_classifier(tmp_path / "clf.pt").eval()
    assert isinstance(speechssl.load(tmp_path / "clf.pt"), SpeechClassifier)
    if task == "xvector":  # embeddings of one speaker's utterances are closer than another's
        a, b, c = back.embed([waves[0, :8000].numpy(), waves[3, :8000].numpy(), waves[1, :6400].numpy()])
        cos = torch.nn.functional.cosine_similarity
        assert cos(a, b, dim=0) > cos(a, c, dim=0)
    elif task == "sequence_classification":
        assert back.predict([waves[i, :n] for i, n in enumerate(lengths.tolist())]) == labels.tolist()
    else:
        assert len(back.predict(waves[0, :8000])) == back(waves[:1, :8000]).logits.shape[1]
    with torch.no_grad():
        assert torch.equal(back(waves, lengths).logits, model.eval()(waves, lengths).logits)


def test_bad_head_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"head\.task"):
        HeadConfig(task="regression")
    with pytest.raises(ValueError, match="same number"):
        HeadConfig(tdnn_dim=[8, 8], tdnn_kernel=[3], tdnn_dilation=[1])
    with pytest.raises(ValueError, match="label names"):
        _tiny("sequence_classification").__class__(load_model_config(REPO / "configs/model/tiny_transformer.yaml"),
                                                   HeadConfig(num_labels=3), labels=["a", "b"])
