"""The context network interface (:class:`ContextNetwork`, :class:`ContextOutput`) and the
registry that picks a network by ``model.context.type``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class ContextOutput:
    """output: ``(B, T', D_out)``; hidden_states: each layer's output ``(B, T', D)``;
    padding_mask: ``(B, T')`` with True at padding, or None when nothing is padded; input_state:
    what the first layer reads, after positional embedding and input normalisation (Hugging Face's
    ``hidden_states[0]``)."""

    output: Tensor
    hidden_states: list[Tensor]
    padding_mask: Tensor | None
    input_state: Tensor | None = None


class ContextNetwork(nn.Module):
    """Base class: subclasses set ``input_dim`` and ``output_dim`` and implement ``forward``."""

    input_dim: int
    output_dim: int

    @property
    def depth(self) -> int:
        """The number of hidden states ``forward`` returns (layers; stacks for the Zipformer)."""
        return len(self.layers)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None,
                num_layers: int | None = None) -> ContextOutput:
        """``x (B, T, input_dim)`` -> :class:`ContextOutput`; ``num_layers`` stops after that many
        layers (the output is then the last computed hidden state)."""
        raise NotImplementedError

    def _check_num_layers(self, num_layers: int | None, total: int) -> None:
        if num_layers is not None and not 0 < num_layers <= total:
            raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")

    def _layer_or_skip(self, layer: nn.Module, layer_drop: float, x: Tensor, *args: Any) -> Tensor:
        """``layer(x, *args)``, or ``x`` with probability ``layer_drop`` in training (layer drop).

        Eager: the draw is on the CPU generator (no device synchronisation) and a dropped layer is
        not run. Inside ``torch.compile`` a branch on a random value would split the graph, so the
        draw is on the device and the layer always runs, its output discarded where dropped: the
        same distribution, but the dropped layer's parameters get zero gradients instead of none
        (as under ZeRO, which fills missing gradients with zeros).
        """
        if not (self.training and layer_drop > 0):
            return layer(x, *args)
        if torch.compiler.is_compiling():
            keep = torch.rand((), device=x.device) >= layer_drop
            return torch.where(keep, layer(x, *args), x)
        return x if torch.rand(()).item() < layer_drop else layer(x, *args)


def init_bert_params(module: nn.Module) -> None:
    """fairseq's ``init_bert_params`` for the Linear layers under ``module``: N(0, 0.02), zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


_REGISTRY: dict[str, tuple[type, type[ContextNetwork]]] = {}


def register_context(name: str, config_class: type) -> Callable[[type[ContextNetwork]], type[ContextNetwork]]:
    """Class decorator: make ``config_class`` / the module available as ``context.type: name``."""

    def wrap(module_class: type[ContextNetwork]) -> type[ContextNetwork]:
        _REGISTRY[name] = (config_class, module_class)
        return module_class

    return wrap


def context_config_class(name: str) -> type:
    """The config dataclass of context network ``name``; KeyError with the known names otherwise."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown context network {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][0]


def registered_contexts() -> list[str]:
    """The ``context.type`` names of every registered network, sorted."""
    return sorted(_REGISTRY)


def build_context(config: Any) -> ContextNetwork:
    """Instantiate the context network described by ``config`` (a registered config dataclass)."""
    for config_class, module_class in _REGISTRY.values():
        if type(config) is config_class:
            return module_class(config)
    raise TypeError(f"no context network registered for {type(config).__name__}")
