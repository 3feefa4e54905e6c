"""Building WebDataset shards: ``{key}.flac`` (16-bit) + ``{key}.json`` per sample, and ``index.json``.

Inputs are decoded, checked and converted in worker processes; shards are cut and written in input
order by the main process, so the same inputs give byte-identical shards and index whatever the
number of workers. Bad inputs are skipped, counted by reason and listed in ``skipped.tsv``.
``index.json`` is removed first and written last, atomically: a killed job leaves no index.

The output folder is locked for the build (``.lock``): a second build into it fails, naming the
first. A finished shard set there (``index.json``), or shards of the same prefix that no build of
ours left unfinished, are replaced only with ``overwrite``; a killed build's leftovers (marked by
``.incomplete``, removed when the index is written) are cleared without asking, since make-shards
does not resume: it starts again.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from speechssl.data.audio import BadAudio, encode_flac, prepare, seconds_to_samples
from speechssl.data.entry import Entry, read_entry
from speechssl.data.shardset import FORMAT, INDEX
from speechssl.locking import FolderLock

REPORT = "skipped.tsv"
INCOMPLETE = ".incomplete"  # the prefixes of a build under way; its tars are leftovers if it dies
MTIME = 0  # fixed tar timestamps: reproducible shards
# A plain file-name part: no separators, no leading dot ("..", hidden files), no glob characters
# (the prefix is globbed to find the shards it replaces).
PREFIX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass
class ShardOptions:
    """sample_rate: target rate (resampled with soxr). max_count / max_megabytes / max_hours: a
    shard is closed before it would exceed any of them (0 = no limit). min_seconds / max_seconds:
    inputs outside are skipped. workers: decoding processes. prefix: shard file names."""

    sample_rate: int = 16000
    max_count: int = 2000
    max_megabytes: float = 256.0
    max_hours: float = 0.0
    min_seconds: float = 0.1
    max_seconds: float = 600.0
    workers: int = max(1, (os.cpu_count() or 1))
    prefix: str = "shard"

    def __post_init__(self) -> None:
        if not PREFIX.fullmatch(self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: shard names must stay in the output folder; use letters, "
                             "digits, '_', '-' and '.' (not first), e.g. 'shard'")


@dataclass
class Sample:
    key: str
    flac: bytes
    meta: bytes
    num_samples: int
    speaker: str | None
    text: str | None


@dataclass
class Skip:
    id: str
    path: str
    reason: str
    detail: str


def safe_key(entry_id: str) -> str:
    """A WebDataset-safe key: no dots (they start the extension), no slashes, no leading underscore."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", entry_id).strip("_") or "utt"
    return key[:120]


def _unique_keys(entries: list[Entry]) -> list[str]:
    """One distinct key per entry, in order: the first entry with a sanitized key keeps it, the
    next get ``-2``, ``-3``... skipping any key that another entry has or was given (ids ``a b``,
    ``a_b`` and ``a_b-2`` become ``a_b``, ``a_b-3``, ``a_b-2``)."""
    plain = [safe_key(entry.id) for entry in entries]
    taken = set(plain)
    keys, used = [], set()
    for key in plain:
        if key in used:
            n = 2
            while f"{key}-{n}" in taken:
                n += 1
            key = f"{key}-{n}"
            taken.add(key)
        used.add(key)
        keys.append(key)
    return keys


def _load(entry: Entry) -> tuple:
    if entry.synth is not None:
        from data_tools.synthetic import SAMPLE_RATE, render

        return render(**entry.synth), SAMPLE_RATE
    return read_entry(entry)


