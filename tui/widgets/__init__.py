"""Widgets of fleet-tui: the run and recap tables, the throughput chart."""
