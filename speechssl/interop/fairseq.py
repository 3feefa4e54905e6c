"""fairseq wav2vec 2.0 checkpoints <-> speechssl, without fairseq.

A fairseq checkpoint is a ``torch.save`` dict with ``model`` (the state dict) and the model's
configuration, either as ``cfg`` (hydra-era fairseq: ``cfg["model"]``, ``cfg["task"]``,
``cfg["criterion"]``) or as ``args`` (an ``argparse.Namespace``, as in ``wav2vec_small.pt``).
Pretraining checkpoints (``_name``/``arch`` ``wav2vec2``: ``wav2vec_small.pt``,
``wav2vec_vox_new.pt``, ``libri960_big.pt``...) become a :class:`Wav2Vec2Model`; fine-tuned CTC
checkpoints (``wav2vec_ctc``: ``wav2vec_small_960h.pt``...) a :class:`CTCModel`, whose architecture
is the ``w2v_args`` stored in them with fine-tuning's overrides. The architecture comes from the
checkpoint's own config, fairseq's defaults filling what an older file lacks. Files are read with
:func:`~speechssl.interop.untrusted.load_untrusted`: no pickled code runs.

fairseq keeps a fine-tuned model's letters in a separate ``dict.ltr.txt`` (fairseq's
``Dictionary``: ``<s> <pad> </s> <unk>`` first, then one ``symbol count`` line per letter, ``|``
the word boundary). Given (or found next to the checkpoint), it becomes the model's character
vocabulary, ``<s>`` the CTC blank as in fairseq's decoders; ``<pad>`` and ``</s>`` stay classes
the model was trained never to emit.
"""

from __future__ import annotations

import ast
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from speechssl.interop.huggingface import NEVER, UNK, WORD, with_char_vocabulary
from speechssl.interop.keys import rename
from speechssl.interop.untrusted import load_untrusted, plain
from speechssl.models.config import FeatureExtractorConfig, LossConfig, ModelConfig, QuantizerConfig
from speechssl.models.context.conformer import ConformerConfig
from speechssl.models.context.transformer import TransformerConfig
from speechssl.models.ctc import CTCModel
from speechssl.models.encoder import SpeechEncoder
from speechssl.models.masker import MaskingConfig
from speechssl.models.wav2vec2 import Wav2Vec2Model

# fairseq's Wav2Vec2Config defaults (fairseq/models/wav2vec/wav2vec2.py), for files that omit a field.
DEFAULTS: dict[str, Any] = {
    "extractor_mode": "default", "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12, "activation_fn": "gelu", "layer_type": "transformer", "dropout": 0.1,
    "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "dropout_input": 0.0,
    "dropout_features": 0.0, "final_dim": 0, "layer_norm_first": False,
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "conv_bias": False, "logit_temp": 0.1, "quantize_targets": False, "quantize_input": False,
    "same_quantizer": False, "target_glu": False, "feature_grad_mult": 1.0, "quantizer_depth": 1,
    "quantizer_factor": 3, "latent_vars": 320, "latent_groups": 2, "latent_dim": 0, "mask_length": 10,
    "mask_prob": 0.65, "mask_selection": "static", "mask_other": 0.0, "no_mask_overlap": False,
    "mask_min_space": 1, "require_same_masks": True, "mask_dropout": 0.0, "mask_channel_length": 10,
    "mask_channel_prob": 0.0, "mask_channel_selection": "static", "num_negatives": 100,
    "negatives_from_everywhere": False, "cross_sample_negatives": 0, "codebook_negatives": 0,
    "conv_pos": 128, "conv_pos_groups": 16, "pos_conv_depth": 1, "latent_temp": (2.0, 0.5, 0.999995),
    "max_positions": 100000, "depthwise_conv_kernel_size": 31, "attn_type": "", "pos_enc_type": "abs",
}
# What a fine-tuning config overrides in the pretrained model's (fairseq's Wav2VecEncoder).
CTC_OVERRIDES = {"dropout": "dropout", "activation_dropout": "activation_dropout", "dropout_input": "dropout_input",
                 "attention_dropout": "attention_dropout", "mask_length": "mask_length", "mask_prob": "mask_prob",
                 "require_same_masks": "require_same_masks", "mask_selection": "mask_selection",
                 "mask_other": "mask_other", "no_mask_overlap": "no_mask_overlap",
                 "mask_channel_length": "mask_channel_length", "mask_channel_prob": "mask_channel_prob",
                 "layerdrop": "encoder_layerdrop", "feature_grad_mult": "feature_grad_mult"}
