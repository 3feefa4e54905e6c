from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speechssl import ModelConfig, Wav2Vec2Model, load_model_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return load_model_config(REPO / "configs/model/tiny_transformer.yaml")


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> Wav2Vec2Model:
    return Wav2Vec2Model(tiny_config)


@pytest.fixture
def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([16000, 12345, 8000])
    waves = torch.randn(3, 16000)
    waves[torch.arange(16000) >= lengths[:, None]] = 0.0
    return waves, lengths
