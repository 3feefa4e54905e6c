from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pretrain.config import PretrainConfig
from pretrain.overfit import OverfitConfig
from speechssl.config import ConfigError, build
from speechssl.models.config import ModelConfig, load_model_config
from speechssl.models.context.transformer import TransformerConfig
from speechssl.models.wav2vec2 import Wav2Vec2Model
from speechssl.training.config import deepspeed_config
from tests.conftest import REPO

MODELS = REPO / "configs/model"


def test_base_config_is_fairseq_base() -> None:
    cfg = load_model_config(str(MODELS / "base_transformer.yaml"))
    ctx = cfg.context
    assert isinstance(ctx, TransformerConfig)
    assert (ctx.num_layers, ctx.embed_dim, ctx.ffn_dim, ctx.num_heads) == (12, 768, 3072, 12)
    assert cfg.extractor.mode == "group_norm" and not cfg.extractor.conv_bias
    assert not ctx.layer_norm_first and cfg.final_dim == 256
    assert cfg.extractor.conv_layers == [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
    assert (cfg.quantizer.num_groups, cfg.quantizer.num_vars) == (2, 320)
    params = sum(p.numel() for p in Wav2Vec2Model(cfg).parameters())
    assert 94e6 < params < 96e6  # fairseq's BASE has 95M


def test_large_config_is_fairseq_large_lv60k() -> None:
    cfg = load_model_config(str(MODELS / "large_transformer.yaml"))
    ctx = cfg.context
    assert (ctx.num_layers, ctx.embed_dim, ctx.ffn_dim, ctx.num_heads) == (24, 1024, 4096, 16)
    assert cfg.extractor.mode == "layer_norm" and cfg.extractor.conv_bias
    assert ctx.layer_norm_first and cfg.final_dim == 768


def test_stable_base_differs_from_base_in_layout_and_diversity_weight() -> None:
    stable = load_model_config(str(MODELS / "base_transformer_stable.yaml"))
    relaid = load_model_config(str(MODELS / "base_transformer.yaml"), [
        "extractor.mode=layer_norm", "extractor.conv_bias=true", "context.layer_norm_first=true",
        "loss.feature_penalty_weight=0.0", "feature_grad_mult=1.0", "loss.diversity_weight=0.5"])
    assert stable == relaid


def test_small_conformer_is_the_stable_layout_with_conformer_blocks() -> None:
    small = load_model_config(str(MODELS / "small_conformer_stable.yaml"))
    stable = load_model_config(str(MODELS / "base_transformer_stable.yaml"), ["loss.diversity_weight=1.0"])
    assert dataclasses.replace(small, context=stable.context) == stable
    assert (small.context.type, small.context.embed_dim, small.context.num_layers) == ("conformer", 384, 6)
    model = Wav2Vec2Model(small)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 25.5  # as its header says


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs/pretrain").glob("*.yaml")
                                         if not p.stem.startswith("overfit")))
def test_shipped_pretrain_configs_load(name: str) -> None:
    cfg = build(PretrainConfig, str(REPO / f"configs/pretrain/{name}.yaml"), [])
    assert cfg.trainer.max_updates > 0 and cfg.data.shards and cfg.valid_shards
    deepspeed_config(cfg.trainer, on_gpu=True)  # the optimizer and the DeepSpeed JSON agree


def test_deepspeeds_synchronising_throughput_timer_is_off_unless_the_file_sets_it(tmp_path: Path) -> None:
    cfg = build(PretrainConfig, str(REPO / "configs/pretrain/base_one_gpu.yaml"), [])
    assert deepspeed_config(cfg.trainer, on_gpu=True)["timers"] == {"throughput": {"enabled": False}}
    own = json.loads((REPO / cfg.trainer.deepspeed).read_text())
    own["timers"] = {"throughput": {"enabled": True, "synchronized": False}}
    (tmp_path / "ds.json").write_text(json.dumps(own))
    cfg.trainer.deepspeed = str(tmp_path / "ds.json")
    assert deepspeed_config(cfg.trainer, on_gpu=True)["timers"] == own["timers"]


def test_dotted_overrides_and_file_sections() -> None:
    cfg = build(OverfitConfig, str(REPO / "configs/pretrain/overfit_tiny.yaml"),
                ["model.context.num_layers=4", "steps=7", "model.masking.mask_prob=0.5"])
    assert cfg.model.context.num_layers == 4 and cfg.steps == 7 and cfg.model.masking.mask_prob == 0.5
    assert cfg.model.context.embed_dim == 96  # the rest comes from the included model file
    swapped = build(OverfitConfig, str(REPO / "configs/pretrain/overfit_tiny.yaml"),
                    ["model=configs/model/base_transformer.yaml", "model.context.num_layers=3"])
    assert swapped.model.context.embed_dim == 768 and swapped.model.context.num_layers == 3


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("model.context.num_layerz=4", "model.context.num_layerz", "unknown key"),
        ("model.bogus=1", "model.bogus", "unknown key"),
        ("stepz=1", "stepz", "unknown key"),
        ("model.context.num_layers=four", "model.context.num_layers", "four"),
        ("model.quantizer.temp_start=hot", "model.quantizer.temp_start", "hot"),
        ("model.extractor.mode=batch_norm", "model.extractor.mode", "group_norm"),
        ("model.context.num_heads=5", "model.context.num_heads", "divide"),
        ("model.context.type=lstm", "model.context.type", "unknown context network"),
        ("model.masking.mask_prob=1.5", "model.masking.mask_prob", "[0, 1]"),
        ("model.quantizer.codevector_dim=63", "model.quantizer.codevector_dim", "divisible"),
        ("model=configs/model/nope.yaml", "model", "not found"),
        ("model.context.type=[1]", "model.context.type", "unhashable"),
        ("model.quantizer.weight_proj_factor=0", "model.quantizer.weight_proj_factor", ">= 1"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(OverfitConfig, str(REPO / "configs/pretrain/overfit_tiny.yaml"), [override])
    message = str(err.value)
    assert message.startswith(f"{key}:"), message
    assert words in message, message


def test_context_type_defaults_to_transformer() -> None:
    cfg = build(OverfitConfig, {"model": {"context": {"num_layers": 3}}}, ["model.context.embed_dim=64",
                                                                         "model.context.num_heads=4"])
    assert isinstance(cfg.model.context, TransformerConfig) and cfg.model.context.num_layers == 3
    assert isinstance(ModelConfig(context="transformer").context, TransformerConfig)


def test_saved_config_round_trips(tiny_config: ModelConfig) -> None:
    from speechssl.config import to_dict

    again = load_model_config(to_dict(tiny_config))
    assert again == tiny_config


def test_model_config_built_in_python() -> None:
    cfg = ModelConfig(context={"type": "transformer", "num_layers": 2, "embed_dim": 64, "num_heads": 4,
                               "ffn_dim": 128, "pos_conv_groups": 4})
    assert isinstance(cfg.context, TransformerConfig) and cfg.context.num_layers == 2
    assert len(Wav2Vec2Model(cfg).context.layers) == 2
    with pytest.raises(ConfigError, match=r"model\.context"):
        ModelConfig(context={"type": "transformer", "num_layerz": 2})
    with pytest.raises(ConfigError, match=r"model\.context\.type: unknown context network"):
        ModelConfig(context={"type": "rnn"})
