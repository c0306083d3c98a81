"""The screens of fleet-tui: fleet, run, pipeline, bench (modes), help and error (modal)."""
