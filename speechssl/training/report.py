"""A run's ``metrics.jsonl`` as one PNG (``speechssl report RUN_DIR``; every run writes its
``report.png`` when it ends).

The panels are those of the metrics the run logged: a pretraining run shows its loss terms,
contrastive accuracy, codebook perplexities and Gumbel temperature; a fine-tuning run its CTC loss
and validation CER and WER. Both show the learning rate, gradient norm and throughput.
Validation points are drawn over the training curves.
"""

from __future__ import annotations

import math
from pathlib import Path

from speechssl.training.metrics_log import read_metrics

# (title, keys, whether validation points are drawn)
PANELS = [
    ("loss", ["loss"], True),
    ("loss terms", ["contrastive", "diversity", "feature_penalty"], False),
    ("contrastive accuracy", ["accuracy"], True),
    ("perplexity", ["prob_perplexity", "code_perplexity"], True),
    ("Gumbel temperature", ["temperature"], False),
    ("validation error rate", ["cer", "wer"], True),
    ("learning rate", ["lr"], False),
    ("gradient norm", ["grad_norm"], False),
    ("throughput (audio-s / s)", ["audio_seconds_per_second"], False),
]


def load_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} a run folder?)")
    return read_metrics(path)


def _points(records: list[dict], split: str, key: str) -> list[tuple[int, float]]:
    return [(r["update"], r[key]) for r in records
            if r.get("split") == split and isinstance(r.get(key), (int, float))]


def panels_with_data(records: list[dict]) -> list[tuple[str, list[str], bool]]:
    """The :data:`PANELS` that ``records`` (``metrics.jsonl`` lines) have something to draw in."""
    return [p for p in PANELS if any(_points(records, s, k) for k in p[1] for s in ("train", "valid"))]


def render(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw every panel that has data into ``output`` (default ``RUN_DIR/report.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_metrics(run_dir)
    output = Path(output) if output else Path(run_dir) / "report.png"
    panels = panels_with_data(records)
    if not panels:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} holds no training or validation record yet")
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, keys, with_valid) in zip(axes.flat, panels, strict=False):
        for key in keys:
            for split, style in (("train", "-"), ("valid", "o--")):
                points = _points(records, split, key) if split == "train" or with_valid else []
                if points:
                    x, y = zip(*points, strict=True)
                    ax.plot(x, y, style, markersize=4,
                            label=f"{split} {key}" if len(keys) > 1 or with_valid else key)
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.legend(fontsize=7)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.suptitle(f"{Path(run_dir).resolve().name}: {max((r['update'] for r in records), default=0)} updates")
    fig.tight_layout()
    fig.savefig(output, dpi=90)
    plt.close(fig)
    return output
