"""The shards a job reads: shard directories (with mixing weights) or brace patterns, resolved
against their ``index.json`` so every shard's sample keys and lengths are known before reading."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand

INDEX = "index.json"
FORMAT = "speechssl-shards"


@dataclass(frozen=True)
class Shard:
    """One tar file: its path, sample keys and lengths (in samples), and the source it came from."""

    path: str
    keys: tuple[str, ...]
    lengths: tuple[int, ...]
    source: int


def read_index(directory: str | Path) -> dict:
    """The ``index.json`` of a shard directory; a clear error when it is missing or foreign."""
    path = Path(directory) / INDEX
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"shard directory {directory} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {INDEX} (not a shard directory, or its build did not finish)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a speechssl shard index")
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"name", "keys", "lengths"} <= s.keys()
                                               for s in shards):
        raise ValueError(f"{path}: no valid 'shards' list (each shard needs name, keys and lengths); "
                         "rebuild it with make-shards")
    if not isinstance(index.get("sample_rate"), int):
        raise ValueError(f"{path}: no integer 'sample_rate'")
    return index


class ShardSet:
    """Sources of shards with mixing weights.

    Each source is a shard directory or a brace pattern of tar files (``/data/shard-{000000..000099}.tar``)
    whose directory holds the ``index.json`` that lists them. A weight of 2 reads a source twice per
    epoch, 0.5 reads a seeded half of its shards.
    """

    def __init__(self, sources: list[str] | str, weights: list[float] | None = None):
        sources = [sources] if isinstance(sources, str) else list(sources)
        if not sources:
            raise ValueError("no shard sources given")
        weights = [1.0] * len(sources) if weights is None else list(weights)
        if len(weights) != len(sources) or any(w <= 0 for w in weights):
            raise ValueError(f"weights {weights} must be positive, one per source ({len(sources)})")
        self.sources, self.weights = sources, weights
        self.shards: list[list[Shard]] = [self._resolve(s, i) for i, s in enumerate(sources)]
        rates = {self.sample_rate_of(s) for s in sources}
        if len(rates) > 1:
            raise ValueError(f"sources have different sample rates: {sorted(rates)}")
        self.sample_rate = rates.pop()

    @staticmethod
    def _directory(source: str) -> str:
        return source if Path(source).is_dir() else str(Path(source).parent)

    @staticmethod
    def sample_rate_of(source: str) -> int:
        return int(read_index(ShardSet._directory(source))["sample_rate"])

    def charset(self) -> str:
        """Every character of the sources' transcripts, from their indexes (a pattern's whole
        directory counts)."""
        return "".join(sorted({c for s in self.sources for c in read_index(self._directory(s)).get("charset", "")}))

    def transcripts(self) -> Iterator[str]:
        """The ``text`` of every sample that has one, read from the tars' json members (no audio is
        decoded), each shard once whatever its weight."""
        import webdataset as wds

        paths = [shard.path for shards in self.shards for shard in shards]
        for sample in wds.DataPipeline(wds.SimpleShardList(paths), wds.tarfile_to_samples()):
            if "json" in sample:
                text = json.loads(sample["json"]).get("text")
                if text:
                    yield text

    @staticmethod
    def _resolve(source: str, number: int) -> list[Shard]:
        if Path(source).is_dir():
            directory, wanted = Path(source), None
        elif "{" not in source and not Path(source).is_file():
            raise FileNotFoundError(f"shard directory {source} does not exist")
        else:
            paths = list(braceexpand.braceexpand(source))
            directories = {str(Path(p).parent) for p in paths}
            if len(directories) != 1:
                raise ValueError(f"{source}: a pattern must name shards of one directory")
            directory, wanted = Path(directories.pop()), [Path(p).name for p in paths]
        index = read_index(directory)
        listed = {s["name"]: s for s in index["shards"]}
        names = [s["name"] for s in index["shards"]] if wanted is None else wanted
        missing = [n for n in names if n not in listed]
        if missing:
            raise FileNotFoundError(f"{source}: {len(missing)} shard(s) not in {directory / INDEX}, e.g. {missing[0]}")
        shards = []
        for name in names:
            entry = listed[name]
            path = directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {directory / INDEX} but does not exist")
            shards.append(Shard(str(path), tuple(entry["keys"]), tuple(entry["lengths"]), number))
        return shards

    def fingerprint(self) -> str:
        """Identifies the set (paths and counts): a saved loader state only fits the same set."""
        import hashlib

        h = hashlib.sha256()
        for source, weight, shards in zip(self.sources, self.weights, self.shards, strict=True):
            h.update(f"{source}|{weight}|".encode())
            for s in shards:
                h.update(f"{s.path}:{len(s.keys)};".encode())
        return h.hexdigest()[:16]
