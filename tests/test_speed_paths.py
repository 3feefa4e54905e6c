"""The faster paths of the model compute what the plain ones do: the positional convolution through
the FFT, and the model or parts of it compiled with ``trainer.compile``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from speechssl import ModelConfig, Wav2Vec2Model, load_model_config
from speechssl.models.context.blocks import ConvPositionalEmbedding
from speechssl.models.fft_conv import conv1d_fft
from speechssl.objectives.negatives import sample_negatives
from speechssl.training.compilation import compile_submodules
from tests.conftest import REPO


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


@pytest.mark.parametrize("context", ["transformer", "conformer"])
def test_the_whole_model_traces_as_one_graph_that_updates_do_not_recompile(context: str) -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    config = load_model_config(REPO / f"configs/model/tiny_{context}.yaml", ["context.layer_drop=0.2"])
    model = Wav2Vec2Model(config).train()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    waves, lengths = torch.randn(2, 8000), torch.tensor([8000, 7000])
    temperatures = []
    for update in (0, 5_000, 50_000):
        model.set_num_updates(update)
        out = compiled(waves, lengths)
        (out.loss / out.sample_size).backward()
        temperatures.append(float(out.temperature))
    # Two graphs: the checks of the inputs (values read on the host) run between them, eagerly.
    assert counter.frame_count == 2
    q = model.quantizer
    assert temperatures == pytest.approx([max(q.temp_start * q.temp_decay**u, q.temp_end) for u in (0, 5_000, 50_000)])
    with pytest.raises(ValueError, match="exceeds the 8000 samples"):
        compiled(waves, torch.tensor([9000, 7000]))


def test_compiled_layer_drop_keeps_the_input_of_a_dropped_layer() -> None:
    """Inside a graph every layer runs and a dropped one's output is discarded: with layer_drop=1
    the context network passes its input through, as eager layer drop does, and the layers'
    parameters get zero gradients rather than none."""
    torch._dynamo.reset()
    config = load_model_config(REPO / "configs/model/tiny_transformer.yaml", ["context.dropout=0.0"])
    context = Wav2Vec2Model(config).context.train()
    context.layer_drop = 1.0  # beyond what the config accepts, to make the draw certain
    x = torch.randn(2, 30, context.input_dim)
    expected = context(x).output
    assert all(p.grad is None for p in context.layers.parameters())
    got = torch.compile(context, backend="aot_eager")(x).output
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in context.layers.parameters())


def test_the_compiled_model_computes_the_eager_loss_and_gradients(tiny_config: ModelConfig) -> None:
    """Inductor's code for the whole model against eager, on a padded batch with the mask and the
    negatives given (eval mode: no dropout, argmax codes, so both are deterministic)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Wav2Vec2Model(tiny_config).eval()
    compiled = copy.deepcopy(eager)
    compile_submodules(compiled, ["model"])
    waves, lengths = torch.randn(2, 8000), torch.tensor([8000, 6000])
    frames = eager.feature_extractor.output_lengths(lengths)
    mask = eager.masker.time_mask(frames, (2, int(frames.max())), torch.device("cpu"))
    counts = mask.sum(1)
    negatives = sample_negatives(counts, mask.shape[1], tiny_config.loss.num_negatives,
                                 tiny_config.loss.cross_sample_negatives)
    results = []
    for model in (eager, compiled):
        out = model(waves, lengths, mask=mask, negatives=negatives)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (got_loss, got_grads) = results
    torch.testing.assert_close(got_loss, loss, rtol=1e-4, atol=1e-3)
    assert got_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)
