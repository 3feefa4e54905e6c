"""ONNX export (speechssl.interop.onnx): ONNX Runtime against PyTorch on padded batches of two
batch sizes and two lengths, for the encoder (chosen layers) and CTC models of every context
network; the metadata a user decodes with; the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speechssl import Wav2Vec2Model, load_model_config
from speechssl.asr.decoding import greedy_decode
from speechssl.asr.tokenizer import CharTokenizer
from speechssl.config import to_dict
from speechssl.data.audio import normalize_audio
from speechssl.features import LayerFeatures
from speechssl.interop.onnx import OnnxExportError, OnnxModel, export_onnx, run_onnx
from speechssl.models.context import ContextNetwork, ContextOutput, registered_contexts
from speechssl.models.ctc import CTCModel
from tests.conftest import REPO, randomize_batch_norm_statistics

TOLERANCE = 1e-3  # fp32, absolute, on valid frames
# (lengths of a padded batch): two batch sizes, two lengths (neither the export's example)
BATCHES = [[24_000, 17_777, 9_001], [13_120]]


def _config(name: str, **context):
    data = to_dict(load_model_config(REPO / f"configs/model/{name}.yaml"))
    data["context"].update(context)
    return load_model_config(data)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norms, biases and BatchNorm statistics, so that every parameter matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    randomize_batch_norm_statistics(model)
    return model


def _batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)
    waves = 0.1 * torch.randn(len(lengths), max(lengths), generator=generator)
    waves[torch.arange(waves.shape[1]) >= lengths_t[:, None]] = 0.0
    return waves, lengths_t


def _max_diff(got: np.ndarray, expected: torch.Tensor, frames: torch.Tensor) -> float:
    assert got.shape == tuple(expected.shape)
    valid = (torch.arange(expected.shape[1]) < frames[:, None]).numpy()
    return float(np.abs(got - expected.numpy())[valid].max())


def _check_encoder(path: Path, model: Wav2Vec2Model, layers: list[int]) -> None:
    onnx_model = OnnxModel(path)
    assert onnx_model.output_names == [f"layer_{i}" for i in layers] + ["frame_lengths"]
    features = LayerFeatures(model, layers)
    for lengths in BATCHES:
        waves, lengths_t = _batch(lengths)
        out = onnx_model(waves, lengths_t)
        expected = features(waves, lengths_t)
        np.testing.assert_array_equal(out["frame_lengths"], expected.lengths.numpy())
        for i, state in zip(layers, expected.hidden_states, strict=True):
            assert _max_diff(out[f"layer_{i}"], state, expected.lengths) < TOLERANCE, (lengths, i)


def _check_ctc(path: Path, model: CTCModel) -> None:
    onnx_model = OnnxModel(path)
    assert onnx_model.output_names == ["logits", "frame_lengths"]
    for lengths in BATCHES:
        waves, lengths_t = _batch(lengths)
        out = onnx_model(waves, lengths_t, normalize=False)
        with torch.no_grad():
            logits, frames = model.eval()(waves, lengths_t)
        np.testing.assert_array_equal(out["frame_lengths"], frames.numpy())
        assert _max_diff(out["logits"], logits, frames) < TOLERANCE, lengths


VOCAB = ["<blank>", "<unk>", "|", "A", "B", "C", "D", "E"]


def _ctc_model(config, normalize_audio: bool = False) -> CTCModel:
    tokenizer = CharTokenizer(VOCAB)
    model = CTCModel(config, len(VOCAB), vocab=VOCAB, tokenizer=tokenizer.to_dict(), normalize_audio=normalize_audio)
    with torch.no_grad():  # a head that prefers tokens over the blank somewhere: transcripts are not empty
        model.lm_head.bias.copy_(torch.linspace(-1.0, 1.0, len(VOCAB)))
    return _perturbed(model)


# ---------------------------------------------------------------------------------- Transformer


@pytest.fixture(scope="module")
def transformer_export(tmp_path_factory) -> tuple[Path, Wav2Vec2Model]:
    torch.manual_seed(0)
    model = _perturbed(Wav2Vec2Model(_config("tiny_transformer")))
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "encoder.onnx", layers=[0, 1, 2])
    return path, model


def test_transformer_encoder_layers_match_pytorch(transformer_export) -> None:
    path, model = transformer_export
    _check_encoder(path, model, [0, 1, 2])


def test_encoder_metadata_and_axes(transformer_export) -> None:
    import onnx

    path, model = transformer_export
    proto = onnx.load(str(path))
    axes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]}
    assert axes["waveforms"] == ["batch", "samples"] and axes["lengths"] == ["batch"]
    assert axes["layer_1"] == ["batch", "frames", 96] and axes["frame_lengths"] == ["batch"]
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64]
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["format"] == "speechssl.onnx/1" and meta["kind"] == "encoder"
    assert (meta["sample_rate"], meta["frame_stride"], meta["frame_rate"]) == (16000, 320, 50.0)
    assert meta["receptive_field"] == model.feature_extractor.receptive_field == 400
    assert meta["layers"] == [0, 1, 2] and meta["context_type"] == "transformer"
    assert meta["config"] == to_dict(model.config)
    assert meta["normalize_audio"] is False and meta["extract_per_utterance"] is False


def test_onnx_model_inputs(transformer_export) -> None:
    """A 1-D waveform, a list of unequal ones (padded), lengths from the list; run_onnx; bad lengths."""
    path, model = transformer_export
    onnx_model = OnnxModel(path)
    a, b = np.random.default_rng(0).standard_normal((2, 9000)).astype(np.float32)
    frames = model.feature_extractor.output_lengths(torch.tensor([9000, 5000])).tolist()
    single = onnx_model(a)
    assert single["layer_2"].shape[0] == 1 and single["frame_lengths"].tolist() == frames[:1]
    listed = run_onnx(path, [a, b[:5000]])
    assert listed["frame_lengths"].tolist() == frames
    np.testing.assert_allclose(listed["layer_2"][0], single["layer_2"][0], atol=1e-5)
    with pytest.raises(ValueError, match="receptive field"):
        onnx_model(a, [300])
    with pytest.raises(ValueError, match="at most the samples given"):
        onnx_model(a, [9001])


def test_per_utterance_export_is_independent_of_padding(tmp_path: Path) -> None:
    """per_utterance=True: a padded row's frames equal the row alone (group_norm over its own
    frames). The model passed is left as it was (mode, gradients, weights, its own setting); the
    default layers are the last."""
    model = _perturbed(Wav2Vec2Model(_config("tiny_transformer"))).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path / "own.onnx", per_utterance=True, verify=False)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    onnx_model = OnnxModel(path)
    assert onnx_model.output_names == ["layer_2", "frame_lengths"]
    assert onnx_model.metadata["extract_per_utterance"] is True and model.extract_per_utterance is False
    waves, lengths = _batch([20_000, 11_000])
    padded = onnx_model(waves, lengths)
    alone = onnx_model(waves[1:, :11_000])
    frames = int(alone["frame_lengths"][0])
    np.testing.assert_allclose(padded["layer_2"][1, :frames], alone["layer_2"][0], atol=1e-4)


# ---------------------------------------------------------------------------------- CTC


@pytest.fixture(scope="module")
def ctc_export(tmp_path_factory) -> tuple[Path, CTCModel]:
    torch.manual_seed(0)
    model = _ctc_model(_config("tiny_transformer"), normalize_audio=True)
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "ctc.onnx"), model


def test_ctc_logits_match_pytorch(ctc_export) -> None:
    path, model = ctc_export
    _check_ctc(path, model)


def test_ctc_metadata_decodes_without_speechssl(ctc_export) -> None:
    """onnxruntime, json and numpy alone (the module docstring's recipe) give the transcripts of
    the PyTorch model's greedy decoding, on audio normalised as the metadata says."""
    import onnxruntime

    path, model = ctc_export
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["kind"] == "ctc" and meta["vocab"] == VOCAB and meta["blank"] == 0
    assert meta["decoding"] == {"type": "char", "word_delimiter": "|"} and meta["normalize_audio"] is True
    waves, lengths = _batch([20_000, 12_345])
    rows = [normalize_audio(w[:n].numpy()) for w, n in zip(waves, lengths, strict=True)]
    normalized = np.zeros(waves.shape, dtype=np.float32)
    for i, row in enumerate(rows):
        normalized[i, :len(row)] = row
    logits, frames = session.run(None, {"waveforms": normalized, "lengths": lengths.numpy()})
    texts = []
    for row, n in zip(logits.argmax(-1), frames, strict=True):
        ids = [t for i, t in enumerate(row[:n]) if (i == 0 or t != row[i - 1]) and t != meta["blank"]]
        texts.append(" ".join("".join(meta["vocab"][t] for t in ids).replace("|", " ").split()))

    with torch.no_grad():
        ref_logits, ref_frames = model.eval()(torch.from_numpy(normalized), lengths)
    tokenizer = CharTokenizer(VOCAB)
    expected = [tokenizer.decode(ids) for ids in greedy_decode(ref_logits, ref_frames)]
    assert texts == expected and any(expected)
    onnx_model = OnnxModel(path)  # normalises by itself, as the metadata says
    assert onnx_model.greedy_transcripts(onnx_model(waves, lengths)) == expected


# ---------------------------------------------------------------------------------- other context networks


def test_conformer_encoder_matches_pytorch(tmp_path: Path) -> None:
    """Relative positions at lengths that are no multiple of 8 (the padded query rows of the
    relative shift, the rounded-up position table) and a BatchNorm with running statistics."""
    torch.manual_seed(0)
    encoder = _perturbed(Wav2Vec2Model(_config("tiny_conformer")))
    _check_encoder(export_onnx(encoder, tmp_path / "encoder.onnx", layers=[1, 2]), encoder, [1, 2])


@pytest.mark.slow
@pytest.mark.parametrize("context", registered_contexts())
def test_every_registered_context_exports(context: str, tmp_path: Path) -> None:
    """Each registered network's tiny model (configs/model/tiny_NAME.yaml): every layer of the
    encoder, and a CTC model."""
    torch.manual_seed(0)
    encoder = _perturbed(Wav2Vec2Model(_config(f"tiny_{context}")))
    layers = list(range(encoder.context.depth + 1))
    _check_encoder(export_onnx(encoder, tmp_path / "encoder.onnx", layers="all"), encoder, layers)
    ctc = _ctc_model(_config(f"tiny_{context}"))
    _check_ctc(export_onnx(ctc, tmp_path / "ctc.onnx"), ctc)


@pytest.mark.slow
def test_conformer_variants_match_pytorch(tmp_path: Path) -> None:
    """The filterbank front-end; the convolutional positional embedding without relative positions;
    rotary positions with local attention (a CTC model)."""
    torch.manual_seed(0)
    fbank = _perturbed(Wav2Vec2Model(_config("tiny_conformer_fbank")))
    _check_encoder(export_onnx(fbank, tmp_path / "fbank.onnx", layers="all"), fbank, [0, 1, 2])
    absolute = _perturbed(Wav2Vec2Model(_config("tiny_conformer", position_embeddings="none", pos_conv_kernel=16,
                                                pos_conv_groups=4)))
    _check_encoder(export_onnx(absolute, tmp_path / "abs.onnx", layers=[2]), absolute, [2])
    ctc = _ctc_model(_config("tiny_conformer", position_embeddings="rotary", att_context_size=[8, 2]))
    _check_ctc(export_onnx(ctc, tmp_path / "ctc.onnx"), ctc)


@pytest.mark.slow
def test_zipformer_variants_match_pytorch(tmp_path: Path) -> None:
    """A CTC model at 25 Hz (output downsampling 2) and a causal (chunked) encoder, full utterances."""
    torch.manual_seed(0)
    ctc = _ctc_model(_config("tiny_zipformer", output_downsampling_factor=2))
    path = export_onnx(ctc, tmp_path / "ctc.onnx")
    assert OnnxModel(path).frame_stride == 640
    _check_ctc(path, ctc)
    causal = _perturbed(Wav2Vec2Model(_config("tiny_zipformer", causal=True, chunk_size=[16],
                                              left_context_frames=[64])))
    path = export_onnx(causal, tmp_path / "causal.onnx", layers=[3])
    assert OnnxModel(path).metadata["chunking"] == {"chunk_size": 16, "left_chunks": 4, "streaming": False}
    _check_encoder(path, causal, [3])


@pytest.mark.slow
def test_base_transformer_encoder_and_ctc_match_pytorch(tmp_path: Path) -> None:
    """The acceptance check of issue 25 at full size: BASE, the last layer and a CTC head."""
    torch.manual_seed(0)
    encoder = Wav2Vec2Model(load_model_config(REPO / "configs/model/base_transformer.yaml"))
    _check_encoder(export_onnx(encoder, tmp_path / "encoder.onnx", layers=[6, 12]), encoder, [6, 12])
    ctc = _ctc_model(load_model_config(REPO / "configs/model/base_transformer.yaml"))
    _check_ctc(export_onnx(ctc, tmp_path / "ctc.onnx"), ctc)


# ---------------------------------------------------------------------------------- refusals


class _DataDependentContext(ContextNetwork):
    """A context network whose depth depends on the input's values: no static graph holds it."""

    def __init__(self, dim: int):
        super().__init__()
        self.input_dim = self.output_dim = dim
        self.layers = torch.nn.ModuleList([torch.nn.Linear(dim, dim)])

    def forward(self, x, padding_mask=None, num_layers=None) -> ContextOutput:
        if x.abs().sum() > 0:  # a branch on a value
            x = self.layers[0](x)
        return ContextOutput(x, [x], padding_mask, x)


def test_refusals_are_clear(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="speechssl model"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    model = Wav2Vec2Model(_config("tiny_transformer"))
    with pytest.raises(ValueError, match=r"layers 0 .* to 2"):
        export_onnx(model, tmp_path / "x.onnx", layers=[3])
    with pytest.raises(ValueError, match="repeat"):
        export_onnx(model, tmp_path / "x.onnx", layers=[1, 1])

    fbank = Wav2Vec2Model(_config("tiny_conformer_fbank"))
    fbank.feature_extractor.fixed_statistics = (torch.zeros(40), torch.ones(40))
    with pytest.raises(OnnxExportError, match="fixed_statistics"):
        export_onnx(fbank, tmp_path / "x.onnx")

    odd = Wav2Vec2Model(_config("tiny_transformer"))
    odd.context = _DataDependentContext(odd.context.input_dim)
    odd.config.context.type = "handmade"
    with pytest.raises(OnnxExportError, match=r"'handmade' context network .*tested for conformer, transformer"):
        export_onnx(odd, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_not_a_speechssl_file(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="not a speechssl ONNX file"):
        OnnxModel(tmp_path / "other.onnx")