def convert(job: tuple[Entry, str, ShardOptions]) -> Sample | Skip:
    """Decode, check, resample and encode one entry (runs in a worker)."""
    entry, key, options = job
    try:
        samples, rate = _load(entry)
        frames = samples.size  # at the file's rate
        samples = prepare(samples, rate, options.sample_rate, options.min_seconds, options.max_seconds)
        flac, clipped = encode_flac(samples, options.sample_rate)
    except BadAudio as e:
        return Skip(entry.id, entry.path, e.reason, e.detail)
    except Exception as e:  # one bad file never stops the job; it is reported with its error
        return Skip(entry.id, entry.path, "error", f"{type(e).__name__}: {e}")
    meta = {
        **entry.extra,  # first: the fields below describe the stored audio, whatever a manifest says
        "id": entry.id,
        "path": entry.path,
        "sample_rate": options.sample_rate,
        "original_sample_rate": rate,
        "num_samples": int(samples.size),
        "duration": round(samples.size / options.sample_rate, 6),
        "text": entry.text,
        "speaker": entry.speaker,
        **({"clipped_samples": clipped} if clipped else {}),
        **({"segment": _segment(entry, rate, frames)} if entry.is_segment else {}),
    }
    return Sample(key, flac, json.dumps(meta, sort_keys=True, ensure_ascii=False).encode(), int(samples.size),
                  entry.speaker, entry.text)


def _segment(entry: Entry, rate: int, frames: int) -> dict:
    """Where a segment came from in its file (``path``): seconds as the manifest gave them, and the
    first sample and sample count at the file's ``rate``."""
    return {"offset": entry.offset, "duration": entry.duration, "channel": entry.channel,
            "start": seconds_to_samples(entry.offset, rate), "frames": frames}


def _converted(entries: list[Entry], options: ShardOptions) -> Iterator[Sample | Skip]:
    jobs = [(e, k, options) for e, k in zip(entries, _unique_keys(entries), strict=True)]
    if options.workers <= 1:
        yield from map(convert, jobs)
        return
    with multiprocessing.get_context("fork").Pool(options.workers) as pool:
        yield from pool.imap(convert, jobs, chunksize=4)


class _ShardCutter:
    """Writes samples into numbered shards, closing one before it would exceed a limit."""

    def __init__(self, output: Path, options: ShardOptions):
        self.output, self.options = output, options
        self.shards: list[dict] = []
        self.writer: wds.TarWriter | None = None
        self.current: dict = {}

    def _open(self) -> None:
        name = f"{self.options.prefix}-{len(self.shards):06d}.tar"
        self.stream = (self.output / name).open("wb")
        self.writer = wds.TarWriter(self.stream, encoder=False, mtime=MTIME, user="speechssl", group="speechssl")
        self.current = {"name": name, "num_samples": 0, "seconds": 0.0, "bytes": 0, "keys": [], "lengths": []}
        self.shards.append(self.current)

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.stream.close()
            self.current["bytes"] = (self.output / self.current["name"]).stat().st_size
            self.current["seconds"] = round(self.current["seconds"], 3)
            self.writer = None

    def add(self, sample: Sample) -> None:
        o = self.options
        seconds = sample.num_samples / o.sample_rate
        size = len(sample.flac) + len(sample.meta) + 1536  # tar headers and padding
        c = self.current
        full = self.writer is not None and c["num_samples"] > 0 and (
            (o.max_count and c["num_samples"] + 1 > o.max_count)
            or (o.max_megabytes and c["bytes"] + size > o.max_megabytes * 1e6)
            or (o.max_hours and c["seconds"] + seconds > o.max_hours * 3600))
        if self.writer is None or full:
            self._close()
            self._open()
            c = self.current
        self.writer.write({"__key__": sample.key, "flac": sample.flac, "json": sample.meta})
        c["num_samples"] += 1
        c["seconds"] += seconds
        c["bytes"] += size
        c["keys"].append(sample.key)
        c["lengths"].append(sample.num_samples)

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def _shard_files(output: Path, prefix: str) -> list[Path]:
    """The shards a build with ``prefix`` names (``{prefix}-NNNNNN.tar``), not those of a longer prefix."""
    name = re.compile(re.escape(prefix) + r"-\d{6,}\.tar")
    return sorted(p for p in output.glob(f"{prefix}-*.tar") if name.fullmatch(p.name))