POSITIONS = {"abs": "none", "rel_pos": "relative", "rope": "rotary"}
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # fairseq Dictionary's first four symbols
CTC_PREFIX = "w2v_encoder.w2v_model."


# ---------------------------------------------------------------------------------------- configs


def _literal(text: str, key: str) -> Any:
    """A fairseq list expression such as ``[(512, 10, 5)] + [(512, 3, 2)] * 4``: literals joined by
    ``+`` and ``*``, evaluated without ``eval``."""
    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"fairseq {key}: {text!r} is not a list of literals joined by + and *")

    return value(ast.parse(text, mode="eval").body)


def _get(m: dict, key: str) -> Any:
    value = m.get(key)
    return DEFAULTS[key] if value is None else value


def config_from_fairseq(model_cfg: dict, loss_weights: list[float] | None = None) -> ModelConfig:
    """A :class:`ModelConfig` from a fairseq ``wav2vec2`` model config (``cfg["model"]`` or the
    ``args`` of an older file, as a dict). ``loss_weights``: the criterion's ``[diversity,
    feature penalty]`` weights (wav2vec 2.0's recipe, ``[0.1, 10]``, when None). What would change the
    network and has no counterpart here is refused with the reason; training-only settings that
    speechssl lacks are warned about."""
    m = model_cfg
    name = m.get("_name") or m.get("arch") or "wav2vec2"
    if not str(name).startswith("wav2vec2"):
        raise ValueError(f"not a fairseq wav2vec 2.0 model config ({name!r}); expected wav2vec2 or wav2vec_ctc")
    for key, want in (("quantize_input", False), ("target_glu", False), ("negatives_from_everywhere", False),
                      ("codebook_negatives", 0), ("pos_conv_depth", 1)):
        if _get(m, key) != want:
            raise ValueError(f"fairseq {key}={_get(m, key)!r} is not supported (only {want!r})")
    if not _get(m, "quantize_targets"):
        raise ValueError("fairseq quantize_targets=False (targets from a linear projection) is not supported: "
                         "speechssl's targets are always quantized")
    for key, want in (("mask_selection", "static"), ("mask_other", 0.0), ("mask_channel_selection", "static")):
        if _get(m, key) != want:
            warnings.warn(f"fairseq {key}={_get(m, key)!r}: speechssl masks with {key}={want!r} if this model "
                          f"trains further", stacklevel=2)
    layer_type = _get(m, "layer_type")
    conv_layers = _get(m, "conv_feature_layers")
    conv_layers = _literal(conv_layers, "conv_feature_layers") if isinstance(conv_layers, str) else conv_layers
    mode = {"default": "group_norm", "layer_norm": "layer_norm"}.get(_get(m, "extractor_mode"))
    if mode is None:
        raise ValueError(f"fairseq extractor_mode={_get(m, 'extractor_mode')!r} (default or layer_norm)")
    common = dict(embed_dim=_get(m, "encoder_embed_dim"), num_layers=_get(m, "encoder_layers"),
                  num_heads=_get(m, "encoder_attention_heads"), ffn_dim=_get(m, "encoder_ffn_embed_dim"),
                  dropout=_get(m, "dropout"), attention_dropout=_get(m, "attention_dropout"),
                  activation_dropout=_get(m, "activation_dropout"), layer_drop=_get(m, "encoder_layerdrop"))
    if layer_type == "transformer":
        if _get(m, "activation_fn") != "gelu":
            raise ValueError(f"fairseq activation_fn={_get(m, 'activation_fn')!r}: the Transformer supports gelu")
        context: Any = TransformerConfig(**common, layer_norm_first=bool(_get(m, "layer_norm_first")),
                                         pos_conv_kernel=_get(m, "conv_pos"),
                                         pos_conv_groups=_get(m, "conv_pos_groups"))
    elif layer_type == "conformer":
        position = POSITIONS.get(_get(m, "pos_enc_type"))
        if position is None:
            raise ValueError(f"fairseq pos_enc_type={_get(m, 'pos_enc_type')!r} (abs, rel_pos or rope)")
        if position == "relative" and _get(m, "attn_type") != "espnet":
            raise ValueError("fairseq's rel_pos Conformer needs attn_type='espnet'")
        # fairseq's Conformer blocks always use swish; its ConformerEncoder ignores the positional conv.
        context = ConformerConfig(**common, depthwise_conv_kernel=_get(m, "depthwise_conv_kernel_size"),
                                  activation="swish", position_embeddings=position, pos_conv_kernel=0,
                                  layer_norm_first=bool(_get(m, "layer_norm_first")), mask_padding_in_conv=False)
    else:
        raise ValueError(f"fairseq layer_type={layer_type!r} is not supported (transformer or conformer)")
    temp = _get(m, "latent_temp")
    temp = _literal(temp, "latent_temp") if isinstance(temp, str) else temp
    weights = [0.1, 10.0] if loss_weights is None else list(loss_weights) + [0.0] * (2 - len(loss_weights))
    final_dim = _get(m, "final_dim") or _get(m, "encoder_embed_dim")
    return ModelConfig(
        extractor=FeatureExtractorConfig(mode=mode, conv_layers=[list(map(int, c)) for c in conv_layers],
                                         conv_bias=bool(_get(m, "conv_bias"))),
        context=context,
        quantizer=QuantizerConfig(num_groups=_get(m, "latent_groups"), num_vars=_get(m, "latent_vars"),
                                  codevector_dim=_get(m, "latent_dim"), weight_proj_depth=_get(m, "quantizer_depth"),
                                  weight_proj_factor=_get(m, "quantizer_factor"),
                                  temp_start=float(temp[0]), temp_end=float(temp[1]), temp_decay=float(temp[2])),
        masking=MaskingConfig(mask_prob=_get(m, "mask_prob"), mask_length=_get(m, "mask_length"), min_masks=2,
                              require_same_masks=bool(_get(m, "require_same_masks")),
                              mask_dropout=_get(m, "mask_dropout"), no_overlap=bool(_get(m, "no_mask_overlap")),
                              min_space=_get(m, "mask_min_space"), channel_prob=_get(m, "mask_channel_prob"),
                              channel_length=_get(m, "mask_channel_length")),
        loss=LossConfig(num_negatives=_get(m, "num_negatives"),
                        cross_sample_negatives=_get(m, "cross_sample_negatives"),
                        logit_temp=_get(m, "logit_temp"), diversity_weight=float(weights[0]),
                        feature_penalty_weight=float(weights[1])),
        feature_grad_mult=_get(m, "feature_grad_mult"), dropout_input=_get(m, "dropout_input"),
        dropout_features=_get(m, "dropout_features"), final_dim=final_dim)


