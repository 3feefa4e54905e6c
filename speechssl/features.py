"""Hidden states of any layer of a speechssl model, for downstream tasks.

    from speechssl import load_model
    from speechssl.features import LayerFeatures

    features = LayerFeatures(load_model("runs/base/model.pt"), layers=[6, 12])
    out = features(waveforms, lengths)        # waveforms (B, S), lengths (B,) in samples
    out.hidden_states                         # [(B, T, D), (B, T, D)]: layers 6 and 12
    out.lengths                               # (B,) valid frames of each utterance

Layers count as Hugging Face's ``hidden_states`` do: layer 0 is what the context network's first
layer reads (the frontend output after positional embedding and input normalisation), layer i the
output of layer i (of stack i for the Zipformer). ``layers`` is a list of indices, ``"all"`` or
``"last"``. The model runs in eval mode, without masking or quantizer, and only up to the deepest
selected layer.

:func:`min_input_samples` is the shortest input a model runs on (its extractor's receptive
field): shorter utterances have no frame at all and are skipped by extraction.

A recording too long for one pass goes through :meth:`LayerFeatures.windowed`: overlapping
windows, each keeping the frames nearest its centre, stitched into the single pass's frames in
bounded memory.

``weighted_sum=True`` adds learnable softmax weights over the selected layers (Hugging Face's
``use_weighted_layer_sum``, SUPERB's upstream weighting): ``out.weighted`` is ``(B, T, D)`` and
only the weights train. ``capture`` names submodules (as in ``model.named_modules()``) whose
outputs are returned in ``out.captured`` through forward hooks, so any intermediate output can be
read without editing the model.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from speechssl.data.audio import pad_waveforms
from speechssl.models.encoder import SpeechEncoder
from speechssl.models.fbank import SHIFT, FbankExtractor


@dataclass
class LayerOutput:
    """hidden_states: one ``(B, T, D)`` per selected layer, in the order of ``layers``; lengths:
    ``(B,)`` valid frames (None when no lengths were given); weighted: the weighted sum ``(B, T, D)``
    or None; captured: each captured module's output (its first tensor when it returns several)."""

    hidden_states: list[Tensor]
    layers: list[int]
    lengths: Tensor | None
    weighted: Tensor | None = None
    captured: dict[str, Tensor] = field(default_factory=dict)


def min_input_samples(model: SpeechEncoder) -> int:
    """The fewest samples (16 kHz) ``model`` gives a frame for: its feature extractor's receptive
    field (400 for the convolutional encoder's default layers, 560 for filterbanks stacked by 2)."""
    return model.feature_extractor.receptive_field


def _first_tensor(value) -> Tensor | None:
    """A module's output as one tensor: itself, the first tensor of a tuple, or ``.output``."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in map(_first_tensor, value) if v is not None), None)
    return getattr(value, "output", None)


def window_batches(audio: Tensor, plan: list[tuple[int, int, int, int]], batch_windows: int
                   ) -> Iterator[tuple[int, list[tuple[int, int, int, int]], Tensor, Tensor]]:
    """The windows of :meth:`LayerFeatures.window_plan` over ``audio (S,)``, ``batch_windows`` at a
    time: ``(index of the group's first window, its plan rows, waves (B, S') zero-padded, lengths (B,))``."""
    for first in range(0, len(plan), batch_windows):
        group = plan[first: first + batch_windows]
        waves, lengths = pad_waveforms([audio[start:end] for start, end, _, _ in group], audio.dtype)
        yield first, group, waves, lengths


def _fixed_group_norm(norm: nn.GroupNorm, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``norm`` (one group per channel) applied to ``x (B, C, S)`` with given statistics ``(C,)``."""
    scale = torch.rsqrt(var + norm.eps).to(x.dtype)
    y = (x - mean.to(x.dtype)[:, None]) * scale[:, None]
    return y * norm.weight[:, None] + norm.bias[:, None] if norm.affine else y


