"""A model named the way every command names one: a run folder, a model file, ``hf:NAME_OR_PATH``
or a Hugging Face folder, ``ta:BUNDLE``, ``fairseq:CHECKPOINT``, ``fairseq2:CHECKPOINT``, or
``scratch:MODEL_CONFIG``.

    model = speechssl.load("runs/ctc")             # a fine-tuning run: its CTCModel
    model = speechssl.load("hf:facebook/wav2vec2-base")  # a Wav2Vec2Model (pretraining parts fresh)
    model = speechssl.load("ta:WAV2VEC2_ASR_BASE_960H")  # a CTCModel with the bundle's labels

- a run folder: its ``model.pt`` (the exported model; ``speechssl export RUN`` writes it from the
  newest checkpoint of a run that stopped before);
- a model file: one written by :meth:`Wav2Vec2Model.save <speechssl.models.wav2vec2.Wav2Vec2Model.save>`
  (pretraining; also one imported from torchaudio or Hugging Face and saved) or by
  :meth:`CTCModel.save <speechssl.models.ctc.CTCModel.save>` (fine-tuning) or ``SpeechClassifier.save``
  (a downstream head), told apart by the
  file's own ``format``;
- ``hf:NAME_OR_PATH``, or a folder with a Hugging Face ``config.json``: a Wav2Vec2 or
  Wav2Vec2-Conformer checkpoint (hub name or saved folder;
  :func:`speechssl.interop.huggingface.from_huggingface`); a CTC one with its vocabulary; a
  classification or x-vector one as a ``SpeechClassifier``
  (:func:`speechssl.interop.huggingface_heads.from_huggingface_head`);
- ``ta:BUNDLE``: a torchaudio pipeline bundle, e.g. ``ta:WAV2VEC2_BASE`` (its weights are
  downloaded to torch.hub's cache where the network allows, or read from it); an ASR bundle
  becomes a CTC model with the bundle's labels;
- ``fairseq:CHECKPOINT``, or a fairseq checkpoint file given as a model file: a fairseq wav2vec 2.0
  checkpoint (pretraining, or fine-tuned CTC with the ``dict.ltr.txt`` beside it;
  :func:`speechssl.interop.fairseq.from_fairseq`), read without running its pickled code;
- ``fairseq2:CHECKPOINT``, or a fairseq2 checkpoint file given as a model file: a fairseq2
  wav2vec 2.0 or wav2vec 2.0 ASR model, its architecture from the ``.yaml`` beside the file or
  read from the weights (:func:`speechssl.interop.fairseq2.load_fairseq2_checkpoint`);
- ``scratch:MODEL_CONFIG``: a random initialisation of the model of that YAML (a from-scratch
  baseline), drawn after ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from speechssl.models.encoder import ENCODER_PARTS, SpeechEncoder

NAMED_SOURCES = ("hf:", "ta:", "scratch:", "fairseq:", "fairseq2:")  # sources that are not paths
SOURCES = ("a run folder with model.pt, a model file, hf:NAME or a Hugging Face folder, ta:BUNDLE, "
           "fairseq:CHECKPOINT or fairseq2:CHECKPOINT")


def model_file(source: str | os.PathLike) -> Path:
    """The model file a run folder or file names (FileNotFoundError when there is none)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "model.pt").is_file() and (path / "checkpoints").is_dir():
            raise FileNotFoundError(f"{path} has no model.pt (the run stopped before writing it): write it from the "
                                    f"newest checkpoint with `speechssl export {path}`")
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist ({SOURCES})")
    return path


def is_huggingface_folder(path: Path) -> bool:
    """A ``save_pretrained`` folder: a ``config.json`` that names a ``model_type``."""
    import json

    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def from_bundle(name: str) -> SpeechEncoder:
    """The model of the torchaudio pipeline bundle ``name`` (``WAV2VEC2_BASE``, ``WAV2VEC2_ASR_BASE_960H``...)."""
    import torchaudio.pipelines

    from speechssl.interop.torchaudio import from_torchaudio

    bundle = getattr(torchaudio.pipelines, name, None)
    if bundle is None or not hasattr(bundle, "get_model"):
        known = sorted(n for n in dir(torchaudio.pipelines) if n.startswith(("WAV2VEC2", "HUBERT", "WAVLM")))
        raise ValueError(f"ta:{name} is not a torchaudio wav2vec 2.0 bundle; known: {', '.join(known)}")
    ta_model = bundle.get_model()
    normalize = hasattr(ta_model, "normalize_waveform") and ta_model.normalize_waveform
    ta_model = getattr(ta_model, "model", ta_model)  # the wrapper of bundles that normalise the waveform
    labels = bundle.get_labels() if hasattr(bundle, "get_labels") else None
    model = from_torchaudio(ta_model, labels=labels or None)
    if labels:
        model.normalize_audio = bool(normalize)
    return model


def load(source: str | os.PathLike, seed: int = 1) -> SpeechEncoder:
    """``speechssl.load``: the model ``source`` names (the module's docstring), on the CPU, in
    eval mode: a :class:`~speechssl.models.wav2vec2.Wav2Vec2Model` (pretraining) or a
    :class:`~speechssl.models.ctc.CTCModel` (fine-tuned). FileNotFoundError for a missing file or
    folder, ValueError for one that holds no model of a kind it knows."""
    return load_speech_model(str(source), seed).eval()


