"""Hugging Face ``transformers`` <-> speechssl, for the Transformer and the Conformer.

Imports ``Wav2Vec2Model`` / ``Wav2Vec2ForPreTraining`` / ``Wav2Vec2ForCTC`` and their
``Wav2Vec2Conformer*`` counterparts (config and weights) as a speechssl :class:`Wav2Vec2Model`
(the base and pretraining classes) or :class:`CTCModel` (the CTC classes), and exports ours back to
those classes. A base model has no quantizer or projections: importing one gives freshly
initialised pretraining parts. Hugging Face has no feature penalty, so imports set its weight to 0.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from speechssl.data.inputs import SAMPLE_RATE
from speechssl.interop.keys import rename
from speechssl.models.config import FeatureExtractorConfig, LossConfig, ModelConfig, QuantizerConfig
from speechssl.models.context.conformer import ConformerConfig
from speechssl.models.context.transformer import TransformerConfig
from speechssl.models.ctc import CTCModel
from speechssl.models.encoder import SpeechEncoder
from speechssl.models.masker import MaskingConfig
from speechssl.models.wav2vec2 import Wav2Vec2Model

# (speechssl key, Hugging Face key below the base model's prefix); {i} is a layer number.
_SHARED = [
    ("feature_extractor.blocks.{i}.conv.", "feature_extractor.conv_layers.{i}.conv."),
    ("feature_extractor.blocks.{i}.norm.", "feature_extractor.conv_layers.{i}.layer_norm."),
    ("frontend.layer_norm.", "feature_projection.layer_norm."),
    ("frontend.projection.", "feature_projection.projection."),
    ("frontend.masker.mask_emb", "masked_spec_embed"),
    ("context.pos_conv.conv.", "encoder.pos_conv_embed.conv."),
    ("context.layer_norm.", "encoder.layer_norm."),
]
_TRANSFORMER = [
    ("context.layers.{i}.attention.out_proj.", "encoder.layers.{i}.attention.out_proj."),
    ("context.layers.{i}.layer_norm.", "encoder.layers.{i}.layer_norm."),
    ("context.layers.{i}.final_layer_norm.", "encoder.layers.{i}.final_layer_norm."),
    ("context.layers.{i}.feed_forward.fc1.", "encoder.layers.{i}.feed_forward.intermediate_dense."),
    ("context.layers.{i}.feed_forward.fc2.", "encoder.layers.{i}.feed_forward.output_dense."),
]
_CONFORMER = [
    ("context.layers.{i}.ffn1.fc1.", "encoder.layers.{i}.ffn1.intermediate_dense."),
    ("context.layers.{i}.ffn1.fc2.", "encoder.layers.{i}.ffn1.output_dense."),
    ("context.layers.{i}.ffn2.fc1.", "encoder.layers.{i}.ffn2.intermediate_dense."),
    ("context.layers.{i}.ffn2.fc2.", "encoder.layers.{i}.ffn2.output_dense."),
    ("context.layers.{i}.", "encoder.layers.{i}."),  # every other block name is the same
]
_HEADS = [  # outside the base model
    ("quantizer.weight_proj.0.", "quantizer.weight_proj."),
    ("quantizer.codevectors", "quantizer.codevectors"),
    ("project_q.", "project_q."),
    ("final_proj.", "project_hid."),
    ("lm_head.", "lm_head."),
]
_QKV = re.compile(r"context\.layers\.(\d+)\.attention\.qkv\.(weight|bias)")
_HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")
_POINTWISE = re.compile(r"context\.layers\.\d+\.conv_module\.pointwise_conv[12]\.weight")
_BASES = {"wav2vec2": "Wav2Vec2", "wav2vec2_conformer": "Wav2Vec2Conformer"}


def _is_conformer(obj: Any) -> bool:
    return "Conformer" in type(obj).__name__


# ---------------------------------------------------------------------------------------- configs


def config_from_huggingface(hf_config: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a ``Wav2Vec2Config`` or ``Wav2Vec2ConformerConfig``."""
    c = hf_config
    if c.feat_extract_activation != "gelu":
        raise ValueError(f"unsupported feat_extract_activation {c.feat_extract_activation!r} (only 'gelu')")
    if getattr(c, "add_adapter", False):
        raise ValueError("models with add_adapter=True (an adapter after the encoder) are not supported")
    extractor = FeatureExtractorConfig(
        mode={"group": "group_norm", "layer": "layer_norm"}[c.feat_extract_norm],
        conv_layers=[[d, k, s] for d, k, s in zip(c.conv_dim, c.conv_kernel, c.conv_stride, strict=True)],
        conv_bias=c.conv_bias)
    if _is_conformer(c):
        context: Any = ConformerConfig(
            embed_dim=c.hidden_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
            ffn_dim=c.intermediate_size, depthwise_conv_kernel=c.conv_depthwise_kernel_size,
            activation={"swish": "swish", "silu": "swish", "gelu": "gelu"}.get(c.hidden_act, c.hidden_act),
            position_embeddings=c.position_embeddings_type or "none",
            max_source_positions=c.max_source_positions, rotary_embedding_base=int(c.rotary_embedding_base),
            pos_conv_kernel=0, dropout=c.hidden_dropout, attention_dropout=c.attention_dropout,
            activation_dropout=c.activation_dropout, conv_dropout=c.conformer_conv_dropout,
            layer_drop=c.layerdrop, layer_norm_eps=c.layer_norm_eps, mask_padding_in_conv=False)
    else:
        if c.hidden_act != "gelu":
            raise ValueError(f"unsupported hidden_act {c.hidden_act!r} for the Transformer (only 'gelu')")
        if c.layer_norm_eps != 1e-5:
            raise ValueError(f"unsupported layer_norm_eps {c.layer_norm_eps} for the Transformer (only 1e-5)")
        context = TransformerConfig(
            embed_dim=c.hidden_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
            ffn_dim=c.intermediate_size, layer_norm_first=c.do_stable_layer_norm, dropout=c.hidden_dropout,
            attention_dropout=c.attention_dropout, activation_dropout=c.activation_dropout,
            layer_drop=c.layerdrop, pos_conv_kernel=c.num_conv_pos_embeddings,
            pos_conv_groups=c.num_conv_pos_embedding_groups)
    return ModelConfig(
        extractor=extractor, context=context,
        quantizer=QuantizerConfig(num_groups=c.num_codevector_groups, num_vars=c.num_codevectors_per_group,
                                  codevector_dim=c.codevector_dim),
        masking=MaskingConfig(mask_prob=c.mask_time_prob, mask_length=c.mask_time_length,
                              min_masks=c.mask_time_min_masks, channel_prob=c.mask_feature_prob,
                              channel_length=c.mask_feature_length),
        loss=LossConfig(num_negatives=c.num_negatives, logit_temp=c.contrastive_logits_temperature,
                        diversity_weight=c.diversity_loss_weight, feature_penalty_weight=0.0),
        dropout_input=c.feat_proj_dropout, dropout_features=c.feat_quantizer_dropout,
        final_dim=c.proj_codevector_dim)


