"""``split``: a deterministic dev set from a manifest, holding out whole speakers or a fraction.

Writes ``train`` and ``dev`` manifests (the input's format and suffix) into the output folder; an
output folder where one of them would be the input manifest itself is refused.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from speechssl.data.manifest import PATH_COLUMNS, SPEAKER_COLUMNS


def _rows(manifest: Path) -> tuple[list[str], list[dict], str | None]:
    """Lines to write (relative audio paths made absolute, so the new manifests work from their own
    folder), parsed rows, and the header line for TSV."""
    lines = [line for line in manifest.read_text().splitlines() if line.strip()]
    jsonl = manifest.suffix in (".jsonl", ".json")
    header = None if jsonl else lines[0]
    body = lines if jsonl else lines[1:]
    names = None if jsonl else header.split("\t")
    rows = [json.loads(b) if jsonl else dict(zip(names, next(csv.reader([b], delimiter="\t", quoting=csv.QUOTE_NONE)),
                                                  strict=False)) for b in body]
    out = []
    for row in rows:
        for column in PATH_COLUMNS:
            if row.get(column) and not Path(str(row[column])).is_absolute():
                row[column] = str((manifest.parent / str(row[column])).resolve())
                break
        out.append(json.dumps(row, ensure_ascii=False) if jsonl else "\t".join(str(row[n]) for n in names))
    return out, rows, header


def split_manifest(manifest: str | Path, output: str | Path, dev_speakers: int = 0, dev_fraction: float = 0.0,
                   seed: int = 0) -> dict:
    """Write ``train`` and ``dev`` manifests (same format) into ``output``.

    ``dev_speakers`` holds out that many speakers (seeded choice); otherwise ``dev_fraction`` of
    the speakers, or of the utterances when the manifest has no speaker column.
    """
    manifest, output = Path(manifest), Path(output)
    if (dev_speakers > 0) == (dev_fraction > 0):
        raise ValueError("give exactly one of dev_speakers > 0 or 0 < dev_fraction < 1")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {output} is a file; give a folder for train{manifest.suffix} and "
                              f"dev{manifest.suffix}")
    targets = [output / f"{name}{manifest.suffix}" for name in ("train", "dev")]
    for target in targets:
        if target.resolve() == manifest.resolve() or (target.exists() and target.samefile(manifest)):
            raise ValueError(f"output {target} would overwrite the input manifest {manifest}; "
                             "choose another output folder")
    lines, rows, header = _rows(manifest)
    column = next((c for c in SPEAKER_COLUMNS if rows and c in rows[0]), None)
    if column is not None:
        speakers = sorted({str(r[column]) for r in rows})
        count = dev_speakers or max(1, round(dev_fraction * len(speakers)))
        if count >= len(speakers):
            raise ValueError(f"cannot hold out {count} of {len(speakers)} speakers")
        rng = np.random.default_rng(seed)
        held = {speakers[i] for i in rng.choice(len(speakers), size=count, replace=False)}
        is_dev = [str(r[column]) in held for r in rows]
    else:
        if dev_speakers:
            raise ValueError(f"{manifest} has no speaker column (one of {', '.join(SPEAKER_COLUMNS)})")
        is_dev = [int(hashlib.sha256(f"{seed}:{line}".encode()).hexdigest(), 16) % 10**6 < dev_fraction * 10**6
                  for line in lines]
        held = set()
    output.mkdir(parents=True, exist_ok=True)
    for target, flag in zip(targets, (False, True), strict=True):
        chosen = [line for line, d in zip(lines, is_dev, strict=True) if d == flag]
        text = "\n".join(([header] if header is not None else []) + chosen) + "\n"
        target.write_text(text)
    return {"train": is_dev.count(False), "dev": is_dev.count(True), "dev_speakers": sorted(held)}
