"""Write an SVG screenshot of each screen to ``docs/screenshots/`` (for the README).

    .venv/bin/python -m tui.screenshots              # docs/screenshots/{fleet,run,...}.svg
    .venv/bin/python -m tui.screenshots --out /tmp/shots

The scene is the tests' (``tests/tui/fixtures``): three stand-in agents (``tui.testing``), one
of them throttled and one down, the recorded ``local.jsonl`` run replayed, the sample fleet
report, and an unparsable inventory for the error screen. Headless, no terminal needed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tui.agent import Tokens
from tui.app import FleetApp
from tui.settings import Settings
from tui.testing import BROKEN_INVENTORY, FakeAgent, sample_bench, sample_status

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "tui" / "fixtures"
PROJECT = FIXTURES / "project"
SIZE = (140, 40)
TOKEN = "demo-token"


@contextlib.contextmanager
def demo_fleet(folder: Path) -> Iterator[Settings]:
    """Settings over three live stand-in agents (pi-a, pi-b throttled) and one down (pi-c)."""
    agents = [
        FakeAgent(sample_status("pi-a", 51.0), TOKEN, bench=sample_bench(24.1)),
        FakeAgent(sample_status("pi-b", 83.5, throttled=0x50004), TOKEN, bench=sample_bench(13.2)),
    ]
    with contextlib.ExitStack() as stack:
        for agent in agents:
            stack.enter_context(agent)
        inventory = folder / "fleet.yml"
        inventory.write_text(
            "all:\n  children:\n"
            "    pi5:\n      hosts:\n"
            f"        pi-a: {{pi_agent_url: '{agents[0].url}'}}\n"
            f"        pi-b: {{pi_agent_url: '{agents[1].url}'}}\n"
            "    pi4:\n      hosts:\n"
            "        pi-c: {ansible_host: 127.0.0.1, pi_agent_port: 1}\n"
        )
        token = folder / "token"
        token.write_text(TOKEN + "\n")
        yield Settings(
            project_dir=PROJECT,
            inventory=(inventory,),
            tokens=Tokens(token_file=token),
            report=PROJECT / "reports" / "fleet-report.csv",
            refresh_s=3600,
        )


async def _until(pilot: object, condition: object, tries: int = 200) -> None:
    """Pause the pilot until ``condition()`` holds (no fixed sleeps)."""
    for _ in range(tries):
        if condition():  # type: ignore[operator]
            return
        await pilot.pause(0.05)  # type: ignore[attr-defined]
    raise TimeoutError("the screen never reached the expected state")


async def shoot(out: Path) -> list[Path]:
    """Take every screenshot; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp, demo_fleet(Path(tmp)) as settings:
        replay = FIXTURES / "events" / "local.jsonl"
        app = FleetApp(Settings(**{**settings.__dict__, "replay": replay}), mode="fleet")
        async with app.run_test(size=SIZE) as pilot:
            fleet = app.get_screen("fleet")
            await _until(pilot, lambda: fleet.polls > 0)  # type: ignore[attr-defined]
            await pilot.press("space", "down", "space")
            await pilot.pause()
            written.append(Path(app.save_screenshot("fleet.svg", str(out))))
            for key, name in (("f3", "run"), ("f4", "pipeline"), ("f5", "bench")):
                await pilot.press(key)
                if name == "run":
                    run = app.get_screen("run")
                    await _until(pilot, lambda r=run: r.finished is not None)  # type: ignore[attr-defined]
                await pilot.pause()
                written.append(Path(app.save_screenshot(f"{name}.svg", str(out))))
            await pilot.press("f1")
            await pilot.pause()
            written.append(Path(app.save_screenshot("help.svg", str(out))))
        (Path(tmp) / "broken.yml").write_text(BROKEN_INVENTORY)
        # relative, so the picture names the file as a user would type it
        broken = Settings(project_dir=PROJECT, inventory=(Path("broken.yml"),))
        app = FleetApp(broken, mode="fleet")
        with contextlib.chdir(tmp):
            async with app.run_test(size=SIZE) as pilot:
                await _until(pilot, lambda: bool(app.errors))
                await pilot.pause()
                written.append(Path(app.save_screenshot("error.svg", str(out.resolve()))))
    return written


def main(argv: list[str] | None = None) -> int:
    """Write the screenshots and list them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args(argv)
    for path in asyncio.run(shoot(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
