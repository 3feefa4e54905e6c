"""Corpus readers: the utterances of a folder, a LibriSpeech tree, or a manifest.

Manifests: TSV (a header naming a path column); JSON lines, NeMo's included, where ``offset`` and
``duration`` (seconds) make a row a segment of its file, as NeMo reads it; fairseq's ``.tsv``
(a root line, then ``path<TAB>num_samples``) with its ``.wrd`` / ``.ltr`` label files; lhotse
CutSets (``cuts.jsonl.gz`` or ``.jsonl``, see :mod:`speechssl.data.lhotse`). Gzipped JSON lines
(``.jsonl.gz``) are read as they are.

Every reader returns :class:`~speechssl.data.entry.Entry` items in a deterministic order. Paths are
resolved, but not opened: a missing file, or a segment past its file's end, is reported when the
shard builder reaches it; a malformed manifest (a label file of the wrong length, a negative
offset) is a ValueError that names the file.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

from speechssl.data.audio import AUDIO_EXTENSIONS
from speechssl.data.entry import Entry, parse_seconds
from speechssl.data.lhotse import is_cut, read_cuts

PATH_COLUMNS = ("path", "audio", "audio_filepath", "file", "wav")
ID_COLUMNS = ("id", "utt_id", "utterance_id", "key")
TEXT_COLUMNS = ("text", "transcript", "sentence", "normalized_text")
SPEAKER_COLUMNS = ("speaker", "speaker_id", "spk", "client_id")
SEGMENT_COLUMNS = ("offset", "duration")  # NeMo: seconds into the file, seconds to read
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def _pick(row: dict, names: tuple[str, ...]) -> str | None:
    for name in names:
        if row.get(name) not in (None, ""):
            return str(row[name])
    return None


def _seconds(row: dict, key: str, where: str) -> float | None:
    return None if row.get(key) is None else parse_seconds(row[key], f"{where}, {key}")


def _from_rows(rows: list[dict], base: Path, where: str, segments: bool = False) -> list[Entry]:
    """Entries of manifest rows; ``segments``: a row's ``offset`` / ``duration`` (seconds) cut its file."""
    entries = []
    for i, row in enumerate(rows):
        path = _pick(row, PATH_COLUMNS)
        if path is None:
            raise ValueError(f"{where}: row {i + 1} has no path column (one of {', '.join(PATH_COLUMNS)})")
        full = Path(path) if Path(path).is_absolute() else base / path
        cut = SEGMENT_COLUMNS if segments else ()
        used = {k for k in (*PATH_COLUMNS, *ID_COLUMNS, *TEXT_COLUMNS, *SPEAKER_COLUMNS, *cut) if k in row}
        offset, duration = (_seconds(row, k, f"{where}: row {i + 1}") for k in cut) if segments else (None, None)
        name = str(Path(path).with_suffix(""))
        entries.append(Entry(
            # Segments of one file differ by their offset.
            id=_pick(row, ID_COLUMNS) or (name if offset is None else f"{name}@{offset!r}"),
            path=str(full),
            text=_pick(row, TEXT_COLUMNS),
            speaker=_pick(row, SPEAKER_COLUMNS),
            extra={k: v for k, v in row.items() if k not in used},
            offset=offset or 0.0,
            duration=duration,
        ))
    return entries


def read_tsv(path: Path) -> list[Entry]:
    """A TSV manifest with a header row naming a path column; relative paths are relative to it."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return _from_rows(rows, path.parent, str(path))


def read_json_lines(path: Path) -> list[dict]:
    """The objects of a JSON-lines file, gunzipped when its name ends in ``.gz``; blank lines are skipped."""
    with (gzip.open(path, "rt") if path.suffix == ".gz" else path.open()) as f:
        lines = f.read().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
            if not isinstance(rows[-1], dict):
                raise ValueError(f"{path}:{n}: not a JSON object")
    return rows


def read_jsonl(path: Path, rows: list[dict] | None = None) -> list[Entry]:
    """One JSON object per line (``rows``: those already read). NeMo's rows work as NeMo reads them:
    ``audio_filepath``, and ``duration`` seconds from ``offset`` (default 0) when they are given;
    a row with an ``offset`` and no id is named ``{path}@{offset}``."""
    return _from_rows(read_json_lines(path) if rows is None else rows, path.parent, str(path), segments=True)


def is_fairseq_manifest(path: Path) -> bool:
    lines = path.read_text().splitlines()
    if len(lines) < 2 or "\t" in lines[0]:
        return False
    parts = lines[1].split("\t")
    return len(parts) == 2 and parts[1].strip().isdigit()


def read_fairseq_manifest(path: Path) -> list[Entry]:
    """fairseq's ``.tsv``: a root folder line (relative to the manifest's folder unless absolute),
    then ``relative_path<TAB>num_samples`` lines.

    The label files beside it, of the same stem, give the transcripts, line by line: ``.wrd``
    (words) is the text; without it, the text is rebuilt from ``.ltr`` (letters separated by spaces,
    ``|`` between words). When both are there, the letters line is kept too, as ``ltr``.
    """
    lines = path.read_text().splitlines()
    root = Path(lines[0].strip())
    if not root.is_absolute():
        root = path.parent / root
    paths = [line.split("\t")[0] for line in lines[1:] if line.strip()]
    words, letters = (_labels(path, path.with_suffix(suffix), len(paths)) for suffix in (".wrd", ".ltr"))
    entries = []
    for i, rel in enumerate(paths):
        text = None
        if words:
            text = words[i].strip()
        elif letters:
            text = _letters_to_text(letters[i])
        entries.append(Entry(id=str(Path(rel).with_suffix("")), path=str(root / rel), text=text or None,
                             extra={"ltr": letters[i].strip()} if words and letters else {}))
    return entries


def _labels(manifest: Path, labels: Path, count: int) -> list[str] | None:
    """The lines of a fairseq label file (None when there is none), one per audio line of ``manifest``."""
    if not labels.is_file():
        return None
    lines = labels.read_text().splitlines()
    if len(lines) != count:
        raise ValueError(f"{labels} has {len(lines)} lines but {manifest} lists {count} audio files; "
                         "a label file needs one line per audio line, in the same order")
    return lines


def _letters_to_text(line: str) -> str:
    """A ``.ltr`` line as text: ``H E L L O | W O R L D |`` is ``HELLO WORLD``."""
    return " ".join("".join(" " if c == "|" else c for c in line.split()).split())


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
    if source.name.endswith(JSON_SUFFIXES):
        rows = read_json_lines(source)
        if rows and is_cut(rows[0]):
            return read_cuts(rows, str(source)), "lhotse"
        return read_jsonl(source, rows), "jsonl"
    if is_fairseq_manifest(source):
        return read_fairseq_manifest(source), "fairseq"
    return read_tsv(source), "tsv"
