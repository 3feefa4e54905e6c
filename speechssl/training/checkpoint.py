"""Checkpoints that a crash cannot spoil.

Layout: ``checkpoints/update_00000100/`` holds DeepSpeed's files (model, optimizer, scheduler),
one ``rank{r}.pt`` per rank (data loader state, RNG states) and, once every rank has finished,
``COMPLETE``. ``checkpoints/LATEST`` names the newest complete one and is replaced atomically after
it is complete, so a save killed half-way leaves the previous checkpoint in charge.

Every file of a checkpoint is read with ``torch.load(weights_only=True)`` (``safe_load``), DeepSpeed's
too (``use_safe_loading``): tensors, plain containers and a short list of known classes, never
arbitrary pickled objects, so resuming from a checkpoint folder someone else wrote runs no code.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from speechssl.training.distributed import barrier


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds pickled objects other than tensors and plain data."""


def _allowed_classes() -> list:
    """What our checkpoints hold besides tensors and plain containers: numpy arrays (the RNG
    state), and DeepSpeed's loss scaler, ZeRO stage and fragment records (its optimizer states)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location=None):
    """``torch.load`` that refuses pickled code (UnsafeCheckpoint) instead of running it."""
    with torch.serialization.safe_globals(_allowed_classes()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            detail = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), str(e)[:200])
            raise UnsafeCheckpoint(f"refusing to load {path}: it holds pickled objects that are not weights or "
                                   f"plain data ({detail}); loading it could run code. Resume only from "
                                   "checkpoints this project wrote.") from None


def use_safe_loading(engine) -> None:
    """Make DeepSpeed read checkpoint files through ``safe_load`` (its own engine loads with
    ``weights_only=False``). Every load of model, optimizer and ZeRO states goes through
    ``engine.checkpoint_engine.load``."""
    engine.checkpoint_engine.load = safe_load


LATEST = "LATEST"
COMPLETE = "COMPLETE"


def tag(update: int) -> str:
    return f"update_{update:08d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save(engine, root: Path, update: int, rank: int, rank_state: dict, keep: int) -> Path:
    """Save on every rank (collective); returns the checkpoint folder."""
    name = tag(update)
    engine.save_checkpoint(str(root), tag=name, client_state={"update": update}, save_latest=False)
    folder = root / name
    _atomic_write(folder / f"rank{rank}.pt", lambda p: torch.save(rank_state, p))
    barrier()
    if rank == 0:
        (folder / COMPLETE).write_text(f"{update}\n")
        _atomic_write(root / LATEST, lambda p: p.write_text(name + "\n"))
        _prune(root, keep, current=name)
    barrier()
    return folder


def _prune(root: Path, keep: int, current: str) -> None:
    folders = sorted(p for p in root.glob("update_*") if p.is_dir())
    complete = [p for p in folders if (p / COMPLETE).is_file()]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for broken in folders:  # left by a save that was killed
        if not (broken / COMPLETE).is_file() and broken.name != current:
            shutil.rmtree(broken, ignore_errors=True)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = root / LATEST
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if (folder / COMPLETE).is_file():
            return folder
    complete = sorted(p for p in root.glob("update_*") if (p / COMPLETE).is_file())
    return complete[-1] if complete else None


def resume_point(resume: str, root: Path) -> Path | None:
    """The checkpoint a run with ``trainer.resume`` continues from: None for ``none`` (or ``auto``
    with no complete checkpoint under ``root``), the newest complete one for ``auto``, else the
    folder given."""
    if resume == "none":
        return None
    return latest(root) if resume == "auto" else Path(resume)


def load(engine, folder: Path, rank: int) -> tuple[int, dict | None]:
    """Restore DeepSpeed's state; returns the update count and this rank's own state."""
    if not (folder / COMPLETE).is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint")
    path, client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {folder}")
    own = folder / f"rank{rank}.pt"
    rank_state = safe_load(own) if own.is_file() else None
    return int(client["update"]), rank_state