def huggingface_config(config: ModelConfig, **extra: Any) -> Any:
    """The ``Wav2Vec2Config`` (Transformer) or ``Wav2Vec2ConformerConfig`` (Conformer) of a
    speechssl config; ``extra`` adds or overrides fields (``vocab_size=...`` for CTC)."""
    import transformers

    if config.extractor.type != "conv":
        raise ValueError(f"Hugging Face's Wav2Vec2 models have no {config.extractor.type!r} extractor; "
                         "only the convolutional one ('conv') exports")
    ctx = config.context
    kwargs: dict[str, Any] = dict(
        conv_dim=[c for c, _, _ in config.extractor.conv_layers],
        conv_kernel=[k for _, k, _ in config.extractor.conv_layers],
        conv_stride=[s for _, _, s in config.extractor.conv_layers],
        conv_bias=config.extractor.conv_bias,
        feat_extract_norm={"group_norm": "group", "layer_norm": "layer"}[config.extractor.mode],
        feat_extract_activation="gelu",
        hidden_size=ctx.embed_dim, num_hidden_layers=ctx.num_layers, num_attention_heads=ctx.num_heads,
        intermediate_size=ctx.ffn_dim, hidden_dropout=ctx.dropout, attention_dropout=ctx.attention_dropout,
        activation_dropout=ctx.activation_dropout, layerdrop=ctx.layer_drop,
        feat_proj_dropout=config.dropout_input, feat_quantizer_dropout=config.dropout_features,
        mask_time_prob=config.masking.mask_prob, mask_time_length=config.masking.mask_length,
        mask_time_min_masks=config.masking.min_masks, mask_feature_prob=config.masking.channel_prob,
        mask_feature_length=config.masking.channel_length,
        num_codevector_groups=config.quantizer.num_groups, num_codevectors_per_group=config.quantizer.num_vars,
        codevector_dim=config.codevector_dim, proj_codevector_dim=config.final_dim,
        num_negatives=config.loss.num_negatives, contrastive_logits_temperature=config.loss.logit_temp,
        diversity_loss_weight=config.loss.diversity_weight,
    )
    if isinstance(ctx, ConformerConfig):
        if ctx.pos_conv_kernel > 0:
            raise ValueError("Hugging Face's Wav2Vec2-Conformer has no convolutional positional embedding; "
                             "a Conformer with pos_conv_kernel > 0 cannot be exported")
        if ctx.att_context_size != [-1, -1]:
            raise ValueError(f"Hugging Face's Wav2Vec2-Conformer has full attention only; this model uses "
                             f"att_context_size={ctx.att_context_size} (change_attention([-1, -1]) first)")
        if not ctx.layer_norm_first:
            raise ValueError("Hugging Face's Wav2Vec2-Conformer has its LayerNorm after the last block; this "
                             "model has it before the first (layer_norm_first: false) and cannot be exported")
        kwargs.update(
            hidden_act=ctx.activation, conv_depthwise_kernel_size=ctx.depthwise_conv_kernel,
            position_embeddings_type=None if ctx.position_embeddings == "none" else ctx.position_embeddings,
            max_source_positions=ctx.max_source_positions, rotary_embedding_base=ctx.rotary_embedding_base,
            conformer_conv_dropout=ctx.conv_dropout, layer_norm_eps=ctx.layer_norm_eps)
        kwargs.update(extra)
        return transformers.Wav2Vec2ConformerConfig(**kwargs)
    if not isinstance(ctx, TransformerConfig):
        raise ValueError(f"Hugging Face has no {ctx.type!r} context network")
    kwargs.update(hidden_act="gelu", do_stable_layer_norm=ctx.layer_norm_first,
                  num_conv_pos_embeddings=ctx.pos_conv_kernel, num_conv_pos_embedding_groups=ctx.pos_conv_groups)
    kwargs.update(extra)
    return transformers.Wav2Vec2Config(**kwargs)


