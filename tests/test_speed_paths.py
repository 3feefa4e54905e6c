"""The faster paths of the model compute what the plain ones do: the positional convolution through
the FFT, and parts of the model compiled with ``trainer.compile``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from speechssl import ModelConfig, Wav2Vec2Model
from speechssl.models.context.transformer import ConvPositionalEmbedding
from speechssl.models.fft_conv import conv1d_fft
from speechssl.training.compilation import compile_submodules


@pytest.mark.parametrize("channels,groups,kernel,length", [(768, 16, 128, 300), (64, 4, 8, 37), (32, 2, 129, 5)])
def test_fft_convolution_equals_conv1d(channels: int, groups: int, kernel: int, length: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, channels, length, dtype=torch.float64)
    weight = torch.randn(channels, channels // groups, kernel, dtype=torch.float64) / (kernel * channels) ** 0.5
    bias = torch.randn(channels, dtype=torch.float64)
    expected = F.conv1d(x, weight, bias, padding=kernel // 2, groups=groups)
    got = conv1d_fft(x.float(), weight.float(), bias.float(), kernel // 2, groups)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    scale = float(expected.abs().max())
    assert float((got.double() - expected).abs().max()) < 1e-5 * scale


def test_fft_positional_embedding_gives_the_gradients_of_the_direct_one() -> None:
    torch.manual_seed(0)
    direct = ConvPositionalEmbedding(96, 16, 4, dropout=0.1)
    fft = copy.deepcopy(direct)
    direct.use_fft, fft.use_fft = False, True
    x = torch.randn(2, 50, 96, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    target = torch.randn(2, 50, 96)
    for module, inp in ((direct, x), (fft, x2)):
        (module(inp) * target).sum().backward()
    torch.testing.assert_close(fft(x2), direct(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(direct.named_parameters(), fft.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)
    # By default the FFT serves CUDA tensors only: CPU runs keep nn.Conv1d (and their exact numbers).
    assert ConvPositionalEmbedding(96, 16, 4, dropout=0.1).use_fft is None


def test_compiled_layers_compute_what_eager_layers_do(tiny_config: ModelConfig) -> None:
    torch.manual_seed(0)
    eager = Wav2Vec2Model(tiny_config).eval()
    compiled = copy.deepcopy(eager)
    names = compile_submodules(compiled, ["context.layers", "feature_extractor"])
    assert names == [f"context.layers.{i}" for i in range(len(eager.context.layers))] + ["feature_extractor"]
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints are unchanged
    waves = torch.randn(2, 8000)
    with torch.no_grad():
        expected, _ = eager.encode(waves)
        got, _ = compiled.encode(waves)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"no submodule 'context\.layer'.*feature_extractor"):
        compile_submodules(compiled, ["context.layer"])
