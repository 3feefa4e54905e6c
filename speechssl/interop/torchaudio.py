"""torchaudio ``Wav2Vec2Model`` <-> speechssl :class:`~speechssl.Wav2Vec2Model`.

torchaudio's model is the extractor, the frontend projection and the Transformer (plus an optional
``aux`` head); the pretraining parts (mask embedding, quantizer, projections) exist only here, so a
model imported from torchaudio gets freshly initialised ones and can go on pretraining.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from speechssl.interop.keys import rename
from speechssl.models.config import FeatureExtractorConfig, ModelConfig
from speechssl.models.context.transformer import TransformerConfig
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


def from_torchaudio(ta_model: nn.Module) -> Wav2Vec2Model:
    """Build a speechssl model with the architecture and weights of a torchaudio ``Wav2Vec2Model``
    (including the fairseq-trained checkpoints torchaudio's bundles load)."""
    model = Wav2Vec2Model(config_from_torchaudio(ta_model))
    state = _import_state_dict(ta_model.state_dict())
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


def to_torchaudio(model: Wav2Vec2Model) -> nn.Module:
    """A ``torchaudio.models.Wav2Vec2Model`` with this model's weights (extractor, projection,
    Transformer and aux head; the pretraining parts have no place there)."""
    import torchaudio

    ta_model = torchaudio.models.wav2vec2_model(**torchaudio_kwargs(model.config))
    ta_model.load_state_dict(_export_state_dict(model.state_dict()))
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
