"""The log-mel filterbank extractor (``model.extractor.type: fbank``): Kaldi parity, padding,
stacking, standardization, windows, and the models built on it."""

from __future__ import annotations

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi

from data_tools.synthetic import corpus_entries, render
from speechssl import Wav2Vec2Model, load_model, load_model_config
from speechssl.features import LayerFeatures
from speechssl.interop.huggingface import to_huggingface
from speechssl.interop.torchaudio import to_torchaudio
from speechssl.models.config import FeatureExtractorConfig
from speechssl.models.ctc import CTCModel
from speechssl.models.fbank import FbankExtractor
from tests.conftest import REPO


def _speech(seconds: float, seed: int = 3) -> torch.Tensor:
    audio = torch.from_numpy(render(**corpus_entries(0.02, num_speakers=1, seed=seed)[0].synth))
    return audio.repeat(int(seconds * 16000) // len(audio) + 1)[: int(seconds * 16000)]


def test_every_row_is_kaldis_fbank_of_its_own_samples() -> None:
    """A padded batch, one frame per 10 ms: each row equals torchaudio's Kaldi-compatible fbank
    of its valid samples, and the frames past its length are zero."""
    extractor = FbankExtractor(FeatureExtractorConfig(type="fbank", stack=1, standardize=False))
    waves = torch.randn(3, 16000, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([16000, 9000, 561])
    out = extractor(waves, lengths)
    assert out.shape == (3, 98, 80)
    assert extractor.output_lengths(lengths).tolist() == [98, 54, 2]
    for row, length in enumerate(lengths.tolist()):
        reference = kaldi.fbank(waves[row: row + 1, :length], num_mel_bins=80, dither=0.0)
        frames = reference.shape[0]
        torch.testing.assert_close(out[row, :frames], reference, rtol=1e-5, atol=1e-5)
        assert not out[row, frames:].any()


def test_standardized_stacked_frames_do_not_depend_on_padding() -> None:
    """``stack: 2``: frame t is 10 ms frames 2t and 2t+1 side by side, each bin standardized over
    the utterance; the leftover odd frame is dropped; a row padded in a batch equals the row alone."""
    extractor = FbankExtractor(FeatureExtractorConfig(type="fbank", num_mel_bins=40, stack=2))
    speech = _speech(2.0)
    alone = extractor(speech[None, :20000])
    reference = kaldi.fbank(speech[None, :20000], num_mel_bins=40, dither=0.0)  # 123 frames
    reference = (reference - reference.mean(0)) / reference.std(0, unbiased=False)
    assert alone.shape == (1, 61, 80) and extractor.output_lengths(torch.tensor([20000])).item() == 61
    torch.testing.assert_close(alone[0], reference[:122].reshape(61, 80), rtol=1e-4, atol=1e-4)
    batch = torch.stack([speech[:32000], torch.nn.functional.pad(speech[:20000], (0, 12000))])
    padded = extractor(batch, torch.tensor([32000, 20000]))
    torch.testing.assert_close(padded[1, :61], alone[0])
    assert extractor.receptive_field == 560 and extractor.stride == 320
    assert not list(extractor.parameters())


def test_a_long_recording_in_windows_matches_one_pass() -> None:
    """Windows are standardized with the whole recording's statistics, so layer 0 (the frontend
    output) matches the single pass to rounding; deeper layers lose only the attention context
    beyond a window."""
    torch.manual_seed(0)
    model = Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_conformer_fbank.yaml"))
    features = LayerFeatures(model, "all")
    audio = _speech(40.0)
    audio = torch.cat([audio, audio[:777]])
    whole = features(audio[None]).hidden_states
    windows = features.windowed(audio, 10 * 16000, 2 * 16000, batch_windows=2)
    assert windows.lengths.item() == whole[0].shape[1] == model.feature_extractor.output_lengths(
        torch.tensor([len(audio)])).item()
    for k, (a, b) in enumerate(zip(whole, windows.hidden_states, strict=True)):
        relative = float((a - b).norm() / a.norm())
        assert relative < (1e-5 if k == 0 else 5e-3), (k, relative)
    assert model.feature_extractor.fixed_statistics is None


def test_fbank_models_pretrain_fine_tune_and_round_trip(tmp_path) -> None:
    """A pretraining step and a CTC step have gradients everywhere but the (empty) extractor; a
    saved model loads with the same outputs; the exports without an fbank extractor refuse."""
    torch.manual_seed(0)
    config = load_model_config(REPO / "configs/model/tiny_conformer_fbank.yaml")
    model = Wav2Vec2Model(config)
    waves, lengths = torch.stack([_speech(2.0), _speech(2.0, seed=4)]), torch.tensor([32000, 25000])
    out = model(waves, lengths)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.sample_size > 0
    assert model.quantizer.weight_proj[0].weight.shape[1] == 80  # the quantizer reads the stacked bins
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("aux"))
    model.save(tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt").eval()
    model.eval()
    torch.testing.assert_close(loaded.encode(waves, lengths)[0], model.encode(waves, lengths)[0])
    ctc = CTCModel.from_pretrained(loaded, vocab_size=12)
    logits, frames = ctc(waves, lengths)
    assert logits.shape[-1] == 12 and frames.tolist() == [99, 77]
    with pytest.raises(ValueError, match="no 'fbank' extractor"):
        to_torchaudio(model)
    with pytest.raises(ValueError, match="no 'fbank' extractor"):
        to_huggingface(model)


def test_a_model_with_bf16_weights_computes_filterbanks_in_fp32() -> None:
    """As DeepSpeed's bf16 engine leaves it (parameters bf16, buffers as they were; the mel banks
    cast too, to be sure): bf16 waveforms in, bf16 features out, close to the fp32 model's."""
    torch.manual_seed(0)
    config = load_model_config(REPO / "configs/model/tiny_conformer_fbank.yaml")
    model = Wav2Vec2Model(config).eval()
    half = Wav2Vec2Model(config)
    half.load_state_dict(model.state_dict())
    for p in half.parameters():
        p.data = p.data.bfloat16()
    half.feature_extractor.mel_banks = half.feature_extractor.mel_banks.bfloat16()
    waves, lengths = torch.stack([_speech(2.0), _speech(2.0, seed=4)]), torch.tensor([32000, 25000])
    features = half.eval().feature_extractor(waves.bfloat16(), lengths)
    assert features.dtype == torch.bfloat16
    with torch.no_grad():
        reference = model.encode(waves, lengths)[0]
        out = half.encode(waves.bfloat16(), lengths)[0]
    assert float((out.float() - reference).norm() / reference.norm()) < 0.02
