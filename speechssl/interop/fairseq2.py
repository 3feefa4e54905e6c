"""fairseq2 wav2vec 2.0 (pretraining) and wav2vec 2.0 ASR (CTC) models <-> speechssl.

The configs and weights map without fairseq2's code, so a fairseq2 checkpoint file loads where
fairseq2 is not installed (:func:`load_fairseq2_checkpoint`); :func:`from_fairseq2` and
:func:`to_fairseq2` convert live fairseq2 modules and need fairseq2 (``pip install
speechssl[fairseq2]``, in its own environment: README, "fairseq2").

A fairseq2 config is handled as a plain dict with the fields of fairseq2's dataclasses
(``Wav2Vec2Config`` with its ``encoder_config``, ``Wav2Vec2AsrConfig``); the dataclasses themselves
are accepted too. What maps:

- the waveform extractor (group or layer norm, bias), the feature LayerNorm and projection;
- the Transformer with the convolutional positional encoder, post-norm (``POST``, the LayerNorm
  before the layers: ``layer_norm_features``) or pre-norm (``PRE``, the LayerNorm after them);
- the Conformer (``use_conformer``) with relative positions (``pos_encoder_type: relative``) or
  the convolutional positional encoder, its LayerNorm before the first block;
- the quantizer, the projections, the mask embedding, and the CTC head of the ASR model.

Refused with the reason: filterbank input (``use_fbank``), rotary positions (fairseq2 rotates the
projected queries and keys, speechssl the block input), a stacked positional encoder, relative
positions in the Transformer, a final projection without bias.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from speechssl.interop.keys import rename
from speechssl.interop.untrusted import load_untrusted
from speechssl.models.config import FeatureExtractorConfig, LossConfig, ModelConfig, QuantizerConfig
from speechssl.models.context.conformer import ConformerConfig
from speechssl.models.context.transformer import TransformerConfig
from speechssl.models.ctc import CTCModel
from speechssl.models.encoder import SpeechEncoder
from speechssl.models.masker import MaskingConfig
from speechssl.models.wav2vec2 import Wav2Vec2Model

PRETRAINING, ASR = "wav2vec2", "wav2vec2_asr"  # fairseq2's model families

# fairseq2 0.8's Wav2Vec2EncoderConfig defaults; the ASR config changes four of them.
ENCODER_DEFAULTS: dict[str, Any] = {
    "model_dim": 768, "max_seq_len": 4096, "feature_dim": 512, "use_fbank": False, "first_pass_dropout_p": 0.0,
    "layer_norm_features": True,
    "feature_extractor_layer_descs": [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2,
    "feature_extractor_bias": False, "feature_extractor_layer_norm_convs": False, "feature_grad_scale": 0.1,
    "num_fbank_channels": 0, "fbank_stride": 0, "sample_fbank_every_k": 0, "pos_encoder_type": "conv",
    "pos_encoder_depth": 1, "pos_conv_kernel_size": 128, "num_pos_conv_groups": 16, "use_conformer": False,
    "num_encoder_layers": 12, "num_encoder_attn_heads": 12, "ffn_inner_dim": 3072, "dropout_p": 0.1,
    "attn_dropout_p": 0.1, "ffn_inner_dropout_p": 0.0, "layer_drop_p": 0.05, "norm_order": "POST",
    "depthwise_conv_kernel_size": 0,
}
ASR_ENCODER_DEFAULTS = {**ENCODER_DEFAULTS, "feature_grad_scale": 1.0, "dropout_p": 0.0, "attn_dropout_p": 0.0,
                        "ffn_inner_dropout_p": 0.1}
PRETRAINING_DEFAULTS: dict[str, Any] = {
    "final_dim": 256, "final_proj_bias": True, "quantizer_encoder_grad": True, "temporal_mask_span_len": 10,
    "max_temporal_mask_prob": 0.69, "min_num_temporal_mask_spans": 2, "spatial_mask_span_len": 10,
    "max_spatial_mask_prob": 0.0, "min_num_spatial_mask_spans": 2, "quantized_dim": 256, "num_codebooks": 2,
    "num_codebook_entries": 320, "codebook_sampling_temperature": [2.0, 0.5, 0.999995], "num_distractors": 100,
    "logit_temp": 0.1,
}
ASR_DEFAULTS: dict[str, Any] = {
    "target_vocab_size": 32, "final_dropout_p": 0.0, "use_masking": True, "temporal_mask_span_len": 10,
    "max_temporal_mask_prob": 0.69, "min_num_temporal_mask_spans": 2, "spatial_mask_span_len": 64,
    "max_spatial_mask_prob": 0.55, "min_num_spatial_mask_spans": 2,
}


# ---------------------------------------------------------------------------------------- configs


def _plain(value: Any) -> Any:
    """A fairseq2 config (dataclass, enum members inside) as plain dicts, lists and scalars."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def family_of(config: Any) -> str:
    """``wav2vec2_asr`` for an ASR config (it has ``target_vocab_size``), else ``wav2vec2``."""
    return ASR if "target_vocab_size" in _plain(config) else PRETRAINING


