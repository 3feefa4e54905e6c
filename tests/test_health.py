"""The training-health monitor warns once per problem, with the metric, and not on a healthy run."""

from __future__ import annotations

import pytest

from speechssl.training.health import HealthMonitor


def _healthy(update: int) -> dict[str, float]:
    return {"prob_perplexity": 300.0, "code_perplexity": 250.0, "accuracy": 0.3 + update / 10_000,
            "contrastive": 4.6 - update / 500}


def test_a_healthy_run_raises_nothing() -> None:
    monitor = HealthMonitor(num_groups=2, max_updates=1000)
    for update in range(0, 1000, 10):
        monitor.check(update, _healthy(update))
    assert monitor.warnings == []


@pytest.mark.parametrize("change, kind, words", [
    ({"prob_perplexity": 3.0, "code_perplexity": 3.0}, "collapse", "codebook collapse"),
    ({"code_perplexity": 20.0}, "flat", "nearly flat"),
    ({"accuracy": 0.99}, "easy", "too easy"),
    ({"contrastive": 4.615}, "plateau", "has not moved"),
])
def test_each_problem_is_reported_once(change: dict[str, float], kind: str, words: str) -> None:
    monitor = HealthMonitor(num_groups=2, max_updates=1000)
    for update in range(0, 1000, 10):
        metrics = _healthy(update)
        if update >= 50 or kind == "plateau":
            metrics.update(change)
        monitor.check(update, metrics)
    assert monitor.reported == {kind}
    assert len(monitor.warnings) == 1 and words in monitor.warnings[0]
