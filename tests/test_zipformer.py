from __future__ import annotations

import pytest
import torch

from speechssl.models.context.zipformer import Zipformer, ZipformerConfig
from speechssl.models.context.zipformer.scaling import (
    Balancer,
    ScheduledFloat,
    UpdateClock,
    Whiten,
    _proportion_positive_to_mean,
    limit_param_value,
)
from tests.zipformer_reference import reference_encoder, reference_module, reference_scaling

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
    from speechssl.models.config import load_model_config
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
    from speechssl.models.config import load_model_config
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
    from speechssl.models.config import load_model_config
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


# ------------------------------------------------------------------ training aids and torch.compile


def _channels_out_of_range(shape: tuple[int, ...], channel_dim: int) -> torch.Tensor:
    """Channels with too positive a mean, too small and too large an RMS, and ones in range."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    scale = torch.tensor([1.0, 0.01, 30.0, 1.0, 1.0, 0.5]).repeat(shape[channel_dim] // 6)
    offset = torch.tensor([3.0, 0.0, 0.0, -2.0, 0.0, 0.1]).repeat(shape[channel_dim] // 6)
    view = [1] * len(shape)
    view[channel_dim] = shape[channel_dim]
    return x * scale.view(view) + offset.view(view)


@pytest.mark.parametrize("shape,channel_dim", [((3, 40, 12), -1), ((2, 12, 50), 1)])
def test_balancer_gradient_matches_the_reference(shape: tuple[int, ...], channel_dim: int) -> None:
    ref_function = reference_scaling().BalancerFunction
    x = _channels_out_of_range(shape, channel_dim)
    grad = torch.randn(shape)
    balancer = Balancer(channel_dim, 0.3, 0.7, min_abs=0.5, max_abs=5.0, grad_scale=0.04, prob=1.0).train()
    ours = x.clone().requires_grad_(True)
    balancer(ours).backward(grad)
    theirs = x.clone().requires_grad_(True)
    ref_function.apply(theirs, _proportion_positive_to_mean(0.3), _proportion_positive_to_mean(0.7),
                       1.25331413732 * 0.5, 1.25331413732 * 5.0, 0.04, channel_dim).backward(grad)
    assert not torch.equal(theirs.grad, grad)  # the limits are exceeded: the gradient changes
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_groups,limit", [(1, 1.0), (4, 1.0), (1, 1e6)])
def test_whitening_gradient_and_probability_match_the_reference(num_groups: int, limit: float) -> None:
    scaling = reference_scaling()
    torch.manual_seed(0)
    x = torch.randn(3, 20, 16) @ torch.randn(16, 16)  # correlated channels
    grad = torch.randn(3, 20, 16)
    ours_module = Whiten(num_groups, limit, (0.025, 0.25), 0.01).train()
    ours_module.prob = 1.0  # this call runs for sure
    ref_module = scaling.Whiten(num_groups, limit, (0.025, 0.25), 0.01)
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours_module(ours).backward(grad)
    scaling.WhiteningPenaltyFunction.apply(theirs, ref_module).backward(grad)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.grad, grad) == (limit > 1e3)  # unchanged only under the limit
    assert ours_module.prob == ref_module.prob == (0.025 if limit > 1e3 else 0.25)


def test_schedules_on_the_device_follow_the_update_clock() -> None:
    clock = UpdateClock()
    schedule = ScheduledFloat((0.0, 0.2), (4000.0, 0.05), (16000.0, 0.0))
    schedule.follow(clock)
    assert "_clock" not in dict(schedule.named_children())  # referenced, not a submodule
    for update in (0, 1000, 4000, 10000, 16000, 50000):
        clock.set_num_updates(update)
        assert float(schedule.on_device()) == pytest.approx(schedule.value_at(update), abs=1e-7)
    model = Zipformer(ZipformerConfig(**SMALL))
    assert all(m._clock is model.update_clock for m in model.modules() if isinstance(m, ScheduledFloat))
    assert not any(k.endswith(("update_clock.count", "point_table", "device_prob")) for k in model.state_dict())
    model.to(torch.bfloat16)  # a cast model: the schedules keep their points and Whiten its probability
    schedules = [m for m in model.modules() if isinstance(m, ScheduledFloat)]
    assert schedules and all(torch.equal(m.point_table, torch.tensor(m.points, dtype=torch.float32))
                             for m in schedules)
    assert any(m.point_table.ne(m.point_table.bfloat16().float()).any() for m in schedules)  # bf16 would round
    whiten = model.encoders[0].layers[0].whiten
    assert whiten.device_prob.dtype == torch.float32 and float(whiten.device_prob) == pytest.approx(0.25, abs=1e-9)
    assert model.encoders[0].layers[0].feed_forward1.in_proj.weight.dtype == torch.bfloat16


def test_layers_of_one_shape_share_a_compiled_graph() -> None:
    """``context.layers`` compiles each layer; layers of the same width and frame rate reuse one
    graph although their schedules (the layer warm-up's skip rates) differ."""
    from torch._dynamo.testing import CompileCounter

    from speechssl.training.compilation import compile_submodules

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.context = Zipformer(ZipformerConfig(**SMALL)).train()
    for module in model.modules():
        if hasattr(module, "set_num_updates"):
            module.set_num_updates(2500)
    layers = model.context.layers
    assert len(layers) == 5 and len({layer.bypass.skip_rate.points[0] for layer in layers}) == 5
    counter = CompileCounter()
    for layer in layers:  # as compile_submodules does, with a counting backend
        layer.compile(backend=counter)
    x = torch.randn(2, 40, 32, requires_grad=True)
    model.context(x).output.sum().backward()
    assert counter.frame_count == 3  # widths 32, 48 and 64 at 1, 1/2 and 1/4 of the frame rate
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert compile_submodules(model, ["context.layers"]) == [f"context.layers.{i}" for i in range(5)]


@pytest.mark.slow
def test_compiled_layers_get_inputs_that_cuda_graphs_accept() -> None:
    """With padded rows and chunked attention, no input of a compiled layer's forward or backward
    graph fails Inductor's memory-overlap check, which turns CUDA graphs off for that graph
    without a word. The padding mask's view at a lower rate failed it whenever the rate's factor
    does not divide the frame count (779 frames at 15.6 s): in the medium Zipformer only the
    first stack's layers, which get the mask itself, then ran as CUDA graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.output_code import complex_memory_overlap

    failing: list[tuple[str, tuple, tuple]] = []
    graphs = {"forward": 0, "backward": 0}

    def checking(kind: str):
        def compiler(gm: torch.fx.GraphModule, example_inputs: list) -> object:
            graphs[kind] += 1
            failing.extend((kind, tuple(t.shape), t.stride()) for t in example_inputs
                           if isinstance(t, torch.Tensor) and complex_memory_overlap(t))
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    torch.manual_seed(0)
    two_rates = dict(downsampling_factor=[1, 2], encoder_dim=[32, 48], num_encoder_layers=[1, 1],
                     encoder_unmasked_dim=[24, 32], num_heads=[4, 4], query_head_dim=[8], value_head_dim=[6],
                     pos_head_dim=[2], pos_dim=16, feedforward_dim=[64, 96], cnn_module_kernel=[7, 7])
    model = Zipformer(ZipformerConfig(**two_rates, causal=True, chunk_size=[8], left_context_frames=[16])).train()
    backend = aot_autograd(fw_compiler=checking("forward"), bw_compiler=checking("backward"))
    for layer in model.layers:
        layer.compile(backend=backend)
    frames = 41  # the half-rate view of the mask: row stride 41, less than twice its length (21)
    x = torch.randn(2, frames, 32, requires_grad=True)
    padding_mask = torch.arange(frames) >= torch.tensor([frames, 30]).unsqueeze(1)
    model(x, padding_mask).output.sum().backward()
    assert graphs["forward"] == graphs["backward"] == 2  # one per frame rate
    assert failing == []
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_zipformer_model_traces_as_one_graph_that_updates_do_not_recompile() -> None:
    """Inside torch.compile the Zipformer's random choices, schedules and Whiten's comparison stay
    on the device: the model traces as the two graphs of the other context networks, and later
    updates (other schedule values) reuse them."""
    from torch._dynamo.testing import CompileCounter

    from speechssl.models.config import load_model_config
    from speechssl.models.wav2vec2 import Wav2Vec2Model
    from tests.conftest import REPO

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Wav2Vec2Model(load_model_config(REPO / "configs/model/tiny_zipformer.yaml")).train()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    waves, lengths = torch.randn(2, 8000), torch.tensor([8000, 7000])
    whiten = model.context.encoders[0].layers[0].self_attn1.whiten
    for update in (0, 5_000, 50_000):
        model.set_num_updates(update)
        out = compiled(waves, lengths)
        (out.loss / out.sample_size).backward()
        assert torch.isfinite(out.loss)
        assert min(abs(float(whiten.device_prob) - p) for p in (0.025, 0.25)) < 1e-7
    assert counter.frame_count == 2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.context.parameters())


def test_compiled_training_aids_give_the_eager_gradients() -> None:
    """With every draw certain, the device-side paths of Balancer, Whiten and the value limit give
    the gradients of the eager ones."""
    torch._dynamo.reset()
    x = _channels_out_of_range((3, 40, 12), -1)
    grad = torch.randn(3, 40, 12)
    balancer = Balancer(-1, 0.3, 0.7, min_abs=0.5, max_abs=5.0, prob=1.0).train()
    whiten = Whiten(1, 1.0, (1.0, 1.0), 0.01).train()

    def aids(x: torch.Tensor) -> torch.Tensor:
        return limit_param_value(whiten(balancer(x)), -0.5, 0.5, training=True, prob=1.0)

    grads = []
    for function in (aids, torch.compile(aids, backend="aot_eager", fullgraph=True)):
        inp = x.clone().requires_grad_(True)
        function(inp).backward(grad)
        grads.append(inp.grad)
    assert not torch.equal(grads[0], grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
