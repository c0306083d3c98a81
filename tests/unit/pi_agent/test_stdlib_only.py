"""pi_agent depends on the standard library alone: its wheel declares no dependencies, so an import
of anything else would fail on a board (the role installs it with pip --no-deps)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "pi_agent"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def imported(source: str) -> set[str]:
    """Top-level names of every absolute import in ``source``, at any depth (lazy ones too)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_check_sees_imports_inside_functions() -> None:
    source = "import os\ndef f():\n    import yaml\n    from httpx import Client\n"
    assert imported(source) - sys.stdlib_module_names == {"yaml", "httpx"}


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_the_module_imports_the_standard_library_and_pi_agent_only(module: Path) -> None:
    outside = imported(module.read_text()) - sys.stdlib_module_names - {"pi_agent", "__future__"}
    assert not outside, f"{module.name} imports {sorted(outside)}"


def test_every_module_imports_without_site_packages(tmp_path: Path) -> None:
    # -I -S: no site-packages, no user site, no PYTHONPATH; only the package's own folder.
    names = [f"pi_agent.{p.stem}" for p in MODULES if p.stem != "__init__"]
    code = f"import sys; sys.path.insert(0, {str(PACKAGE.parent)!r}); import " + ", ".join(names)
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                          text=True, cwd=tmp_path, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
