"""The footprint measurement that `make bench` runs, on a short run."""

from __future__ import annotations

import pytest

from pi_agent.footprint import GOALS, measure


@pytest.mark.slow
def test_footprint_of_an_agent_without_a_model() -> None:
    result = measure(scrapes=50, idle_seconds=1.0)
    assert 5 < result["rss_mib"] <= GOALS["rss_mib"]
    assert result["metrics_p50_ms"] <= result["metrics_p99_ms"]
    assert result["scrapes"] == 50
