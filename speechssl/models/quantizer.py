"""Gumbel product quantizer (wav2vec 2.0 targets; fairseq ``GumbelVectorQuantizer``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.models.config import QuantizerConfig


@dataclass
class QuantizerOutput:
    """quantized: ``(B, T, codevector_dim)`` fp32; codes: ``(B, T, G)`` chosen entries;
    prob_perplexity / code_perplexity: scalars summed over groups (max G*V); temperature: the Gumbel
    temperature used, a 0-dim fp32 tensor."""

    quantized: Tensor
    codes: Tensor
    prob_perplexity: Tensor
    code_perplexity: Tensor
    temperature: Tensor


def _perplexity(probs: Tensor, weights: Tensor) -> Tensor:
    """``exp(entropy)`` of the weighted mean of ``probs (N, G, V)`` over N, summed over G."""
    mean = (probs * weights[:, None, None]).sum(0) / weights.sum().clamp_min(1.0)
    return torch.exp(-(mean * torch.log(mean + 1e-7)).sum(-1)).sum()


class GumbelVectorQuantizer(nn.Module):
    """``G`` groups of ``V`` learned codevectors; a frame picks one per group and concatenates them.

    Training uses hard straight-through Gumbel-softmax at the current temperature, eval the argmax.
    The logits, the selection and the perplexities run in fp32 whatever the autocast state.
    """

    def __init__(self, input_dim: int, codevector_dim: int, config: QuantizerConfig):
        super().__init__()
        self.num_groups = config.num_groups
        self.num_vars = config.num_vars
        self.temp_start, self.temp_end, self.temp_decay = config.temp_start, config.temp_end, config.temp_decay
        # forward reads the update count from a buffer: torch.compile would specialise its graph on
        # the int attribute and recompile at every update. Integer, so half-precision casts keep it.
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.num_updates = 0
        groups_vars = config.num_groups * config.num_vars
        self.codevectors = nn.Parameter(
            torch.empty(config.num_groups, config.num_vars, codevector_dim // config.num_groups).uniform_())
        layers: list[nn.Module] = []
        dim = input_dim
        for _ in range(config.weight_proj_depth - 1):
            layers += [nn.Linear(dim, input_dim * config.weight_proj_factor), nn.GELU()]
            dim = input_dim * config.weight_proj_factor
        last = nn.Linear(dim, groups_vars)
        if config.weight_proj_depth == 1:  # fairseq's initialisation of a single projection
            nn.init.normal_(last.weight, mean=0.0, std=1.0)
            nn.init.zeros_(last.bias)
        self.weight_proj = nn.Sequential(*layers, last)

    def _logits(self, x: Tensor) -> Tensor:
        """The code logits in fp32, also when the module's weights are fp16/bf16 (DeepSpeed's
        half-precision modes convert the whole model)."""
        for layer in self.weight_proj:
            x = F.linear(x, layer.weight.float(), layer.bias.float()) if isinstance(layer, nn.Linear) else layer(x)
        return x

    def set_num_updates(self, num_updates: int) -> None:
        """Called by the trainer: the temperature follows the update count."""
        self.num_updates = num_updates
        self.update_count.fill_(num_updates)

    @property
    def temperature(self) -> float:
        return max(self.temp_start * self.temp_decay**self.num_updates, self.temp_end)

    def _temperature(self) -> Tensor:
        """:attr:`temperature` from the ``update_count`` buffer, computed on its device in float64:
        a 0-dim fp32 tensor."""
        decayed = self.temp_start * torch.pow(self.temp_decay, self.update_count.double())
        return decayed.clamp_min(self.temp_end).float()

    def forward(self, x: Tensor, weights: Tensor | None = None) -> QuantizerOutput:
        """x: ``(B, T, C)``; weights: ``(B, T)`` (bool or float) selecting the frames that count in
        the perplexities (the masked ones in pretraining); None counts all."""
        batch, length, _ = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self._logits(x.float()).view(batch * length, self.num_groups, self.num_vars)
            w = (torch.ones(batch * length, device=x.device) if weights is None
                 else weights.reshape(-1).float())
            hard = F.one_hot(logits.argmax(-1), self.num_vars).float()
            prob_perplexity = _perplexity(logits.softmax(-1), w)
            code_perplexity = _perplexity(hard, w)
            temperature = self._temperature()
            if self.training:
                hard = F.gumbel_softmax(logits, tau=temperature, hard=True)
            quantized = torch.einsum("ngv,gvd->ngd", hard, self.codevectors.float())
        return QuantizerOutput(
            quantized=quantized.reshape(batch, length, -1),
            codes=hard.argmax(-1).view(batch, length, self.num_groups),
            prob_perplexity=prob_perplexity,
            code_perplexity=code_perplexity,
            temperature=temperature,
        )
