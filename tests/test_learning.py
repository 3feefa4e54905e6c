"""The full objective really learns: the tiny model on one fixed batch of generated audio."""

from __future__ import annotations

import subprocess
import sys

from pretrain.overfit import OverfitConfig, run
from speechssl.config import build
from tests.conftest import REPO

CONFIG = str(REPO / "configs/pretrain/overfit_tiny.yaml")


def test_contrastive_loss_halves_without_codebook_collapse() -> None:
    config = build(OverfitConfig, CONFIG, ["steps=200"])
    history = run(config, echo=False)
    first = history[0]["contrastive"]
    last = sum(h["contrastive"] for h in history[-10:]) / 10
    assert last <= 0.5 * first, (first, last)
    groups = config.model.quantizer.num_groups
    assert min(h["prob_ppl"] for h in history[-10:]) > 2 * groups


def test_same_seed_same_losses() -> None:
    config = build(OverfitConfig, CONFIG, ["steps=3"])
    assert run(config, echo=False) == run(config, echo=False)
    other = build(OverfitConfig, CONFIG, ["steps=3", "seed=1"])
    assert run(other, echo=False) != run(config, echo=False)


def test_command_line() -> None:
    ok = subprocess.run([sys.executable, "-m", "pretrain.overfit", "--config", CONFIG, "steps=2", "log_every=1"],
                        capture_output=True, text=True, cwd=REPO, check=False)
    assert ok.returncode == 0, ok.stderr
    for term in ("contrastive=", "diversity=", "feature_pen=", "prob_ppl=", "code_ppl=", "temp="):
        assert term in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "pretrain.overfit", "--config", CONFIG, "model.context.layers=3"],
                         capture_output=True, text=True, cwd=REPO, check=False)
    assert bad.returncode == 2 and "model.context.layers: unknown key" in bad.stderr