def fairseq_model_config(config: ModelConfig) -> dict[str, Any]:
    """The fairseq ``wav2vec2`` model config (``cfg["model"]``) of a speechssl config; ValueError
    for a model fairseq cannot hold."""
    if config.extractor.type != "conv":
        raise ValueError(f"fairseq's wav2vec 2.0 has no {config.extractor.type!r} extractor; only 'conv' exports")
    ctx = config.context
    out: dict[str, Any] = {
        "_name": "wav2vec2",
        "extractor_mode": {"group_norm": "default", "layer_norm": "layer_norm"}[config.extractor.mode],
        "conv_feature_layers": str([tuple(c) for c in config.extractor.conv_layers]),
        "conv_bias": config.extractor.conv_bias, "encoder_layers": ctx.num_layers, "encoder_embed_dim": ctx.embed_dim,
        "encoder_ffn_embed_dim": ctx.ffn_dim, "encoder_attention_heads": ctx.num_heads, "dropout": ctx.dropout,
        "attention_dropout": ctx.attention_dropout, "activation_dropout": ctx.activation_dropout,
        "encoder_layerdrop": ctx.layer_drop, "dropout_input": config.dropout_input,
        "dropout_features": config.dropout_features, "final_dim": config.final_dim,
        "logit_temp": config.loss.logit_temp, "quantize_targets": True, "quantize_input": False,
        "feature_grad_mult": config.feature_grad_mult, "quantizer_depth": config.quantizer.weight_proj_depth,
        "quantizer_factor": config.quantizer.weight_proj_factor, "latent_vars": config.quantizer.num_vars,
        "latent_groups": config.quantizer.num_groups, "latent_dim": config.quantizer.codevector_dim,
        "latent_temp": [config.quantizer.temp_start, config.quantizer.temp_end, config.quantizer.temp_decay],
        "mask_length": config.masking.mask_length, "mask_prob": config.masking.mask_prob,
        "require_same_masks": config.masking.require_same_masks, "mask_dropout": config.masking.mask_dropout,
        "no_mask_overlap": config.masking.no_overlap, "mask_min_space": config.masking.min_space,
        "mask_channel_prob": config.masking.channel_prob, "mask_channel_length": config.masking.channel_length,
        "num_negatives": config.loss.num_negatives, "cross_sample_negatives": config.loss.cross_sample_negatives,
        "pos_conv_depth": 1, "layer_norm_first": ctx.layer_norm_first,
    }
    if isinstance(ctx, TransformerConfig):
        out.update(layer_type="transformer", activation_fn="gelu", conv_pos=ctx.pos_conv_kernel,
                   conv_pos_groups=ctx.pos_conv_groups)
    elif isinstance(ctx, ConformerConfig):
        reasons = [why for bad, why in (
            (ctx.pos_conv_kernel > 0, "a positional conv (fairseq's Conformer has none)"),
            (ctx.activation != "swish", f"activation {ctx.activation!r} (fairseq's Conformer uses swish)"),
            (ctx.att_context_size != [-1, -1], f"local attention {ctx.att_context_size}"),
            (ctx.layer_norm_eps != 1e-5, f"layer_norm_eps {ctx.layer_norm_eps}")) if bad]
        if reasons:
            raise ValueError(f"fairseq's Conformer cannot hold this model: {'; '.join(reasons)}")
        position = {v: k for k, v in POSITIONS.items()}[ctx.position_embeddings]
        out.update(layer_type="conformer", activation_fn="swish", depthwise_conv_kernel_size=ctx.depthwise_conv_kernel,
                   pos_enc_type=position, attn_type="espnet", conv_pos=128, conv_pos_groups=16)
    else:
        raise ValueError(f"fairseq's wav2vec 2.0 has no {ctx.type!r} context network")
    return out


