"""``metrics.jsonl``: one JSON record per line (``update``, ``split`` and the values), appended as
a run goes. A crash can leave a torn last line: readers drop it with a warning instead of failing,
and the resume-time rewrite (dropping what a crashed run logged after its checkpoint) replaces the
file atomically, so a kill during it leaves the old file whole."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("speechssl.train")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of ``path``; lines that are not JSON records (a torn write) are dropped with a
    warning."""
    records, torn = [], 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(record, dict) and "update" in record:
            records.append(record)
        else:
            torn += 1
    if torn:
        log.warning("%s: dropped %d line(s) that are not whole records (a write cut short by a crash)", path, torn)
    return records


def rewrite_metrics(path: str | Path, records: list[dict]) -> None:
    """Replace ``path`` with ``records``, atomically."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.tmp")
    with partial.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
