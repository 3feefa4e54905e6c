"""``inspect``: what a shard directory holds, checked against its index."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from speechssl.data.shardset import read_index


def inspect(directory: str | Path, histogram: str | Path | None = None) -> dict:
    """Read every shard; returns a summary with ``problems`` listing any disagreement with the index."""
    directory = Path(directory)
    index = read_index(directory)
    durations: list[float] = []
    speakers: Counter[str] = Counter()
    charset: Counter[str] = Counter()
    problems: list[str] = []
    for shard in index["shards"]:
        path = directory / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']}: listed in the index but missing")
            continue
        keys, metas = [], {}
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if ext == "json":
                        metas[key] = json.load(tar.extractfile(member))
                    if not keys or keys[-1] != key:
                        keys.append(key)
        except (tarfile.TarError, OSError, json.JSONDecodeError) as e:
            problems.append(f"{shard['name']}: unreadable ({e})")
            continue
        if keys != shard["keys"]:
            problems.append(f"{shard['name']}: holds {len(keys)} samples, the index lists {len(shard['keys'])}"
                            + ("" if len(keys) != len(shard["keys"]) else " with other keys"))
        for meta in metas.values():
            durations.append(meta["num_samples"] / meta["sample_rate"])
            if meta.get("speaker") is not None:
                speakers[meta["speaker"]] += 1
            charset.update(meta.get("text") or "")
    totals = index["totals"]
    seconds = float(np.sum(durations)) if durations else 0.0
    if len(durations) != totals["num_samples"]:
        problems.append(f"found {len(durations)} samples, the index totals say {totals['num_samples']}")
    if abs(seconds - totals["seconds"]) > 0.01 * max(1, len(durations)):
        problems.append(f"found {seconds:.1f}s of audio, the index totals say {totals['seconds']}s")
    summary = {
        "directory": str(directory),
        "shards": len(index["shards"]),
        "utterances": len(durations),
        "hours": round(seconds / 3600, 4),
        "speakers": len(speakers),
        "duration_seconds": _stats(durations),
        "duration_histogram": _bins(durations),
        "charset": "".join(sorted(charset)),
        "skipped_at_build": index.get("skipped", {}),
        "problems": problems,
    }
    if histogram is not None and durations:
        _plot(durations, histogram, directory)
        summary["histogram"] = str(histogram)
    return summary


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    v = np.asarray(values)
    return {"min": round(float(v.min()), 3), "median": round(float(np.median(v)), 3),
            "mean": round(float(v.mean()), 3), "max": round(float(v.max()), 3)}


def _plot(durations: list[float], path: str | Path, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(durations, bins=50)
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("utterances")
    ax.set_title(f"{directory.name}: {len(durations)} utterances, {sum(durations) / 3600:.2f} h")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bins(durations: list[float], bins: int = 10) -> list[list[float]]:
    """``[low, high, count]`` per bin of the duration histogram."""
    if not durations:
        return []
    counts, edges = np.histogram(durations, bins=bins)
    return [[round(float(edges[i]), 3), round(float(edges[i + 1]), 3), int(c)] for i, c in enumerate(counts)]


def format_histogram(bins: list[list[float]], width: int = 40) -> str:
    top = max((b[2] for b in bins), default=1) or 1
    return "\n".join(f"{lo:8.2f} - {hi:8.2f} s  {'#' * round(width * c / top):<{width}} {c}" for lo, hi, c in bins)
