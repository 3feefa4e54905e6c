"""Hugging Face's downstream classes <-> :class:`~speechssl.models.classifier.SpeechClassifier`.

``Wav2Vec2ForSequenceClassification``, ``Wav2Vec2ForAudioFrameClassification`` and
``Wav2Vec2ForXVector``, and their ``Wav2Vec2Conformer*`` counterparts: the encoder maps as in
:mod:`speechssl.interop.huggingface`, the head's knobs (``num_labels``, ``use_weighted_layer_sum``,
``classifier_proj_size``, ``tdnn_dim``, ``tdnn_kernel``, ``tdnn_dilation``,
``xvector_output_dim``) and weights one to one, the label names from ``id2label``. Imported
x-vector models pool over Hugging Face's frame counts (``hf_tdnn_lengths``), so their embeddings
are Hugging Face's on padded batches too.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from speechssl.interop.huggingface import (
    _export_state,
    _import_state,
    _is_conformer,
    config_from_huggingface,
    load_exported,
)
from speechssl.interop.huggingface import huggingface_config as _encoder_config
from speechssl.models.classifier import SpeechClassifier
from speechssl.models.context.conformer import ConformerConfig
from speechssl.models.heads import HeadConfig

SUFFIXES = {"sequence_classification": "ForSequenceClassification",
            "frame_classification": "ForAudioFrameClassification", "xvector": "ForXVector"}
TASKS = {suffix: task for task, suffix in SUFFIXES.items()}
# (speechssl key prefix, Hugging Face key prefix) of the head and the layer weights
_HEAD_KEYS = [("layer_weights", "layer_weights"), ("head.objective_weight", "objective.weight"), ("head.", "")]
_CLASS = re.compile(r"Wav2Vec2(Conformer)?(ForSequenceClassification|ForAudioFrameClassification|ForXVector)")


def _prefix(conformer: bool) -> str:
    return "wav2vec2_conformer." if conformer else "wav2vec2."


def head_config_from_huggingface(hf_config: Any, task: str) -> HeadConfig:
    """The :class:`HeadConfig` of a Hugging Face config for ``task``."""
    c = hf_config
    return HeadConfig(task=task, num_labels=c.num_labels, use_weighted_layer_sum=c.use_weighted_layer_sum,
                      classifier_proj_size=c.classifier_proj_size, tdnn_dim=list(c.tdnn_dim),
                      tdnn_kernel=list(c.tdnn_kernel), tdnn_dilation=list(c.tdnn_dilation),
                      xvector_output_dim=c.xvector_output_dim, hf_tdnn_lengths=task == "xvector")


def _labels(hf_config: Any) -> list[str] | None:
    names = [hf_config.id2label.get(i) for i in range(hf_config.num_labels)]
    default = [f"LABEL_{i}" for i in range(hf_config.num_labels)]
    return None if names == default or None in names else [str(n) for n in names]


def is_head_architecture(where: str) -> bool:
    """Whether the Hugging Face model saved at ``where`` (a name or folder) is one of the head classes."""
    import transformers

    architectures = transformers.AutoConfig.from_pretrained(where).architectures or []
    return any(_CLASS.fullmatch(a) for a in architectures)


def from_huggingface_head(hf_model: Any) -> SpeechClassifier:
    """Import a Hugging Face ``*ForSequenceClassification``, ``*ForAudioFrameClassification`` or
    ``*ForXVector`` (an instance, or a name or folder for ``from_pretrained``); its train/eval mode
    is kept."""
    import transformers

    if isinstance(hf_model, str):
        architecture = transformers.AutoConfig.from_pretrained(hf_model).architectures[0]
        hf_model = getattr(transformers, architecture).from_pretrained(hf_model)
    found = _CLASS.fullmatch(type(hf_model).__name__)
    if found is None:
        raise ValueError(f"cannot import {type(hf_model).__name__} as a classifier: expected "
                         "Wav2Vec2[Conformer]ForSequenceClassification, ForAudioFrameClassification or ForXVector")
    conformer = _is_conformer(hf_model)
    config = config_from_huggingface(hf_model.config)
    head = head_config_from_huggingface(hf_model.config, TASKS[found.group(2)])
    model = SpeechClassifier(config, head, labels=_labels(hf_model.config))
    prefix = _prefix(conformer)
    hf_state = hf_model.state_dict()
    base = {k: v for k, v in hf_state.items() if k.startswith(prefix)}
    state = _import_state(base, prefix, conformer, config.quantizer.num_groups)
    if isinstance(config.context, ConformerConfig):  # Hugging Face keeps an unused positional conv
        state = {k: v for k, v in state.items() if not k.startswith("context.pos_conv.")}
    for key, value in hf_state.items():
        if key.startswith(prefix):
            continue
        ours = next((a + key[len(b):] for a, b in _HEAD_KEYS if key.startswith(b)), None)
        state[ours] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "frontend.masker.mask_emb"]  # there only when masking is configured
    if missing or unexpected:
        raise ValueError(f"Hugging Face import mismatch: missing {missing}, unexpected {unexpected}")
    return model.train(hf_model.training)


def to_huggingface_head(model: SpeechClassifier) -> nn.Module:
    """Export to the Hugging Face class of the model's task (Wav2Vec2 or Wav2Vec2-Conformer), in
    eval mode. A model pooling over exact x-vector frame counts exports as it is: Hugging Face
    pools over its own counts (:class:`HeadConfig` ``hf_tdnn_lengths``), which differ on padded
    batches."""
    import transformers

    h = model.head_config
    labels = model.labels or [f"LABEL_{i}" for i in range(h.num_labels)]
    hf_config = _encoder_config(
        model.config, num_labels=h.num_labels, use_weighted_layer_sum=h.use_weighted_layer_sum,
        classifier_proj_size=h.classifier_proj_size, tdnn_dim=list(h.tdnn_dim), tdnn_kernel=list(h.tdnn_kernel),
        tdnn_dilation=list(h.tdnn_dilation), xvector_output_dim=h.xvector_output_dim,
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    conformer = isinstance(model.config.context, ConformerConfig)
    base = "Wav2Vec2Conformer" if conformer else "Wav2Vec2"
    hf_model = getattr(transformers, base + SUFFIXES[h.task])(hf_config)
    state = model.state_dict()
    hf_state: dict[str, Tensor] = _export_state(state, _prefix(conformer), conformer)
    for key, value in state.items():
        theirs = next((b + key[len(a):] for a, b in _HEAD_KEYS if key.startswith(a)), None)
        if theirs is not None:
            hf_state[theirs] = value
    return load_exported(hf_model, hf_state, conformer)
