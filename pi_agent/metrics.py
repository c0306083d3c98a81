"""Prometheus text exposition (format 0.0.4) and one collector per source.

Each collector reports ``pi_agent_scrape_collector_success`` and
``pi_agent_scrape_collector_duration_seconds`` with its name, like node_exporter's collectors: a
failing source costs its own metrics, never the scrape. The clock is injectable so golden-file
tests can compare the whole output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pi_agent import __version__
from pi_agent.host import Host, decode_throttled

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = Mapping[str, str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


@dataclass
class Family:
    """One metric family: name, type, help and its samples."""

    name: str
    type: str
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Family:
        """Add a sample; returns the family for chaining."""
        self.samples.append((labels, value))
        return self

    def render(self) -> str:
        """The family in the text format."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.type}"]
        for labels, value in self.samples:
            text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(
                f"{self.name}{{{text}}} {format_value(value)}"
                if text
                else f"{self.name} {format_value(value)}"
            )
        return "\n".join(lines) + "\n"


def gauge(name: str, help_text: str) -> Family:
    """An empty gauge family."""
    return Family(name, "gauge", help_text)


def counter(name: str, help_text: str) -> Family:
    """An empty counter family."""
    return Family(name, "counter", help_text)


class Collector(Protocol):
    """One source of metrics."""

    name: str

    async def collect(self) -> list[Family]:
        """The source's families; raising marks the collector failed for this scrape."""
        ...


class ThermalCollector:
    """Every thermal zone's temperature."""

    name = "thermal"

    def __init__(self, host: Host) -> None:
        self.host = host

    async def collect(self) -> list[Family]:
        fam = gauge("pi_agent_thermal_zone_celsius", "Temperature of a thermal zone in °C.")
        for zone, kind, celsius in self.host.thermal_zones():
            fam.add(celsius, zone=zone, type=kind)
        return [fam]


class ThrottlingCollector:
    """The firmware's throttling flags: ``vcgencmd get_throttled`` where present, else sysfs."""

    name = "throttling"

    def __init__(self, host: Host, vcgencmd: str = "") -> None:
        self.host = host
        self.vcgencmd = vcgencmd

    async def collect(self) -> list[Family]:
        reading = await self.host.throttled_async(self.vcgencmd)
        if reading is None:
            raise OSError("neither vcgencmd nor sysfs gives the get_throttled word")
        word, source = reading
        raw = gauge("pi_agent_throttled_raw", "The firmware's get_throttled word.").add(
            word, source=source
        )
        flags = gauge(
            "pi_agent_throttled",
            "Throttling condition (1: active now, or seen since boot when when=since_boot).",
        )
        for when, conditions in decode_throttled(word).items():
            for condition, active in conditions.items():
                flags.add(int(active), condition=condition, when=when)
        return [raw, flags]


MEMINFO_METRICS = (
    ("MemTotal", "pi_agent_memory_total_bytes", "Total usable memory."),
    ("MemFree", "pi_agent_memory_free_bytes", "Unused memory."),
    ("MemAvailable", "pi_agent_memory_available_bytes", "Memory available without swapping."),
    ("Buffers", "pi_agent_memory_buffers_bytes", "Memory in block device buffers."),
    ("Cached", "pi_agent_memory_cached_bytes", "Memory in the page cache."),
    ("SwapTotal", "pi_agent_swap_total_bytes", "Total swap (zram included)."),
    ("SwapFree", "pi_agent_swap_free_bytes", "Unused swap."),
)


class MemoryCollector:
    """``/proc/meminfo``."""

    name = "memory"

    def __init__(self, host: Host) -> None:
        self.host = host

    async def collect(self) -> list[Family]:
        info = self.host.meminfo()
        return [
            gauge(metric, text).add(info[key])
            for key, metric, text in MEMINFO_METRICS
            if key in info
        ]


ZRAM_METRICS = (
    ("disksize", "pi_agent_zram_disksize_bytes", "gauge", "Uncompressed capacity."),
    ("orig_data_size", "pi_agent_zram_orig_data_bytes", "gauge", "Uncompressed data stored."),
    ("compr_data_size", "pi_agent_zram_compr_data_bytes", "gauge", "Compressed data stored."),
    ("mem_used_total", "pi_agent_zram_mem_used_bytes", "gauge", "Memory used, overhead included."),
    ("mem_limit", "pi_agent_zram_mem_limit_bytes", "gauge", "Memory limit (0: none)."),
    ("mem_used_max", "pi_agent_zram_mem_used_max_bytes", "gauge", "Peak memory used."),
    ("same_pages", "pi_agent_zram_same_pages", "gauge", "Same-filled pages (no memory used)."),
    ("pages_compacted", "pi_agent_zram_pages_compacted_total", "counter", "Pages compacted."),
    ("huge_pages", "pi_agent_zram_huge_pages", "gauge", "Incompressible pages."),
)


