"""torchaudio ``Wav2Vec2Model`` <-> speechssl :class:`~speechssl.Wav2Vec2Model` and :class:`CTCModel`.

torchaudio's model is the extractor, the frontend projection and the Transformer (plus an optional
``aux`` head); the pretraining parts (mask embedding, quantizer, projections) exist only here, so a
model imported from torchaudio gets freshly initialised ones and can go on pretraining. A CTC
model's head is torchaudio's ``aux``: :func:`to_torchaudio` exports it there and attaches the
labels (``ta_model.labels``), and :func:`from_torchaudio` with ``labels`` imports ``aux`` as the
CTC head with its vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from speechssl.interop.huggingface import UNK, WORD, with_char_vocabulary
from speechssl.interop.keys import rename
from speechssl.models.config import FeatureExtractorConfig, ModelConfig
from speechssl.models.context.transformer import TransformerConfig
from speechssl.models.ctc import CTCModel
from speechssl.models.wav2vec2 import Wav2Vec2Model

# (torchaudio key, speechssl key) prefixes; q/k/v projections are fused separately.
_RENAMES = [
    ("feature_extractor.conv_layers.{i}.conv.", "feature_extractor.blocks.{i}.conv."),
    ("feature_extractor.conv_layers.{i}.layer_norm.", "feature_extractor.blocks.{i}.norm."),
    ("encoder.feature_projection.layer_norm.", "frontend.layer_norm."),
    ("encoder.feature_projection.projection.", "frontend.projection."),
    ("encoder.transformer.pos_conv_embed.conv.", "context.pos_conv.conv."),
    ("encoder.transformer.layer_norm.", "context.layer_norm."),
    ("encoder.transformer.layers.{i}.attention.out_proj.", "context.layers.{i}.attention.out_proj."),
    ("encoder.transformer.layers.{i}.layer_norm.", "context.layers.{i}.layer_norm."),
    ("encoder.transformer.layers.{i}.final_layer_norm.", "context.layers.{i}.final_layer_norm."),
    ("encoder.transformer.layers.{i}.feed_forward.intermediate_dense.", "context.layers.{i}.feed_forward.fc1."),
    ("encoder.transformer.layers.{i}.feed_forward.output_dense.", "context.layers.{i}.feed_forward.fc2."),
    ("aux.", "aux."),
]
_QKV = re.compile(r"encoder\.transformer\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")


def _import_state_dict(ta_state: dict[str, Tensor]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in ta_state.items():
        m = _QKV.fullmatch(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        new = rename(key, _RENAMES)
        if new is None:
            raise ValueError(f"unexpected torchaudio parameter {key!r}")
        state[new] = value
    for (layer, kind), parts in qkv.items():
        state[f"context.layers.{layer}.attention.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return state


def _export_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    ta_state: dict[str, Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"context\.layers\.(\d+)\.attention\.qkv\.(weight|bias)", key)
        if m:
            for name, part in zip("qkv", value.chunk(3), strict=True):
                ta_state[f"encoder.transformer.layers.{m.group(1)}.attention.{name}_proj.{m.group(2)}"] = part
            continue
        new = rename(key, _RENAMES, reverse=True)
        if new is not None:
            ta_state[new] = value
    return ta_state


def _dropout(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else float(module)


def config_from_torchaudio(ta_model: nn.Module) -> ModelConfig:
    """Read the architecture of a ``torchaudio.models.Wav2Vec2Model`` into a :class:`ModelConfig`."""
    blocks = ta_model.feature_extractor.conv_layers
    convs = [b.conv for b in blocks]
    layer_norm = isinstance(blocks[-1].layer_norm, nn.LayerNorm) or (
        len(blocks) == 1 and isinstance(blocks[0].layer_norm, nn.LayerNorm))
    encoder = ta_model.encoder
    transformer = encoder.transformer
    layer = transformer.layers[0]
    if type(layer.attention).__name__ != "SelfAttention":
        raise ValueError(f"unsupported torchaudio attention {type(layer.attention).__name__} "
                         "(only wav2vec 2.0 / HuBERT-style Transformer layers can be imported)")
    pos = transformer.pos_conv_embed.conv
    extractor = FeatureExtractorConfig(
        mode="layer_norm" if layer_norm else "group_norm",
        conv_layers=[[c.out_channels, c.kernel_size[0], c.stride[0]] for c in convs],
        conv_bias=convs[0].bias is not None,
    )
    context = TransformerConfig(
        embed_dim=encoder.feature_projection.projection.out_features,
        num_layers=len(transformer.layers),
        num_heads=layer.attention.num_heads,
        ffn_dim=layer.feed_forward.intermediate_dense.out_features,
        layer_norm_first=layer.layer_norm_first,
        dropout=_dropout(layer.dropout),
        attention_dropout=_dropout(layer.attention.dropout),
        activation_dropout=_dropout(layer.feed_forward.intermediate_dropout),
        layer_drop=float(transformer.layer_drop),
        pos_conv_kernel=pos.kernel_size[0],
        pos_conv_groups=pos.groups,
    )
    aux = getattr(ta_model, "aux", None)
    return ModelConfig(
        extractor=extractor,
        context=context,
        dropout_input=_dropout(encoder.feature_projection.dropout),
        aux_num_out=aux.out_features if aux is not None else None,
    )


def _index(labels: list[str], token: str, blank: int) -> int | None:
    """The class of ``token`` among ``labels`` (the blank excepted), or None."""
    found = [i for i, label in enumerate(labels) if label == token and i != blank]
    return found[0] if found else None


def from_torchaudio(ta_model: nn.Module, labels: Sequence[str] | None = None, blank: int = 0,
                   tokenizer: dict | None = None) -> Wav2Vec2Model | CTCModel:
    """Build a speechssl model with the architecture and weights of a torchaudio ``Wav2Vec2Model``
    (including the fairseq-trained checkpoints torchaudio's bundles load).

    Without ``labels``: a :class:`Wav2Vec2Model` (an ``aux`` head stays its ``aux``). With
    ``labels`` (the text of each ``aux`` class, as ``bundle.get_labels()`` or the ``labels`` that
    :func:`to_torchaudio` attaches) the model has to have ``aux`` and becomes a :class:`CTCModel`
    whose head is ``aux`` and whose blank is class ``blank``. ``tokenizer`` (a tokenizer's
    ``to_dict()``, e.g. a BPE model's) is taken as it is, ``labels`` then being its vocabulary;
    without it, the labels are read as characters, torchaudio's greedy decoding (written as is,
    ``|`` between words): the model gets speechssl's character tokenizer through
    :func:`~speechssl.interop.huggingface.with_char_vocabulary` (``<blank>``, ``<unk>``, ``|`` first,
    the head's rows reordered; a missing ``<unk>`` or ``|`` is added as a class it never predicts),
    so that our greedy transcripts are torchaudio's. The labels of a speechssl export come back in
    their order, the head bit-exact."""
    config = config_from_torchaudio(ta_model)
    aux = getattr(ta_model, "aux", None)
    if labels is not None:
        if aux is None:
            raise ValueError("labels are given but the torchaudio model has no aux head to be the CTC head")
        if len(labels) != aux.out_features:
            raise ValueError(f"{len(labels)} labels for an aux head of {aux.out_features} classes")
        config.aux_num_out = None
        model: Wav2Vec2Model | CTCModel = CTCModel(config, aux.out_features, blank=blank, vocab=list(labels),
                                                   tokenizer=tokenizer)
    else:
        model = Wav2Vec2Model(config)
    state = _import_state_dict(ta_model.state_dict())
    if labels is not None:
        state = {("lm_head." + k[4:] if k.startswith("aux.") else k): v for k, v in state.items()}
    weight_key = "context.pos_conv.conv.weight"
    plain_weight = state.pop(weight_key, None)  # torchaudio removed weight norm (scripted models)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if plain_weight is not None:
        with torch.no_grad():
            model.context.pos_conv.conv.weight = plain_weight  # weight_norm's right_inverse sets g and v
        missing = [k for k in missing if not k.startswith("context.pos_conv.conv.parametrizations.weight")]
    pretraining_only = ("frontend.masker.mask_emb", "quantizer.", "project_q.", "final_proj.")
    missing = [k for k in missing if not k.startswith(pretraining_only)]
    if missing or unexpected:
        raise ValueError(f"torchaudio import mismatch: missing {missing}, unexpected {unexpected}")
    if isinstance(model, CTCModel) and tokenizer is None:
        labels = list(labels)
        unk, word = (_index(labels, token, blank) for token in (UNK, WORD))
        with_char_vocabulary(model, labels, blank, unk, word)
    return model


def torchaudio_kwargs(config: ModelConfig) -> dict[str, Any]:
    """The ``torchaudio.models.wav2vec2_model`` arguments of a speechssl config."""
    if config.extractor.type != "conv":
        raise ValueError(f"torchaudio has no {config.extractor.type!r} extractor; "
                         "only the convolutional one ('conv') exports")
    ctx = config.context
    if not isinstance(ctx, TransformerConfig):
        raise ValueError(f"torchaudio has no {ctx.type!r} context network; only 'transformer' exports")
    return dict(
        extractor_mode=config.extractor.mode,
        extractor_conv_layer_config=[tuple(layer) for layer in config.extractor.conv_layers],
        extractor_conv_bias=config.extractor.conv_bias,
        encoder_embed_dim=ctx.embed_dim,
        encoder_projection_dropout=config.dropout_input,
        encoder_pos_conv_kernel=ctx.pos_conv_kernel,
        encoder_pos_conv_groups=ctx.pos_conv_groups,
        encoder_num_layers=ctx.num_layers,
        encoder_num_heads=ctx.num_heads,
        encoder_attention_dropout=ctx.attention_dropout,
        encoder_ff_interm_features=ctx.ffn_dim,
        encoder_ff_interm_dropout=ctx.activation_dropout,
        encoder_dropout=ctx.dropout,
        encoder_layer_norm_first=ctx.layer_norm_first,
        encoder_layer_drop=ctx.layer_drop,
        aux_num_out=config.aux_num_out,
    )


def to_torchaudio(model: Wav2Vec2Model | CTCModel) -> nn.Module:
    """A ``torchaudio.models.Wav2Vec2Model`` with this model's weights: extractor, projection,
    Transformer and head (the pretraining parts have no place there).

    A :class:`Wav2Vec2Model`'s ``aux`` head stays ``aux``. A :class:`CTCModel`'s CTC head becomes
    ``aux`` (``aux_num_out`` = its classes; final dropout, off in inference, is not kept), so the
    torchaudio model's ``forward`` gives our logits (its emissions), and the result gets an attribute
    ``labels``: the tuple of the classes' texts (``model.vocab``; None when the model does not know
    it), with the blank at ``model.blank`` (0, ``<blank>``, for speechssl's tokenizers), ``|`` the word
    delimiter of a character vocabulary. Pass them to :func:`from_torchaudio` to come back, or to
    torchaudio's decoders (``ctc_decoder(..., tokens=list(labels), blank_token="<blank>",
    sil_token="|")``)."""
    import torchaudio

    kwargs = torchaudio_kwargs(model.config)
    state = model.state_dict()
    if isinstance(model, CTCModel):
        kwargs["aux_num_out"] = model.vocab_size
        state = {("aux." + k[len("lm_head."):] if k.startswith("lm_head.") else k): v for k, v in state.items()}
    ta_model = torchaudio.models.wav2vec2_model(**kwargs)
    ta_model.load_state_dict(_export_state_dict(state))
    if isinstance(model, CTCModel):
        vocab = model.vocab
        if vocab is None and model.tokenizer is not None and model.tokenizer.get("type") == "char":
            vocab = model.tokenizer["vocab"]
        ta_model.labels = tuple(vocab) if vocab is not None else None
    return ta_model


def wav2vec2_model(
    extractor_mode: str,
    extractor_conv_layer_config: list[tuple[int, int, int]] | None,
    extractor_conv_bias: bool,
    encoder_embed_dim: int,
    encoder_projection_dropout: float,
    encoder_pos_conv_kernel: int,
    encoder_pos_conv_groups: int,
    encoder_num_layers: int,
    encoder_num_heads: int,
    encoder_attention_dropout: float,
    encoder_ff_interm_features: int,
    encoder_ff_interm_dropout: float,
    encoder_dropout: float,
    encoder_layer_norm_first: bool,
    encoder_layer_drop: float,
    aux_num_out: int | None,
) -> Wav2Vec2Model:
    """Build a speechssl model from exactly the arguments of ``torchaudio.models.wav2vec2_model``
    (same names, same meaning); the pretraining parts use fairseq's defaults."""
    extractor = FeatureExtractorConfig(mode=extractor_mode, conv_bias=extractor_conv_bias)
    if extractor_conv_layer_config is not None:
        extractor.conv_layers = [list(layer) for layer in extractor_conv_layer_config]
        extractor.__post_init__()
    context = TransformerConfig(
        embed_dim=encoder_embed_dim, num_layers=encoder_num_layers, num_heads=encoder_num_heads,
        ffn_dim=encoder_ff_interm_features, layer_norm_first=encoder_layer_norm_first,
        dropout=encoder_dropout, attention_dropout=encoder_attention_dropout,
        activation_dropout=encoder_ff_interm_dropout, layer_drop=encoder_layer_drop,
        pos_conv_kernel=encoder_pos_conv_kernel, pos_conv_groups=encoder_pos_conv_groups,
    )
    return Wav2Vec2Model(ModelConfig(extractor=extractor, context=context,
                                     dropout_input=encoder_projection_dropout, aux_num_out=aux_num_out))