def _complete(config: Any) -> tuple[dict, dict, str]:
    """``(top-level fields, encoder fields, family)`` with fairseq2's defaults filled in."""
    top = _plain(config)
    family = family_of(top)
    encoder = {**(ASR_ENCODER_DEFAULTS if family == ASR else ENCODER_DEFAULTS), **top.get("encoder_config", {})}
    top = {**(ASR_DEFAULTS if family == ASR else PRETRAINING_DEFAULTS), **top}
    encoder["norm_order"] = str(encoder["norm_order"]).rsplit(".", 1)[-1].upper()
    unknown = set(encoder) - set(ENCODER_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown fairseq2 encoder_config fields: {sorted(unknown)}")
    return top, encoder, family


def config_from_fairseq2(config: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a fairseq2 ``Wav2Vec2Config`` or ``Wav2Vec2AsrConfig`` (the
    dataclass or a dict of its fields; missing fields take fairseq2's defaults). Models speechssl
    cannot reproduce are refused with the reason (the module's docstring)."""
    top, e, family = _complete(config)
    reasons = [why for bad, why in (
        (e["use_fbank"], "filterbank input (use_fbank)"),
        (e["pos_encoder_type"] == "rotary", "rotary positions (fairseq2 rotates the projected queries and keys)"),
        (e["pos_encoder_type"] == "relative" and not e["use_conformer"], "relative positions in the Transformer"),
        (e["pos_encoder_type"] not in ("conv", "relative", "rotary"), f"pos_encoder_type {e['pos_encoder_type']!r}"),
        (e["pos_encoder_type"] == "conv" and e["pos_encoder_depth"] != 1, "a stacked positional encoder"),
        (not top.get("final_proj_bias", True), "a final projection without bias"),
        (not top.get("quantizer_encoder_grad", True), "quantizer_encoder_grad=False"),
        (e["norm_order"] not in ("POST", "PRE"), f"norm_order {e['norm_order']}"),
        (e["norm_order"] == "POST" and not e["layer_norm_features"], "POST norm without layer_norm_features"),
        (e["norm_order"] == "PRE" and e["layer_norm_features"], "PRE norm with layer_norm_features"),
        (e["feature_extractor_layer_descs"][-1][0] != e["feature_dim"],
         "feature_dim differs from the last extractor layer's width")) if bad]
    if reasons:
        raise ValueError(f"cannot import this fairseq2 model: {'; '.join(reasons)}")
    conv_pos = e["pos_conv_kernel_size"] if e["pos_encoder_type"] == "conv" else 0
    common = dict(embed_dim=e["model_dim"], num_layers=e["num_encoder_layers"], num_heads=e["num_encoder_attn_heads"],
                  ffn_dim=e["ffn_inner_dim"], dropout=e["dropout_p"], attention_dropout=e["attn_dropout_p"],
                  activation_dropout=e["ffn_inner_dropout_p"], layer_drop=e["layer_drop_p"])
    if e["use_conformer"]:
        context: Any = ConformerConfig(
            **common, depthwise_conv_kernel=e["depthwise_conv_kernel_size"], activation="swish",
            position_embeddings="relative" if e["pos_encoder_type"] == "relative" else "none",
            max_source_positions=e["max_seq_len"], pos_conv_kernel=conv_pos, pos_conv_groups=e["num_pos_conv_groups"],
            layer_norm_first=False, mask_padding_in_conv=True)
    else:
        context = TransformerConfig(**common, layer_norm_first=e["norm_order"] == "PRE", pos_conv_kernel=conv_pos,
                                    pos_conv_groups=e["num_pos_conv_groups"])
    masking = MaskingConfig(
        mask_prob=top["max_temporal_mask_prob"] if top.get("use_masking", True) else 0.0,
        mask_length=top["temporal_mask_span_len"], min_masks=top["min_num_temporal_mask_spans"],
        channel_prob=top["max_spatial_mask_prob"] if top.get("use_masking", True) else 0.0,
        channel_length=top["spatial_mask_span_len"])
    extractor = FeatureExtractorConfig(
        mode="layer_norm" if e["feature_extractor_layer_norm_convs"] else "group_norm",
        conv_layers=[list(map(int, d)) for d in e["feature_extractor_layer_descs"]],
        conv_bias=bool(e["feature_extractor_bias"]))
    if family == ASR:  # no pretraining parts in an ASR model: fairseq2's defaults stand in for them
        top = {**PRETRAINING_DEFAULTS, **top}
    temp = top["codebook_sampling_temperature"]
    return ModelConfig(
        extractor=extractor, context=context,
        quantizer=QuantizerConfig(num_groups=top["num_codebooks"], num_vars=top["num_codebook_entries"],
                                  codevector_dim=top["quantized_dim"], temp_start=float(temp[0]),
                                  temp_end=float(temp[1]), temp_decay=float(temp[2])),
        masking=masking,
        loss=LossConfig(num_negatives=top["num_distractors"], logit_temp=top["logit_temp"],
                        diversity_weight=0.1, feature_penalty_weight=10.0),  # fairseq2's forward defaults
        feature_grad_mult=e["feature_grad_scale"], dropout_input=e["first_pass_dropout_p"],
        dropout_features=e["first_pass_dropout_p"], final_dim=top["final_dim"])


def fairseq2_config(model: SpeechEncoder) -> dict[str, Any]:
    """The fairseq2 config (a dict of ``Wav2Vec2Config`` fields, or ``Wav2Vec2AsrConfig`` for a
    :class:`CTCModel`) of a model; ValueError for one fairseq2 cannot hold."""
    c = model.config
    ctx = c.context
    if c.extractor.type != "conv":
        raise ValueError(f"only the convolutional extractor exports to fairseq2, not {c.extractor.type!r}")
    conformer = isinstance(ctx, ConformerConfig)
    if not conformer and not isinstance(ctx, TransformerConfig):
        raise ValueError(f"fairseq2's wav2vec 2.0 has no {ctx.type!r} context network")
    reasons = []
    if conformer:
        reasons = [why for bad, why in (
            (ctx.layer_norm_first, "its LayerNorm after the last block (fairseq2's Conformer has it before the first)"),
            (ctx.position_embeddings == "rotary", "rotary positions"),
            (ctx.position_embeddings == "relative" and ctx.pos_conv_kernel > 0, "relative positions and a conv"),
            (ctx.activation != "swish", f"activation {ctx.activation!r}"),
            (ctx.att_context_size != [-1, -1], f"local attention {ctx.att_context_size}"),
            (not ctx.mask_padding_in_conv, "padding leaking into the convolutions (mask_padding_in_conv false)"),
            (ctx.layer_norm_eps != 1e-5, f"layer_norm_eps {ctx.layer_norm_eps}")) if bad]
    if reasons:
        raise ValueError(f"fairseq2's Conformer cannot hold this model: {'; '.join(reasons)}")
    if c.dropout_features != c.dropout_input:
        warnings.warn(f"fairseq2 has one dropout for inputs and targets: dropout_features={c.dropout_features} "
                      f"becomes first_pass_dropout_p={c.dropout_input}", stacklevel=2)
    pre = not conformer and ctx.layer_norm_first
    encoder = {
        "model_dim": ctx.embed_dim, "feature_dim": c.extractor.conv_layers[-1][0],
        "first_pass_dropout_p": c.dropout_input, "layer_norm_features": not pre,
        "feature_extractor_layer_descs": [list(d) for d in c.extractor.conv_layers],
        "feature_extractor_bias": c.extractor.conv_bias,
        "feature_extractor_layer_norm_convs": c.extractor.mode == "layer_norm",
        "feature_grad_scale": c.feature_grad_mult,
        "pos_encoder_type": "relative" if conformer and ctx.position_embeddings == "relative" else "conv",
        "pos_encoder_depth": 1,  # the conv fields keep fairseq2's defaults where no conv is used
        "pos_conv_kernel_size": ctx.pos_conv_kernel or ENCODER_DEFAULTS["pos_conv_kernel_size"],
        "num_pos_conv_groups": ctx.pos_conv_groups if ctx.pos_conv_kernel else ENCODER_DEFAULTS["num_pos_conv_groups"],
        "use_conformer": conformer, "num_encoder_layers": ctx.num_layers, "num_encoder_attn_heads": ctx.num_heads,
        "ffn_inner_dim": ctx.ffn_dim, "dropout_p": ctx.dropout, "attn_dropout_p": ctx.attention_dropout,
        "ffn_inner_dropout_p": ctx.activation_dropout, "layer_drop_p": ctx.layer_drop,
        "norm_order": "PRE" if pre else "POST",
        "depthwise_conv_kernel_size": ctx.depthwise_conv_kernel if conformer else 0,
    }
    if conformer:
        encoder["max_seq_len"] = ctx.max_source_positions
    if ctx.pos_conv_kernel == 0 and encoder["pos_encoder_type"] == "conv":
        raise ValueError("fairseq2 needs a position encoder: a conv (pos_conv_kernel > 0) or relative positions")
    m = c.masking
    masks = {"temporal_mask_span_len": m.mask_length, "max_temporal_mask_prob": m.mask_prob,
             "min_num_temporal_mask_spans": m.min_masks, "spatial_mask_span_len": m.channel_length,
             "max_spatial_mask_prob": m.channel_prob}
    if isinstance(model, CTCModel):
        return {"encoder_config": encoder, "target_vocab_size": model.vocab_size,
                "final_dropout_p": model.final_dropout.p, "use_masking": m.mask_prob > 0, **masks}
    q = c.quantizer
    return {"encoder_config": encoder, "final_dim": c.final_dim, **masks, "quantized_dim": c.codevector_dim,
            "num_codebooks": q.num_groups, "num_codebook_entries": q.num_vars,
            "codebook_sampling_temperature": [q.temp_start, q.temp_end, q.temp_decay],
            "num_distractors": c.loss.num_negatives, "logit_temp": c.loss.logit_temp}


# ---------------------------------------------------------------------------------------- weights

_FS2_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_QKV = re.compile(r"context\.layers\.(\d+)\.attention\.qkv\.(weight|bias)")
_POINTWISE = re.compile(r"context\.layers\.\d+\.conv_module\.pointwise_conv[12]\.weight")
_SKIPPED = ("quantizer.num_updates",)  # fairseq2's temperature schedule counter; ours follows the trainer


def _pairs(config: ModelConfig, asr: bool) -> list[tuple[str, str]]:
    """(fairseq2 key prefix, speechssl key prefix); ``{i}`` is a number; the first match wins."""
    ctx = config.context
    conformer = isinstance(ctx, ConformerConfig)
    fx = "encoder_frontend.feature_extractor.layers."
    norm = ((fx + "{i}.layer_norm.", "feature_extractor.blocks.{i}.norm.") if config.extractor.mode == "layer_norm"
            else (fx + "0.group_norm.", "feature_extractor.blocks.0.norm."))
    pairs = [(fx + "{i}.conv.", "feature_extractor.blocks.{i}.conv."), norm,
             ("encoder_frontend.post_extract_layer_norm.", "frontend.layer_norm."),
             ("encoder_frontend.model_dim_proj.", "frontend.projection."),
             ("encoder_frontend.pos_encoder.conv.weight_g", "context.pos_conv.conv.parametrizations.weight.original0"),
             ("encoder_frontend.pos_encoder.conv.weight_v", "context.pos_conv.conv.parametrizations.weight.original1"),
             ("encoder_frontend.pos_encoder.conv.bias", "context.pos_conv.conv.bias"),
             ("encoder.layer_norm." if not conformer and ctx.layer_norm_first else "encoder_frontend.layer_norm.",
              "context.layer_norm."),
             ("masker.temporal_mask_embed", "frontend.masker.mask_emb")]
    pairs += [("final_proj.", "lm_head.")] if asr else [
        ("quantizer.entries", "quantizer.codevectors"), ("quantizer.entry_proj.", "quantizer.weight_proj.0."),
        ("final_target_proj.", "project_q."), ("final_proj.", "final_proj.")]
    layer, ours = "encoder.layers.{i}.", "context.layers.{i}."
    if conformer:
        for ffn in ("ffn1", "ffn2"):
            pairs += [(f"{layer}{ffn}.inner_proj.", f"{ours}{ffn}.fc1."),
                      (f"{layer}{ffn}.output_proj.", f"{ours}{ffn}.fc2.")]
        pairs += [(layer + "self_attn.q_proj.", ours + "self_attn.linear_q."),
                  (layer + "self_attn.k_proj.", ours + "self_attn.linear_k."),
                  (layer + "self_attn.v_proj.", ours + "self_attn.linear_v."),
                  (layer + "self_attn.output_proj.", ours + "self_attn.linear_out."),
                  (layer + "self_attn.sdpa.u_bias", ours + "self_attn.pos_bias_u"),
                  (layer + "self_attn.sdpa.v_bias", ours + "self_attn.pos_bias_v"),
                  (layer + "self_attn.sdpa.r_proj.", ours + "self_attn.linear_pos."),
                  (layer + "conv_layer_norm.", ours + "conv_module.layer_norm."),
                  (layer + "conv.", ours + "conv_module."),
                  (layer + "layer_norm.", ours + "final_layer_norm."),
                  (layer, ours)]  # ffn1_layer_norm, self_attn_layer_norm, ffn2_layer_norm
    else:
        pairs += [(layer + "self_attn.output_proj.", ours + "attention.out_proj."),
                  (layer + "self_attn_layer_norm.", ours + "layer_norm."),
                  (layer + "ffn.inner_proj.", ours + "feed_forward.fc1."),
                  (layer + "ffn.output_proj.", ours + "feed_forward.fc2."),
                  (layer + "ffn_layer_norm.", ours + "final_layer_norm.")]
    return pairs


def import_state(state: dict[str, Tensor], config: ModelConfig, asr: bool) -> dict[str, Tensor]:
    """speechssl's state dict from a fairseq2 wav2vec 2.0 (``asr`` False) or ASR one."""
    pairs = _pairs(config, asr)
    conformer = isinstance(config.context, ConformerConfig)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key in _SKIPPED:
            continue
        if not conformer and (m := _FS2_QKV.fullmatch(key)):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        new = rename(key, pairs)
        if new is None:
            raise ValueError(f"unexpected fairseq2 parameter {key!r}")
        if new == "quantizer.codevectors":
            value = value.reshape(config.quantizer.num_groups, config.quantizer.num_vars, -1)
        elif _POINTWISE.fullmatch(new):
            value = value.squeeze(-1)
        out[new] = value
    for (layer, kind), parts in qkv.items():
        out[f"context.layers.{layer}.attention.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def export_state(state: dict[str, Tensor], config: ModelConfig, asr: bool) -> dict[str, Tensor]:
    """fairseq2's state dict of a speechssl one (the inverse of :func:`import_state`); an ASR
    export leaves out the pretraining parts, as fairseq2's ASR model has none."""
    pairs = _pairs(config, asr)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if asr and key.startswith(("quantizer.", "project_q.", "final_proj.")):
            continue
        if m := _QKV.fullmatch(key):
            for name, part in zip("qkv", value.chunk(3), strict=True):
                out[f"encoder.layers.{m.group(1)}.self_attn.{name}_proj.{m.group(2)}"] = part
            continue
        if key == "quantizer.codevectors":
            value = value.reshape(1, -1, value.shape[-1])
        elif _POINTWISE.fullmatch(key):
            value = value.unsqueeze(-1)
        new = rename(key, pairs, reverse=True)
        if new is None:
            raise ValueError(f"no fairseq2 name for parameter {key!r}")
        out[new] = value
    if not asr:
        out["quantizer.num_updates"] = torch.zeros((), dtype=torch.int64)
    return out


def _build(config: ModelConfig, family: str, top: dict) -> SpeechEncoder:
    if family == ASR:
        return CTCModel(config, int(top["target_vocab_size"]), blank=0, final_dropout=float(top["final_dropout_p"]))
    return Wav2Vec2Model(config)


def _load_weights(model: SpeechEncoder, state: dict[str, Tensor], asr: bool) -> None:
    missing, unexpected = model.load_state_dict(import_state(state, model.config, asr), strict=False)
    if asr:  # an ASR model has no pretraining parts: ours keep their initialisation
        missing = [k for k in missing if not k.startswith(("quantizer.", "project_q.", "final_proj."))]
    if missing or unexpected:
        raise ValueError(f"fairseq2 import mismatch: missing {missing}, unexpected {unexpected}")


def from_state_dict(state: dict[str, Tensor], config: Any) -> Wav2Vec2Model | CTCModel:
    """Our model of a fairseq2 state dict and its config (:func:`config_from_fairseq2`'s argument),
    in eval mode."""
    top, _, family = _complete(config)
    model = _build(config_from_fairseq2(config), family, top)
    _load_weights(model, state, family == ASR)
    return model.eval()


# ---------------------------------------------------------------------------------------- live modules


def config_of_module(fs2_model: nn.Module) -> dict[str, Any]:
    """The fairseq2 config (a dict) of a fairseq2 ``Wav2Vec2Model`` or ``Wav2Vec2AsrModel``, read
    from its modules: fairseq2 keeps no config on the model."""
    state = fs2_model.state_dict()
    config = infer_config(state)
    e = config["encoder_config"]
    layers = fs2_model.encoder.layers
    e["num_encoder_attn_heads"] = int(layers[0].self_attn.num_heads)
    convs = [layer.conv for layer in fs2_model.encoder_frontend.feature_extractor.layers]
    e["feature_extractor_layer_descs"] = [[c.out_channels, c.kernel_size[0], c.stride[0]] for c in convs]
    e["feature_grad_scale"] = float(fs2_model.encoder_frontend.feature_extractor.grad_scale)
    e["layer_drop_p"] = float(getattr(fs2_model.encoder, "layer_drop_p", 0.0))
    masker = getattr(fs2_model, "masker", None)
    if masker is not None:
        config.update(temporal_mask_span_len=masker.temporal_span_len,
                      max_temporal_mask_prob=masker.max_temporal_mask_prob,
                      min_num_temporal_mask_spans=masker.min_num_temporal_mask_spans,
                      spatial_mask_span_len=masker.spatial_span_len, max_spatial_mask_prob=masker.max_spatial_mask_prob)
    elif "target_vocab_size" in config:
        config["use_masking"] = False
    if "target_vocab_size" not in config:
        config.update(num_distractors=fs2_model.num_distractors, logit_temp=fs2_model.logit_temp,
                      codebook_sampling_temperature=list(fs2_model.quantizer.codebook_sampling_temperature))
    return config


def from_fairseq2(fs2_model: nn.Module, config: Any = None) -> Wav2Vec2Model | CTCModel:
    """Import a fairseq2 ``Wav2Vec2Model`` (as a :class:`Wav2Vec2Model`) or ``Wav2Vec2AsrModel``
    (as a :class:`CTCModel`, blank 0 as in fairseq2's CTC loss). ``config``: its fairseq2 config;
    None reads it from the modules (:func:`config_of_module`). The result's train/eval mode is the
    source's."""
    model = from_state_dict(fs2_model.state_dict(), config if config is not None else config_of_module(fs2_model))
    return model.train(fs2_model.training)


def to_fairseq2_config(model: SpeechEncoder) -> Any:
    """fairseq2's own config dataclass for a model (needs fairseq2)."""
    from fairseq2.models.transformer import TransformerNormOrder
    from fairseq2.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2EncoderConfig
    from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrConfig

    fields = fairseq2_config(model)
    encoder = dict(fields.pop("encoder_config"))
    encoder["norm_order"] = TransformerNormOrder[encoder["norm_order"]]
    encoder["feature_extractor_layer_descs"] = [tuple(d) for d in encoder["feature_extractor_layer_descs"]]
    if "codebook_sampling_temperature" in fields:
        fields["codebook_sampling_temperature"] = tuple(fields["codebook_sampling_temperature"])
    kind = Wav2Vec2AsrConfig if isinstance(model, CTCModel) else Wav2Vec2Config
    return kind(encoder_config=Wav2Vec2EncoderConfig(**encoder), **fields)


def to_fairseq2(model: SpeechEncoder) -> nn.Module:
    """Export to a fairseq2 ``Wav2Vec2Model``, or ``Wav2Vec2AsrModel`` for a :class:`CTCModel`
    (needs fairseq2). The result is in eval mode."""
    from fairseq2.models.wav2vec2 import create_wav2vec2_model
    from fairseq2.models.wav2vec2.asr import create_wav2vec2_asr_model

    asr = isinstance(model, CTCModel)
    config = to_fairseq2_config(model)
    fs2_model = create_wav2vec2_asr_model(config) if asr else create_wav2vec2_model(config)
    fs2_model.load_state_dict(export_state(model.state_dict(), model.config, asr), strict=True)
    return fs2_model.eval()


# ---------------------------------------------------------------------------------------- files


def infer_config(state: dict[str, Tensor]) -> dict[str, Any]:
    """A fairseq2 config read from a state dict's names and shapes. The weights do not tell the
    attention heads of a Transformer (taken as ``model_dim // 64``, fairseq2's BASE and LARGE) or
    the extractor's strides (those of wav2vec 2.0 for its kernels ``10 3 3 3 3 2 2``); pass a
    config to :func:`load_fairseq2_checkpoint` for anything else. Training settings are fairseq2's
    defaults."""
    asr = "final_target_proj.weight" not in state
    fx = "encoder_frontend.feature_extractor.layers."
    kernels = [state[f"{fx}{i}.conv.weight"] for i in range(len(state)) if f"{fx}{i}.conv.weight" in state]
    standard = {10: 5, 3: 2, 2: 2}
    if [k.shape[-1] for k in kernels] != [10, 3, 3, 3, 3, 2, 2]:
        raise ValueError(f"extractor kernels {[k.shape[-1] for k in kernels]} are not wav2vec 2.0's; the strides "
                         "cannot be read from the weights: pass the fairseq2 config")
    conformer = any(".ffn1." in k for k in state)
    dim = state["encoder_frontend.model_dim_proj.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    ffn = state["encoder.layers.0.ffn1.inner_proj.weight" if conformer else "encoder.layers.0.ffn.inner_proj.weight"]
    u_bias = state.get("encoder.layers.0.self_attn.sdpa.u_bias")
    pos = state.get("encoder_frontend.pos_encoder.conv.weight_v")
    encoder = {
        "model_dim": dim, "feature_dim": kernels[-1].shape[0],
        "layer_norm_features": "encoder_frontend.layer_norm.weight" in state,
        "feature_extractor_layer_descs": [[k.shape[0], k.shape[-1], standard[k.shape[-1]]] for k in kernels],
        "feature_extractor_bias": f"{fx}0.conv.bias" in state,
        "feature_extractor_layer_norm_convs": f"{fx}0.layer_norm.weight" in state,
        "pos_encoder_type": "conv" if pos is not None else ("relative" if u_bias is not None else "none"),
        "use_conformer": conformer, "num_encoder_layers": layers,
        "num_encoder_attn_heads": u_bias.shape[0] if u_bias is not None else max(dim // 64, 1),
        "ffn_inner_dim": ffn.shape[0], "norm_order": "PRE" if "encoder.layer_norm.weight" in state else "POST",
    }
    if pos is not None:
        encoder.update(pos_conv_kernel_size=pos.shape[-1], num_pos_conv_groups=dim // pos.shape[1])
    if conformer:
        encoder["depthwise_conv_kernel_size"] = state["encoder.layers.0.conv.depthwise_conv.weight"].shape[-1]
    if asr:
        return {"encoder_config": encoder, "target_vocab_size": state["final_proj.weight"].shape[0]}
    entries = state["quantizer.entries"]
    quantized = state["final_target_proj.weight"].shape[1]
    groups = quantized // entries.shape[-1]
    return {"encoder_config": encoder, "final_dim": state["final_proj.weight"].shape[0], "quantized_dim": quantized,
            "num_codebooks": groups, "num_codebook_entries": entries.shape[1] // groups}


def is_fairseq2_checkpoint(blob: Any) -> bool:
    """A loaded file holds a fairseq2 wav2vec 2.0 state dict (under ``model``, or as it is)."""
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    return isinstance(state, dict) and any(str(k).startswith("encoder_frontend.") for k in state)


def _state_of(blob: Any, path: Path) -> dict[str, Tensor]:
    if not is_fairseq2_checkpoint(blob):
        raise ValueError(f"{path} holds no fairseq2 wav2vec 2.0 model (no encoder_frontend.* weights)")
    state = blob.get("model", blob)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_fairseq2_checkpoint(path: str | os.PathLike, config: Any = None) -> Wav2Vec2Model | CTCModel:
    """Our model of a fairseq2 checkpoint file (a state dict, or a dict with it under ``model``, as
    fairseq2's ``load_custom_model`` reads), without fairseq2 and without running pickled code.
    The config is read from the weights (:func:`infer_config`); ``config`` (a fairseq2 config,
    dataclass or dict, or a YAML file of one) overrides any of its fields, e.g.
    ``{"encoder_config": {"num_encoder_attn_heads": 8}}``. None reads the ``.yaml`` beside the file
    that :func:`save_fairseq2_checkpoint` writes, if there is one (with a CTC model's vocabulary).
    An ASR model without one has no vocabulary (``.tokenizer`` None; blank 0). In eval mode."""
    path = Path(path)
    state = _state_of(load_untrusted(path), path)
    if config is None and path.with_suffix(".yaml").is_file():
        config = path.with_suffix(".yaml")
    extra: dict = {}
    if isinstance(config, (str, os.PathLike)):
        config = yaml.safe_load(Path(config).read_text())
        if isinstance(config, dict) and "config" in config:
            extra, config = config.get("speechssl") or {}, config["config"]
    try:
        inferred = infer_config(state)
    except ValueError:
        if config is None:
            raise
        model = from_state_dict(state, config)
    else:
        given = _plain(config) if config is not None else {}
        encoder = {**inferred.pop("encoder_config"), **given.pop("encoder_config", {})}
        model = from_state_dict(state, {**inferred, **given, "encoder_config": encoder})
    if isinstance(model, CTCModel) and extra:
        model.tokenizer, model.vocab = extra.get("tokenizer"), extra.get("vocab")
        model.normalize_audio = bool(extra.get("normalize_audio", False))
    return model


def save_fairseq2_checkpoint(model: SpeechEncoder, path: str | os.PathLike) -> Path:
    """Write ``{"model": fairseq2 state dict}`` to ``path`` (fairseq2's ``load_custom_model(path,
    config)`` reads it) and the config beside it as ``.yaml``: ``family``, ``config`` (the fields
    of :func:`fairseq2_config`) and, for a CTC model, ``speechssl`` (its vocabulary, tokenizer and
    audio normalisation, which :func:`load_fairseq2_checkpoint` restores). Returns the path."""
    path = Path(path)
    asr = isinstance(model, CTCModel)
    fields = fairseq2_config(model)
    state = export_state({k: v.detach().clone() for k, v in model.state_dict().items()}, model.config, asr)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    sidecar: dict[str, Any] = {"family": ASR if asr else PRETRAINING, "config": fields}
    if asr:  # what fairseq2 keeps elsewhere (its tokenizer asset), for speechssl to read back
        sidecar["speechssl"] = {"tokenizer": model.tokenizer, "vocab": model.vocab,
                                "normalize_audio": bool(model.normalize_audio)}
    path.with_suffix(".yaml").write_text(yaml.safe_dump(sidecar, sort_keys=False, allow_unicode=True))
    return path