class ZramCollector:
    """Every zram device's ``mm_stat``, size and algorithm."""

    name = "zram"

    def __init__(self, host: Host) -> None:
        self.host = host

    async def collect(self) -> list[Family]:
        devices = self.host.zram()
        families = []
        for key, metric, kind, text in ZRAM_METRICS:
            fam = Family(metric, kind, text)
            for dev in devices:
                if key in dev:
                    fam.add(dev[key], device=str(dev["device"]))  # type: ignore[arg-type]
            families.append(fam)
        ratio = gauge("pi_agent_zram_compression_ratio", "Uncompressed over compressed size.")
        info = gauge("pi_agent_zram_info", "zram device and its compression algorithm.")
        for dev in devices:
            compressed = int(dev.get("compr_data_size", 0))  # type: ignore[call-overload]
            original = int(dev.get("orig_data_size", 0))  # type: ignore[call-overload]
            ratio.add(
                round(original / compressed, 4) if compressed else 0.0, device=str(dev["device"])
            )
            info.add(1, device=str(dev["device"]), algorithm=str(dev["algorithm"]))
        return [*families, ratio, info]


class CpuCollector:
    """``/proc/stat``, ``/proc/loadavg``, ``/proc/uptime`` and cpufreq."""

    name = "cpu"

    def __init__(self, host: Host) -> None:
        self.host = host

    async def collect(self) -> list[Family]:
        seconds = counter("pi_agent_cpu_seconds_total", "Seconds each CPU spent in each mode.")
        for cpu, modes in self.host.cpu_times():
            for mode, value in modes.items():
                seconds.add(value, cpu=cpu, mode=mode)
        load = gauge("pi_agent_load_average", "Load average over 1, 5 and 15 minutes.")
        for window, value in zip(("1m", "5m", "15m"), self.host.loadavg(), strict=True):
            load.add(value, window=window)
        freq = gauge("pi_agent_cpu_frequency_hertz", "Current CPU frequency (cpufreq).")
        for cpu, hertz in self.host.cpu_frequencies():
            freq.add(hertz, cpu=cpu)
        uptime = gauge("pi_agent_host_uptime_seconds", "Seconds since the host booted.").add(
            self.host.uptime_seconds()
        )
        return [seconds, load, freq, uptime]


_LLAMA_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def relabel_llama_metrics(text: str, role: str) -> list[Family]:
    """llama-server's own ``/metrics`` (``llamacpp:*``) as ``pi_agent_llamacpp_*{role=...}``."""
    families: dict[str, Family] = {}
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            types[name] = kind.strip()
        elif line and not line.startswith("#"):
            match = _LLAMA_LINE.match(line)
            if not match or match.group(2):
                continue
            name = match.group(1)
            new = "pi_agent_llamacpp_" + re.sub(r"^llamacpp:", "", name).replace(":", "_")
            kind = types.get(name, "untyped")
            if kind == "counter" and not new.endswith("_total"):
                kind = "gauge"  # llama.cpp names some counters without _total
            fam = families.setdefault(new, Family(new, kind, helps.get(name, name)))
            fam.add(float(match.group(3)), role=role)
    return list(families.values())


class LlamaServerCollector:
    """Supervisor state, llama-server's own metrics and its slots, per role."""

    name = "llama_server"

    def __init__(self, supervisors: Callable[[], Mapping[str, Any]]) -> None:
        self.supervisors = supervisors

    async def collect(self) -> list[Family]:
        up = gauge("pi_agent_llama_server_up", "1 when the llama-server answers its health check.")
        restarts = counter("pi_agent_llama_server_restarts_total", "llama-server restarts.")
        state = gauge("pi_agent_llama_server_state", "Supervisor state of the llama-server.")
        slots = gauge("pi_agent_llama_server_slots", "llama-server slots by state.")
        extra: list[Family] = []
        errors = []
        for role, sup in self.supervisors().items():
            up.add(int(sup.state == "ready"), role=role)
            restarts.add(sup.restarts, role=role)
            for name in sup.STATES:
                state.add(int(sup.state == name), role=role, state=name)
            if sup.state != "ready":
                continue
            try:
                text, slot_list = await sup.scrape()
            except (OSError, ValueError, TimeoutError) as exc:
                errors.append(f"{role}: {exc}")
                continue
            extra.extend(relabel_llama_metrics(text, role))
            busy = sum(1 for s in slot_list if s.get("is_processing"))
            slots.add(busy, role=role, state="processing")
            slots.add(len(slot_list) - busy, role=role, state="idle")
        merged: dict[str, Family] = {}
        for fam in extra:
            if fam.name in merged:
                merged[fam.name].samples.extend(fam.samples)
            else:
                merged[fam.name] = fam
        if errors:
            raise OSError("; ".join(errors))
        return [up, restarts, state, slots, *merged.values()]


