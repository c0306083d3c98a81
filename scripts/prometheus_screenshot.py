"""A screenshot of Prometheus's own graph page on the monitoring host, with headless Chromium.

    python scripts/prometheus_screenshot.py --url http://10.89.0.11:9090 \\
        --out docs/screenshots/prometheus-tokens.png \\
        --expr 'pi_agent_bench_tokens_per_second' --expr 'up{job="pi_agent"}'

Each ``--expr`` is one graph panel of the page (Prometheus's ``/graph?g0.expr=...`` URL, the last
``--range`` of data). Chromium is Debian's (``apt-get install chromium``); the page is drawn for
``--wait`` seconds of virtual time so that its queries have answered.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path


def graph_url(base: str, exprs: list[str], range_: str) -> str:
    """Prometheus's graph page with one panel per expression, as graphs over ``range_``."""
    query: dict[str, str] = {}
    for i, expr in enumerate(exprs):
        query |= {f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.range_input": range_}
    return f"{base.rstrip('/')}/graph?{urllib.parse.urlencode(query)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="Prometheus's base URL")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--expr", action="append", required=True, help="a PromQL expression")
    parser.add_argument("--range", default="15m", help="time range of the graphs")
    parser.add_argument("--size", default="1400,1000", help="window width,height")
    parser.add_argument("--wait", type=int, default=15, help="seconds of virtual time to draw")
    args = parser.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("prometheus_screenshot: chromium is missing (apt-get install chromium)",
              file=sys.stderr)  # fmt: skip
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial.png")
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--window-size={args.size}", f"--virtual-time-budget={args.wait * 1000}",
           f"--screenshot={partial}", graph_url(args.url, args.expr, args.range)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 or not partial.is_file():
        print(f"prometheus_screenshot: chromium exited {done.returncode}: "
              f"{done.stderr.strip()[-500:]}", file=sys.stderr)  # fmt: skip
        partial.unlink(missing_ok=True)
        return 1
    partial.replace(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
