"""``python -m pretrain report RUN_DIR``: the run's metrics as one PNG."""

from __future__ import annotations

from pathlib import Path

from speechssl.training.metrics_log import read_metrics

PANELS = [
    ("loss per masked frame", ["loss"], True),
    ("loss terms", ["contrastive", "diversity", "feature_penalty"], False),
    ("contrastive accuracy", ["accuracy"], True),
    ("perplexity", ["prob_perplexity", "code_perplexity"], True),
    ("Gumbel temperature", ["temperature"], False),
    ("learning rate", ["lr"], False),
    ("gradient norm", ["grad_norm"], False),
    ("throughput (audio-s / s)", ["audio_seconds_per_second"], False),
]


def load_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} a run folder?)")
    return read_metrics(path)


def render(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw every panel that has data; validation points are drawn over the training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_metrics(run_dir)
    output = Path(output) if output else Path(run_dir) / "report.png"
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (title, keys, with_valid) in zip(axes.flat, PANELS, strict=True):
        for key in keys:
            for split, style in (("train", "-"), ("valid", "o--")):
                if split == "valid" and not with_valid:
                    continue
                points = [(r["update"], r[key]) for r in records if r["split"] == split and key in r]
                if points:
                    x, y = zip(*points, strict=True)
                    ax.plot(x, y, style, label=f"{split} {key}" if len(keys) > 1 or with_valid else key,
                            markersize=4)
        ax.set_title(title)
        ax.set_xlabel("update")
        if ax.lines:
            ax.legend(fontsize=7)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.suptitle(f"{Path(run_dir).resolve().name}: {max((r['update'] for r in records), default=0)} updates")
    fig.tight_layout()
    fig.savefig(output, dpi=90)
    plt.close(fig)
    return output
