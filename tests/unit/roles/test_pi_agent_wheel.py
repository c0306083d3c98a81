"""The wheel the pi_agent role installs on every board (packaging/pi-agent/build_wheel.py) and the
key it is built and named by (roles/pi_agent/files/source_key.py)."""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BUILD = ROOT / "packaging" / "pi-agent" / "build_wheel.py"
SOURCE_KEY = ROOT / "roles" / "pi_agent" / "files" / "source_key.py"


def build(wheel_dir: Path, project: Path = ROOT) -> Path:
    done = subprocess.run(
        [sys.executable, str(BUILD), "--project", str(project), "--wheel-dir", str(wheel_dir)],
        capture_output=True, text=True, check=False,
        env={"SOURCE_DATE_EPOCH": "315532800", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_the_pi_agent_package_and_its_data_files_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert info.startswith("pi_agent-")
    assert {n.split("/")[0] for n in names} == {"pi_agent", info}  # no distill/, no tui/
    sources = {
        f"pi_agent/{p.relative_to(ROOT / 'pi_agent').as_posix()}"
        for p in (ROOT / "pi_agent").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert {"pi_agent/defaults.toml", "pi_agent/reference_throughput.csv"} <= sources
    assert {n for n in names if n.startswith("pi_agent/")} == sources


def test_the_wheel_declares_no_dependencies_and_the_pi_agent_command(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        info = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(info).decode())
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert metadata["Name"] == "pi-agent"
    assert metadata.get_all("Requires-Dist") is None
    assert metadata.get_all("Provides-Extra") is None
    assert entry_points.split() == ["[console_scripts]", "pi-agent", "=", "pi_agent.cli:main"]


def test_the_same_sources_give_the_same_bytes(wheel: Path, tmp_path: Path) -> None:
    again = build(tmp_path)
    assert again.read_bytes() == wheel.read_bytes()


def copy_project(tmp_path: Path) -> Path:
    """The parts of the project the key could see: the agent, its packaging, the rest."""
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("pi_agent", "packaging/pi-agent", "roles/pi_agent/files"):
        shutil.copytree(ROOT / folder, project / folder, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", project / "pyproject.toml")
    (project / "distill").mkdir()
    (project / "distill" / "cli.py").write_text("# the workstation\n")
    return project


def key(project: Path) -> str:
    done = subprocess.run([sys.executable, str(SOURCE_KEY), str(project)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("edited", "changes_the_key"),
    [
        ("pi_agent/app.py", True),
        ("pi_agent/defaults.toml", True),
        ("packaging/pi-agent/pyproject.toml", True),
        ("pyproject.toml", False),  # the workstation's dependencies are not the agent's
        ("distill/cli.py", False),
    ],
    ids=lambda v: v if isinstance(v, str) else ("rebuilds" if v else "keeps the wheel"),
)
def test_the_wheel_is_keyed_by_the_agent_sources_only(
    tmp_path: Path, edited: str, changes_the_key: bool
) -> None:
    project = copy_project(tmp_path)
    before = key(project)
    assert key(project) == before
    with (project / edited).open("a") as handle:
        handle.write("\n# an edit\n")
    assert (key(project) != before) is changes_the_key


def test_the_wheel_of_a_copied_project_holds_that_copy(tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    (project / "pi_agent" / "extra.py").write_text('"""A module added to the agent."""\n')
    wheel = build(tmp_path / "wheels", project)
    assert "pi_agent/extra.py" in zipfile.ZipFile(wheel).namelist()
