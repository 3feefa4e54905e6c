"""A model named the way every command names one: a run folder, a model file, ``hf:NAME_OR_PATH``,
or ``scratch:MODEL_CONFIG``.

- a run folder: its ``model.pt``;
- a model file: one written by :meth:`Wav2Vec2Model.save <speechssl.models.wav2vec2.Wav2Vec2Model.save>`
  (pretraining; also one imported from torchaudio or Hugging Face and saved) or by
  :meth:`CTCModel.save <speechssl.models.ctc.CTCModel.save>` (fine-tuning), told apart by the
  file's own ``format``;
- ``hf:NAME_OR_PATH``: a Hugging Face Wav2Vec2 or Wav2Vec2-Conformer checkpoint (hub name or saved
  folder; :func:`speechssl.interop.huggingface.from_huggingface`);
- ``scratch:MODEL_CONFIG``: a random initialisation of the model of that YAML (a from-scratch
  baseline), drawn after ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from speechssl.models.encoder import SpeechEncoder

SOURCES = "a run folder with model.pt, a model file, or hf:NAME"


def model_file(source: str | os.PathLike) -> Path:
    """The model file a run folder or file names (FileNotFoundError when there is none)."""
    path = Path(source)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist ({SOURCES})")
    return path


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
    if source.startswith("hf:"):
        from speechssl.interop.huggingface import from_huggingface

        return from_huggingface(source[3:])
    path = model_file(source)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    from speechssl.models.ctc import FORMAT as CTC_FORMAT

    if isinstance(blob, dict) and blob.get("format") == CTC_FORMAT:
        from speechssl.models.ctc import load_ctc_model

        return load_ctc_model(path)
    from speechssl.models.wav2vec2 import load_model

    return load_model(path)
