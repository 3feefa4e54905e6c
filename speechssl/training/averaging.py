"""Checkpoint averaging: the mean of the weights of several model files (as ESPnet's and icefall's
``average_checkpoints``), and the set of validated models a run keeps for it.

A run with ``trainer.average_models: N`` exports the model at each validation that makes the set:
the N best by the task's validation metric (``average_by: best``) or the N last (``last``), as
``validated/update_XXXXXXXX.pt`` listed in ``validated/index.json``, and writes their average to
``averaged.pt`` at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

INDEX = "index.json"


def average_files(paths: list[str | os.PathLike], output: str | os.PathLike) -> None:
    """Write a model file like ``paths[0]`` whose weights are the mean of the files' weights.
    Floating-point tensors are averaged (in float64, stored in their dtype); integer buffers such as
    BatchNorm's batch counters are taken from the last file. The files must hold the same model."""
    if not paths:
        raise ValueError("nothing to average: no model files given")
    blobs = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    first = blobs[0]
    if not isinstance(first, dict) or "state_dict" not in first:
        raise ValueError(f"{paths[0]} is not a speechssl model file")
    for path, blob in zip(paths[1:], blobs[1:], strict=True):
        if blob.get("format") != first.get("format") or blob["state_dict"].keys() != first["state_dict"].keys():
            raise ValueError(f"{path} does not hold the same kind of model as {paths[0]}")
        for key, value in blob["state_dict"].items():
            if value.shape != first["state_dict"][key].shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, {paths[0]} has "
                                 f"{tuple(first['state_dict'][key].shape)}")
    averaged = {}
    for key, value in first["state_dict"].items():
        if value.is_floating_point():
            total = sum(b["state_dict"][key].double() for b in blobs)
            averaged[key] = (total / len(blobs)).to(value.dtype)
        else:
            averaged[key] = blobs[-1]["state_dict"][key]
    torch.save({**first, "state_dict": averaged, "averaged_from": [str(p) for p in paths]}, output)


class ValidatedModels:
    """The models kept for averaging in ``folder``: ``keep`` of them, the best by a metric to
    minimise (``by="best"``) or the last (``by="last"``)."""

    def __init__(self, folder: Path, keep: int, by: str):
        if by not in ("best", "last"):
            raise ValueError(f"average_by must be best or last, got {by!r}")
        self.folder, self.keep, self.by = Path(folder), keep, by
        path = self.folder / INDEX
        self.entries: list[dict] = json.loads(path.read_text()) if path.is_file() else []

    def _rank(self, entries: list[dict]) -> list[dict]:
        """The entries in order of preference (the best or the newest first)."""
        if self.by == "last":
            return sorted(entries, key=lambda e: -e["update"])
        return sorted(entries, key=lambda e: (e["metric"], -e["update"]))

    def wants(self, metric: float) -> bool:
        """Whether a model with this validation metric, newer than all kept, would be kept."""
        if self.by == "last" or len(self.entries) < self.keep:
            return True
        return metric <= max(e["metric"] for e in self.entries)  # a tie goes to the newer model

    def add(self, update: int, metric: float, export) -> None:
        """Keep the model of ``update`` if it makes the set: ``export(path)`` writes it."""
        if not self.wants(metric):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"update_{update:08d}.pt"
        export(self.folder / name)
        kept = self._rank([*[e for e in self.entries if e["update"] != update],
                           {"update": update, "metric": metric, "file": name}])[: self.keep]
        self._write(kept)

    def forget_after(self, update: int) -> None:
        """Drop models validated after ``update`` (a resumed run repeats those updates)."""
        self._write([e for e in self.entries if e["update"] <= update])

    def _write(self, kept: list[dict]) -> None:
        if not kept and not self.entries:
            return
        tmp = self.folder / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(kept, indent=1) + "\n")
        os.replace(tmp, self.folder / INDEX)
        names = {e["file"] for e in kept}
        for old in self.entries:
            if old["file"] not in names:
                (self.folder / old["file"]).unlink(missing_ok=True)
        self.entries = kept

    def paths(self) -> list[Path]:
        """The files of the ``keep`` preferred entries, oldest first."""
        chosen = self._rank(self.entries)[: self.keep]
        return [self.folder / e["file"] for e in sorted(chosen, key=lambda e: e["update"])]
