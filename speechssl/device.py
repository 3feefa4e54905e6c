"""Which device a job runs on, and moving batches there without making the host wait for it."""

from __future__ import annotations

import os

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def is_gpu(choice: str) -> bool:
    """Whether ``choice`` (``auto``, ``cpu`` or ``cuda``) means a GPU on this machine."""
    return choice == "cuda" or (choice == "auto" and torch.cuda.is_available())


def pick_device(choice: str) -> torch.device:
    """``auto``: this rank's GPU (``LOCAL_RANK``) if there is one, else the CPU; ``cuda`` fails
    clearly without a GPU."""
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {choice!r}")
    if not is_gpu(choice):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for, but no GPU is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU tensor on ``device`` (and in ``dtype``) without making the host wait for the GPU: a
    copy from pageable memory waits for the work already queued, a copy from pinned memory does not."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device=device, dtype=dtype, non_blocking=True)
