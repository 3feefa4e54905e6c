from __future__ import annotations

import pytest
import torch

from speechssl.models.context.zipformer import Zipformer, ZipformerConfig
from tests.zipformer_reference import reference_encoder, reference_module

SMALL = dict(downsampling_factor=[1, 2, 4, 2], encoder_dim=[32, 48, 64, 48], num_encoder_layers=[1, 1, 2, 1],
             encoder_unmasked_dim=[24, 32, 32, 32], num_heads=[4, 4, 4, 4], query_head_dim=[8], value_head_dim=[6],
             pos_head_dim=[2], pos_dim=16, feedforward_dim=[64, 96, 128, 96], cnn_module_kernel=[7, 7, 5, 7])


def _perturbed(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere, so a mis-mapped or unused parameter shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _pair(causal: bool = False, chunk: int = -1, left: int = -1):
    ref_module = reference_module()
    lists = dict(SMALL)
    ref = ref_module.Zipformer(output_downsampling_factor=2, pos_dim=lists.pop("pos_dim"),
                               causal=causal, chunk_size=[chunk], left_context_frames=[left],
                               **{k: tuple(v) for k, v in lists.items()})
    _perturbed(ref)
    ours = Zipformer(ZipformerConfig(**SMALL, output_downsampling_factor=2, causal=causal, chunk_size=[chunk],
                                     left_context_frames=[left]))
    state = {k: v.reshape(1) if k.endswith("norm.log_scale") else v  # (1,) here, a scalar there
             for k, v in ref.state_dict().items()
             if not k.endswith(tuple(f"layers.{j}.bypass_scale" for j in range(4)))}  # unused there
    ours.load_state_dict(state, strict=True)
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("causal,chunk,left", [(False, -1, -1), (True, 8, 16)])
def test_matches_the_reference_zipformer(causal: bool, chunk: int, left: int) -> None:
    ref, ours = _pair(causal, chunk, left)
    torch.manual_seed(1)
    x = torch.randn(2, 40, 32)
    lengths = torch.tensor([40, 40])
    with torch.no_grad():
        expected, _ = ref(x.transpose(0, 1), lengths)
        out = ours(x)
    assert out.output.shape == (2, 20, 64)
    torch.testing.assert_close(out.output, expected.transpose(0, 1), atol=1e-4, rtol=1e-4)


# icefall's rates (1, 2, 4, 8, 4, 2) with small widths, so every downsampling factor is covered.
ALL_RATES = dict(SMALL, downsampling_factor=[1, 2, 4, 8, 4, 2], encoder_dim=[32, 48, 64, 80, 64, 48],
                 num_encoder_layers=[1], encoder_unmasked_dim=[24], num_heads=[4], feedforward_dim=[64],
                 cnn_module_kernel=[7, 7, 5, 5, 5, 7])


@pytest.mark.parametrize("settings,output_factor", [(SMALL, 1), (SMALL, 2), (ALL_RATES, 1), (ALL_RATES, 2)])
def test_shapes_and_batch_invariance_for_odd_lengths(settings: dict, output_factor: int) -> None:
    torch.manual_seed(0)
    model = Zipformer(ZipformerConfig(**settings, output_downsampling_factor=output_factor))
    _perturbed(model)
    model.eval()
    lengths = torch.tensor([37, 23, 11, 2])
    x = torch.randn(4, 37, 32)
    padding = torch.arange(37)[None] >= lengths[:, None]
    dims = settings["encoder_dim"]
    with torch.no_grad():
        batched = model(x, padding)
        assert batched.output.shape == (4, -(-37 // output_factor), max(dims))
        assert [h.shape for h in batched.hidden_states] == [(4, 37, d) for d in dims]
        assert torch.equal((~batched.padding_mask).sum(1),
                           -(-lengths // output_factor))
        for i, n in enumerate(lengths.tolist()):
            alone = model(x[i:i + 1, :n]).output[0]
            torch.testing.assert_close(batched.output[i, :alone.shape[0]], alone, atol=1e-5, rtol=1e-5)


def _stream(model: Zipformer, x: torch.Tensor, lengths: torch.Tensor, states: list[torch.Tensor],
            chunk: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Feed ``x (B, T, C)`` chunk by chunk; the outputs concatenated over time and the last states."""
    outputs = []
    for start in range(0, x.shape[1], chunk):
        out, _, states = model.streaming_forward(x[:, start:start + chunk], (lengths - start).clamp(0, chunk),
                                                 states)
        outputs.append(out)
    return torch.cat(outputs, dim=1), states


@pytest.mark.parametrize("settings,output_factor,chunk,left", [
    (SMALL, 1, 8, 16), (SMALL, 2, 8, 16), (SMALL, 2, 16, 40), (ALL_RATES, 2, 16, 32)])
def test_streaming_equals_the_full_causal_forward(settings: dict, output_factor: int, chunk: int, left: int) -> None:
    torch.manual_seed(0)
    model = Zipformer(ZipformerConfig(**settings, output_downsampling_factor=output_factor, causal=True,
                                      chunk_size=[chunk], left_context_frames=[left]))
    _perturbed(model)
    model.eval()
    lengths = torch.tensor([61, 30, 9])
    x = torch.randn(3, 64, 32)
    with torch.no_grad():
        full = model(x, torch.arange(64)[None] >= lengths[:, None])
        streamed, states = _stream(model, x, lengths, model.get_init_states(3), chunk)
    assert streamed.shape == full.output.shape
    assert torch.equal(states[-1], lengths)
    for i, n in enumerate((-(-lengths // output_factor)).tolist()):
        torch.testing.assert_close(streamed[i, :n], full.output[i, :n], atol=1e-4, rtol=1e-4)
    # A limited left context matters: the last frames differ from those of unlimited context.
    unlimited = Zipformer(ZipformerConfig(**settings, output_downsampling_factor=output_factor, causal=True,
                                          chunk_size=[chunk], left_context_frames=[-1]))
    unlimited.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(unlimited.eval()(x[:1]).output[0, -1], full.output[0, -1], atol=1e-3)


def test_streaming_states_stack_and_unstack() -> None:
    from speechssl.models.context.zipformer import stack_states, unstack_states

    torch.manual_seed(0)
    model = Zipformer(ZipformerConfig(**SMALL, causal=True, chunk_size=[8], left_context_frames=[16]))
    _perturbed(model)
    model.eval()
    lengths = torch.tensor([40, 24])
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        _, states = _stream(model, x, lengths, model.get_init_states(2), 8)
        again = stack_states(unstack_states(states))
        assert len(again) == len(states) and all(torch.equal(a, b) for a, b in zip(again, states, strict=True))
        # Streams run alone, then batched mid-stream, continue exactly as the batch did.
        alone = [_stream(model, x[i:i + 1, :24], lengths[i:i + 1].clamp(max=24), model.get_init_states(1), 8)[1]
                 for i in range(2)]
        batched, _ = _stream(model, x[:, 24:], (lengths - 24).clamp(min=0), stack_states(alone), 8)
        reference, _ = _stream(model, x, lengths, model.get_init_states(2), 8)
    torch.testing.assert_close(batched[0], reference[0, 24:], atol=1e-5, rtol=1e-5)


def test_streaming_needs_a_causal_model_in_eval() -> None:
    model = Zipformer(ZipformerConfig(**SMALL, causal=True, chunk_size=[8], left_context_frames=[16]))
    with pytest.raises(RuntimeError, match="eval mode"):
        model.get_init_states(1)
    model.eval()
    with pytest.raises(ValueError, match="chunks of chunk_size=8"):
        model.streaming_forward(torch.zeros(1, 6, 32), torch.tensor([6]), model.get_init_states(1))
    with pytest.raises(RuntimeError, match="causal Zipformer"):
        Zipformer(ZipformerConfig(**SMALL)).eval().get_init_states(1)


def test_schedules_follow_the_update_count() -> None:
    from speechssl.config import load_model_config
    from speechssl.models.wav2vec2 import Wav2Vec2Model
    from tests.conftest import REPO

    model = Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_zipformer.yaml"))
    layer = model.context.encoders[0].layers[0]
    model.train()
    model.set_num_updates(0)
    def read() -> tuple[float, float, float]:
        return (float(layer.attention_skip_rate), float(layer.bypass.scale_min),
                float(layer.feed_forward1.out_proj.dropout))

    early = read()
    model.set_num_updates(30000)
    late = read()
    assert early == pytest.approx((0.2, 0.9, 0.3)) and late == pytest.approx((0.0, 0.2, 0.1))
    model.eval()
    assert float(layer.attention_skip_rate) == 0.0  # eval: the defaults


def test_tiny_zipformer_learns() -> None:
    """The foundation's learning test with the tiny Zipformer. It needs 300 updates rather than
    200: its training-time regularisers (dropout 0.3, module skipping) are at their strongest early."""
    from pretrain.overfit import OverfitConfig, run
    from speechssl.config import build
    from tests.conftest import REPO

    config = build(OverfitConfig, REPO / "configs/pretrain/overfit_tiny.yaml",
                   ["steps=300", f"model={REPO / 'configs/model/tiny_zipformer.yaml'}"])
    history = run(config, echo=False)
    first = history[0]["contrastive"]
    last = sum(h["contrastive"] for h in history[-10:]) / 10
    assert last <= 0.5 * first, (first, last)
    assert min(h["prob_ppl"] for h in history[-10:]) > 2 * config.model.quantizer.num_groups


def test_pretraining_step_with_a_zipformer() -> None:
    from speechssl.config import load_model_config
    from speechssl.models.wav2vec2 import Wav2Vec2Model
    from tests.conftest import REPO

    torch.manual_seed(0)
    model = Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_zipformer.yaml"))
    model.train()
    model.set_num_updates(100_000)  # past the warm-up: no layer or module is skipped
    out = model(torch.randn(2, 16000), torch.tensor([16000, 12000]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    idle = [n for n, p in model.context.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert idle == ["downsample_output.bias"]  # a softmax over one weight at output factor 1


@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_shipped_sizes_mirror_the_reference_encoder(size: str) -> None:
    """Our context network has the reference encoder's parameters, less the output downsampling
    weight it does not use at factor 1 and the per-layer bypass scales the reference leaves unused."""
    from speechssl.config import load_model_config
    from tests.conftest import REPO

    context = load_model_config(REPO / f"configs/model/{size}_zipformer.yaml").context
    ours = Zipformer(context)
    reference = reference_encoder(context)
    names = {n for n, _ in ours.named_parameters()}
    ref_names = {n for n, _ in reference.named_parameters()
                 if not n.endswith(tuple(f"layers.{j}.bypass_scale" for j in range(8)))}
    assert names == ref_names
    count = sum(p.numel() for p in ours.parameters())
    assert count == pytest.approx(sum(p.numel() for p in reference.parameters()), rel=1e-3)
    assert count / 1e6 == pytest.approx({"small": 21.4, "medium": 63.4, "large": 146.0}[size], abs=0.05)


@pytest.mark.parametrize("override,words", [
    (dict(chunk_size=[6], causal=True), "multiple of every downsampling factor"),
    (dict(chunk_size=[8]), "needs causal: true"),
    (dict(encoder_dim=[32, 48]), "one per stack"),
    (dict(cnn_module_kernel=[6]), "must be odd"),
])
def test_config_errors_name_the_key(override: dict, words: str) -> None:
    from speechssl.config import ConfigError

    with pytest.raises(ConfigError, match=words):
        ZipformerConfig(**{**SMALL, **override})