def load_speech_model(source: str, seed: int = 1) -> SpeechEncoder:
    """The model ``source`` names (see the module's docstring), on the CPU: a
    :class:`~speechssl.models.wav2vec2.Wav2Vec2Model` or a :class:`~speechssl.models.ctc.CTCModel`
    (whose ``normalize_audio`` says whether it expects normalised audio). FileNotFoundError for a
    missing file, ValueError for a file that is not a speechssl model."""
    if source.startswith("scratch:"):
        from speechssl.models.config import load_model_config
        from speechssl.models.wav2vec2 import Wav2Vec2Model

        torch.manual_seed(seed)
        return Wav2Vec2Model(load_model_config(source[len("scratch:"):]))
    if source.startswith("ta:"):
        return from_bundle(source[3:])
    if source.startswith("hf:") or is_huggingface_folder(Path(source)):
        from speechssl.interop.huggingface import from_huggingface
        from speechssl.interop.huggingface_heads import from_huggingface_head, is_head_architecture

        where = source[3:] if source.startswith("hf:") else source
        return from_huggingface_head(where) if is_head_architecture(where) else from_huggingface(where)
    from speechssl.interop import fairseq, fairseq2

    if source.startswith("fairseq:"):
        return fairseq.from_fairseq(model_file(source[len("fairseq:"):]))
    if source.startswith("fairseq2:"):
        return fairseq2.load_fairseq2_checkpoint(model_file(source[len("fairseq2:"):]))
    path = model_file(source)
    from speechssl.interop.untrusted import load_untrusted

    blob = load_untrusted(path)  # a file from anywhere: no pickled code runs
    if fairseq.is_fairseq_checkpoint(blob):
        return fairseq.from_fairseq(path)
    if fairseq2.is_fairseq2_checkpoint(blob):
        return fairseq2.load_fairseq2_checkpoint(path)
    from speechssl.models.ctc import FORMAT as CTC_FORMAT

    if isinstance(blob, dict) and blob.get("format") == CTC_FORMAT:
        from speechssl.models.ctc import load_ctc_model

        return load_ctc_model(path)
    from speechssl.models.classifier import FORMAT as CLASSIFIER_FORMAT

    if isinstance(blob, dict) and blob.get("format") == CLASSIFIER_FORMAT:
        from speechssl.models.classifier import load_classifier

        return load_classifier(path)
    from speechssl.models.wav2vec2 import load_model

    return load_model(path)


@dataclass
class WeightTransfer:
    """What :func:`take_weights` did: ``taken`` tensors copied; ``fresh``: the model's parts the
    source lacks, left as initialised; ``unused``: the source's parts the model has no place for
    (a CTC head when pretraining, say). Parts are module paths, e.g. ``quantizer``, ``project_q``."""

    taken: int
    fresh: list[str]
    unused: list[str]

    def describe(self) -> str:
        return (f"{self.taken} tensors taken; initialised fresh: {', '.join(self.fresh) or 'nothing'}; "
                f"not used: {', '.join(self.unused) or 'nothing'}")


def _parts(keys: set[str]) -> list[str]:
    """The module paths of state-dict keys, one level below the top (``frontend.masker``) or the
    top one where that is the whole module (``quantizer``), each once."""
    return sorted({".".join(k.split(".")[:2]) if k.split(".")[0] in ("frontend", "context") else k.split(".")[0]
                   for k in keys})


def take_weights(model: nn.Module, source: nn.Module, where: str = "the source") -> WeightTransfer:
    """Copy into ``model`` every tensor of ``source``'s state dict that ``model`` has under the same
    name and shape; the rest of ``model`` keeps its initialisation. Outside the encoder (the
    quantizer and projections, set by the pretraining config) a tensor of another shape starts
    fresh too. ValueError when the encoders differ: an encoder tensor of another shape, or one
    the model lacks (the two are not the same architecture)."""
    target, given = model.state_dict(), source.state_dict()
    differ = {k for k in target.keys() & given.keys() if target[k].shape != given[k].shape}
    clashes = [f"{k} {tuple(given[k].shape)} (the model's {tuple(target[k].shape)})"
               for k in sorted(differ) if k.startswith(ENCODER_PARTS)]
    homeless = sorted(k for k in given.keys() - target.keys() if k.startswith(ENCODER_PARTS))
    if clashes or homeless:
        detail = (f"{len(clashes)} encoder tensor(s) differ in shape, e.g. {'; '.join(clashes[:3])}" if clashes
                  else f"{len(homeless)} of its encoder's tensors have no place in the model, e.g. "
                  f"{', '.join(homeless[:3])}")
        raise ValueError(f"{where} is another architecture: {detail}. Use its model config "
                         "(speechssl.load(SOURCE).config)")
    shared = {k: given[k] for k in (target.keys() & given.keys()) - differ}
    model.load_state_dict(shared, strict=False)
    return WeightTransfer(len(shared), _parts(target.keys() - shared.keys()), _parts(given.keys() - target.keys()))
