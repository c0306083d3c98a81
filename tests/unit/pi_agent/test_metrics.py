"""The whole /metrics page of fake Pi 4 and Pi 5 trees, against golden files.

Regenerate after a deliberate change: PI_AGENT_UPDATE_GOLDEN=1 pytest tests/unit/pi_agent.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import Counter
from pathlib import Path

import pytest

from pi_agent import metrics
from pi_agent.host import Host, decode_throttled, parse_vcgencmd_throttled

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pi_agent"


def fake_clock():
    ticks = itertools.count()
    return lambda: next(ticks) * 0.001


def _fake_statvfs(path: Path) -> os.statvfs_result:
    # A 32 GB card, 4096-byte fragments, 5 GiB free to users (root keeps its 5% apart).
    blocks, free, avail = 7_812_500, 1_408_000, 1_310_720
    return os.statvfs_result((4096, 4096, blocks, free, avail, 1 << 21, 1 << 20, 1 << 20, 0, 255))


def registry(board: str, collectors: list[str] | None = None) -> metrics.Registry:
    host = Host(FIXTURES / board / "root")
    made = {
        "thermal": metrics.ThermalCollector(host),
        "throttling": metrics.ThrottlingCollector(host, vcgencmd=""),
        "memory": metrics.MemoryCollector(host),
        "zram": metrics.ZramCollector(host),
        "cpu": metrics.CpuCollector(host),
        "llama_server": metrics.LlamaServerCollector(dict),
        "bench": metrics.BenchCollector(FIXTURES / board / "state"),
        "blobs": metrics.BlobCollector(
            metrics.BlobStats(bytes_served=3 << 20, requests=Counter({206: 3, 200: 1, 404: 2}))
        ),
        "disk": metrics.DiskCollector(Path("/var/lib/pi-agent"), statvfs=_fake_statvfs),
    }
    names = collectors or list(made)
    return metrics.Registry([made[n] for n in names], host, clock=fake_clock())


@pytest.mark.parametrize("board", ["pi4", "pi5"])
def test_whole_metrics_page_matches_the_golden_file(board: str) -> None:
    text = asyncio.run(registry(board).render())
    golden = FIXTURES / f"{board}.metrics"
    if os.environ.get("PI_AGENT_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_a_failing_source_fails_only_its_collector(tmp_path: Path) -> None:
    host = Host(tmp_path)  # an empty tree: every file is missing
    reg = metrics.Registry(
        [metrics.MemoryCollector(host), metrics.BenchCollector(tmp_path)], host, fake_clock()
    )
    text = asyncio.run(reg.render())
    assert 'pi_agent_scrape_collector_success{collector="memory"} 0' in text
    assert 'pi_agent_scrape_collector_success{collector="bench"} 1' in text
    assert "pi_agent_memory_total_bytes" not in text


def test_throttled_word_decodes_now_and_since_boot() -> None:
    flags = decode_throttled(0x50005)
    assert flags["now"]["under_voltage"] and flags["now"]["throttled"]
    assert not flags["now"]["arm_freq_capped"]
    assert flags["since_boot"]["under_voltage"] and flags["since_boot"]["throttled"]
    assert parse_vcgencmd_throttled("throttled=0x50005\n") == 0x50005
    with pytest.raises(ValueError):
        parse_vcgencmd_throttled("error")


def test_vcgencmd_is_preferred_over_sysfs(tmp_path: Path) -> None:
    fake = tmp_path / "vcgencmd"
    fake.write_text("#!/bin/sh\necho throttled=0x4\n")
    fake.chmod(0o755)
    host = Host(FIXTURES / "pi4" / "root")
    assert host.throttled(str(fake)) == (4, "vcgencmd")
    assert host.throttled("") == (0x50000, "sysfs")


def test_boards_are_named_from_the_device_tree() -> None:
    assert Host(FIXTURES / "pi4" / "root").board() == "pi4"
    assert Host(FIXTURES / "pi5" / "root").board() == "pi5"


def test_llama_server_metrics_are_renamed_with_the_role() -> None:
    text = (
        "# HELP llamacpp:prompt_tokens_total Number of prompt tokens\n"
        "# TYPE llamacpp:prompt_tokens_total counter\n"
        "llamacpp:prompt_tokens_total 36\n"
        "# HELP llamacpp:n_tokens_max Largest sequence\n"
        "# TYPE llamacpp:n_tokens_max counter\n"
        "llamacpp:n_tokens_max 40\n"
    )
    families = {f.name: f for f in metrics.relabel_llama_metrics(text, "decoder")}
    assert families["pi_agent_llamacpp_prompt_tokens_total"].type == "counter"
    assert families["pi_agent_llamacpp_prompt_tokens_total"].samples == [({"role": "decoder"}, 36)]
    assert families["pi_agent_llamacpp_n_tokens_max"].type == "gauge"  # no _total: not a counter


def test_label_values_are_escaped() -> None:
    fam = metrics.gauge("x", "help").add(1, model='a "b"\\c\nd')
    assert fam.render().splitlines()[-1] == 'x{model="a \\"b\\"\\\\c\\nd"} 1'
