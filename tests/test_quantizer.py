from __future__ import annotations

import pytest
import torch

from speechssl.models.config import QuantizerConfig
from speechssl.models.quantizer import GumbelVectorQuantizer


def _quantizer(depth: int = 1) -> GumbelVectorQuantizer:
    return GumbelVectorQuantizer(16, 32, QuantizerConfig(num_groups=2, num_vars=8, weight_proj_depth=depth))


@pytest.mark.parametrize("depth", [1, 2])
def test_straight_through_gradients_reach_the_projection(depth: int) -> None:
    q = _quantizer(depth).train()
    x = torch.randn(2, 10, 16, requires_grad=True)
    out = q(x)
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.weight_proj.parameters())
    assert q.codevectors.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_perplexity_bounds() -> None:
    q = _quantizer().eval()
    last = q.weight_proj[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    uniform = q(torch.randn(2, 10, 16))
    assert uniform.prob_perplexity.item() == pytest.approx(2 * 8, rel=1e-5)  # G * V
    assert uniform.code_perplexity.item() == pytest.approx(2, rel=1e-5)  # every frame picks entry 0
    with torch.no_grad():
        last.bias.copy_(torch.tensor([100.0] + [0.0] * 7 + [0.0] * 3 + [100.0] + [0.0] * 4))
    one_hot = q(torch.randn(2, 10, 16))
    assert one_hot.prob_perplexity.item() == pytest.approx(2, rel=1e-4)  # G
    assert one_hot.codes[..., 0].eq(0).all() and one_hot.codes[..., 1].eq(3).all()


def test_perplexity_counts_only_weighted_frames() -> None:
    q = _quantizer().eval()
    x = torch.randn(1, 12, 16)
    weights = torch.zeros(1, 12, dtype=torch.bool)
    weights[0, :4] = True
    ref = q(x[:, :4])
    out = q(x, weights)
    torch.testing.assert_close(out.prob_perplexity, ref.prob_perplexity)
    torch.testing.assert_close(out.code_perplexity, ref.code_perplexity)


def test_eval_picks_the_argmax_codevectors() -> None:
    q = _quantizer().eval()
    out = q(torch.randn(2, 5, 16))
    expected = torch.cat([q.codevectors[g][out.codes[..., g]] for g in range(2)], -1)
    torch.testing.assert_close(out.quantized, expected)


def test_fp32_under_autocast_and_temperature() -> None:
    q = _quantizer().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(torch.randn(2, 5, 16))
    assert out.quantized.dtype == torch.float32 and out.prob_perplexity.dtype == torch.float32
    assert out.temperature == 2.0
    q.set_num_updates(50_000)
    assert q.temperature == pytest.approx(2.0 * 0.999995**50_000)


def test_a_schedule_too_short_for_the_temperature_decay_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    """fairseq's decay suits its 400k updates; over 4,000 the temperature stays near 2: the job warns
    and names the decay that anneals within the run, which does reach temp_end at 69% of it."""
    from pretrain.task import PretrainTask, matched_temp_decay
    from speechssl import load_model_config

    config = load_model_config("configs/model/tiny_transformer.yaml", ["quantizer.temp_decay=0.999995"])
    with caplog.at_level("WARNING", logger="speechssl.pretrain"):
        PretrainTask(config, 400_000)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="speechssl.pretrain"):
        PretrainTask(config, 4000)
    decay = matched_temp_decay(2.0, 0.5, 4000)
    assert "falls from 2 to 1.96" in caplog.text and f"temp_decay={decay:.6g}" in caplog.text
    assert 2.0 * decay ** (0.69 * 4000) == pytest.approx(0.5)
    caplog.clear()
    tuned = load_model_config("configs/model/tiny_transformer.yaml", [f"quantizer.temp_decay={decay}"])
    with caplog.at_level("WARNING", logger="speechssl.pretrain"):
        PretrainTask(tuned, 4000)
    assert not caplog.records