# ---------------------------------------------------------------------------------------- weights


def _pairs(conformer: bool) -> list[tuple[str, str]]:
    return _SHARED + (_CONFORMER if conformer else _TRANSFORMER)


def _import_state(hf_state: dict[str, Tensor], prefix: str, conformer: bool, groups: int) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in hf_state.items():
        inner = key[len(prefix):] if key.startswith(prefix) else None
        if inner is not None and inner.startswith("encoder.embed_positions."):
            continue  # rotary frequencies: a function of the config, recomputed here
        if inner is not None and (m := _HF_QKV.fullmatch(inner)):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        new = rename(inner, _pairs(conformer), reverse=True) if inner is not None else rename(key, _HEADS, reverse=True)
        if new is None:
            raise ValueError(f"unexpected Hugging Face parameter {key!r}")
        if new == "quantizer.codevectors":
            value = value.view(groups, -1, value.shape[-1])
        elif _POINTWISE.fullmatch(new):
            value = value.squeeze(-1)
        state[new] = value
    for (layer, kind), parts in qkv.items():
        state[f"context.layers.{layer}.attention.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return state


def _export_state(state: dict[str, Tensor], prefix: str, conformer: bool) -> dict[str, Tensor]:
    hf_state: dict[str, Tensor] = {}
    for key, value in state.items():
        if m := _QKV.fullmatch(key):
            for name, part in zip("qkv", value.chunk(3), strict=True):
                hf_state[f"{prefix}encoder.layers.{m.group(1)}.attention.{name}_proj.{m.group(2)}"] = part
            continue
        if key == "quantizer.codevectors":
            value = value.reshape(1, -1, value.shape[-1])
        elif _POINTWISE.fullmatch(key):
            value = value.unsqueeze(-1)
        inner = rename(key, _pairs(conformer))
        if inner is not None:
            hf_state[prefix + inner] = value
        elif (head := rename(key, _HEADS)) is not None:
            hf_state[head] = value
    return hf_state


# ---------------------------------------------------------------------------------------- vocabularies

# speechssl's character tokenizer (finetune/tokenizer.py, CharTokenizer) starts its vocabulary with
# these three; Hugging Face names the blank <pad> (its pipeline drops the pad token as the CTC blank).
BLANK, UNK, WORD = "<blank>", "<unk>", "|"
HF_PAD = "<pad>"
NEVER = -1e4  # the bias of an added class the model never predicts


def _case_of(tokens: list[str]) -> str:
    """The case folding a character vocabulary implies: upper or lower when every cased
    single-character token is, else keep."""
    cased = [t for t in tokens if len(t) == 1 and t.lower() != t.upper()]
    if cased and all(t == t.upper() for t in cased):
        return "upper"
    if cased and all(t == t.lower() for t in cased):
        return "lower"
    return "keep"


def with_char_vocabulary(model: CTCModel, tokens: list[str], blank: int, unk: int | None = None,
                         delimiter: int | None = None, lower: bool = False) -> CTCModel:
    """Give ``model``, whose classes are ``tokens`` (a character vocabulary: each token's text is
    written as is, the ``delimiter`` token between words), speechssl's character tokenizer, in place:
    the classes ``blank``, ``unk`` and ``delimiter`` become ``<blank>``, ``<unk>`` and ``|`` at 0, 1
    and 2, the others follow in their order, and the rows of ``lm_head`` are reordered to match (the
    same order keeps them bit-exact). A missing ``unk`` or ``delimiter`` (None) is added as a class
    the model never predicts (zero weights, bias -1e4), so the other classes' log-probabilities are
    unchanged. ``lower``: the tokens are lowercased (Hugging Face's ``do_lower_case``, which
    lowercases its transcripts); the tokenizer's case is then ``lower``, else the case the tokens
    show (:func:`_case_of`). Returns ``model``, its ``.tokenizer`` (a ``CharTokenizer.to_dict()``),
    ``.vocab``, ``.vocab_size`` and ``.blank`` (0) set."""
    n = len(tokens)
    if n != model.vocab_size:
        raise ValueError(f"{n} tokens for a CTC head of {model.vocab_size} classes")
    given = [i for i in (blank, unk, delimiter) if i is not None]
    if len(set(given)) != len(given) or not all(0 <= i < n for i in given):
        raise ValueError(f"the blank ({blank}), unk ({unk}) and word delimiter ({delimiter}) must be "
                         f"different classes among the {n}")
    rows: list[int | None] = [blank, unk, delimiter, *(i for i in range(n) if i not in given)]
    rest = [tokens[i].lower() if lower else tokens[i] for i in rows[3:]]
    if any(WORD in t or not t for t in rest):
        raise ValueError(f"a character vocabulary has {WORD!r} only as its word delimiter and no empty token; "
                         f"got {[t for t in rest if WORD in t or not t]}")
    head = model.lm_head
    weight = head.weight.new_zeros(len(rows), head.in_features)
    bias = head.weight.new_full((len(rows),), NEVER)
    with torch.no_grad():
        for new, old in enumerate(rows):
            if old is not None:
                weight[new], bias[new] = head.weight[old], head.bias[old]
    model.lm_head = nn.Linear(head.in_features, len(rows), device=weight.device, dtype=weight.dtype)
    model.lm_head.weight, model.lm_head.bias = nn.Parameter(weight), nn.Parameter(bias)
    model.vocab = [BLANK, UNK, WORD, *rest]
    model.vocab_size, model.blank = len(rows), 0
    model.tokenizer = {"type": "char", "vocab": list(model.vocab), "case": "lower" if lower else _case_of(rest)}
    return model


def _local(where: str) -> Path | None:
    path = Path(where)
    return path if path.is_dir() else None


def _saved_normalization(where: str | None) -> bool | None:
    """``do_normalize`` of the feature extractor saved at ``where`` (a folder or a name), or None
    when there is none."""
    import transformers

    folder = _local(where) if where is not None else None
    if where is None or (folder is not None and not (folder / "preprocessor_config.json").is_file()):
        return None
    try:
        return transformers.Wav2Vec2FeatureExtractor.from_pretrained(where).do_normalize
    except OSError:
        if folder is not None:
            raise
        return None


def _saved_tokenizer(where: str) -> Any:
    """The tokenizer saved with a model at ``where`` (a folder or a name), or None when there is none."""
    import transformers

    folder = _local(where)
    if folder is not None:
        return transformers.AutoTokenizer.from_pretrained(where) if (folder / "vocab.json").is_file() else None
    try:
        return transformers.AutoTokenizer.from_pretrained(where)
    except OSError:
        return None


def _tokenizer_and_normalization(tokenizer: Any, source: str | None) -> tuple[Any, bool | None]:
    """The Hugging Face tokenizer to import (or None) and the feature extractor's ``do_normalize``
    (or None when unknown), from the arguments of :func:`from_huggingface` (``source``: the model's
    name or folder, when given as one)."""
    import transformers

    if isinstance(tokenizer, transformers.Wav2Vec2Processor):
        return tokenizer.tokenizer, tokenizer.feature_extractor.do_normalize
    do_normalize = _saved_normalization(source)
    if isinstance(tokenizer, str):
        if do_normalize is None:
            do_normalize = _saved_normalization(tokenizer)
        return transformers.AutoTokenizer.from_pretrained(tokenizer), do_normalize
    if tokenizer is None:
        return (_saved_tokenizer(source) if source is not None else None), do_normalize
    return (tokenizer or None), do_normalize


def _huggingface_tokens(tokenizer: Any, hf_config: Any) -> tuple[list[str], int, int | None, int | None, bool]:
    """``(tokens, blank, unk, delimiter, lower)`` of a ``Wav2Vec2CTCTokenizer`` for the model's
    classes (:func:`with_char_vocabulary`'s arguments); the blank is the tokenizer's pad token,
    which the pipeline drops as the CTC blank."""
    import transformers

    if not isinstance(tokenizer, transformers.Wav2Vec2CTCTokenizer):
        raise ValueError(f"cannot import the vocabulary of a {type(tokenizer).__name__}: only a Wav2Vec2CTCTokenizer "
                         "(characters joined, the word delimiter as space) maps onto speechssl's character "
                         "tokenizer; pass tokenizer=False to import the model without its vocabulary")
    if tokenizer.replace_word_delimiter_char != " ":
        raise ValueError(f"the tokenizer writes its word delimiter as {tokenizer.replace_word_delimiter_char!r}; "
                         "speechssl's character tokenizer writes a space")
    n = hf_config.vocab_size

    def class_of(token_id: int | None) -> int | None:
        return token_id if token_id is not None and 0 <= token_id < n else None

    blank = class_of(tokenizer.pad_token_id)
    if blank is None:
        raise ValueError(f"the tokenizer's pad token {tokenizer.pad_token!r} (the CTC blank of Hugging Face's "
                         f"pipeline) is not one of the model's {n} classes")
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in range(n)]
    unk = class_of(tokenizer.unk_token_id) if tokenizer.unk_token is not None else None
    delimiter = class_of(tokenizer.word_delimiter_token_id)
    return tokens, blank, (None if unk == blank else unk), delimiter, bool(tokenizer.do_lower_case)


