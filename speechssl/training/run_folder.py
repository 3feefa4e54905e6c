"""A training job's hold on its run folder: a lock for the job's life, and the job config saved in
``config.yaml``, which a resumed run must match.

A resume with a changed config would silently mix two runs (a new ``trainer.lr`` is ignored by the
restored scheduler, a new ``warmup_updates`` makes the LR jump, a new model ends in a DeepSpeed
traceback), so it is refused with the changed keys listed, except for the keys in
``SAFE_TO_CHANGE``: how long to run, how often to log, validate and save, and how the job runs
(threads, compilation, loader workers). Those changes are taken, logged, and recorded with the
update they took effect at in ``config_changes.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from speechssl.config import ConfigError, to_dict
from speechssl.locking import FolderLock, FolderLocked
from speechssl.training import checkpoint

log = logging.getLogger("speechssl.train")

CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.jsonl"
SAFE_TO_CHANGE = (
    "trainer.max_updates", "trainer.stop_at", "trainer.max_minutes",  # how long (the LR schedule follows max_updates)
    "trainer.log_every", "trainer.validate_every", "trainer.max_valid_batches", "trainer.checkpoint_every",
    "trainer.keep_checkpoints", "trainer.record_samples",
    "trainer.resume", "trainer.output_dir", "trainer.device", "trainer.threads", "trainer.compile",
    "trainer.compile_mode", "data.num_workers",
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    keys = sorted(saved.keys() | current.keys())
    return {k: (saved.get(k, "<absent>"), current.get(k, "<absent>")) for k in keys if saved.get(k) != current.get(k)}


def resume_changes(config: Any, output: Path) -> dict[str, tuple[Any, Any]]:
    """The keys a resume in ``output`` would change, ``{key: (saved, new)}`` (empty when the job
    starts afresh or the folder has no ``config.yaml``); ConfigError for a change outside
    ``SAFE_TO_CHANGE``. Reads only: ``--dry-run`` asks it too."""
    path = output / CONFIG_FILE
    if checkpoint.resume_point(config.trainer.resume, output / "checkpoints") is None or not path.is_file():
        return {}
    changes = _changes(flatten(yaml.safe_load(path.read_text()) or {}), flatten(to_dict(config)))
    refused = {k: v for k, v in changes.items() if k not in SAFE_TO_CHANGE}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(f"{output} holds a run with another config, and resuming would mix the two: {listed}. "
                          f"Put those values back (they are in {path}), or use another trainer.output_dir "
                          f"(or trainer.resume=none to start over there). Keys that may change on resume: "
                          f"{', '.join(SAFE_TO_CHANGE)}")
    return changes


def check_and_save_config(config: Any, output: Path) -> None:
    """Compare the job config with the run folder's ``config.yaml`` when the job will resume
    (:func:`resume_changes`), record the changes taken, then save the config there (atomically)."""
    path = output / CONFIG_FILE
    point = checkpoint.resume_point(config.trainer.resume, output / "checkpoints")
    changes = resume_changes(config, output)
    if changes:
        update = int(point.name.split("_")[1]) if config.trainer.resume == "auto" else None
        record = {"update": update, "changed": {k: list(v) for k, v in changes.items()}}
        with (output / CHANGES_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.warning("resuming with changed settings: %s",
                    "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    elif point is not None and not path.is_file():
        log.warning("%s has no %s (a run from an older version): resuming without comparing configs", output,
                    CONFIG_FILE)
    output.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    os.replace(partial, path)


def open_run_folder(config: Any, rank: int, device) -> FolderLock | None:
    """Rank 0 locks ``trainer.output_dir`` for the job's life (FolderLocked if another job has it)
    and checks and saves the config; every rank raises if that failed (collective)."""
    from speechssl.training.distributed import all_reduce_sum, barrier

    output = Path(config.trainer.output_dir)
    lock, error = None, None
    if rank == 0:
        try:
            lock = FolderLock(output, "a training run folder").acquire()
            check_and_save_config(config, output)
        except (FolderLocked, ConfigError) as e:
            if lock is not None:
                lock.release()
            error = e
    failed = all_reduce_sum([float(error is not None)], device)[0]
    if error is not None:
        raise error
    if failed:
        raise ConfigError(f"rank 0 could not open {output} (see its error)")
    barrier()
    return lock