# ---------------------------------------------------------------------------------------- weights

_ATTN = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_QKV = re.compile(r"context\.layers\.(\d+)\.attention\.qkv\.(weight|bias)")
_POINTWISE = re.compile(r"context\.layers\.\d+\.conv_module\.pointwise_conv[12]\.weight")


def _pairs(config: ModelConfig) -> list[tuple[str, str]]:
    """(fairseq key prefix, speechssl key prefix) for the model's layout; ``{i}`` is a number. The
    first pair that matches wins, in both directions."""
    norm = (("feature_extractor.conv_layers.{i}.2.1.", "feature_extractor.blocks.{i}.norm.")
            if config.extractor.mode == "layer_norm" else
            ("feature_extractor.conv_layers.0.2.", "feature_extractor.blocks.0.norm."))
    pairs = [
        ("feature_extractor.conv_layers.{i}.0.", "feature_extractor.blocks.{i}.conv."),
        norm,
        ("layer_norm.", "frontend.layer_norm."),
        ("post_extract_proj.", "frontend.projection."),
        ("mask_emb", "frontend.masker.mask_emb"),
        ("encoder.pos_conv.0.weight_g", "context.pos_conv.conv.parametrizations.weight.original0"),
        ("encoder.pos_conv.0.weight_v", "context.pos_conv.conv.parametrizations.weight.original1"),
        ("encoder.pos_conv.0.bias", "context.pos_conv.conv.bias"),
        ("encoder.layer_norm.", "context.layer_norm."),
        ("quantizer.vars", "quantizer.codevectors"),
        ("project_q.", "project_q."),
        ("final_proj.", "final_proj."),
    ]
    depth = config.quantizer.weight_proj_depth
    if depth == 1:
        pairs.append(("quantizer.weight_proj.", "quantizer.weight_proj.0."))
    else:  # fairseq: (Linear, GELU) blocks, then a Linear; ours: one flat Sequential
        pairs += [(f"quantizer.weight_proj.{j}.0.", f"quantizer.weight_proj.{2 * j}.") for j in range(depth - 1)]
        pairs.append((f"quantizer.weight_proj.{depth - 1}.", f"quantizer.weight_proj.{2 * (depth - 1)}."))
    if isinstance(config.context, ConformerConfig):
        for ffn in ("ffn1", "ffn2"):
            pairs += [(f"encoder.layers.{{i}}.{ffn}.layer_norm.", f"context.layers.{{i}}.{ffn}_layer_norm."),
                      (f"encoder.layers.{{i}}.{ffn}.w_1.", f"context.layers.{{i}}.{ffn}.fc1."),
                      (f"encoder.layers.{{i}}.{ffn}.w_2.", f"context.layers.{{i}}.{ffn}.fc2.")]
        pairs.append(("encoder.layers.{i}.", "context.layers.{i}."))  # every other name is the same
    else:
        pairs += [("encoder.layers.{i}.self_attn.out_proj.", "context.layers.{i}.attention.out_proj."),
                  ("encoder.layers.{i}.self_attn_layer_norm.", "context.layers.{i}.layer_norm."),
                  ("encoder.layers.{i}.fc1.", "context.layers.{i}.feed_forward.fc1."),
                  ("encoder.layers.{i}.fc2.", "context.layers.{i}.feed_forward.fc2."),
                  ("encoder.layers.{i}.final_layer_norm.", "context.layers.{i}.final_layer_norm.")]
    return pairs


