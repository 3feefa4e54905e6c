"""Hugging Face ``transformers`` <-> speechssl, for the Transformer and the Conformer.

Imports ``Wav2Vec2Model`` / ``Wav2Vec2ForPreTraining`` / ``Wav2Vec2ForCTC`` and their
``Wav2Vec2Conformer*`` counterparts (config and weights) as a speechssl :class:`Wav2Vec2Model`
(the base and pretraining classes) or :class:`CTCModel` (the CTC classes), and exports ours back to
those classes. A base model has no quantizer or projections: importing one gives freshly
initialised pretraining parts. Hugging Face has no feature penalty, so imports set its weight to 0.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

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


# ---------------------------------------------------------------------------------------- entry points


def from_huggingface(hf_model: Any) -> Wav2Vec2Model | CTCModel:
    """Import a ``transformers`` Wav2Vec2 or Wav2Vec2-Conformer model (``*Model``,
    ``*ForPreTraining`` or ``*ForCTC``; an instance, or a name or folder for ``from_pretrained``).
    CTC models become a :class:`CTCModel` (blank = ``pad_token_id``), the others a
    :class:`Wav2Vec2Model`. The result is in eval mode when the source was."""
    if isinstance(hf_model, str):
        import transformers

        architecture = transformers.AutoConfig.from_pretrained(hf_model).architectures[0]
        hf_model = getattr(transformers, architecture).from_pretrained(hf_model)
    name = type(hf_model).__name__
    if not re.fullmatch(r"Wav2Vec2(Conformer)?(Model|ForPreTraining|ForCTC)", name):
        raise ValueError(f"cannot import {name}: expected Wav2Vec2[Conformer]Model, ForPreTraining or ForCTC")
    conformer = _is_conformer(hf_model)
    config = config_from_huggingface(hf_model.config)
    prefix = "" if name.endswith("Model") else ("wav2vec2_conformer." if conformer else "wav2vec2.")
    ctc = name.endswith("ForCTC")
    if ctc:
        model: SpeechEncoder = CTCModel(config, hf_model.config.vocab_size, blank=hf_model.config.pad_token_id or 0,
                                        final_dropout=hf_model.config.final_dropout)
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
    ours = _export_state(model.state_dict(), prefix, conformer)
    target = hf_model.state_dict()
    ours = {k: v for k, v in ours.items() if k in target}  # e.g. the CTC head when exporting the base model
    # A Hugging Face Conformer keeps an unused positional conv and its rotary frequencies as buffers.
    unused = ("pos_conv_embed", "embed_positions") if conformer else ()
    left = [k for k in target if k not in ours and not any(u in k for u in unused)]
    if left:
        raise ValueError(f"Hugging Face export left parameters unset: {left}")
    hf_model.load_state_dict(ours, strict=False)
    return hf_model.eval()
