"""The key of pi-agent's sources: what the wheel pushed to the boards is built and named by.

    python source_key.py /path/to/project        # prints 16 hex digits

The boards get the agent's own distribution (packaging/pi-agent: the pi_agent package alone, no
dependencies). Keying its wheel by ``pi_agent/`` and ``packaging/pi-agent/`` alone means that an
edit elsewhere in the project (distill/, tui/, the workstation's pyproject.toml) neither rebuilds
the wheel nor restarts an agent.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

SOURCES = ("pi_agent", "packaging/pi-agent")


def source_key(project: Path) -> str:
    """sha256 over the files (names and bytes) of the agent's package and its packaging."""
    digest = hashlib.sha256()
    files = sorted(
        path
        for folder in SOURCES
        for path in (project / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )
    for path in files:
        digest.update(str(path.relative_to(project)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    sys.stdout.write(source_key(Path(sys.argv[1])) + "\n")
    sys.exit(0)
