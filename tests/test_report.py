"""The report PNG draws the panels of what the run logged: pretraining or fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speechssl.training.report import load_metrics, panels_with_data, render


def _write(run: Path, records: list[dict]) -> None:
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_fine_tuning_run_gets_its_loss_and_error_rate_curves(tmp_path: Path) -> None:
    run = tmp_path / "ctc"
    _write(run, [{"update": u, "split": "train", "loss": 100.0 / u, "lr": 1e-3, "grad_norm": 5.0,
                  "audio_seconds_per_second": 90.0} for u in range(1, 11)]
           + [{"update": u, "split": "valid", "loss": 50.0 / u, "cer": 0.5 / u, "wer": 0.9 / u} for u in (5, 10)])
    titles = [title for title, _, _ in panels_with_data(load_metrics(run))]
    assert titles == ["loss", "validation error rate", "learning rate", "gradient norm", "throughput (audio-s / s)"]
    assert render(run) == run / "report.png" and (run / "report.png").stat().st_size > 10_000


def test_a_pretraining_run_gets_its_quantizer_panels(tmp_path: Path) -> None:
    run = tmp_path / "pretrain"
    keys = {"loss": 4.0, "contrastive": 3.9, "diversity": 0.4, "feature_penalty": 0.1, "accuracy": 0.2,
            "prob_perplexity": 40.0, "code_perplexity": 38.0, "temperature": 2.0, "lr": 1e-3}
    _write(run, [{"update": u, "split": "train", **keys} for u in range(1, 6)])
    titles = [title for title, _, _ in panels_with_data(load_metrics(run))]
    assert "contrastive accuracy" in titles and "Gumbel temperature" in titles
    assert "validation error rate" not in titles and "gradient norm" not in titles
    assert render(run, tmp_path / "elsewhere.png").is_file()


def test_a_run_without_records_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl not found"):
        render(tmp_path)
    _write(tmp_path / "empty", [{"update": 0, "split": "data", "samples": 3}])
    with pytest.raises(ValueError, match="no training or validation record"):
        render(tmp_path / "empty")
