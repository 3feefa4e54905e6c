"""ONNX export of speechssl models, and running the files with ONNX Runtime.

    from speechssl.interop.onnx import OnnxModel, export_onnx

    export_onnx(model, "encoder.onnx", layers=[6, 12])   # a pretraining model: hidden states
    export_onnx(ctc_model, "ctc.onnx")                    # a CTC model: logits and frame lengths

    onnx_model = OnnxModel("ctc.onnx")                    # onnxruntime, CPU by default
    out = onnx_model(waveforms, lengths)                  # {"logits": (B, T, V), "frame_lengths": (B,)}
    onnx_model.greedy_transcripts(out)                    # ["HELLO WORLD", ...]

Every file has two inputs, ``waveforms (B, S)`` float32 at 16 kHz (zero-padded) and ``lengths
(B,)`` int64 (valid samples of each row), with dynamic batch and sample axes. Its outputs:

- an encoder (:class:`~speechssl.Wav2Vec2Model`, or any speechssl encoder with ``layers`` given):
  ``layer_{i} (B, T, D)`` for each chosen layer ``i``, counted as in
  :mod:`speechssl.features` (0 is the context network's input, ``i`` the output of layer ``i``,
  of stack ``i`` for the Zipformer; ``"last"``, ``"all"`` or a list), and ``frame_lengths (B,)``
  int64, the valid frames of each row;
- a CTC model (:class:`~speechssl.models.ctc.CTCModel`, ``layers=None``): ``logits (B, T, V)``
  (before softmax) and ``frame_lengths (B,)``.

Frames past a row's ``frame_lengths`` are padding, as in PyTorch. The graph is the model's eval
forward: a padded row's valid frames are exactly what PyTorch gives for the same padded batch
(with a ``group_norm`` extractor that normalises over the whole padded row, as fairseq does,
unless the model's ``extract_per_utterance`` is set; ``per_utterance=True`` sets it for the
export).

What a user needs to run the file without speechssl travels in the ONNX ``metadata_props``, each
value JSON: ``format`` (``"speechssl.onnx/1"``), ``kind`` (``"encoder"`` or ``"ctc"``),
``sample_rate`` (16000), ``frame_stride`` (input samples per output frame, 320 at 50 Hz),
``frame_rate`` (Hz), ``receptive_field`` (the fewest samples that give a frame: shorter rows have
none), ``min_samples``, ``inputs`` and ``outputs`` (names, shapes, dtypes), ``layers`` (encoder),
``normalize_audio`` (whether each utterance must be brought to zero mean and unit variance
before the model, as in training: ``(x - mean) / sqrt(var + 1e-5)`` over its valid samples),
``extract_per_utterance``, ``context_type``, ``config`` (the model config) and, for a CTC model,
``vocab`` (token strings by index, or null), ``blank``, ``decoding`` (how token strings become
text: ``{"type": "char", "word_delimiter": "|"}`` or ``{"type": "bpe", "word_boundary": "▁"}``)
and ``tokenizer_case``. Greedy CTC decoding from those alone::

    import json, numpy as np, onnxruntime as ort
    session = ort.InferenceSession("ctc.onnx")
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    logits, frames = session.run(None, {"waveforms": waves, "lengths": lengths})
    for row, n in zip(logits.argmax(-1), frames):
        ids = [t for i, t in enumerate(row[:n]) if (i == 0 or t != row[i - 1]) and t != meta["blank"]]
        text = "".join(meta["vocab"][t] for t in ids)
        print(" ".join(text.replace("|", " ").split()))      # "▁" instead of "|" for BPE

The exporter is ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` then onnxscript's
translation), not the legacy TorchScript tracer: the tracer cannot export the Conformer's or the
Zipformer's relative-position attention with a dynamic length (``as_strided`` with traced sizes
is refused), nor the filterbank front-end's ``rfft``; the dynamo exporter handles all three
context networks and both front-ends. Three adjustments make its graphs correct at every length
(each checked at export, see ``verify``):

- onnxscript translates Python's ``//`` on symbolic sizes to ONNX ``Div``, which truncates: wrong
  for a negative numerator, as in the ceiling ``-(-n // k)`` the Conformer's relative positions and
  the Zipformer's downsampling use. A floor division is given in ``custom_translation_table``.
- Tracing runs ``scaled_dot_product_attention`` in its math form, so its output strides are
  those of the decomposition the ONNX translation replays (else a ``view`` of the Conformer's
  attention output fails to translate).
- The Zipformer's positional encoding reshapes with ``len(offsets)``, which ``torch.export``
  records as a constant (the example's length); while tracing, an equal function that reads
  ``offsets.shape[0]`` stands in for it (checked equal on a sample first).

After writing the file, ``verify`` (default on) runs it with ONNX Runtime on two batches of other
sizes and lengths than the example and compares with PyTorch, so a graph that only works at the
traced shape is an error at export, not at use.

Needs the ``onnx`` extra (``pip install speechssl[onnx]``: onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import contextlib
import copy
import json
import operator
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from speechssl.config import to_dict
from speechssl.features import LayerFeatures
from speechssl.models.ctc import CTCModel
from speechssl.models.encoder import SpeechEncoder

FORMAT = "speechssl.onnx/1"
SAMPLE_RATE = 16000
INPUTS = ("waveforms", "lengths")
FRAME_LENGTHS = "frame_lengths"
# Context networks whose export is tested (tests/test_onnx.py); another registered type is tried,
# and a failure names it.
TESTED_CONTEXTS = ("conformer", "transformer", "zipformer")
_INSTALL = "pip install 'speechssl[onnx]' (onnx, onnxruntime, onnxscript)"


class OnnxExportError(RuntimeError):
    """The model could not be exported, or the exported graph does not reproduce PyTorch."""


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"ONNX export and inference need {', '.join(missing)}: {_INSTALL}")


# ---------------------------------------------------------------------------------- graphs


class _EncoderGraph(nn.Module):
    """``(waveforms (B, S), lengths (B,))`` -> ``(*hidden states (B, T, D), frame_lengths (B,))``:
    :class:`~speechssl.features.LayerFeatures` without hooks or weighting. The frame lengths are
    those of the hidden states (the context input's rate: a Zipformer's output downsampling does
    not apply to its stacks' outputs)."""

    def __init__(self, model: SpeechEncoder, layers: list[int]):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        features, padding_mask, frames = self.model._features(waveforms, lengths, False)
        x, _ = self.model.frontend(features)
        out = self.model.context(x, padding_mask, num_layers=max(self.layers) or 1)
        states = [out.input_state, *out.hidden_states]
        return (*[states[i] for i in self.layers], frames)


class _CTCGraph(nn.Module):
    """``(waveforms (B, S), lengths (B,))`` -> ``(logits (B, T, V), frame_lengths (B,))``: the
    eval forward of a :class:`CTCModel`."""

    def __init__(self, model: CTCModel):
        super().__init__()
        self.model = model

    def forward(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        logits, frames = self.model(waveforms, lengths, check_values=False)
        return logits, frames


# ---------------------------------------------------------------------------------- exporter fixes


def _floordiv(self, other):
    """Python's ``//`` on symbolic sizes (int64 scalars) as ONNX ops: ``Div`` truncates towards
    zero, so one is taken off where the signs differ and the division is inexact."""
    from onnxscript import INT64
    from onnxscript import opset18 as op

    quotient = op.Div(self, other)
    inexact = op.Not(op.Equal(op.Mul(quotient, other), self))
    zero = op.Constant(value_int=0)
    signs_differ = op.Xor(op.Less(self, zero), op.Less(other, zero))
    return op.Sub(quotient, op.Cast(op.And(inexact, signs_differ), to=INT64.dtype))


def _zipformer_positions(offsets: Tensor, dim: int, length_factor: float = 1.0) -> Tensor:
    """:func:`speechssl.models.context.zipformer.layer.compact_relative_positions` with the row
    count read as ``offsets.shape[0]`` (a symbolic size under ``torch.export``) instead of
    ``len(offsets)`` (a constant there)."""
    import math

    x = offsets.float().unsqueeze(1)
    freqs = 1 + torch.arange(dim // 2, device=offsets.device)
    compression = dim ** 0.5
    compressed = compression * x.sign() * ((x.abs() + compression).log() - math.log(compression))
    angles = (compressed / (length_factor * dim / (2.0 * math.pi))).atan() * freqs
    pe = torch.stack((angles.cos(), angles.sin()), dim=-1).reshape(offsets.shape[0], dim)
    pe[:, -1] = 1.0
    return pe


@contextlib.contextmanager
def _tracing_substitutions(model: SpeechEncoder) -> Iterator[None]:
    """While tracing: the math attention kernel, and for a Zipformer the shape-safe positional
    encoding (after checking it equals the original on a sample)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from speechssl.models.context.zipformer import network

    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if isinstance(model.context, network.Zipformer):
            original = network.compact_relative_positions
            offsets = torch.arange(-12, 13)
            dim = model.context.config.pos_dim
            if not torch.equal(original(offsets, dim), _zipformer_positions(offsets, dim)):
                raise OnnxExportError(
                    "the Zipformer's compact_relative_positions changed and no longer matches the ONNX exporter's "
                    "shape-safe copy in speechssl/interop/onnx.py (_zipformer_positions): update the copy")
            network.compact_relative_positions = _zipformer_positions
            stack.callback(setattr, network, "compact_relative_positions", original)
        yield


# ---------------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's notices that say nothing about this export: torchvision ops it skips, the
    pytree deprecation inside torch.export, the renaming of the dynamic axes."""
    import logging
    import warnings

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*", category=FutureWarning)
            warnings.filterwarnings("ignore", message="# The axis name: .* will not be used", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


def _name_frame_axes(model: Any) -> None:
    """Name the outputs' frame axis ``frames`` (the exporter writes the size expression in samples)."""
    from onnxscript import ir

    for value in model.graph.outputs:
        if value.shape is not None and len(value.shape) >= 2:
            dims = list(value.shape)
            value.shape = ir.Shape([dims[0], ir.SymbolicDim("frames"), *dims[2:]])


def _refusal(model: SpeechEncoder) -> str | None:
    """Why ``model`` cannot be exported, or None."""
    if getattr(model.feature_extractor, "fixed_statistics", None) is not None:
        return ("the filterbank extractor has fixed_statistics set (windowed extraction in progress); "
                "export outside LayerFeatures.windowed")
    return None


def _example_inputs(model: SpeechEncoder) -> tuple[Tensor, Tensor]:
    """Two padded rows of 2 s and 1.5 s of noise (a fixed generator: the caller's RNG is untouched)."""
    samples = max(2 * SAMPLE_RATE, 4 * model.feature_extractor.receptive_field)
    generator = torch.Generator().manual_seed(0)
    waves = 0.1 * torch.randn(2, samples, generator=generator)
    lengths = torch.tensor([samples, samples * 3 // 4])
    waves[1, lengths[1]:] = 0.0
    return waves, lengths


def _frame_stride(model: SpeechEncoder, kind: str) -> int:
    factor = getattr(model.config.context, "output_downsampling_factor", 1) if kind == "ctc" else 1
    return model.feature_extractor.stride * factor


def _metadata(model: SpeechEncoder, kind: str, layers: list[int] | None, output_names: list[str],
              widths: list[int], opset: int, per_utterance: bool) -> dict[str, Any]:
    import speechssl

    stride = _frame_stride(model, kind)
    field = model.feature_extractor.receptive_field
    if kind == "ctc":
        outputs = {"logits": {"shape": ["batch", "frames", widths[0]], "dtype": "float32",
                              "meaning": "CTC logits before softmax"}}
    else:
        outputs = {name: {"shape": ["batch", "frames", width], "dtype": "float32",
                          "meaning": f"hidden state {i} (0 = the context network's input)"}
                   for name, i, width in zip(output_names, layers, widths, strict=False)}
    outputs[FRAME_LENGTHS] = {"shape": ["batch"], "dtype": "int64", "meaning": "valid frames of each row"}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "sample_rate": SAMPLE_RATE,
        "frame_stride": stride,
        "frame_rate": SAMPLE_RATE / stride,
        "receptive_field": field,
        "min_samples": field,
        "inputs": {"waveforms": {"shape": ["batch", "samples"], "dtype": "float32",
                                 "meaning": f"mono audio at {SAMPLE_RATE} Hz, zero-padded"},
                   "lengths": {"shape": ["batch"], "dtype": "int64", "meaning": "valid samples of each row"}},
        "outputs": outputs,
        "normalize_audio": bool(getattr(model, "normalize_audio", False)),
        "extract_per_utterance": per_utterance,
        "context_type": model.config.context.type,
        "config": to_dict(model.config),
        "speechssl_version": speechssl.__version__,
        "torch_version": torch.__version__,
        "opset": opset,
    }
    if getattr(model.config.context, "causal", False):  # a chunked Zipformer: the eval chunking, full utterances
        chunk_size, left_chunks = model.context.chunk_config()
        meta["chunking"] = {"chunk_size": chunk_size, "left_chunks": left_chunks, "streaming": False}
    if kind == "encoder":
        meta["layers"] = layers
    else:
        tokenizer = model.tokenizer or {}
        meta["vocab"] = list(model.vocab) if model.vocab is not None else None
        meta["blank"] = model.blank
        bpe = tokenizer.get("type") == "bpe"
        meta["decoding"] = ({"type": "bpe", "word_boundary": "\u2581"} if bpe
                            else {"type": "char", "word_delimiter": "|"})
        meta["tokenizer_case"] = tokenizer.get("case")
    return meta


def _exportable_copy(model: SpeechEncoder, per_utterance: bool | None) -> SpeechEncoder:
    """A CPU fp32 eval copy, so the caller's model keeps its device, dtype, mode and gradients."""
    copied = copy.deepcopy(model).to("cpu", torch.float32).eval().requires_grad_(False)
    if per_utterance is not None:
        copied.extract_per_utterance = bool(per_utterance)
    return copied


def export_onnx(model: SpeechEncoder, path: str | os.PathLike, *, layers: Sequence[int] | str | None = None,
                opset: int | None = None, per_utterance: bool | None = None, verify: bool = True,
                tolerance: float = 1e-3) -> Path:
    """Write ``model`` to the ONNX file ``path`` (its parent folder is created); returns the path.

    model: a :class:`~speechssl.Wav2Vec2Model` (or another speechssl encoder) -> hidden states of
    ``layers`` (default ``"last"``; a list of indices, ``"last"`` or ``"all"``, as
    :class:`~speechssl.features.LayerFeatures`); a :class:`CTCModel` -> logits, unless ``layers``
    is given (then its encoder's hidden states). Inputs ``waveforms (B, S)`` float32 and ``lengths
    (B,)`` int64; outputs ``layer_{i} (B, T, D)`` ... or ``logits (B, T, V)``, then
    ``frame_lengths (B,)`` int64; batch and samples are dynamic axes.

    opset: the ONNX opset (default: the exporter's, 20 with torch 2.11). per_utterance: set the
    model's ``extract_per_utterance`` for the export (None keeps the model's). verify: run the file
    with ONNX Runtime on two batches unlike the traced one (batch 3 padded, and batch 1) and raise
    :class:`OnnxExportError` when a valid frame differs from PyTorch by more than ``tolerance``
    times ``max(1, |PyTorch's largest value|)`` or a frame count differs. The model is copied (CPU,
    fp32, eval), so the one passed is left as it was. Weights above 2 GB go to an external data
    file next to ``path``, as ONNX requires.

    Raises TypeError for something that is not a speechssl model, ValueError for bad ``layers``,
    OnnxExportError naming the context network when it cannot be exported (a causal Zipformer is
    refused up front), ImportError without the ``onnx`` extra.
    """
    _require("onnx", "onnxscript", "onnxruntime")
    if not isinstance(model, SpeechEncoder):
        raise TypeError(f"export_onnx takes a speechssl model (Wav2Vec2Model, CTCModel or another SpeechEncoder), "
                        f"got {type(model).__name__}")
    context_type = model.config.context.type
    reason = _refusal(model)
    if reason:
        raise OnnxExportError(f"cannot export this model to ONNX: {reason}")
    kind = "ctc" if isinstance(model, CTCModel) and layers is None else "encoder"
    exportable = _exportable_copy(model, per_utterance)
    if kind == "ctc":
        graph: nn.Module = _CTCGraph(exportable)
        chosen = None
        output_names = ["logits", FRAME_LENGTHS]
    else:
        chosen = LayerFeatures(exportable, "last" if layers is None else layers).layers
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layers {chosen} repeat a layer: ONNX output names must be unique")
        graph = _EncoderGraph(exportable, chosen)
        output_names = [f"layer_{i}" for i in chosen] + [FRAME_LENGTHS]

    example = _example_inputs(exportable)
    with torch.no_grad():
        widths = [int(t.shape[-1]) for t in graph(*example)[:-1]]
    graph.eval()
    try:
        with torch.no_grad(), _tracing_substitutions(exportable), _quiet_exporter():
            program = torch.onnx.export(
                graph, example, dynamo=True, opset_version=opset, input_names=list(INPUTS),
                output_names=output_names, dynamic_shapes=({0: "batch", 1: "samples"}, {0: "batch"}),
                custom_translation_table={operator.floordiv: _floordiv}, optimize=True, verbose=False)
    except OnnxExportError:
        raise
    except Exception as error:  # the exporter's errors are long: keep the summary, chain the rest
        summary = str(error).strip().splitlines()
        detail = next((line for line in summary if line.startswith("<class")), summary[0] if summary else "")
        tested = "" if context_type in TESTED_CONTEXTS else f" (export is tested for {', '.join(TESTED_CONTEXTS)})"
        raise OnnxExportError(f"the {context_type!r} context network{tested} could not be exported to ONNX by "
                              f"torch.onnx.export(dynamo=True): {type(error).__name__}: {detail}") from error

    _name_frame_axes(program.model)
    used_opset = program.model.opset_imports.get("", opset)
    meta = _metadata(exportable, kind, chosen, output_names, widths, used_opset, exportable.extract_per_utterance)
    for key, value in meta.items():
        program.model.metadata_props[key] = json.dumps(value)
    program.model.doc_string = (f"speechssl {kind} ({context_type}); inputs waveforms (B, S) float32 at "
                                f"{SAMPLE_RATE} Hz and lengths (B,) int64; metadata_props hold JSON values")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path)
    _check_dynamic(path)
    if verify:
        _verify(path, graph, exportable, tolerance)
    return path


def _check_dynamic(path: Path) -> None:
    """The inputs' batch and samples axes must be symbolic: a specialised axis would make the file
    work only at the example's size."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        fixed = [i for i, d in enumerate(dims) if not d.dim_param]
        if fixed:
            raise OnnxExportError(f"the exported input {value.name!r} has fixed axes {fixed} "
                                  f"({[d.dim_value for d in dims]}): the export specialised a dynamic size")


def _verify(path: Path, graph: nn.Module, model: SpeechEncoder, tolerance: float) -> None:
    """ONNX Runtime against PyTorch on a padded batch of 3 and a batch of 1, neither the traced
    example's size."""
    session = OnnxModel(path)
    field = model.feature_extractor.receptive_field
    generator = torch.Generator().manual_seed(1)
    for lengths in ([40_000, 29_123, max(field + 1000, 6_007)], [11_357]):
        lengths = torch.tensor(lengths)
        waves = 0.1 * torch.randn(len(lengths), int(lengths.max()), generator=generator)
        waves[torch.arange(waves.shape[1]) >= lengths[:, None]] = 0.0
        with torch.no_grad():
            expected = [t.numpy() for t in graph(waves, lengths)]
        got = session.run(waves.numpy(), lengths.numpy(), normalize=False)
        problem = compare_outputs(got, dict(zip(session.output_names, expected, strict=True)), tolerance)
        if problem:
            raise OnnxExportError(f"the exported graph of the {model.config.context.type!r} context network does not "
                                  f"reproduce PyTorch on a batch of {len(lengths)} ({lengths.tolist()} samples): "
                                  f"{problem}")


def compare_outputs(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], tolerance: float = 1e-3,
                    relative: bool = True) -> str | None:
    """None when ``got`` matches ``expected`` (both by output name): equal ``frame_lengths`` and, on
    the valid frames of every ``(B, T, D)`` output, a largest difference within ``tolerance`` (times
    ``max(1, largest |expected|)`` when ``relative``); else what differs."""
    frames = expected[FRAME_LENGTHS]
    if not np.array_equal(got[FRAME_LENGTHS], frames):
        return f"frame_lengths {got[FRAME_LENGTHS].tolist()} instead of {frames.tolist()}"
    for name, want in expected.items():
        if name == FRAME_LENGTHS:
            continue
        have = got[name]
        if have.shape != want.shape:
            return f"{name} has shape {have.shape} instead of {want.shape}"
        valid = np.arange(want.shape[1])[None, :] < frames[:, None]
        diff = float(np.abs(have - want)[valid].max(initial=0.0))
        scale = max(1.0, float(np.abs(want[valid]).max(initial=0.0))) if relative else 1.0
        if not diff <= tolerance * scale:
            return f"{name} differs by up to {diff:.3g} on valid frames (allowed {tolerance * scale:.3g})"
    return None


# ---------------------------------------------------------------------------------- inference


class OnnxModel:
    """A file written by :func:`export_onnx`, run with ONNX Runtime.

    ``OnnxModel(path)(waveforms, lengths)`` -> ``{output name: numpy array}``: ``layer_{i} (B, T,
    D)`` ... or ``logits (B, T, V)``, and ``frame_lengths (B,)``. ``metadata``: the file's
    metadata, JSON decoded (see the module docstring); ``kind``, ``layers``, ``vocab``, ``blank``,
    ``sample_rate``, ``frame_stride`` read it. providers: ONNX Runtime execution providers
    (default CPU); threads: intra-op threads (default ONNX Runtime's).
    """

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 threads: int | None = None):
        _require("onnxruntime")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(self.path), options,
                                                    providers=list(providers or ["CPUExecutionProvider"]))
        raw = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                self.metadata[key] = json.loads(value)
            except json.JSONDecodeError:
                self.metadata[key] = value
        if self.metadata.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not a speechssl ONNX file (metadata format "
                             f"{self.metadata.get('format')!r}, expected {FORMAT!r}): export it with export_onnx")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    kind = property(lambda self: self.metadata["kind"], doc="``encoder`` or ``ctc``")
    layers = property(lambda self: self.metadata.get("layers"), doc="the exported layers (encoder)")
    vocab = property(lambda self: self.metadata.get("vocab"), doc="token strings by index (CTC), or None")
    blank = property(lambda self: self.metadata.get("blank"), doc="the CTC blank index")
    sample_rate = property(lambda self: self.metadata["sample_rate"], doc="input samples per second")
    frame_stride = property(lambda self: self.metadata["frame_stride"], doc="input samples per output frame")

    def _batch(self, waveforms: Any, lengths: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(B, S)`` or ``(S,)`` arrays or tensors, or a list of 1-D ones (zero-padded), to
        float32 ``(B, S)`` and int64 ``(B,)``."""
        if isinstance(waveforms, (list, tuple)):
            rows = [np.asarray(w.detach().cpu() if isinstance(w, Tensor) else w, dtype=np.float32) for w in waveforms]
            if any(r.ndim != 1 for r in rows):
                raise ValueError("a list of waveforms takes 1-D arrays, one per utterance")
            if lengths is None:
                lengths = [len(r) for r in rows]
            batch = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.float32)
            for i, r in enumerate(rows):
                batch[i, :len(r)] = r
            waveforms = batch
        if isinstance(waveforms, Tensor):
            waveforms = waveforms.detach().cpu().float().numpy()
        waveforms = np.asarray(waveforms, dtype=np.float32)
        if waveforms.ndim == 1:
            waveforms = waveforms[None]
        if waveforms.ndim != 2 or waveforms.shape[0] == 0:
            raise ValueError(f"waveforms must have shape (batch, samples), got {waveforms.shape}")
        if lengths is None:
            lengths = np.full(waveforms.shape[0], waveforms.shape[1])
        if isinstance(lengths, Tensor):
            lengths = lengths.detach().cpu().numpy()
        lengths = np.asarray(lengths).astype(np.int64).reshape(-1)
        if lengths.shape[0] != waveforms.shape[0]:
            raise ValueError(f"lengths must have shape ({waveforms.shape[0]},), got {lengths.shape}")
        field = self.metadata["receptive_field"]
        if (lengths > waveforms.shape[1]).any() or (lengths < field).any():
            raise ValueError(f"lengths {lengths.tolist()} must lie in [{field}, {waveforms.shape[1]}]: at least the "
                             f"receptive field ({field} samples) and at most the samples given")
        return waveforms, lengths

    def run(self, waveforms: Any, lengths: Any = None, normalize: bool | None = None) -> dict[str, np.ndarray]:
        """The outputs by name for ``waveforms (B, S)`` (or ``(S,)``, or a list of 1-D arrays) and
        ``lengths (B,)`` in samples (None: all valid). normalize: bring each row's valid samples
        to zero mean and unit variance first (None: when the metadata's ``normalize_audio`` says the
        model was trained so)."""
        waveforms, lengths = self._batch(waveforms, lengths)
        if normalize if normalize is not None else self.metadata.get("normalize_audio", False):
            waveforms = normalized_rows(waveforms, lengths)
        outputs = self.session.run(None, {"waveforms": waveforms, "lengths": lengths})
        return dict(zip(self.output_names, outputs, strict=True))

    __call__ = run

    def greedy_transcripts(self, outputs: dict[str, np.ndarray]) -> list[str]:
        """Best-path CTC text of a CTC file's outputs: per frame the likeliest token, repeats merged,
        blanks dropped, tokens joined with the metadata's word delimiter (or BPE word boundary) as
        spaces; as ``speechssl.asr.decoding.greedy_decode`` then the tokenizer's ``decode``."""
        if self.kind != "ctc" or self.vocab is None:
            raise ValueError("greedy_transcripts needs a CTC file with its vocabulary in the metadata")
        return [tokens_to_text(ids, self.vocab, self.metadata["decoding"])
                for ids in greedy_ids(outputs["logits"], outputs[FRAME_LENGTHS], self.blank)]


def greedy_ids(logits: np.ndarray, frames: np.ndarray, blank: int) -> list[list[int]]:
    """Best path of ``logits (B, T, V)`` over each row's ``frames (B,)``: token ids, repeats merged,
    blanks removed."""
    out = []
    for row, n in zip(logits.argmax(-1), frames, strict=True):
        row = row[:int(n)]
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        out.append([int(t) for t in row[keep] if t != blank])
    return out


def tokens_to_text(ids: list[int], vocab: list[str], decoding: dict[str, str]) -> str:
    """Token ids to text with the file's ``decoding`` metadata (special ``<...>`` tokens other than
    ``<unk>`` dropped)."""
    special = {token for token in vocab if token.startswith("<") and token.endswith(">") and token != "<unk>"}
    text = "".join(vocab[i] for i in ids if vocab[i] not in special)
    separator = decoding.get("word_delimiter") if decoding.get("type") == "char" else decoding.get("word_boundary")
    return " ".join(text.replace(separator, " ").split()) if separator else " ".join(text.split())


def normalized_rows(waveforms: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each row's valid samples brought to zero mean and unit variance (``(x - mean) / sqrt(var +
    1e-5)``, :func:`speechssl.data.audio.normalize_audio`), padding left at zero: ``(B, S)``."""
    out = np.zeros_like(waveforms)
    for i, n in enumerate(lengths):
        row = waveforms[i, :int(n)].astype(np.float64)
        out[i, :int(n)] = (row - row.mean()) / np.sqrt(row.var() + 1e-5)
    return out


def run_onnx(path: str | os.PathLike, waveforms: Any, lengths: Any = None, **options: Any) -> dict[str, np.ndarray]:
    """:class:`OnnxModel` ``(path, **options)`` run once on ``waveforms (B, S)`` and ``lengths (B,)``:
    the outputs by name as numpy arrays."""
    return OnnxModel(path, **options)(waveforms, lengths)