def _make_room(output: Path, prefix: str, overwrite: bool) -> None:
    """Clear ``output`` for a build with ``prefix``: the old index, and the shards it replaces.

    Raises FileExistsError when a finished set (``index.json``) or shards named like the new ones
    are there and ``overwrite`` is not given, unless they are the leftovers of a killed build
    (listed in ``.incomplete``). The marker is written before anything is removed."""
    marker, index = output / INCOMPLETE, output / INDEX
    unfinished = {p for p in marker.read_text().split() if PREFIX.fullmatch(p)} if marker.is_file() else set()
    clash = [] if prefix in unfinished else _shard_files(output, prefix)
    if not overwrite and (index.is_file() or clash):
        what = f"a shard set ({INDEX})" if index.is_file() else f"shards named {clash[0].name}"
        raise FileExistsError(f"{output} already holds {what}; give --overwrite to replace it, "
                              "or choose another output folder")
    listed = []
    # An unreadable index is replaced all the same; only its shards cannot be named.
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        listed = [s["name"] for s in json.loads(index.read_text()).get("shards", [])] if index.is_file() else []
    marker.write_text("".join(f"{p}\n" for p in sorted(unfinished | {prefix})))
    index.unlink(missing_ok=True)  # no index may describe a half-written set
    for name in listed:
        if Path(name).name == name and name.endswith(".tar"):  # never a path out of the folder
            (output / name).unlink(missing_ok=True)
    for p in sorted(unfinished | {prefix}):
        for old in _shard_files(output, p):
            old.unlink()


def make_shards(entries: list[Entry], output: str | Path, options: ShardOptions | None = None,
                source: str = "", progress: bool = True, overwrite: bool = False) -> dict:
    """Write shards of ``entries`` into ``output``; returns the index (also saved as ``index.json``).

    ``overwrite``: replace a finished shard set in ``output`` (without it, FileExistsError). Raises
    :class:`~speechssl.locking.FolderLocked` while another build writes into ``output``."""
    options = options or ShardOptions()
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {output} is a file, not a folder")
    with FolderLock(output, "make-shards"):
        return _build(entries, output, options, source, progress, overwrite)


def _build(entries: list[Entry], output: Path, options: ShardOptions, source: str, progress: bool,
           overwrite: bool) -> dict:
    _make_room(output, options.prefix, overwrite)
    cutter = _ShardCutter(output, options)
    skips: list[Skip] = []
    speakers: set[str] = set()
    charset: Counter[str] = Counter()
    bar = tqdm(total=len(entries), unit="file", disable=not progress, desc="shards")
    seconds = 0.0
    for result in _converted(entries, options):
        if isinstance(result, Skip):
            skips.append(result)
        else:
            cutter.add(result)
            seconds += result.num_samples / options.sample_rate
            if result.speaker is not None:
                speakers.add(result.speaker)
            charset.update(result.text or "")
        bar.update(1)
        bar.set_postfix(hours=f"{seconds / 3600:.2f}", skipped=len(skips), refresh=False)
    bar.close()
    shards = cutter.finish()

    _write_report(output / REPORT, skips)
    params = asdict(options)
    params.pop("workers")  # does not change the output
    index = {
        "format": FORMAT,
        "version": 1,
        "sample_rate": options.sample_rate,
        "source": source,
        "parameters": params,
        "totals": {
            "shards": len(shards),
            "num_samples": sum(s["num_samples"] for s in shards),
            "seconds": round(sum(sum(s["lengths"]) for s in shards) / options.sample_rate, 3),
            "hours": round(sum(sum(s["lengths"]) for s in shards) / options.sample_rate / 3600, 4),
            "speakers": len(speakers),
            "inputs": len(entries),
            "skipped": len(skips),
        },
        "skipped": dict(sorted(Counter(s.reason for s in skips).items())),
        "charset": "".join(sorted(charset)),
        "shards": shards,
    }
    tmp = output / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, output / INDEX)
    (output / INCOMPLETE).unlink()
    return index


def _write_report(path: Path, skips: Iterable[Skip]) -> None:
    with path.open("w") as f:
        f.write("id\tpath\treason\tdetail\n")
        for s in skips:
            fields = (s.id, s.path, s.reason, s.detail)
            f.write("\t".join(x.replace("\t", " ").replace("\n", " ") for x in fields) + "\n")
