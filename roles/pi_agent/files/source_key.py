"""The key of pi-agent's sources: what the wheel pushed to the boards is built and named by.

    python source_key.py /path/to/project        # prints 16 hex digits

The project's wheel holds the workstation's packages too (distill, tui), which the boards never
run; keying the wheel by ``pi_agent/`` and ``pyproject.toml`` alone means that an edit elsewhere in
the project neither rebuilds the wheel nor restarts an agent.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def source_key(project: Path) -> str:
    """sha256 over the agent package's files (names and bytes) and pyproject.toml."""
    digest = hashlib.sha256()
    package = (project / "pi_agent").rglob("*")
    files = [project / "pyproject.toml"]
    files += sorted(p for p in package if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(project)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    sys.stdout.write(source_key(Path(sys.argv[1])) + "\n")
    sys.exit(0)
