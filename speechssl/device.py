"""Moving batches to the device without making the host wait for it."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU tensor on ``device`` (and in ``dtype``) without making the host wait for the GPU: a
    copy from pageable memory waits for the work already queued, a copy from pinned memory does not."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device=device, dtype=dtype, non_blocking=True)