def _char_vocab_of(model: CTCModel) -> list[str]:
    """The character vocabulary of a CTC model, or ValueError saying why it has none that Hugging
    Face's ``Wav2Vec2CTCTokenizer`` can hold."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("this CTC model has no tokenizer (it was not made by speechssl's fine-tuning job); "
                         "pass tokenizer=False to write the model without one")
    if tokenizer.get("type") == "bpe":
        raise ValueError("a SentencePiece (BPE) vocabulary cannot become a Wav2Vec2CTCTokenizer: that tokenizer "
                         "writes each token's text as is and turns only a whole word-delimiter token into a space, "
                         "while SentencePiece pieces carry the word boundary inside the piece (\u2581), so the "
                         "pipeline's transcripts would not be ours. Pass tokenizer=False to write the model, its "
                         "config and feature extractor without a tokenizer, and decode its logits with the "
                         "SentencePiece model")
    if tokenizer.get("type") != "char":
        raise ValueError(f"unknown tokenizer type {tokenizer.get('type')!r} (char or bpe)")
    vocab = list(tokenizer["vocab"])
    if vocab[:3] != [BLANK, UNK, WORD] or len(vocab) != model.vocab_size or model.blank != 0:
        raise ValueError(f"the character vocabulary ({len(vocab)} tokens from {vocab[:3]}) does not fit the CTC "
                         f"head ({model.vocab_size} classes, blank {model.blank})")
    extra = [t for t in vocab[3:] if t in (HF_PAD, UNK, WORD)]
    if len(set(vocab)) != len(vocab) or extra:
        raise ValueError(f"the vocabulary repeats a token or uses a special token's name: {extra or vocab}")
    return vocab


def huggingface_tokenizer(model: CTCModel) -> Any:
    """The ``Wav2Vec2CTCTokenizer`` of a CTC model with a character tokenizer: our classes in
    order, ``<blank>`` named ``<pad>`` (the pad token, which Hugging Face's CTC decoding drops as
    the blank), ``<unk>`` the unk token and ``|`` the word delimiter; no BOS or EOS token, no case
    folding and no clean-up of spaces, so that it writes our transcripts. (It encodes text as it
    is: fold its case as the model's tokenizer does, ``.tokenizer["case"]``, before making labels
    with it.) A BPE tokenizer or none is a ValueError saying why."""
    import tempfile

    import transformers

    vocab = _char_vocab_of(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.json"
        path.write_text(json.dumps({token: i for i, token in enumerate([HF_PAD, *vocab[1:]])}, ensure_ascii=False))
        return transformers.Wav2Vec2CTCTokenizer(
            str(path), bos_token=None, eos_token=None, unk_token=UNK, pad_token=HF_PAD, word_delimiter_token=WORD,
            replace_word_delimiter_char=" ", do_lower_case=False, clean_up_tokenization_spaces=False)


def huggingface_feature_extractor(model: SpeechEncoder, normalize_audio: bool | None = None) -> Any:
    """The ``Wav2Vec2FeatureExtractor`` for a model: 16 kHz mono samples, ``do_normalize`` =
    ``normalize_audio`` (default: the model's ``normalize_audio``, False for a pretraining model),
    and ``return_attention_mask`` as Hugging Face's released models have it: True for the
    layer_norm extractor (LARGE), False for group_norm (BASE), whose group norm over time sees the
    padding anyway. (Hugging Face normalises with eps 1e-7, speechssl with 1e-5.)"""
    import transformers

    if normalize_audio is None:
        normalize_audio = bool(getattr(model, "normalize_audio", False))
    return transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=normalize_audio,
        return_attention_mask=model.config.extractor.mode == "layer_norm")


# ---------------------------------------------------------------------------------------- entry points


def from_huggingface(hf_model: Any, tokenizer: Any = None, normalize_audio: bool | None = None
                     ) -> Wav2Vec2Model | CTCModel:
    """Import a ``transformers`` Wav2Vec2 or Wav2Vec2-Conformer model (``*Model``,
    ``*ForPreTraining`` or ``*ForCTC``; an instance, or a name or folder for ``from_pretrained``).
    CTC models become a :class:`CTCModel`, the others a :class:`Wav2Vec2Model`. The result is in
    eval mode when the source was.

    The vocabulary of a CTC model comes from ``tokenizer``: a ``Wav2Vec2CTCTokenizer``, a
    ``Wav2Vec2Processor`` or a name or folder holding one; None (the default) reads it from the
    model's own folder when the model is given as one (a folder without ``vocab.json`` gives none),
    False imports no vocabulary. With a vocabulary, the CTC model gets speechssl's character
    tokenizer (``.tokenizer``, ``.vocab``) and ``.blank`` 0, and our greedy decoding gives the
    transcripts of ``pipeline("automatic-speech-recognition")``: the tokenizer's pad token (the
    pipeline's CTC blank) becomes ``<blank>``, its unk token ``<unk>`` and its word delimiter ``|``,
    as the first three classes, the other tokens follow in their order, and the rows of ``lm_head``
    are reordered to match (a folder written by :func:`save_huggingface` has that order already, so
    its weights come back bit-exact). A vocabulary without an unk or delimiter token gets one as a
    class the model never predicts (zero weights, bias -1e4). Without a vocabulary the blank is the
    config's ``pad_token_id`` and ``.tokenizer`` is None.

    ``normalize_audio`` (CTC models): whether inference normalises each utterance; None takes the
    feature extractor's ``do_normalize`` (from ``preprocessor_config.json`` in the folder, or the
    processor given as ``tokenizer``), else False.
    """
    import transformers

    source = hf_model if isinstance(hf_model, str) else None
    if source is not None:
        architecture = transformers.AutoConfig.from_pretrained(source).architectures[0]
        hf_model = getattr(transformers, architecture).from_pretrained(source)
    name = type(hf_model).__name__
    if not re.fullmatch(r"Wav2Vec2(Conformer)?(Model|ForPreTraining|ForCTC)", name):
        raise ValueError(f"cannot import {name}: expected Wav2Vec2[Conformer]Model, ForPreTraining or ForCTC")
    conformer = _is_conformer(hf_model)
    config = config_from_huggingface(hf_model.config)
    prefix = "" if name.endswith("Model") else ("wav2vec2_conformer." if conformer else "wav2vec2.")
    ctc = name.endswith("ForCTC")
    if ctc:
        hf_tokenizer, do_normalize = _tokenizer_and_normalization(tokenizer, source)
        if normalize_audio is None:
            normalize_audio = bool(do_normalize)
        model: SpeechEncoder = CTCModel(config, hf_model.config.vocab_size, blank=hf_model.config.pad_token_id or 0,
                                        final_dropout=hf_model.config.final_dropout, normalize_audio=normalize_audio)
    else:
        model = Wav2Vec2Model(config)
    state = _import_state(hf_model.state_dict(), prefix, conformer, config.quantizer.num_groups)
    if isinstance(config.context, ConformerConfig):  # Hugging Face keeps an unused positional conv
        state = {k: v for k, v in state.items() if not k.startswith("context.pos_conv.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = ("frontend.masker.mask_emb",)  # Hugging Face has it only when masking is configured
    if name.endswith("Model"):
        fresh += ("quantizer.", "project_q.", "final_proj.")
    missing = [k for k in missing if not k.startswith(fresh)]
    if missing or unexpected:
        raise ValueError(f"Hugging Face import mismatch: missing {missing}, unexpected {unexpected}")
    if ctc and hf_tokenizer is not None:
        model = with_char_vocabulary(model, *_huggingface_tokens(hf_tokenizer, hf_model.config))
    return model.train(hf_model.training)


def to_huggingface(model: SpeechEncoder, kind: str | None = None) -> nn.Module:
    """Export to ``transformers``: ``kind`` ``model`` (``Wav2Vec2[Conformer]Model``), ``pretraining``
    (``...ForPreTraining``, the default for a :class:`Wav2Vec2Model`) or ``ctc`` (``...ForCTC``, the
    only kind for a :class:`CTCModel`). The result is in eval mode."""
    import transformers

    is_ctc = isinstance(model, CTCModel)
    kind = kind or ("ctc" if is_ctc else "pretraining")
    if kind not in (("model", "ctc") if is_ctc else ("model", "pretraining")):
        raise ValueError(f"cannot export a {type(model).__name__} as kind {kind!r}")
    conformer = isinstance(model.config.context, ConformerConfig)
    if kind == "pretraining" and model.config.quantizer.weight_proj_depth != 1:
        raise ValueError("Hugging Face's quantizer has a single projection; weight_proj_depth must be 1")
    extra = dict(vocab_size=model.vocab_size, pad_token_id=model.blank,
                 final_dropout=model.final_dropout.p) if is_ctc else {}
    hf_config = huggingface_config(model.config, **extra)
    base = "Wav2Vec2Conformer" if conformer else "Wav2Vec2"
    suffix = {"model": "Model", "pretraining": "ForPreTraining", "ctc": "ForCTC"}[kind]
    hf_model = getattr(transformers, base + suffix)(hf_config)
    prefix = "" if kind == "model" else ("wav2vec2_conformer." if conformer else "wav2vec2.")
    return load_exported(hf_model, _export_state(model.state_dict(), prefix, conformer), conformer)


def load_exported(hf_model: nn.Module, hf_state: dict[str, Tensor], conformer: bool) -> nn.Module:
    """``hf_model`` with the exported weights that have a place in it (the CTC head of a model exported
    as the base class has none), in eval mode; ValueError if any of its own stays unset."""
    target = hf_model.state_dict()
    hf_state = {k: v for k, v in hf_state.items() if k in target}
    # A Hugging Face Conformer keeps an unused positional conv and its rotary frequencies as buffers.
    unused = ("pos_conv_embed", "embed_positions") if conformer else ()
    left = [k for k in target if k not in hf_state and not any(u in k for u in unused)]
    if left:
        raise ValueError(f"Hugging Face export left parameters unset: {left}")
    hf_model.load_state_dict(hf_state, strict=False)
    return hf_model.eval()


def save_huggingface(model: SpeechEncoder, folder: str | os.PathLike, kind: str | None = None,
                     tokenizer: bool = True, normalize_audio: bool | None = None) -> Path:
    """Write a ``save_pretrained`` folder that ``transformers`` loads as it is:

    - ``config.json`` and ``model.safetensors`` (:func:`to_huggingface`; ``kind`` as there);
    - ``preprocessor_config.json`` (:func:`huggingface_feature_extractor`; ``normalize_audio``
      as there);
    - for a CTC export with ``tokenizer`` (the default), the CTC tokenizer
      (:func:`huggingface_tokenizer`): ``vocab.json``, ``tokenizer_config.json`` and
      ``special_tokens_map.json``.

    Then ``pipeline("automatic-speech-recognition", model=folder)`` and
    ``Wav2Vec2Processor.from_pretrained(folder)`` load it, the pipeline's transcripts are our
    greedy ones (but where the model emits two word delimiters with only blanks between them, Hugging
    Face writes two spaces, speechssl one), and :func:`from_huggingface` of the folder gives back
    the model with its vocabulary. Only a character tokenizer can be written: a BPE model (or one
    without a tokenizer) is refused with the reason, unless ``tokenizer=False`` (the model without
    a tokenizer). The checks run before anything is written; files of the same names in ``folder``
    are replaced. Returns the folder."""
    is_ctc = isinstance(model, CTCModel)
    hf_model = to_huggingface(model, kind)
    hf_tokenizer = huggingface_tokenizer(model) if is_ctc and kind in (None, "ctc") and tokenizer else None
    extractor = huggingface_feature_extractor(model, normalize_audio)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(folder)
    extractor.save_pretrained(folder)
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(folder)
        special = {"pad_token": hf_tokenizer.pad_token, "unk_token": hf_tokenizer.unk_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return folder