def import_state(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """speechssl's state dict from a fairseq wav2vec 2.0 one (without the ``w2v_encoder.`` prefix)."""
    conformer = isinstance(config.context, ConformerConfig)
    pairs = _pairs(config)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if (conformer and key.startswith("encoder.pos_conv.")) or key.endswith("rotary_emb.inv_freq"):
            continue  # unused by fairseq's Conformer / recomputed from the config
        if m := _ATTN.fullmatch(key):
            if not conformer:
                qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
                continue
            key = f"encoder.layers.{m.group(1)}.self_attn.linear_{m.group(2)}.{m.group(3)}"
        if conformer:  # a Conformer with fairseq's own attention (attn_type ''): ESPnet names here
            key = key.replace(".self_attn.out_proj.", ".self_attn.linear_out.")
        new = rename(key, pairs)
        if new is None:
            raise ValueError(f"unexpected fairseq parameter {key!r}")
        if new == "quantizer.codevectors":
            value = value.reshape(config.quantizer.num_groups, config.quantizer.num_vars, -1)
        elif _POINTWISE.fullmatch(new):
            value = value.squeeze(-1)
        out[new] = value
    for (layer, kind), parts in qkv.items():
        out[f"context.layers.{layer}.attention.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def export_state(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """fairseq's state dict of a speechssl one (the inverse of :func:`import_state`)."""
    pairs = _pairs(config)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
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
            raise ValueError(f"no fairseq name for parameter {key!r}")
        out[new] = value
    if isinstance(config.context, ConformerConfig):  # fairseq builds a positional conv in its Conformer, unused
        dim = config.context.embed_dim
        out["encoder.pos_conv.0.bias"] = torch.zeros(dim)
        out["encoder.pos_conv.0.weight_g"] = torch.ones(1, 1, 128)
        out["encoder.pos_conv.0.weight_v"] = torch.zeros(dim, dim // 16, 128)
    return out


# ---------------------------------------------------------------------------------------- files


def read_dictionary(path: str | os.PathLike) -> list[str]:
    """The symbols of a fairseq ``Dictionary`` file (``dict.ltr.txt``: ``symbol count`` lines, an
    optional ``#fairseq:overwrite`` flag after the count), after the four a ``Dictionary`` always
    starts with: ``<s> <pad> </s> <unk> ...``."""
    symbols = list(SPECIALS)
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.rstrip()
        if not line:
            continue
        overwrite = line.endswith(" #fairseq:overwrite")
        symbol, _, count = line.removesuffix(" #fairseq:overwrite").rpartition(" ")
        if not symbol or not count.lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected 'symbol count', got {line!r}")
        if symbol in symbols and not overwrite:
            raise ValueError(f"{path}:{n}: symbol {symbol!r} appears twice (fairseq needs #fairseq:overwrite)")
        if symbol not in symbols:
            symbols.append(symbol)
    return symbols


def _sections(checkpoint: dict) -> tuple[dict, dict, dict]:
    """``(model config, task config, criterion config)`` of a checkpoint, ``cfg`` or ``args`` style."""
    cfg = checkpoint.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg["model"], cfg.get("task") or {}, cfg.get("criterion") or {}
    args = checkpoint.get("args")
    if isinstance(args, dict):
        return args, args, args
    raise ValueError("not a fairseq checkpoint: it has neither cfg['model'] nor args")


def _pretraining_config(ctc_cfg: dict) -> tuple[dict, dict]:
    """The pretrained model's config (with fine-tuning's overrides) and task of a ``wav2vec_ctc`` config."""
    w2v = ctc_cfg.get("w2v_args")
    if not isinstance(w2v, dict):
        raise ValueError("this fine-tuned fairseq checkpoint has no w2v_args (the pretrained model's config); "
                         "fairseq reads it from w2v_path, which speechssl does not open")
    model, task = (w2v["model"], w2v.get("task") or {}) if isinstance(w2v.get("model"), dict) else (w2v, w2v)
    model = dict(model)
    for ours, theirs in CTC_OVERRIDES.items():
        if ctc_cfg.get(ours) is not None:
            model[theirs] = ctc_cfg[ours]
    return model, task


def read_fairseq_checkpoint(path: str | os.PathLike) -> dict:
    """A fairseq checkpoint as plain data: the dict of :func:`load_untrusted` with ``args`` and
    ``cfg`` made plain (:func:`~speechssl.interop.untrusted.plain`)."""
    checkpoint = load_untrusted(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path} is not a fairseq checkpoint (a dict with 'model' and 'cfg' or 'args')")
    for key in ("cfg", "args"):
        checkpoint[key] = plain(checkpoint.get(key))
    return checkpoint


def is_fairseq_checkpoint(blob: Any) -> bool:
    """A loaded file holds a fairseq checkpoint: a state dict under ``model`` and ``cfg`` or ``args``."""
    return isinstance(blob, dict) and isinstance(blob.get("model"), dict) and ("cfg" in blob or "args" in blob)


def from_fairseq(source: str | os.PathLike | dict, dictionary: str | os.PathLike | None = None
                 ) -> Wav2Vec2Model | CTCModel:
    """Import a fairseq wav2vec 2.0 checkpoint (a path, or the dict of
    :func:`read_fairseq_checkpoint`): a pretraining one as a :class:`Wav2Vec2Model`, a fine-tuned
    CTC one as a :class:`CTCModel`. ``dictionary``: the fine-tuned model's ``dict.ltr.txt``; None
    looks for ``dict.ltr.txt`` next to the checkpoint, and a model without one has no vocabulary
    (``.tokenizer`` None, blank 0). The result is in eval mode."""
    checkpoint = source if isinstance(source, dict) else read_fairseq_checkpoint(source)
    model_cfg, task_cfg, criterion = _sections(checkpoint)
    state = checkpoint["model"]
    name = model_cfg.get("_name") or model_cfg.get("arch")
    if name == "wav2vec_ctc" or "w2v_encoder.proj.weight" in state:
        arch, pre_task = _pretraining_config(model_cfg)
        config = config_from_fairseq(arch)
        proj = state["w2v_encoder.proj.weight"]
        normalize = bool(task_cfg.get("normalize", pre_task.get("normalize", False)))
        model: SpeechEncoder = CTCModel(config, proj.shape[0], blank=0,
                                        final_dropout=float(model_cfg.get("final_dropout") or 0.0),
                                        normalize_audio=normalize)
        inner = {k[len(CTC_PREFIX):]: v for k, v in state.items() if k.startswith(CTC_PREFIX)}
        # fairseq drops the pretraining parts when fine-tuning starts; files older than that keep them, unused
        ours = {k: v for k, v in import_state(inner, config).items()
                if not k.startswith(("quantizer.", "project_q.", "final_proj."))}
        ours["lm_head.weight"], ours["lm_head.bias"] = proj, state["w2v_encoder.proj.bias"]
        others = [k for k in state if not k.startswith((CTC_PREFIX, "w2v_encoder.proj."))]
        if others:
            raise ValueError(f"unexpected fairseq parameters {others}")
        missing, unexpected = model.load_state_dict(ours, strict=False)
        fresh = ("frontend.masker.mask_emb",)
    else:
        config = config_from_fairseq(model_cfg, criterion.get("loss_weights"))
        model = Wav2Vec2Model(config)
        missing, unexpected = model.load_state_dict(import_state(state, config), strict=False)
        fresh = ()
    missing = [k for k in missing if not k.startswith(fresh)]
    if missing or unexpected:
        raise ValueError(f"fairseq import mismatch: missing {missing}, unexpected {unexpected}")
    if isinstance(model, CTCModel):
        if dictionary is None and not isinstance(source, dict):
            found = Path(source).with_name("dict.ltr.txt")
            dictionary = found if found.is_file() else None
        if dictionary is not None:
            symbols = read_dictionary(dictionary)
            if len(symbols) != model.vocab_size:
                raise ValueError(f"{dictionary}: {len(symbols)} symbols (with <s> <pad> </s> <unk>) for a CTC head "
                                 f"of {model.vocab_size} classes")
            delimiter = symbols.index(WORD) if WORD in symbols else None
            model = with_char_vocabulary(model, symbols, blank=0, unk=3, delimiter=delimiter)
    return model.eval()


def to_fairseq(model: SpeechEncoder) -> dict:
    """A fairseq checkpoint dict of a model (``torch.save`` it, or use :func:`save_fairseq`):
    ``cfg`` with ``model``/``task``/``criterion`` sections as hydra-era fairseq writes them, and
    ``model``, the state dict in fairseq's names. A CTC model becomes ``wav2vec_ctc`` (its
    architecture in ``w2v_args``; no pretraining parts, as fairseq removes them when fine-tuning)."""
    arch = fairseq_model_config(model.config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if isinstance(model, CTCModel):
        head = {k: state.pop(k) for k in ("lm_head.weight", "lm_head.bias")}
        state = {k: v for k, v in state.items() if not k.startswith(("quantizer.", "project_q.", "final_proj."))}
        fs_state = {CTC_PREFIX + k: v for k, v in export_state(state, model.config).items()}
        fs_state["w2v_encoder.proj.weight"] = head["lm_head.weight"]
        fs_state["w2v_encoder.proj.bias"] = head["lm_head.bias"]
        task = {"_name": "audio_finetuning", "normalize": bool(model.normalize_audio), "labels": "ltr"}
        ctc = {"_name": "wav2vec_ctc", "final_dropout": model.final_dropout.p,
               "w2v_args": {"model": arch, "task": {"_name": "audio_pretraining", "normalize": task["normalize"]}}}
        cfg = {"model": ctc, "task": task, "criterion": {"_name": "ctc", "zero_infinity": True}}
    else:
        fs_state = export_state(state, model.config)
        cfg = {"model": arch, "task": {"_name": "audio_pretraining", "normalize": False},
               "criterion": {"_name": "wav2vec", "infonce": True,
                             "log_keys": ["prob_perplexity", "code_perplexity", "temp"],
                             "loss_weights": [model.config.loss.diversity_weight,
                                              model.config.loss.feature_penalty_weight]}}
    return {"args": None, "cfg": cfg, "model": fs_state, "optimizer_history": [], "extra_state": {},
            "last_optimizer_state": None}


def fairseq_dictionary(model: CTCModel) -> tuple[list[str], list[int]]:
    """The fairseq symbols of a character CTC model's classes, ``<s> <pad> </s> <unk>`` first, and for
    each of them the row of our ``lm_head`` it takes (-1: a class the model never predicts)."""
    from speechssl.interop.huggingface import _char_vocab_of

    vocab = _char_vocab_of(model)  # <blank> <unk> | chars...
    if any(t in SPECIALS for t in vocab[3:]):
        raise ValueError(f"the vocabulary uses a name fairseq reserves: {[t for t in vocab[3:] if t in SPECIALS]}")
    symbols = [*SPECIALS, WORD, *vocab[3:]]
    rows = [0, -1, -1, vocab.index(UNK), 2, *range(3, len(vocab))]
    return symbols, rows


def save_fairseq(model: SpeechEncoder, path: str | os.PathLike) -> Path:
    """Write a fairseq checkpoint file (:func:`to_fairseq`). For a CTC model with a character
    vocabulary, its classes are laid out as fairseq's ``Dictionary`` has them and ``dict.ltr.txt``
    is written beside the file (``<pad>`` and ``</s>`` are added as classes never predicted); a
    CTC model without one (or with a BPE vocabulary) is written without a dictionary. Returns the path."""
    path = Path(path)
    checkpoint = to_fairseq(model)
    symbols = None
    if isinstance(model, CTCModel) and model.tokenizer is not None and model.tokenizer.get("type") == "char":
        symbols, rows = fairseq_dictionary(model)
        weight, bias = checkpoint["model"]["w2v_encoder.proj.weight"], checkpoint["model"]["w2v_encoder.proj.bias"]
        new_weight = weight.new_zeros(len(rows), weight.shape[1])
        new_bias = bias.new_full((len(rows),), NEVER)
        for i, row in enumerate(rows):
            if row >= 0:
                new_weight[i], new_bias[i] = weight[row], bias[row]
        checkpoint["model"]["w2v_encoder.proj.weight"] = new_weight
        checkpoint["model"]["w2v_encoder.proj.bias"] = new_bias
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    if symbols is not None:
        path.with_name("dict.ltr.txt").write_text("".join(f"{s} 1\n" for s in symbols[4:]), encoding="utf-8")
    return path