class BenchCollector:
    """The last benchmark: tokens/s per test, the prediction and the gate."""

    name = "bench"

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "bench" / "last.json"

    async def collect(self) -> list[Family]:
        tps = gauge("pi_agent_bench_tokens_per_second", "Measured tokens/s of the last benchmark.")
        pred = gauge(
            "pi_agent_bench_predicted_tokens_per_second",
            "Tokens/s the throughput regressor expected.",
        )
        gate = gauge("pi_agent_bench_gate_pass", "1 when the last benchmark passed the gate.")
        when = gauge("pi_agent_bench_timestamp_seconds", "When the last benchmark ended.")
        if not self.path.is_file():
            return [tps, pred, gate, when]
        last = json.loads(self.path.read_text())
        for row in last["results"]:
            labels = {"test": row["test"], "threads": str(row["threads"])}
            tps.add(row["tokens_per_second"], **labels)
            if row.get("predicted") is not None:
                pred.add(row["predicted"], **labels)
        gate.add(int(last["gate"]["passed"]))
        when.add(last["finished_at"])
        return [tps, pred, gate, when]


@dataclass
class BlobStats:
    """What ``/v1/blobs`` served since the agent started (the agent counts, the collector reads)."""

    bytes_served: int = 0
    requests: Counter[int] = field(default_factory=Counter)


class BlobCollector:
    """Model files served to peers: bytes sent and requests by status."""

    name = "blobs"

    def __init__(self, stats: BlobStats) -> None:
        self.stats = stats

    async def collect(self) -> list[Family]:
        served = counter(
            "pi_agent_blob_bytes_served_total", "Bytes of model files sent from /v1/blobs."
        ).add(self.stats.bytes_served)
        requests = counter("pi_agent_blob_requests_total", "Requests to /v1/blobs by HTTP status.")
        for status, count in sorted(self.stats.requests.items()):
            requests.add(count, status=str(status))
        return [served, requests]


class DiskCollector:
    """Free and total bytes of the file system holding the agent's state (models, CSVs, logs):
    what an install needs room on."""

    name = "disk"

    def __init__(
        self, path: Path, statvfs: Callable[[Path], os.statvfs_result] = os.statvfs
    ) -> None:
        self.path = Path(path)
        self.statvfs = statvfs

    async def collect(self) -> list[Family]:
        st = await asyncio.to_thread(self.statvfs, self.path)
        labels = {"path": str(self.path)}
        avail = gauge(
            "pi_agent_filesystem_avail_bytes", "Bytes free to the agent (non-root) on its state."
        )
        size = gauge("pi_agent_filesystem_size_bytes", "Size of the file system of its state.")
        return [
            avail.add(st.f_bavail * st.f_frsize, **labels),
            size.add(st.f_blocks * st.f_frsize, **labels),
        ]


class Registry:
    """The collectors of one agent; ``render()`` is the whole ``/metrics`` page."""

    def __init__(
        self,
        collectors: Iterable[Collector],
        host: Host,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.collectors = list(collectors)
        self.host = host
        self.clock = clock

    def _info(self) -> list[Family]:
        build = gauge("pi_agent_build_info", "pi-agent version.").add(1, version=__version__)
        board = gauge("pi_agent_board_info", "Board model from the device tree.")
        try:
            board.add(1, model=self.host.board_model(), board=self.host.board())
        except OSError:
            board.add(1, model="unknown", board="unknown")
        return [build, board]

    async def render(self) -> str:
        """Run every collector (concurrently) and write the exposition."""

        async def timed(collector: Collector) -> tuple[list[Family], bool, float]:
            start = self.clock()
            try:
                families, ok = await collector.collect(), True
            except Exception as exc:  # one failing source must not fail the scrape
                log.debug("collector %s failed: %s", collector.name, exc)
                families, ok = [], False
            return families, ok, self.clock() - start

        results = await asyncio.gather(*(timed(c) for c in self.collectors))
        success = gauge("pi_agent_scrape_collector_success", "1 when the collector succeeded.")
        duration = gauge("pi_agent_scrape_collector_duration_seconds", "Time the collector took.")
        parts = [fam.render() for fam in self._info()]
        for collector, (families, ok, took) in zip(self.collectors, results, strict=True):
            parts.extend(fam.render() for fam in families if fam.samples)
            success.add(int(ok), collector=collector.name)
            duration.add(round(took, 6), collector=collector.name)
        parts += [success.render(), duration.render()]
        return "".join(parts)
