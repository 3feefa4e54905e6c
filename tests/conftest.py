from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from speechssl import ModelConfig, Wav2Vec2Model, load_model_config

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true",
                     help="also run the slow tier (multi-process jobs, end-to-end training, compilation): CI runs it")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a long test (minutes on 2 cores); runs with --slow, as in CI")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without --slow, the slow tier is deselected (reported in the summary), not skipped."""
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def deepspeed_launcher(ranks: int) -> list[str]:
    """``deepspeed --num_gpus RANKS --master_port FREE --module``: the launcher of this environment,
    on a free port; append the job's module and arguments."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not installed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(port), "--module"]


def interrupt_shard_writing(monkeypatch: pytest.MonkeyPatch, at_sample: int = 4) -> None:
    """make-shards raises KeyboardInterrupt as its ``at_sample``-th sample goes into a shard, as a
    Ctrl-C there would (``monkeypatch.undo()`` ends it)."""
    import data_tools.shards as shards

    original, calls = shards._ShardCutter.add, {"n": 0}

    def dying_add(self, sample):
        calls["n"] += 1
        if calls["n"] == at_sample:
            raise KeyboardInterrupt
        return original(self, sample)

    monkeypatch.setattr(shards._ShardCutter, "add", dying_add)


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


@torch.no_grad()
def randomize_batch_norm_statistics(model: torch.nn.Module) -> None:
    """Running means around 0 and variances in [0.5, 1.5]: BatchNorm statistics that matter, so a
    buffer mapped to the wrong place or dropped in an export cannot go unnoticed."""
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_(0.0, 0.1)
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 1.5)
