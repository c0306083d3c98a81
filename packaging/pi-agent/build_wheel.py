"""Build the pi-agent wheel: the pi_agent package alone, no dependencies, the `pi-agent` command.

    python packaging/pi-agent/build_wheel.py --project . --wheel-dir dist/pi-agent

The project's own wheel carries distill/ and tui/ with their commands and dependencies, none of
which a board runs. This stages packaging/pi-agent/pyproject.toml next to a copy of pi_agent/
(without caches) in a temporary folder and builds that with pip, offline (no build isolation:
setuptools comes from the running Python). Set SOURCE_DATE_EPOCH for byte-identical rebuilds.
Prints the wheel's path.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


def build(project: Path, wheel_dir: Path) -> Path:
    """Build the wheel of ``project``'s pi_agent into ``wheel_dir``; the wheel's path."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pi-agent-build-") as tmp:
        stage = Path(tmp) / "pi-agent"
        stage.mkdir()
        shutil.copy2(HERE / "pyproject.toml", stage / "pyproject.toml")
        shutil.copytree(project / "pi_agent", stage / "pi_agent", ignore=IGNORED)
        out = Path(tmp) / "out"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
             "--no-build-isolation", "--disable-pip-version-check", "--wheel-dir", str(out),
             str(stage)],
            check=True,
        )  # fmt: skip
        (wheel,) = out.glob("pi_agent-*.whl")
        return Path(shutil.copy2(wheel, wheel_dir / wheel.name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=HERE.parents[1], help="the project root")
    parser.add_argument("--wheel-dir", type=Path, required=True, help="where the wheel goes")
    args = parser.parse_args(argv)
    sys.stdout.write(f"{build(args.project, args.wheel_dir)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
