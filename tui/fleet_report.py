"""``fleet-report``: the fleet benchmark report from the summaries the bench role fetched, on the
workstation (the role runs this installed command).

    fleet-report --results results --hosts pi-1 pi-2 pi-3
    fleet-report --results results --hosts pi-1 --csv out.csv --md out.md --png out.png

Reads each host's newest ``results/<host>/<timestamp>.json`` (the agent's benchmark summary, with
the model's name added by the role) and writes the report that the TUI's bench screen reads (CSV
through ``tui.report.write_report``), a Markdown table, and a PNG chart of generated tokens/s per
host against the regressor's expectation. A file whose content would not change is not rewritten;
the last line of stdout is JSON ``{"changed": [...], "rows": N}`` for Ansible.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from tui.report import COLUMNS, BenchRow, read_report, write_report


def latest_summary(results: Path, host: str) -> dict | None:
    """The newest summary fetched for ``host`` (file names are UTC timestamps)."""
    summaries = sorted((results / host).glob("*.json"))
    return json.loads(summaries[-1].read_text()) if summaries else None


def rows_of(host: str, summary: dict) -> list[BenchRow]:
    """One row per thread count: prompt and generation tokens/s, the expectation, the gate."""
    meta = summary.get("metadata", {})
    by_threads: dict[int, dict[str, dict]] = {}
    for result in summary.get("results", []):
        kind = "tg" if str(result["test"]).startswith("tg") else "pp"
        by_threads.setdefault(int(result["threads"]), {})[kind] = result
    rows = []
    for threads, kinds in sorted(by_threads.items()):
        tg = kinds.get("tg", {})
        expected = tg.get("predicted")
        rows.append(
            BenchRow(
                host=host,
                board=str(meta.get("board") or "unknown"),
                model=str(summary.get("model_name") or meta.get("model_sha256", "")[:12]),
                quant=str(meta.get("quant") or ""),
                threads=threads,
                pp_tok_s=round(float(kinds.get("pp", {}).get("tokens_per_second", 0.0)), 3),
                tg_tok_s=round(float(tg.get("tokens_per_second", 0.0)), 3),
                expected_tg_tok_s=None if expected is None else round(float(expected), 3),
                ok=bool(summary.get("gate", {}).get("passed", False)),
            )
        )
    return rows


def markdown(rows: list[BenchRow], missing: list[str]) -> str:
    """The report as a Markdown table (an expectation of ``-``: no reference for the board)."""
    lines = [
        "# Fleet benchmark",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for row in rows:
        expected = "-" if row.expected_tg_tok_s is None else f"{row.expected_tg_tok_s:.2f}"
        lines.append(
            f"| {row.host} | {row.board} | {row.model} | {row.quant} | {row.threads} "
            f"| {row.pp_tok_s:.2f} | {row.tg_tok_s:.2f} | {expected} | {str(row.ok).lower()} |"
        )
    if missing:
        lines += ["", f"No benchmark fetched for: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def chart(rows: list[BenchRow]) -> bytes:
    """Generated tokens/s per host (bars) against the regressor's expectation (markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.host}\n{r.threads} thr" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.6), dpi=100)
    colors = ["#4c72b0" if not r.below_expected else "#c44e52" for r in rows]
    ax.bar(labels, [r.tg_tok_s for r in rows], color=colors, label="measured")
    expected = [(i, r.expected_tg_tok_s) for i, r in enumerate(rows) if r.expected_tg_tok_s]
    if expected:
        ax.scatter(*zip(*expected, strict=True), marker="_", s=900, color="black",
                   linewidths=2, label="expected (regressor)", zorder=3)  # fmt: skip
    ax.set_ylabel("generated tokens/s")
    ax.set_title("Fleet benchmark: tokens/s per host")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` unless the file already holds it; whether it wrote."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="results/<host>/ folders")
    parser.add_argument("--hosts", nargs="+", required=True, help="hosts in the report, in order")
    parser.add_argument("--csv", type=Path, help="default: <results>/fleet-report.csv")
    parser.add_argument("--md", type=Path, help="default: <results>/fleet-report.md")
    parser.add_argument("--png", type=Path, help="default: <results>/fleet-report.png")
    args = parser.parse_args(argv)
    csv_path = args.csv or args.results / "fleet-report.csv"
    md_path = args.md or args.results / "fleet-report.md"
    png_path = args.png or args.results / "fleet-report.png"
    rows: list[BenchRow] = []
    missing = []
    for host in args.hosts:
        summary = latest_summary(args.results, host)
        if summary is None:
            missing.append(host)
        else:
            rows.extend(rows_of(host, summary))
    changed = []
    try:
        same = csv_path.is_file() and read_report(csv_path) == rows
    except ValueError:
        same = False
    if not same:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        write_report(csv_path, rows)
        changed.append(str(csv_path))
    if write_if_changed(md_path, markdown(rows, missing).encode()):
        changed.append(str(md_path))
    if rows and write_if_changed(png_path, chart(rows)):
        changed.append(str(png_path))
    outcome = {"changed": changed, "rows": len(rows), "missing": missing,
               "csv": str(csv_path), "md": str(md_path), "png": str(png_path)}  # fmt: skip
    sys.stdout.write(json.dumps(outcome) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
