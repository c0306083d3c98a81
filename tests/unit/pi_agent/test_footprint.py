"""The footprint measurements that `make bench` runs, on short runs."""

from __future__ import annotations

import pytest

from pi_agent.footprint import FLOOD_GOALS, GOALS, measure, measure_flood


@pytest.mark.slow
def test_footprint_of_an_agent_without_a_model() -> None:
    result = measure(scrapes=50, idle_seconds=1.0)
    assert 5 < result["rss_mib"] <= GOALS["rss_mib"]
    assert result["metrics_p50_ms"] <= result["metrics_p99_ms"]
    assert result["scrapes"] == 50


@pytest.mark.slow
def test_flood_figures_of_an_agent_without_a_model() -> None:
    result = measure_flood(connections=500)
    assert result["flood_connections"] == result["flood_connected"] == 500
    assert result["flood_healthz_failures"] == 0
    assert 0 < result["flood_healthz_p50_ms"] <= result["flood_healthz_max_ms"]
    assert 5 < result["flood_rss_mib"] <= FLOOD_GOALS["flood_rss_mib"]
    assert 0 < result["flood_log_lines"] <= FLOOD_GOALS["flood_log_lines"]
    # Started with systemd's soft limit, the agent lifted it to the hard one.
    assert result["agent_nofile_soft"] == result["agent_nofile_hard"]
    assert result["meets_goals"] is True
