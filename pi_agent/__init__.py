"""pi-agent: the per-Pi daemon that serves the model, reports on the Pi, benchmarks it and
switches models safely.

    pi-agent serve --config /etc/pi-agent/agent.toml
    pi-agent bench --config /etc/pi-agent/agent.toml --tolerance 0.25

The Pi installs only this package (from a wheelhouse): it depends on the standard library alone,
so the daemon stays small (see ``pi_agent.footprint``).
"""

__version__ = "0.1.0"