class LayerFeatures(nn.Module):
    """Selected hidden states of ``model`` (any :class:`SpeechEncoder`: a pretraining model, a CTC
    model, or one imported from torchaudio or Hugging Face). The model is frozen and stays in eval
    mode whatever ``train()`` is called with; ``layer_weights`` (with ``weighted_sum``) train."""

    def __init__(self, model: SpeechEncoder, layers: list[int] | str = "all", weighted_sum: bool = False,
                 capture: list[str] | tuple[str, ...] = ()):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        depth = model.context.depth
        if layers == "all":
            layers = list(range(depth + 1))
        elif layers == "last":
            layers = [depth]
        elif isinstance(layers, str):
            raise ValueError(f"layers must be a list of indices, 'all' or 'last', got {layers!r}")
        layers = [int(i) for i in layers]
        if not layers or any(not 0 <= i <= depth for i in layers):
            raise ValueError(f"layers {layers}: this model has layers 0 (the context input) to {depth}")
        self.layers = layers
        self.layer_weights = nn.Parameter(torch.zeros(len(layers))) if weighted_sum else None
        modules = dict(model.named_modules())
        for name in capture:
            if name not in modules:
                near = difflib.get_close_matches(name, list(modules), n=3)
                raise ValueError(f"no module named {name!r} in the model" + (f"; did you mean {near}?" if near else ""))
        self.capture = [(name, modules[name]) for name in capture]  # a list: not registered as submodules

    def train(self, mode: bool = True) -> LayerFeatures:
        super().train(mode)
        self.model.eval()  # no dropout, layer drop or BatchNorm updates: features are deterministic
        return self

    @property
    def stride(self) -> int:
        """Samples per output frame of the feature extractor (320 for the usual layers)."""
        return self.model.feature_extractor.stride

    def window_plan(self, samples: int, window: int, overlap: int) -> list[tuple[int, int, int, int]]:
        """Windows over ``samples``: ``(first sample, end sample, first kept frame, end kept frame)``,
        frames counted from the recording's start. Windows start on frame boundaries, so a window's
        frames are the single pass's; each window keeps its frames up to the middle of the overlap
        with the next, and together they keep every frame of the single pass exactly once."""
        stride, field = self.stride, self.model.feature_extractor.receptive_field
        if window % stride or overlap % stride or not 2 * field <= overlap < window:
            raise ValueError(f"window ({window}) and overlap ({overlap}) must be multiples of {stride} samples "
                             f"with {2 * field} <= overlap < window")
        hop = window - overlap
        starts = [0]
        while starts[-1] + window < samples:
            starts.append(starts[-1] + hop)
        total = int(self.model.feature_extractor.output_lengths(torch.tensor([samples]))[0])
        cuts = [0, *((start + overlap // 2) // stride for start in starts[1:]), total]
        return [(start, min(start + window, samples), cuts[i], cuts[i + 1]) for i, start in enumerate(starts)]

    def windowed(self, audio: Tensor, window: int, overlap: int, batch_windows: int = 8) -> LayerOutput:
        """The selected layers of one recording ``audio (S,)`` computed in windows of ``window``
        samples overlapping by ``overlap`` (see :meth:`window_plan`), ``batch_windows`` at a time:
        ``(1, T, D)`` per layer, with T the single pass's frames. Memory holds a batch of windows
        and the stitched result. Nothing is captured by hooks here."""
        plan = self.window_plan(audio.shape[-1], window, overlap)
        pieces: list[list[Tensor]] = [[] for _ in self.layers]
        with self.recording_statistics(audio, plan):
            for _, group, waves, lengths in window_batches(audio, plan, batch_windows):
                out = self(waves, lengths)
                for row, (start, _, keep_from, keep_to) in enumerate(group):
                    offset = start // self.stride
                    for i, state in enumerate(out.hidden_states):
                        pieces[i].append(state[row, keep_from - offset: keep_to - offset])
        states = [torch.cat(p).unsqueeze(0) for p in pieces]
        frames = torch.tensor([states[0].shape[1]])
        return LayerOutput(states, self.layers, frames, self._weighted(states))

    @contextlib.contextmanager
    def recording_statistics(self, audio: Tensor, plan: list[tuple[int, int, int, int]]) -> Iterator[bool]:
        """Inside, the extractor normalises every window of ``audio (S,)`` with the whole
        recording's statistics, as the single pass does: the log-mel bins' (``FbankExtractor``
        with ``standardize``) or the first convolution's channels' (a ``group_norm`` extractor,
        through a hook on its norm). Yields True when that hook is in place: the norm module itself
        must then run on every window."""
        extractor, handle = self.model.feature_extractor, None
        if isinstance(extractor, FbankExtractor):
            if extractor.standardize:
                extractor.fixed_statistics = self._fbank_statistics(audio, plan)
        elif isinstance(norm := extractor.blocks[0].norm, nn.GroupNorm):
            mean, var = self._first_conv_statistics(audio, plan)
            handle = norm.register_forward_hook(lambda m, inputs, _: _fixed_group_norm(m, inputs[0], mean, var))
        try:
            yield handle is not None
        finally:
            if handle is not None:
                handle.remove()
            if isinstance(extractor, FbankExtractor):
                extractor.fixed_statistics = None

    @torch.no_grad()
    def _fbank_statistics(self, audio: Tensor, plan: list[tuple[int, int, int, int]]) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of every mel bin over the whole recording's 10 ms frames,
        accumulated window by window, each window counting the frames it keeps (the last one, to
        the end, with the frames of an incomplete stack that the single pass also counts)."""
        extractor: FbankExtractor = self.model.feature_extractor
        per_frame = self.stride // SHIFT
        total = torch.zeros(extractor.num_mel_bins, dtype=torch.float64, device=audio.device)
        squares, count = torch.zeros_like(total), 0
        for i, (start, end, keep_from, keep_to) in enumerate(plan):
            mel = extractor.log_mel(audio[start:end].view(1, -1))[0].double()
            offset = start // SHIFT
            mel = mel[keep_from * per_frame - offset: None if i == len(plan) - 1 else keep_to * per_frame - offset]
            total += mel.sum(0)
            squares += mel.square().sum(0)
            count += mel.shape[0]
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(1e-5).sqrt()
        return mean.float(), std.float()

    @torch.no_grad()
    def _first_conv_statistics(self, audio: Tensor, plan: list[tuple[int, int, int, int]]) -> tuple[Tensor, Tensor]:
        """Per-channel mean and variance over the whole recording of the first convolution's
        output, which the ``group_norm`` extractor normalises over time: accumulated window by
        window, each window counting the frames it keeps (the last one, to the end)."""
        block = self.model.feature_extractor.blocks[0]
        per_frame = self.stride // block.stride
        total = torch.zeros(block.conv.out_channels, dtype=torch.float64, device=audio.device)
        squares, count = torch.zeros_like(total), 0
        for i, (start, end, keep_from, keep_to) in enumerate(plan):
            y = block.conv(audio[start:end].view(1, 1, -1))[0].double()
            offset = start // block.stride
            y = y[:, keep_from * per_frame - offset: None if i == len(plan) - 1 else keep_to * per_frame - offset]
            total += y.sum(1)
            squares += y.square().sum(1)
            count += y.shape[1]
        mean = total / count
        return mean, (squares / count - mean.square()).clamp_min(0)

    def _weighted(self, selected: list[Tensor]) -> Tensor | None:
        if self.layer_weights is None:
            return None
        if len({s.shape for s in selected}) > 1:
            widths = {i: s.shape[-1] for i, s in zip(self.layers, selected, strict=True)}
            raise ValueError(f"weighted_sum needs layers of one shape; their widths are {widths}")
        weights = self.layer_weights.softmax(0).to(selected[0].dtype)
        return (torch.stack(selected) * weights.view(-1, 1, 1, 1)).sum(0)

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> LayerOutput:
        """``waveforms (B, S)``, ``lengths (B,)`` in samples (None: all ``S`` are valid)."""
        model = self.model
        captured: dict[str, Tensor] = {}
        handles = [module.register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, _first_tensor(out)))
            for name, module in self.capture]
        try:
            with torch.no_grad():
                features, padding_mask, _ = model._features(waveforms, lengths, None)
                x, _ = model.frontend(features)
                deepest = max(self.layers)
                out = model.context(x, padding_mask, num_layers=deepest or 1)
        finally:
            for handle in handles:
                handle.remove()
        states = [out.input_state, *out.hidden_states]
        selected = [states[i] for i in self.layers]
        frames = None if padding_mask is None else (~out.padding_mask).sum(1)
        return LayerOutput(selected, self.layers, frames, self._weighted(selected), captured)
