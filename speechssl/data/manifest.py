"""Corpus readers: the utterances of a folder, a manifest (TSV, CSV, JSON lines) or a LibriSpeech tree.

Every reader returns :class:`Entry` items in a deterministic order. Paths are resolved, but not
opened: a missing file is reported when the shard builder reaches it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from speechssl.data.audio import AUDIO_EXTENSIONS

PATH_COLUMNS = ("path", "audio", "audio_filepath", "file", "wav")
ID_COLUMNS = ("id", "utt_id", "utterance_id", "key")
TEXT_COLUMNS = ("text", "transcript", "sentence", "normalized_text")
SPEAKER_COLUMNS = ("speaker", "speaker_id", "spk", "client_id")


@dataclass
class Entry:
    """One utterance to shard: an id (unique within the corpus), where its audio is, optional
    transcript and speaker, and any other manifest fields."""

    id: str
    path: str
    text: str | None = None
    speaker: str | None = None
    extra: dict = field(default_factory=dict)
    synth: dict | None = None  # generated audio: keyword arguments of data_tools.synthetic.render


def _pick(row: dict, names: tuple[str, ...]) -> str | None:
    for name in names:
        if row.get(name) not in (None, ""):
            return str(row[name])
    return None


def _from_rows(rows: list[dict], base: Path, where: str) -> list[Entry]:
    entries = []
    for i, row in enumerate(rows):
        path = _pick(row, PATH_COLUMNS)
        if path is None:
            raise ValueError(f"{where}: row {i + 1} has no path column (one of {', '.join(PATH_COLUMNS)})")
        full = Path(path) if Path(path).is_absolute() else base / path
        used = {k for k in (*PATH_COLUMNS, *ID_COLUMNS, *TEXT_COLUMNS, *SPEAKER_COLUMNS) if k in row}
        entries.append(Entry(
            id=_pick(row, ID_COLUMNS) or str(Path(path).with_suffix("")),
            path=str(full),
            text=_pick(row, TEXT_COLUMNS),
            speaker=_pick(row, SPEAKER_COLUMNS),
            extra={k: v for k, v in row.items() if k not in used},
        ))
    return entries


def read_tsv(path: Path) -> list[Entry]:
    """A TSV manifest with a header row naming a path column; relative paths are relative to it."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return _from_rows(rows, path.parent, str(path))


def read_jsonl(path: Path) -> list[Entry]:
    """One JSON object per line (NeMo-style ``audio_filepath`` works too)."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
    return _from_rows(rows, path.parent, str(path))


def is_fairseq_manifest(path: Path) -> bool:
    lines = path.read_text().splitlines()
    if len(lines) < 2 or "\t" in lines[0]:
        return False
    parts = lines[1].split("\t")
    return len(parts) == 2 and parts[1].strip().isdigit()


def read_fairseq_manifest(path: Path) -> list[Entry]:
    """fairseq's ``.tsv``: a root folder line, then ``relative_path<TAB>num_samples`` lines."""
    lines = path.read_text().splitlines()
    root = Path(lines[0].strip())
    if not root.is_absolute():
        root = path.parent / root
    entries = []
    for line in lines[1:]:
        if line.strip():
            rel = line.split("\t")[0]
            entries.append(Entry(id=str(Path(rel).with_suffix("")), path=str(root / rel)))
    return entries


def read_librispeech(root: Path) -> list[Entry]:
    """A LibriSpeech-style tree: ``speaker/chapter/*.flac`` with ``*.trans.txt`` transcripts."""
    entries = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            if line.strip():
                utt, _, text = line.strip().partition(" ")
                entries.append(Entry(id=utt, path=str(trans.parent / f"{utt}.flac"), text=text,
                                     speaker=utt.split("-")[0]))
    return entries


def read_directory(root: Path) -> list[Entry]:
    """Every audio file below ``root`` (recursively, sorted); the id is the relative path."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    return [Entry(id=str(p.relative_to(root).with_suffix("")), path=str(p)) for p in files]


def read_source(source: str | Path) -> tuple[list[Entry], str]:
    """Entries of any supported source and the name of its kind."""
    source = Path(source)
    if source.is_dir():
        if next(source.rglob("*.trans.txt"), None) is not None:
            return read_librispeech(source), "librispeech"
        return read_directory(source), "directory"
    if not source.is_file():
        raise FileNotFoundError(f"input {source} does not exist")
    if source.suffix in (".jsonl", ".json"):
        return read_jsonl(source), "jsonl"
    if is_fairseq_manifest(source):
        return read_fairseq_manifest(source), "fairseq"
    return read_tsv(source), "tsv"
