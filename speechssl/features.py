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

``weighted_sum=True`` adds learnable softmax weights over the selected layers (Hugging Face's
``use_weighted_layer_sum``, SUPERB's upstream weighting): ``out.weighted`` is ``(B, T, D)`` and
only the weights train. ``capture`` names submodules (as in ``model.named_modules()``) whose
outputs are returned in ``out.captured`` through forward hooks, so any intermediate output can be
read without editing the model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from speechssl.models.encoder import SpeechEncoder


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


def _first_tensor(value) -> Tensor | None:
    """A module's output as one tensor: itself, the first tensor of a tuple, or ``.output``."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in map(_first_tensor, value) if v is not None), None)
    return getattr(value, "output", None)


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
        self.capture = list(capture)

    def train(self, mode: bool = True) -> LayerFeatures:
        super().train(mode)
        self.model.eval()  # no dropout, layer drop or BatchNorm updates: features are deterministic
        return self

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> LayerOutput:
        """``waveforms (B, S)``, ``lengths (B,)`` in samples (None: all ``S`` are valid)."""
        model = self.model
        captured: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        handles = [modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, _first_tensor(out))) for name in self.capture]
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
        weighted = None
        if self.layer_weights is not None:
            if len({s.shape for s in selected}) > 1:
                widths = {i: s.shape[-1] for i, s in zip(self.layers, selected, strict=True)}
                raise ValueError(f"weighted_sum needs layers of one shape; their widths are {widths}")
            weights = self.layer_weights.softmax(0).to(selected[0].dtype)
            weighted = (torch.stack(selected) * weights.view(-1, 1, 1, 1)).sum(0)
        return LayerOutput(selected, self.layers, frames, weighted, captured)
